"""A small real base for fine-tuning tests: the default model cut to its first decoder layers, then quantized.

Real embeddings, real first layers, real final norm and tokenizer (so the chat template and the loss are
meaningful), but ~1/15 of the compute of the full 30-layer model, so a training step takes a fraction of a
second on 2 cores instead of many seconds. Built once per test session under pytest's tmp dir.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def build_tiny_base(out_dir: Path, num_layers: int = 2, bits: int = 4, group_size: int = 64) -> Path:
    from scaleswap.runtime.checkpoint import load_checkpoint
    from scaleswap.runtime.config import QuantConfig
    from scaleswap.runtime.quantize import is_quantized_base, quantize_checkpoint

    out_dir = Path(out_dir)
    if is_quantized_base(out_dir):
        return out_dir
    ckpt = load_checkpoint(None)  # the default model (SmolLM2-135M-Instruct)
    keep = {f"model.layers.{i}." for i in range(num_layers)}
    state = {k: v for k, v in ckpt.state_dict.items()
             if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)}
    ckpt = replace(ckpt, config=replace(ckpt.config, num_hidden_layers=num_layers), state_dict=state)
    return quantize_checkpoint(ckpt, QuantConfig(bits=bits, group_size=group_size), out_dir,
                               source="tests: default model, first layers", show_progress=False)
