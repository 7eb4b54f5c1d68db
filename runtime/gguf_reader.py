"""Reading a llama.cpp GGUF file as a float checkpoint: config, fp32 weights in HF names, tokenizer.

A GGUF file holds everything a Hugging Face directory holds, spelled the llama.cpp way:
- the config as metadata (``llama.block_count``, ``llama.rope.freq_base``, ...),
- quantized tensors under llama.cpp names (``blk.3.attn_q.weight``), dequantized here with
  ``gguf.quants.dequantize``; for the llama architecture the Q/K rows are permuted for llama.cpp's
  interleaved rotary embedding and are permuted back (``_unpermute_qk``, the inverse of ``permute`` in
  llama.cpp's ``convert_hf_to_gguf.py``; transformers' GGUF loader does the same),
- the tokenizer as ``tokenizer.ggml.*`` metadata, rebuilt here into a ``tokenizers`` JSON (byte-level
  BPE with the pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre``),
- the chat template as ``tokenizer.chat_template``.

References: GGUF spec (github.com/ggml-org/ggml/blob/master/docs/gguf.md); llama.cpp
``convert_hf_to_gguf.py`` and ``src/llama-vocab.cpp`` (pre-tokenizer regexes).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig

# GGUF general.architecture -> HF architecture. llama.cpp writes Mistral (v0.1-v0.3) as "llama".
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp tensor name (inside blk.N) -> HF module name (inside model.layers.N)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# GGUF token types (llama.cpp llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer split regexes, by tokenizer.ggml.pre (llama.cpp src/llama-vocab.cpp; same strings as the
# tokenizer.json files of those models).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O_SPLIT),
}
# GPT-2 byte-level regex after splitting every digit on its own (SmolLM/StarCoder: HF `Digits` + `ByteLevel`).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_PLAIN_GPT2 = {"default", "gpt2", "gpt-2", "olmo", "jais", "stablelm2", "poro-chat", "viking", "mpt", "gpt3-finnish"}


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str, dict[str, Any]]:
    """``(config, state_dict (HF names, fp32), tokenizer_json, tokenizer_config)`` of a GGUF file.

    Raises ``ValueError`` with one sentence for a corrupt/truncated file, an unsupported architecture
    or tokenizer, or tensors that do not fit the config.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # truncated or corrupt: numpy/struct errors of all kinds
        raise ValueError(f"{path} is not a readable GGUF file: truncated or corrupt ({exc})") from None
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    tensor_names = [t.name for t in reader.tensors]
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    embed_rows = int(embed.shape.tolist()[-1])  # GGUF lists (hidden, vocab)
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{path}: GGUF files with a rope_freqs tensor (Llama 3.1-style rope scaling) are not supported; "
            "load the Hugging Face checkpoint directory instead"
        )
    config = _config_from_metadata(meta, tensor_names, embed_rows, path)
    tokenizer_json = build_tokenizer_json(meta, path)  # before the slow part: fail fast on an unsupported vocabulary
    state_dict = _read_tensors(reader, config, arch, path)
    tokenizer_config = _tokenizer_config(meta, config)
    return config, state_dict, tokenizer_json, tokenizer_config


