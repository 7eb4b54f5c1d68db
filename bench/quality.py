"""PEQA fine-tuning quality and cost vs LoRA, on the default model (SmolLM2-135M-Instruct).

    python bench/quality.py [--quick] [--json FILE] [--png FILE] [--steps N] [--batch-size B] [--seq-len T]

Corpus: Python's reference documentation topics as shipped in ``pydoc_data.topics`` (``bench/corpus.py``),
split by topic: every 5th topic (sorted by name) is held out, the other 80 % is training text. Training
examples are consecutive windows of ``--seq-len`` tokens of the training text (raw text: every token is a
target); held-out perplexity uses non-overlapping windows of ``--context`` tokens (``runtime/perplexity.py``).

Rows, each trained in its OWN subprocess so that peak memory is not mixed between runs:
- PEQA on the RTN-quantized base at 4-bit and 3-bit, per channel and g64: only the scales train
  (``runtime/trainer.py``: S = S0·exp(δ), AdamW, warmup + cosine, clipping, gradient checkpointing).
- LoRA rank 8 (alpha 16, no dropout) via PEFT on the same seven linears of every layer, on the float model
  (the GGUF dequantized to float32) in Hugging Face transformers, with gradient checkpointing.
Same training windows, order (seed), steps, batch, schedule shape and clipping for all; learning rates differ
by method (``--peqa-lr``, ``--lora-lr``). Columns: trainable parameters, peak RSS of the process while
training (sampled every 20 ms with psutil) and its rise over the RSS just before training, median seconds per
step (first step excluded), held-out perplexity before and after. The PEQA rise includes the float (Q − Z)
caches that the CPU backward of ``kernels/`` builds on the first step (``kernel_float_cache_mb`` in the JSON).

Output: a table, ``--json`` with every record and loss curve, ``--png`` with the training-loss curves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine, machine_line  # noqa: E402
from corpus import corpus, describe  # noqa: E402

QUANT_CONFIGS = [(4, 64), (4, -1), (3, 64), (3, -1)]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------- worker side
class RssSampler:
    """Peak resident set size of this process, sampled in a thread (psutil), between start() and stop()."""

    def __init__(self, period_s: float = 0.02):
        import psutil

        self.proc = psutil.Process()
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period_s)

    def start(self) -> int:
        rss = self.proc.memory_info().rss
        self.peak = rss
        self._thread.start()
        return rss

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak


def _train_examples(tokenizer, seq_len: int, max_tokens: int | None):
    from scaleswap.runtime.finetune_data import Example

    ids = tokenizer.encode(corpus("train"))
    if max_tokens:
        ids = ids[:max_tokens]
    return [Example(ids[i : i + seq_len], [True] * len(ids[i : i + seq_len]), 0)
            for i in range(0, len(ids) - 1, seq_len) if len(ids[i : i + seq_len]) >= 2]


def _heldout_ids(tokenizer, max_tokens: int | None) -> list[int]:
    ids = tokenizer.encode(corpus("heldout"))
    return ids[:max_tokens] if max_tokens else ids


def worker_peqa(spec: dict) -> dict:
    import torch

    from scaleswap.runtime.perplexity import perplexity
    from scaleswap.runtime.quantize import ensure_default_base, load_quantized
    from scaleswap.runtime.trainer import ScaleTrainer, TrainingConfig

    torch.set_num_threads(spec["threads"])
    qm = load_quantized(ensure_default_base(spec["bits"], spec["group_size"], show_progress=False))
    held = _heldout_ids(qm.tokenizer, spec["eval_tokens"])
    train = _train_examples(qm.tokenizer, spec["seq_len"], spec["train_tokens"])
    # NOTE: perplexities run after training: runtime/perplexity runs under inference_mode, and the CPU kernel's
    # per-thread scratch buffer made there cannot be written by a later forward with autograd on.
    cfg = TrainingConfig(learning_rate=spec["lr"], max_steps=spec["steps"], batch_size=spec["batch_size"],
                         warmup_steps=spec["warmup"], max_seq_len=spec["seq_len"], seed=spec["seed"])
    sampler = RssSampler()
    rss0 = sampler.start()
    trainer = ScaleTrainer(qm.model, cfg)
    step_s: list[float] = []
    result = trainer.train(train, on_step=lambda m: step_s.append(m.seconds))
    peak = sampler.stop()
    # the kernels' CPU backward keeps Q − Z as float32 per layer (built on the first step): part of the RSS rise
    dense_mb = sum(c._dense3.numel() * 4 for c in (lin.weight.cpu_cache() for lin in qm.quant_linears().values())
                   if getattr(c, "_dense3", None) is not None) / 2**20
    if not result.succeeded:
        raise RuntimeError(f"PEQA training {result.status}: {result.error_message}")
    override = {k: v.unsqueeze(0) for k, v in result.scales.items()}
    before = perplexity(qm.model, held, context=spec["context"])["perplexity"]
    after = perplexity(qm.model, held, context=spec["context"], scale_override=override)["perplexity"]
    return {"trainable_params": trainer.num_trainable_params, "rss_before_mb": rss0 / 2**20, "peak_rss_mb": peak / 2**20,
            "s_per_step": statistics.median(step_s[1:] or step_s), "ppl_before": before, "ppl_after": after,
            "losses": result.train_losses, "train_examples": len(train), "kernel_float_cache_mb": dense_mb}


def worker_lora(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from scaleswap.runtime.checkpoint import load_checkpoint
    from scaleswap.runtime.finetune_data import IGNORE_INDEX, iterate_batches
    from scaleswap.runtime.perplexity import perplexity
    from scaleswap.runtime.tokenizer import Tokenizer
    from scaleswap.runtime.trainer import TrainingConfig

    torch.set_num_threads(spec["threads"])
    ckpt = load_checkpoint(None)
    tok = Tokenizer.from_checkpoint(ckpt)
    hf = HFLlama(LlamaConfig(**ckpt.config.to_hf_dict()))
    missing, unexpected = hf.load_state_dict(ckpt.state_dict, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    hf.tie_weights()
    hf.float().eval()
    del ckpt

    class Logits(torch.nn.Module):  # runtime/perplexity expects forward(ids) -> logits
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    held = _heldout_ids(tok, spec["eval_tokens"])
    before = perplexity(Logits(hf), held, context=spec["context"])["perplexity"]
    train = _train_examples(tok, spec["seq_len"], spec["train_tokens"])
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    sampler = RssSampler()
    rss0 = sampler.start()
    model = get_peft_model(hf, lcfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    cfg = TrainingConfig(learning_rate=spec["lr"], max_steps=spec["steps"], batch_size=spec["batch_size"],
                         warmup_steps=spec["warmup"], max_seq_len=spec["seq_len"], seed=spec["seed"])
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    batches = iterate_batches(train, cfg.batch_size, cfg.seed)
    losses, step_s = [], []
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        ids, labels = next(batches)
        logits = model(input_ids=ids).logits  # (B, T, V)
        sel = labels != IGNORE_INDEX
        loss = F.cross_entropy(logits[sel].float(), labels[sel])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step, cfg.max_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step_s.append(time.perf_counter() - t0)
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"LoRA loss became {losses[-1]} at step {step}")
    peak = sampler.stop()
    model.eval()
    after = perplexity(Logits(model), held, context=spec["context"])["perplexity"]
    return {"trainable_params": n_params, "rss_before_mb": rss0 / 2**20, "peak_rss_mb": peak / 2**20,
            "s_per_step": statistics.median(step_s[1:] or step_s), "ppl_before": before, "ppl_after": after,
            "losses": losses, "train_examples": len(train)}


def run_worker(spec: dict) -> dict:
    """Run one training in a fresh interpreter; its last stdout line is the JSON record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- driver
