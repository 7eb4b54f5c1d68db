"""Loading a float checkpoint: a Hugging Face directory or a llama.cpp GGUF file.

``load_checkpoint(src)`` returns a ``FloatCheckpoint``: the ``ModelConfig``, every weight as an fp32
tensor under its Hugging Face name (``model.layers.0.self_attn.q_proj.weight``), and the tokenizer as
``tokenizer.json`` text plus the ``tokenizer_config.json`` dict (with ``chat_template``).

- ``src=None``: the default model (``default_model.default_model_path()``).
- A directory: ``config.json``; ``model.safetensors`` or a sharded ``model.safetensors.index.json``;
  ``tokenizer.json``; ``tokenizer_config.json`` (optional), the chat template from it or from
  ``chat_template.jinja`` / ``chat_template.json``; ``generation_config.json`` (optional, extra EOS ids).
- A ``.gguf`` file (recognised by its magic): see ``gguf_reader``.

With tied embeddings the state dict holds no ``lm_head.weight`` (the model ties it to
``model.embed_tokens.weight``). Every tensor is checked against the config's shapes.

User errors (missing path, corrupt file, unsupported architecture, shapes that do not match) raise
``FileNotFoundError`` / ``ValueError`` with one clear sentence; the CLI prints it and exits 2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig

_GGUF_MAGIC = b"GGUF"


@dataclass
class FloatCheckpoint:
    """A float model as loaded: config, fp32 weights in HF names, tokenizer files' contents."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where it came from (path), for provenance in quant_config.json


def load_checkpoint(src: str | Path | None) -> FloatCheckpoint:
    """Load a HF directory or GGUF file (``None``: the default model) as an fp32 ``FloatCheckpoint``."""
    if src is None:
        from .default_model import default_model_path

        src = default_model_path()
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a Hugging Face directory or a .gguf file)")
    if path.is_dir():
        ckpt = _load_hf_dir(path)
    elif _is_gguf(path):
        from .gguf_reader import load_gguf

        config, state_dict, tokenizer_json, tokenizer_config = load_gguf(path)
        ckpt = FloatCheckpoint(config, state_dict, tokenizer_json, tokenizer_config, str(path))
    else:
        raise ValueError(
            f"{path} is neither a GGUF file (no GGUF magic) nor a Hugging Face checkpoint directory"
        )
    validate_state_dict(ckpt.config, ckpt.state_dict, str(path))
    return ckpt


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


# -- Hugging Face directory ----------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _load_hf_dir(path: Path) -> FloatCheckpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json; it is not a Hugging Face checkpoint directory")
    config_dict = _read_json(config_path)
    try:
        config = ModelConfig.from_hf_dict(config_dict)
    except KeyError as exc:
        raise ValueError(f"{config_path} lacks the required field {exc.args[0]!r}") from None
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        gen_eos = _read_json(gen_path).get("eos_token_id")
        if gen_eos is not None:
            merged = config.eos_token_ids + [e for e in ([gen_eos] if isinstance(gen_eos, int) else gen_eos)
                                             if e not in config.eos_token_ids]
            config.eos_token_id = merged[0] if len(merged) == 1 else merged
    state_dict = _load_safetensors_weights(path)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    tokenizer_json, tokenizer_config = read_tokenizer_files(path)
    return FloatCheckpoint(config, state_dict, tokenizer_json, tokenizer_config, str(path))


def _load_safetensors_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.is_file():
        files = [single]
    elif index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} listed in {index_path.name} is missing from {path}")
    else:
        raise FileNotFoundError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json (only safetensors weights are read)"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{f} is not a readable safetensors file ({exc})") from None
        for name, t in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved; recomputed from the config
            if not t.is_floating_point():
                raise ValueError(f"{f}: tensor {name} has dtype {t.dtype}; a float checkpoint is expected")
            state_dict[name] = t.to(torch.float32)
    return state_dict


def read_tokenizer_files(path: Path) -> tuple[str, dict[str, Any]]:
    """``(tokenizer.json text, tokenizer_config dict with chat_template)`` of a HF directory."""
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json (a fast tokenizer file is required)")
    tokenizer_json = tok_path.read_text(encoding="utf-8")
    cfg_path = path / "tokenizer_config.json"
    tokenizer_config = _read_json(cfg_path) if cfg_path.is_file() else {}
    if not isinstance(tokenizer_config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")
    template = tokenizer_config.get("chat_template")
    jinja_path, json_path = path / "chat_template.jinja", path / "chat_template.json"
    if jinja_path.is_file():
        template = jinja_path.read_text(encoding="utf-8")
    elif json_path.is_file():
        template = _read_json(json_path).get("chat_template", template)
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template:
        tokenizer_config["chat_template"] = template
    else:
        tokenizer_config.pop("chat_template", None)
    return tokenizer_json, tokenizer_config


# -- validation ----------------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Llama-family model in HF names, with its shape (no ``lm_head`` when tied)."""
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    D = config.head_dim
    q_out, kv_out = config.num_attention_heads * D, config.num_key_value_heads * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (H,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (H,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_out, H)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_out, H)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_out, H)
        shapes[f"{p}.self_attn.o_proj.weight"] = (H, q_out)
        shapes[f"{p}.mlp.gate_proj.weight"] = (I, H)
        shapes[f"{p}.mlp.up_proj.weight"] = (I, H)
        shapes[f"{p}.mlp.down_proj.weight"] = (H, I)
        if config.attention_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (q_out,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (kv_out,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (kv_out,)
        if config.mlp_bias:
            shapes[f"{p}.mlp.gate_proj.bias"] = (I,)
            shapes[f"{p}.mlp.up_proj.bias"] = (I,)
            shapes[f"{p}.mlp.down_proj.bias"] = (H,)
    return shapes


def validate_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Raise ``ValueError`` unless ``state_dict`` holds exactly the config's parameters with the right shapes."""
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in state_dict]
    unexpected = [n for n in state_dict if n not in shapes]
    if missing:
        raise ValueError(f"{where}: {len(missing)} weights missing for this config, e.g. {missing[0]}")
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} unexpected weights for this config, e.g. {unexpected[0]}")
    for name, shape in shapes.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise ValueError(f"{where}: weight {name} has shape {got}, the config implies {shape}")
        assert state_dict[name].dtype == torch.float32
