"""``scaleswap finetune``: PEQA fine-tuning offline; writes a scale set that ``PUT /v1/tenants/{id}/scales`` accepts.

Trains only the quantization scales of a quantized base on a JSONL file of the shapes OpenAI's fine-tuning API
takes (``messages`` / ``prompt``+``completion`` / ``text``), with a progress bar and the loss of every step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="train a tenant's scale set (PEQA) on a JSONL file, offline")
    p.add_argument("--model", default=None, help=MODEL_HELP.replace(", a GGUF file or a Hugging Face directory", ""))
    p.add_argument("--bits", type=int, default=4, help="with the default model: bits of its cached base (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="with the default model: group size (default 64)")
    p.add_argument("--data", required=True, help="training JSONL: {messages}, {prompt, completion} or {text} per line")
    p.add_argument("--out", required=True, help="output scale set (.safetensors)")
    p.add_argument("--validation", default=None, help="held-out JSONL (default: --validation-split of --data)")
    p.add_argument("--validation-split", type=float, default=0.0, help="fraction of --data held out (default 0)")
    p.add_argument("--init-scales", default=None, help="start from this scale set instead of the base scales")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    steps.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate on log-scales (default 2e-2)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of the steps)")
    p.add_argument("--schedule", default="cosine", help="cosine, linear or constant (default cosine)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled decay toward the starting scales")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per example (default 512)")
    p.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (default: start and end)")
    p.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scaleswap.runtime.trainer import TrainingConfig

    cfg_kwargs = dict(n_epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size,
                      grad_accum_steps=args.grad_accum, warmup_steps=args.warmup, schedule=args.schedule,
                      weight_decay=args.weight_decay, max_seq_len=args.max_seq_len, eval_every=args.eval_every,
                      gradient_checkpointing=not args.no_checkpointing, seed=args.seed, num_threads=args.threads)
    if args.lr is not None:
        cfg_kwargs["learning_rate"] = args.lr
    cfg = TrainingConfig(**cfg_kwargs)  # validates the options before anything loads
    data_path = Path(args.data)
    if not data_path.is_file():
        raise FileNotFoundError(f"training data not found: {data_path}")
    if args.validation is not None and not Path(args.validation).is_file():
        raise FileNotFoundError(f"validation data not found: {args.validation}")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")

    from tqdm.auto import tqdm

    from scaleswap.runtime.finetune_data import load_examples, split_validation
    from scaleswap.runtime.quantize import load_quantized
    from scaleswap.runtime.scale_set import load_scale_set, save_scale_set
    from scaleswap.runtime.trainer import ScaleTrainer

    from ._common import resolve_quantized_base

    qm = load_quantized(resolve_quantized_base(args.model, args.bits, args.group_size))
    try:
        train = load_examples(data_path, qm.tokenizer, cfg.max_seq_len)
    except ValueError as e:
        raise ValueError(f"{data_path}: {e}") from None
    if args.validation is not None:
        try:
            val = load_examples(Path(args.validation), qm.tokenizer, cfg.max_seq_len)
        except ValueError as e:
            raise ValueError(f"{args.validation}: {e}") from None
    else:
        train, val = split_validation(train, args.validation_split, args.seed)
    init = load_scale_set(args.init_scales, qm.base_info).scales if args.init_scales else None
    pad = qm.tokenizer.pad_token_id
    trainer = ScaleTrainer(qm.model, cfg, init_scales=init, pad_id=pad if pad is not None else 0)
    total = cfg.total_steps(len(train))
    print(f"PEQA: {trainer.num_trainable_params:,} trainable scales ({qm.quant.bits}-bit, group size "
          f"{qm.quant.group_size}); {len(train)} training / {len(val)} validation examples; {total} steps",
          file=sys.stderr)

    def on_step(m) -> None:
        line = f"step {m.step}/{m.total_steps}  loss {m.loss:.4f}  lr {m.learning_rate:.2e}  grad-norm {m.grad_norm:.3f}"
        if m.validation_loss is not None:
            line += f"  val {m.validation_loss:.4f}"
        tqdm.write(line, file=sys.stderr)

    result = trainer.train(train, val, on_step=on_step, progress=True)
    if not result.succeeded:
        print(f"error: training {result.status}: {result.error_message}; nothing written", file=sys.stderr)
        return 1
    save_scale_set(out, result.scales, qm.base_info,
                   {"source": "finetune", "steps": result.steps, "trained_tokens": result.trained_tokens})
    summary = f"wrote {out} after {result.steps} steps ({result.trained_tokens} tokens, {result.seconds:.1f} s)"
    summary += f"; training loss {result.train_losses[0]:.4f} -> {result.train_losses[-1]:.4f}"
    if result.validation_losses:
        summary += f"; validation loss {result.validation_losses[0][1]:.4f} -> {result.validation_losses[-1][1]:.4f}"
    print(summary, file=sys.stderr)
    return 0