# -- metadata ----------------------------------------------------------------------------------------
def _metadata(reader, path: Path) -> dict[str, Any]:
    """All key/value fields as Python values (strings decoded, arrays as lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as exc:
            raise ValueError(f"{path}: corrupt GGUF metadata field {key!r} ({exc})") from None
    return meta


def _config_from_metadata(meta: dict[str, Any], tensor_names: list[str], vocab_size: int, path: Path) -> ModelConfig:
    arch = meta["general.architecture"]

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata lacks {full!r}")
        return default

    hf_arch = GGUF_ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        hf_arch = "MistralForCausalLM"  # numerically a Llama; same choice as transformers' GGUF loader
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = key("attention.key_length", None)
    rope_scaling = None
    scaling_type = key("rope.scaling.type", None)
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ValueError(f"{path}: GGUF rope scaling {scaling_type!r} is not supported; supported: linear")
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=vocab_size,  # rows of token_embd (may exceed the tokenizer's vocabulary)
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(head_dim) if head_dim is not None else None,
        max_position_embeddings=int(key("context_length", 4096)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


# -- tensors -----------------------------------------------------------------------------------------
def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name of a llama.cpp tensor name, or ``None`` if it is not one we know."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}" if part in _LAYER_TENSORS else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_TENSORS[base]}.{kind}" if base in _GLOBAL_TENSORS else None


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute(w, n_head)``: rows (n_head, 2, D/2) -> (n_head, D/2, 2) interleave undone.

    llama.cpp stores each head's rows as [r0, r_{D/2}, r1, r_{D/2+1}, ...] (pairs for its interleaved
    rotary); HF keeps the half-split order [r0..r_{D/2-1}, r_{D/2}..r_{D-1}].
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_tensors(reader, config: ModelConfig, arch: str, path: Path) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from tqdm import tqdm

    state_dict: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", leave=False):
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for a {arch} GGUF")
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{path}: tensor {tensor.name} uses GGML type {tensor.tensor_type.name}, which the gguf package "
                "cannot dequantize"
            ) from None
        except Exception as exc:
            raise ValueError(f"{path}: tensor {tensor.name} is corrupt or truncated ({exc})") from None
        # GGUF shapes are listed innermost first; numpy data is (rows, cols)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = np.array(values, dtype=np.float32, copy=True).reshape(shape)  # own memory, not the file's mmap
        if arch == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            n_head = config.num_attention_heads if ".attn_q." in tensor.name else config.num_key_value_heads
            values = _unpermute_qk(values, n_head)
        state_dict[name] = torch.from_numpy(np.ascontiguousarray(values))  # (out, in) / (n,)
    return state_dict


# -- tokenizer ---------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer_json(meta: dict[str, Any], path: Path | str = "<gguf>") -> str:
    """A ``tokenizers`` JSON for the tokenizer the ``tokenizer.ggml.*`` metadata describes.

    ``tokenizer.ggml.model`` "gpt2": byte-level BPE (SmolLM2, Llama 3, Qwen2); "llama": SentencePiece BPE
    with byte fallback (Llama 2, Mistral), rebuilt as transformers' ``LlamaTokenizer`` does.
    """
    from tokenizers import AddedToken, processors

    model_type = meta.get("tokenizer.ggml.model")
    if model_type not in ("gpt2", "llama"):
        raise ValueError(
            f"{path}: GGUF tokenizer model {model_type!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece BPE)"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if model_type == "gpt2":
        tok, in_vocab = _byte_level_bpe(meta, tokens, path)
    else:
        tok, in_vocab = _sentencepiece_bpe(meta, tokens, path)

    # Control tokens and the named ones (BOS/EOS/UNK/PAD) become special added tokens, user-defined ones plain
    # added tokens (matched whole). A "control" token the model's vocabulary cannot spell is a llama.cpp
    # mislabel and is left alone, like transformers does.
    named = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    specials = [
        AddedToken(t, special=True, normalized=False)
        for i, (t, ty) in enumerate(zip(tokens, token_types))
        if (ty == _TOKEN_CONTROL or i in named) and in_vocab(t)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, token_types)
        if ty == _TOKEN_USER_DEFINED and in_vocab(t)
    ]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    assert tok.get_vocab_size(with_added_tokens=True) == len(tokens), "added tokens must reuse vocabulary ids"

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    single, special_tokens = "$A", []
    if _adds_bos(meta) and bos_id is not None:
        single = f"{tokens[bos_id]} $A"
        special_tokens.append((tokens[bos_id], int(bos_id)))
    if meta.get("tokenizer.ggml.add_eos_token") and eos_id is not None:
        single = f"{single} {tokens[eos_id]}"
        if all(t != tokens[eos_id] for t, _ in special_tokens):
            special_tokens.append((tokens[eos_id], int(eos_id)))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B:1".replace("$A", "$A:0"), special_tokens=special_tokens
    )
    return tok.to_str()


def _adds_bos(meta: dict[str, Any]) -> bool:
    """llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise (older files have no flag)."""
    default = meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], path: Path | str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ValueError(f"{path}: GGUF byte-level tokenizer has no merges (tokenizer.ggml.merges)")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; a few files store special tokens as raw text: respell those.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _SPLIT_BY_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in _PLAIN_GPT2:
            warnings.warn(f"{path}: unknown GGUF pre-tokenizer {pre!r}; using GPT-2's byte-level split", stacklevel=3)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok, lambda t: set(t) <= alphabet


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], path: Path | str):
    """SentencePiece BPE: pieces with "▁" for spaces, byte fallback ``<0xNN>``, merges recovered from scores.

    Merges are every split of a piece into two pieces of the vocabulary, best (highest) piece score first,
    ties by the pieces' lengths: transformers' ``generate_merges``, so ids match its GGUF conversion.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ValueError(f"{path}: GGUF SentencePiece tokenizer needs one score per token (tokenizer.ggml.scores)")
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        candidates.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    merges = [(left, right) for left, right, _ in candidates]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, lambda t: t in vocab


def _tokenizer_config(meta: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """``tokenizer_config.json`` contents (HF keys) for the GGUF tokenizer."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": _adds_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
    }
    if meta.get("tokenizer.chat_template"):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out
