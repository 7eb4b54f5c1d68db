"""The ``scaleswap`` command line: one verb per module in ``scaleswap.server.commands``.

Each verb module exposes ``register(subparsers)``, which adds its subparser and sets ``func(args) -> int``.
Verb modules import torch and the runtime lazily, so ``scaleswap --help`` stays fast. User errors (bad paths,
corrupt checkpoints, invalid options) print one line ``error: ...`` and exit with code 2, no traceback;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("quantize", "generate", "perplexity", "serve", "finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaleswap",
        description="Multi-tenant serving of one low-bit LLM (PEQA): quantize a base, serve tenants' scale sets, fine-tune scales.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        try:
            module = importlib.import_module(f"scaleswap.server.commands.{verb}")
        except ModuleNotFoundError as e:  # a verb not installed in this build
            if e.name == f"scaleswap.server.commands.{verb}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # user errors: bad input, missing/corrupt files
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
