"""Offline engine throughput (issue 4): generated tokens/s by batch size and tenants per batch, side by side
with Hugging Face transformers ``generate`` on the same float model, in one run.

    python bench/engine.py [--quick] [--json FILE] [--png FILE] [--batches 1,4,16,64] [--max-tokens N]
                           [--no-hf] [--profile]

For every batch B in ``--batches`` and tenants ∈ {1 (the base scales), B (a different tenant per request)}
the engine runs B requests submitted at once (``generate_batch``, no HTTP) to exactly ``--max-tokens``
tokens each (``ignore_eos``, greedy): tokens/s = B · max_tokens / wall time, prefill included. Tenants'
scale sets are the base scales times a seeded factor in [0.95, 1.05], made in memory and loaded through
the engine's ``scale_loader``; they are made resident by a warm-up run first (steady state: cold loads
are not timed here). Transformers: ``LlamaForCausalLM`` fp32 with the float weights the quantized base came
from, ``generate(do_sample=False, min_new_tokens = max_new_tokens)``, left padding, batch 1 and 16.
Ratios are to transformers at batch 1 in the same run; ``vs_single_tenant`` is tenants=B ÷ tenants=1.
Warm-up excluded; each figure is the median of ``--repeats`` runs.

``--profile`` adds a torch.profiler table of where one decode step's time goes at batch 1 and the
largest batch (top ops by self CPU time).

Records: system, batch, tenants, tokens_per_s, vs_hf_b1, vs_single_tenant, wall_s, max_tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _machine import machine, machine_line
from scaleswap.runtime.config import EngineConfig, SamplingParams
from scaleswap.runtime.engine import Engine
from scaleswap.runtime.quantize import ensure_default_base, load_quantized

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three fruits that are red:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The most important thing about learning to code is",
    "Translate to French: good morning, how are you?",
]


def tenant_scales(base: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + index)
    return {k: v * (0.95 + 0.1 * torch.rand(v.shape, generator=g)) for k, v in sorted(base.items())}


def run_engine(engine: Engine, batch: int, tenants: int, max_tokens: int) -> tuple[float, int]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    names = [None] * batch if tenants == 1 else [f"t{i % tenants}" for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    results = engine.generate_batch(prompts, params, tenants=names)
    wall = time.perf_counter() - t0
    n = sum(r.num_output_tokens for r in results)
    assert n == batch * max_tokens, (n, batch * max_tokens)
    assert all(r.error is None for r in results)
    return wall, n


def run_hf(model, tokenizer, batch: int, max_tokens: int) -> tuple[float, int]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = [tokenizer.encode(p) for p in prompts]
    width = max(len(e) for e in enc)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, pad_token_id=pad)
    wall = time.perf_counter() - t0
    assert out.shape[1] - width == max_tokens
    return wall, batch * max_tokens


def load_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaleswap.runtime.checkpoint import load_checkpoint

    ckpt = load_checkpoint(None)
    cfg = LlamaConfig(**ckpt.config.to_hf_dict())
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def profile_step(engine: Engine, batch: int, tenants: int, steps: int = 4) -> str:
    """torch.profiler over decode steps of a running batch: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    names = [None] * batch if tenants == 1 else [f"t{i % tenants}" for i in range(batch)]
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine._submit(p, params, names[i], None, f"prof-{batch}-{tenants}-{i}", lambda o: None)
    with torch.inference_mode():
        engine._drain_inbox()
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine._seqs.values()) or engine.scheduler.waiting:
            engine.step()
        engine.step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        per_step = (time.perf_counter() - t0) / steps
        while engine.step():
            pass
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    return f"-- decode step, batch {batch}, tenants {tenants}: {per_step * 1e3:.1f} ms/step (under the profiler)\n{table}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (< 3 min)")
    ap.add_argument("--json", type=Path, help="write the records here")
    ap.add_argument("--png", type=Path, help="write a bar chart here")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--profile", action="store_true", help="print where a decode step's time goes")
    ap.add_argument("--precision", default="fast",
                    help="comma list of engine precisions to compare in this run: fast, fp32 (default fast)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in ("fast", "fp32") for p in precisions):
        ap.error(f"--precision: a comma list of fast, fp32; got {args.precision!r}")
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())

    qm = load_quantized(ensure_default_base(bits=4, group_size=64, show_progress=False))
    base = qm.base_scales
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def loader(tenant: str, version):
        i = int(tenant[1:])
        if i not in cache:
            cache[i] = tenant_scales(base, i)
        return cache[i]

    maxb = max(batches)
    prompt_len = max(len(qm.tokenizer.encode(p)) for p in PROMPTS)
    per_seq_blocks = -(-(prompt_len + max_tokens) // 16) + 1
    cfg = EngineConfig(num_kv_blocks=maxb * per_seq_blocks + 8, max_num_seqs=max(64, maxb), max_waiting=max(256, maxb),
                       max_num_batched_tokens=max(512, maxb * prompt_len), max_resident_tenants=maxb + 1)
    records = []

    print(f"engine: 4-bit g64 SmolLM2-135M, {max_tokens} tokens per request, median of {repeats}")
    engine_rows = {}
    for precision in precisions:
        engine = Engine(qm, dataclasses.replace(cfg, precision=precision), scale_loader=loader)
        for batch in batches:
            for tenants in ([1, batch] if batch > 1 else [1]):
                run_engine(engine, batch, tenants, 4)  # warm-up: loads tenants, builds caches
                walls = []
                for _ in range(repeats):
                    wall, n = run_engine(engine, batch, tenants, max_tokens)
                    walls.append(wall)
                wall = statistics.median(walls)
                tps = batch * max_tokens / wall
                engine_rows[(precision, batch, tenants)] = tps
                print(f"  scaleswap {precision:4s} batch {batch:3d} tenants {tenants:3d}: {tps:8.1f} tok/s  ({wall:.2f} s)",
                      flush=True)
                records.append({"system": "scaleswap", "precision": precision, "batch": batch, "tenants": tenants,
                                "tokens_per_s": tps, "wall_s": wall, "max_tokens": max_tokens})
        if precision != precisions[-1]:
            engine.close()
    hf_rows = {}
    if not args.no_hf:
        model = load_hf_model()
        for batch in [1, 16]:
            run_hf(model, qm.tokenizer, batch, 2)  # warm-up
            walls = [run_hf(model, qm.tokenizer, batch, max_tokens)[0] for _ in range(repeats)]
            wall = statistics.median(walls)
            hf_rows[batch] = tps = batch * max_tokens / wall
            print(f"  transformers batch {batch:3d} tenants   1: {tps:8.1f} tok/s  ({wall:.2f} s)", flush=True)
            records.append({"system": "transformers", "precision": "fp32", "batch": batch, "tenants": 1, "tokens_per_s": tps,
                            "wall_s": wall, "max_tokens": max_tokens})
        del model
    hf1 = hf_rows.get(1)
    for r in records:
        r["vs_hf_b1"] = r["tokens_per_s"] / hf1 if hf1 else None
        if r["system"] == "scaleswap":
            single = engine_rows.get((r["precision"], r["batch"], 1))
            r["vs_single_tenant"] = r["tokens_per_s"] / single if single else None

    print()
    print(f"{'system':13s} {'precision':>9s} {'batch':>5s} {'tenants':>7s} {'tok/s':>9s} {'vs HF b1':>9s} {'vs 1 tenant':>11s}")
    for r in records:
        vs = f"{r['vs_hf_b1']:.2f}x" if r["vs_hf_b1"] else "-"
        st = f"{r['vs_single_tenant']:.2f}x" if r.get("vs_single_tenant") else "-"
        print(f"{r['system']:13s} {r['precision']:>9s} {r['batch']:5d} {r['tenants']:7d} {r['tokens_per_s']:9.1f} "
              f"{vs:>9s} {st:>11s}")
    p0 = precisions[0]
    if hf1:
        b1 = engine_rows.get((p0, 1, 1))
        b16 = engine_rows.get((p0, 16, 1))
        if b1:
            print(f"targets ({p0}): engine b1 >= 5x HF b1: {b1 / hf1:.2f}x"
                  + (f"; engine b16 >= 15x: {b16 / hf1:.2f}x" if b16 else ""))
    if (p0, 64, 64) in engine_rows:
        print(f"target ({p0}): 64 distinct tenants >= 0.9x single tenant: "
              f"{engine_rows[(p0, 64, 64)] / engine_rows[(p0, 64, 1)]:.2f}x")
    stats = engine.stats()
    print(f"engine stats: {stats}")

    if args.profile:
        for batch, tenants in sorted({(1, 1), (maxb, 1), (maxb, maxb)}):
            print(profile_step(engine, batch, tenants))
    engine.close()

    out = {"benchmark": "engine", "machine": machine(), "max_tokens": max_tokens, "repeats": repeats,
           "records": records}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.png:
        plot(records, args.png, machine_line())
        print(f"wrote {args.png}")
    return 0


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels, vals, colors = [], [], []
    for r in records:
        if r["system"] == "transformers":
            labels.append(f"HF b{r['batch']}")
            colors.append("#999999")
        else:
            labels.append(f"b{r['batch']}\n{r['tenants']}t" + ("" if r["precision"] == "fast" else "\nfp32"))
            colors.append(("#1f77b4" if r["tenants"] == 1 else "#ff7f0e") if r["precision"] == "fast"
                          else ("#6baed6" if r["tenants"] == 1 else "#fdae6b"))
        vals.append(r["tokens_per_s"])
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_xticks(range(len(vals)), labels, fontsize=8)
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"scaleswap engine vs transformers (blue: 1 tenant, orange: tenant per request)\n{title}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
