"""A small real base for fine-tuning tests: the default model cut to its first decoder layers, then quantized.

Real embeddings, real first layers, real final norm and tokenizer (so the chat template and the loss are
meaningful), but ~1/15 of the compute of the full 30-layer model, so a training step takes a fraction of a
second on 2 cores instead of many seconds. Built once per machine under ``$SCALESWAP_CACHE/test-bases``
(like the default base of ``ensure_default_base``), with a file lock so parallel sessions build it once.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def build_tiny_base(num_layers: int = 2, bits: int = 4, group_size: int = 64) -> Path:
    from scaleswap.runtime.checkpoint import load_checkpoint
    from scaleswap.runtime.config import QuantConfig
    from scaleswap.runtime.quantize import cached_base, quantize_checkpoint

    def build(out_dir: Path) -> None:
        ckpt = load_checkpoint(None)  # the default model (SmolLM2-135M-Instruct)
        keep = tuple(f"model.layers.{i}." for i in range(num_layers))
        state = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("model.layers.") or k.startswith(keep)}
        ckpt = replace(ckpt, config=replace(ckpt.config, num_hidden_layers=num_layers), state_dict=state)
        quantize_checkpoint(ckpt, QuantConfig(bits=bits, group_size=group_size), out_dir,
                            source="tests: default model, first layers", show_progress=False)

    gs = "pc" if group_size == -1 else f"g{group_size}"
    return cached_base("test-bases", f"SmolLM2-135M-Instruct-first{num_layers}-{bits}bit-{gs}", build)