def _label(method: str, bits: int | None, gs: int | None) -> str:
    if method == "lora":
        return "LoRA r8 (float32)"
    return f"PEQA {bits}-bit " + ("per-channel" if gs == -1 else f"g{gs}")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in records:
        xs = range(1, len(r["losses"]) + 1)
        line, = ax.plot(xs, r["losses"], lw=0.7, alpha=0.35)
        beta, ema, smooth = 1 - 1 / max(2, len(r["losses"]) // 10), 0.0, []
        for i, loss in enumerate(r["losses"], start=1):  # bias-corrected EMA (the same batches for every run)
            ema = beta * ema + (1 - beta) * loss
            smooth.append(ema / (1 - beta**i))
        ax.plot(xs, smooth, lw=1.8, color=line.get_color(), label=r["label"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token; thin: per step, thick: EMA)")
    ax.set_title("PEQA (scales only) vs LoRA r8: training loss, SmolLM2-135M on Python docs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, short windows, 2k held-out tokens (minutes)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; quick 10)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per step (default 4; quick 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per training window (default 256; quick 128)")
    ap.add_argument("--context", type=int, default=512, help="held-out perplexity window")
    ap.add_argument("--peqa-lr", type=float, default=5e-3, help="PEQA learning rate on log-scales (default 5e-3)")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate (default 1e-3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    ap.add_argument("--configs", default=None, help="comma list like 4g64,4pc,3g64,3pc,lora (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--png", default="bench/results/quality_loss.png", help="loss-curve plot")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker is not None:
        spec = json.loads(args.worker)
        out = worker_lora(spec) if spec["method"] == "lora" else worker_peqa(spec)
        print(json.dumps(out))
        return

    steps = args.steps or (10 if args.quick else 200)
    batch = args.batch_size or (2 if args.quick else 4)
    seq_len = args.seq_len or (128 if args.quick else 256)
    eval_tokens = 2048 if args.quick else None
    train_tokens = steps * batch * seq_len if args.quick else None  # quick: tokenise only what is used
    threads = args.threads or os.cpu_count() or 1
    wanted = [(4, 64), (4, -1), (3, 64), (3, -1), None]
    if args.configs:
        names = {"4g64": (4, 64), "4pc": (4, -1), "3g64": (3, 64), "3pc": (3, -1), "lora": None}
        try:
            wanted = [names[c.strip()] for c in args.configs.split(",")]
        except KeyError as e:
            raise SystemExit(f"unknown config {e}; choose from {', '.join(names)}")
    print(machine_line())
    print(f"corpus: {describe()}; training windows of {seq_len} tokens, {steps} steps x batch {batch}; "
          f"held-out {'first ' + str(eval_tokens) + ' tokens' if eval_tokens else 'all'} in windows of {args.context}")
    common = dict(steps=steps, batch_size=batch, seq_len=seq_len, context=args.context, eval_tokens=eval_tokens,
                  train_tokens=train_tokens, threads=threads, seed=args.seed, warmup=max(1, steps // 10))
    records = []
    for cfg in wanted:
        if cfg is None:
            spec = dict(common, method="lora", lr=args.lora_lr, bits=None, group_size=None)
        else:
            spec = dict(common, method="peqa", lr=args.peqa_lr, bits=cfg[0], group_size=cfg[1])
        label = _label(spec["method"], spec["bits"], spec["group_size"])
        print(f"running {label} ...", flush=True)
        t0 = time.perf_counter()
        rec = run_worker(spec)
        rec.update(label=label, method=spec["method"], bits=spec["bits"], group_size=spec["group_size"],
                   lr=spec["lr"], wall_s=time.perf_counter() - t0)
        records.append(rec)
        print(f"  ppl {rec['ppl_before']:.3f} -> {rec['ppl_after']:.3f}, {rec['s_per_step']:.2f} s/step, "
              f"peak RSS {rec['peak_rss_mb']:.0f} MB"
              + (f" (of which kernel float (Q-Z) cache {rec['kernel_float_cache_mb']:.0f} MB)"
                 if rec.get("kernel_float_cache_mb") else ""), flush=True)

    lora = next((r for r in records if r["method"] == "lora"), None)
    float_ppl = lora["ppl_before"] if lora else None
    hdr = (f"\n{'run':<22}{'trainable':>11}{'peak RSS MB':>13}{'+RSS MB':>9}{'s/step':>8}"
           f"{'ppl before':>12}{'ppl after':>11}{'recovered':>11}")
    print(hdr)
    for r in records:
        r["rss_rise_mb"] = r["peak_rss_mb"] - r["rss_before_mb"]
        rec_txt = "-"
        if float_ppl and r["method"] == "peqa" and r["ppl_before"] > float_ppl:
            # share of the quantization loss (in log-perplexity) that fine-tuning won back
            r["recovered"] = (math.log(r["ppl_before"]) - math.log(r["ppl_after"])) / (
                math.log(r["ppl_before"]) - math.log(float_ppl))
            rec_txt = f"{100 * r['recovered']:.0f}%"
        print(f"{r['label']:<22}{r['trainable_params']:>11,}{r['peak_rss_mb']:>13.0f}{r['rss_rise_mb']:>9.0f}"
              f"{r['s_per_step']:>8.2f}{r['ppl_before']:>12.3f}{r['ppl_after']:>11.3f}{rec_txt:>11}")
    if float_ppl:
        print(f"(float32 model before LoRA: ppl {float_ppl:.3f}; 'recovered' = share of the quantization gap in "
              f"log-ppl closed by PEQA; +RSS = peak during training minus RSS just before)")
    if args.png:
        plot(records, Path(args.png))
        print(f"wrote {args.png}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), "corpus": describe(), "settings": common,
                                               "peqa_lr": args.peqa_lr, "lora_lr": args.lora_lr,
                                               "records": records}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
