"""``scaleswap quantize``: float checkpoint (GGUF, HF directory or the default model) -> quantized base."""
from __future__ import annotations

import argparse
import sys

from ._common import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a float model into a shared integer base + base scale set")
    p.add_argument("--model", default=None, help=MODEL_HELP.replace("a quantized base directory, ", ""))
    p.add_argument("--bits", type=int, default=4, help="integer width: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="-1 (per output channel), 32, 64 or 128 (default 64)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--float-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage dtype of embeddings, norms and LM head (default float32)")
    p.add_argument("--no-mse-clip", action="store_true", help="plain min/max RTN without the clipping search")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scaleswap.runtime.config import QuantConfig

    quant = QuantConfig(bits=args.bits, group_size=args.group_size)  # validates before loading anything
    from scaleswap.runtime.checkpoint import load_checkpoint
    from scaleswap.runtime.default_model import default_model_path
    from scaleswap.runtime.quantize import quantize_checkpoint

    src = args.model or default_model_path()
    ckpt = load_checkpoint(src)
    out = quantize_checkpoint(
        ckpt, quant, args.out, float_dtype=args.float_dtype, mse_clip=not args.no_mse_clip, source=str(src)
    )
    print(f"wrote quantized base to {out}", file=sys.stderr)
    return 0
