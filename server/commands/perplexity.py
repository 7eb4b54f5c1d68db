"""``scaleswap perplexity``: perplexity of a (quantized or float) model on a text file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model (optionally with a tenant's scale set) on a text file")
    p.add_argument("--model", default=None, help=MODEL_HELP + "; a float checkpoint is evaluated unquantized")
    p.add_argument("--scales", default=None, help="a scale-set .safetensors to evaluate instead of the base scales")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    p.set_defaults(func=run)


def load_model_for_eval(model: str | None, scales: str | None):
    """-> (model, tokenizer, scale_override or None). Quantized bases load as such; float checkpoints in float32."""
    from scaleswap.runtime.quantize import is_quantized_base, load_quantized

    from ._common import resolve_quantized_base

    if model is None or is_quantized_base(model):
        qm = load_quantized(resolve_quantized_base(model))
        override = None
        if scales:
            from scaleswap.runtime.scale_set import load_scale_set

            ss = load_scale_set(scales, qm.base_info)
            override = {k: v.unsqueeze(0) for k, v in ss.scales.items()}
        return qm.model, qm.tokenizer, override
    if scales:
        raise ValueError("--scales needs a quantized base as --model (scale sets belong to a quantized base)")
    from scaleswap.runtime.checkpoint import load_checkpoint
    from scaleswap.runtime.model import LlamaForCausalLM
    from scaleswap.runtime.tokenizer import Tokenizer

    ckpt = load_checkpoint(model)
    m = LlamaForCausalLM(ckpt.config)
    m.load_state_dict(ckpt.state_dict, strict=False)
    if ckpt.config.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    return m.eval().requires_grad_(False), Tokenizer.from_checkpoint(ckpt), None


def run(args: argparse.Namespace) -> int:
    from scaleswap.runtime.perplexity import perplexity

    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"text file not found: {text_path}")
    text = text_path.read_text(encoding="utf-8")
    model, tokenizer, override = load_model_for_eval(args.model, args.scales)
    ids = tokenizer.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    result = perplexity(model, ids, context=args.context, scale_override=override, show_progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens (mean NLL {result['nll']:.4f})")
    return 0
