"""Helpers shared by the CLI verbs: resolving ``--model`` and loading scale files."""
from __future__ import annotations

import argparse
from pathlib import Path

MODEL_HELP = "a quantized base directory, a GGUF file or a Hugging Face directory (default: the default model, SmolLM2-135M-Instruct)"


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)


def resolve_quantized_base(model: str | None, bits: int = 4, group_size: int = 64) -> Path:
    """``--model`` -> a quantized-base directory: the cached default base, or the given directory."""
    from scaleswap.runtime.quantize import ensure_default_base, is_quantized_base

    if model is None:
        return ensure_default_base(bits, group_size)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if not is_quantized_base(path):
        raise ValueError(
            f"{path} is not a quantized base; make one with `scaleswap quantize --model {path} --out DIR`"
        )
    return path
