"""``scaleswap generate``: one completion from a quantized base (optionally under a tenant's scale set)."""
from __future__ import annotations

import argparse
import sys

from ._common import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for PROMPT (with --chat: a user message)")
    p.add_argument("--model", default=None, help=MODEL_HELP.replace("a GGUF file or a Hugging Face directory", "made by `scaleswap quantize`"))
    p.add_argument("--scales", default=None, help="a scale-set .safetensors to use instead of the base scales")
    p.add_argument("--chat", action="store_true", help="treat PROMPT as a user message under the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=("fast", "fp32"), default="fast",
                   help="CPU arithmetic: fast (default) or fp32 (float32 throughout; see `scaleswap serve --help`)")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scaleswap.runtime.config import EngineConfig, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    from scaleswap.runtime.engine import Engine
    from scaleswap.runtime.quantize import load_quantized

    from ._common import resolve_quantized_base

    qm = load_quantized(resolve_quantized_base(args.model))
    tenant, scales = None, None
    if args.scales:
        from scaleswap.runtime.scale_set import load_scale_set

        scales = load_scale_set(args.scales, qm.base_info).scales  # validated before anything runs
        tenant = "cli"
    loader = (lambda _tenant, _version: scales) if scales is not None else None

    engine = Engine(qm, EngineConfig(max_num_seqs=1, kv_cache_memory_bytes=64 * 2**20, scale_bank_memory_bytes=16 * 2**20,
                                 precision=args.precision),
                    scale_loader=loader)
    if tenant is not None:
        engine.set_tenant_version(tenant, 1)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt = engine.chat_prompt(messages)
    (result,) = engine.generate_batch([prompt], params, tenants=[tenant])
    if result.error:
        raise RuntimeError(result.error)
    sys.stdout.write(result.text + ("\n" if not result.text.endswith("\n") else ""))
    return 0
