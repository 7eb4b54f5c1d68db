"""Reference objects shared by the checkpoint/tokenizer/parity tests, each built once per process.

- the default GGUF, loaded by us and by transformers (``from_pretrained(dir, gguf_file=...)``);
- tiny random transformers models (Llama, Qwen2 with biases, Mistral, Llama with llama3 rope scaling)
  saved as HF directories;
- a writer for tiny llama.cpp-style GGUF files (Q/K permuted as llama.cpp's converter does), so the
  GGUF path is checked against weights we know independently of transformers.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch


@functools.cache
def default_gguf_path() -> Path:
    from scaleswap.runtime.default_model import default_model_path

    return default_model_path()


@functools.cache
def our_default_checkpoint():
    from scaleswap.runtime.checkpoint import load_checkpoint

    return load_checkpoint(default_gguf_path())


@functools.cache
def hf_default_model():
    """transformers' own GGUF load of the default model, fp32, eval."""
    from transformers import AutoModelForCausalLM

    p = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval()


@functools.cache
def hf_default_tokenizer():
    from transformers import AutoTokenizer

    p = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


# -- tiny random HF models ------------------------------------------------------------------------------
TINY_ARCHS = ("llama", "qwen2", "mistral", "llama3-rope-untied")


def tiny_hf_model(kind: str, seed: int = 0, vocab_size: int = 301):
    """A small random transformers model of ``kind`` (fp32, eval), with non-trivial norms and biases."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif kind == "llama3-rope-untied":
        cfg = transformers.LlamaConfig(
            **common, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all-ones: a wrong norm mapping must show
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.08)
    return model


def save_tiny_hf_dir(model, path: Path, max_shard_size: str | None = None) -> Path:
    """save_pretrained (safetensors; sharded when max_shard_size is given) plus our GGUF-derived tokenizer."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    from scaleswap.runtime.tokenizer import Tokenizer

    Tokenizer.from_checkpoint(our_default_checkpoint()).save(path)
    return path


# -- tiny GGUF files ------------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: half-split rotary rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TINY_MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ 1", "1 2", "Ġ Ġ", "ĠĠ ĠĠ", "r e", "Ċ Ċ", "a t"]
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer_metadata() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) of a small byte-level BPE vocabulary: specials, 256 bytes, merged tokens."""
    tokens = list(TINY_SPECIALS) + list(bytes_to_unicode().values())
    for m in TINY_MERGES:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    return tokens, types, list(TINY_MERGES)


SPM_PIECES = ["\u2581", "t", "h", "e", "a", "c", "i", "n", "s", "\u2581t", "he", "\u2581the", "\u2581a", "at",
              "\u2581c", "\u2581cat", "in", "\u2581in", "is", "\u2581is", "1", "2", "\u00e9", "\u2581\u2581", "x"]


def tiny_spm_metadata() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token_types, scores) of a small SentencePiece vocabulary: <unk> <s> </s>, 256 byte pieces,
    scored pieces, a control token and a user-defined one (llama.cpp token types 2/3/6/1/4)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<|im_start|>", "[INST]"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0, 0.0]
    return tokens, types, scores


def write_tiny_gguf(
    path: Path,
    hf_model=None,
    arch: str = "llama",
    pre: str = "llama-bpe",
    quant: str = "F32",
    chat_template: str | None = None,
    add_bos: bool | None = False,
    name: str = "tiny",
    tokenizer: str = "gpt2",
) -> Path:
    """A GGUF file as llama.cpp's converter writes it, from a tiny HF model's weights.

    ``quant``: "F32", "F16" or "Q8_0" for the 2-D weights (Q8_0 needs in_features % 32 == 0).
    ``tokenizer``: "gpt2" (byte-level BPE, ``tiny_tokenizer_metadata``) or "llama" (SentencePiece,
    ``tiny_spm_metadata``). ``add_bos=None`` writes no flag.
    """
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    if hf_model is not None:
        c = hf_model.config
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    if tokenizer == "gpt2":
        tokens, types, merges = tiny_tokenizer_metadata()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_pad_token_id(2)
    else:
        tokens, types, scores = tiny_spm_metadata()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
    if hf_model is not None:
        _add_tensors(w, hf_model, arch, quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _add_tensors(w, hf_model, arch: str, quant: str) -> None:
    import gguf

    c = hf_model.config
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy().copy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_TO_GGUF[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if module.endswith("q_proj") else c.num_key_value_heads
                a = llama_cpp_permute(a, heads)
        if a.ndim == 2 and quant == "Q8_0":
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif a.ndim == 2 and quant == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, a.astype(np.float32))


def gguf_reference_weights(hf_model, quant: str) -> dict[str, torch.Tensor]:
    """What a lossless reader must return for a GGUF written with ``quant``: the HF weights after that rounding."""
    import gguf

    out = {}
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy()
        if a.ndim == 2 and quant == "Q8_0":
            a = gguf.quants.dequantize(gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                                       gguf.GGMLQuantizationType.Q8_0)
        elif a.ndim == 2 and quant == "F16":
            a = a.astype(np.float16).astype(np.float32)
        out[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))
