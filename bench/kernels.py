"""Benchmark of the multi-tenant low-bit linear (issue 3): time per call, side by side with dense float.

    python bench/kernels.py [--quick] [--json FILE] [--png FILE] [--shapes model,llama7b] [--bits 3,4]
                            [--group-sizes=-1,64,128] [--ms 1,8,32,128,512] [--threads N]

For every layer shape (default model SmolLM2-135M: 576→576, 576→192, 576→1536, 1536→576; Llama-7B:
4096→4096, 4096→11008, 11008→4096), M ∈ {1, 8, 32, 128, 512} rows and tenants per batch ∈ {1, 8, M}
(a different tenant on every row; capped at 64 slots for the Llama-7B shapes to bound the bank's
memory) it times ``multi_tenant_linear`` and, in the same run, the dense float matmul of the same
M, N, K, and prints/writes the ratios ``vs_dense`` (÷ dense; < 1 is faster) and ``vs_single_tenant``
(÷ the same call with one tenant).

Timing is "as a model runs it": each measurement cycles through enough independent copies of the
layer that the dense float32 weights total >= 256 MB (the low-bit copies are as many, so they too
stream from DRAM rather than sit in the 32 MB L3), warm-up excluded, median of several passes.
Scale banks are cycled over as many copies as fit in 64 MB. Row r uses slot 1 + (r mod T),
interleaved (the worst case for grouping rows by tenant); the single-tenant call (T = 1) passes
slot_ids too (every row slot 1), as the engine does for a batch of one non-base tenant.

On CPU it measures the CPU path (``path`` names the branch taken) against fp32 MKL ``F.linear``;
on a CUDA GPU the Triton kernels (fp16 activations) against cuBLAS fp16 ``F.linear`` and the memory
roofline (bytes the call must move ÷ the copy bandwidth measured on the device).
Output records: N, K, M, tenants, bits, group_size, device, path, ms, vs_dense, vs_single_tenant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scaleswap.kernels import cpu_path
from scaleswap.kernels.ops import PackedLinearWeight, multi_tenant_linear
from scaleswap.kernels.packing import packed_row_bytes
from scaleswap.kernels.reference import num_groups

MODEL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (K in, N out)
LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
STREAM_BYTES = 256 << 20  # float32 weight bytes cycled through per measurement
BANK_BYTES = 64 << 20
LLAMA_MAX_TENANTS = 64


def machine_info(device: str) -> dict:
    """CPU model, cores, torch/triton versions, ISA, GPU name."""
    info = {"cpu": platform.processor() or "?", "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": cpu_path.cpu_has_bf16_dot(), "device": device, "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


BUDGET_S = 1.5  # seconds of passes per measurement beyond the first three (--quick: 0.3)


def time_per_call(fn, arg_list: list[tuple], device: str, min_passes: int = 3, budget_s: float | None = None) -> float:
    """Median over passes of the mean time (ms) of one call, each pass cycling through ``arg_list``."""
    for args in arg_list[: min(len(arg_list), 4)]:
        fn(*args)  # warm-up: builds caches, compiles/autotunes
    _sync(device)
    passes: list[float] = []
    budget_s = BUDGET_S if budget_s is None else budget_s
    start = time.perf_counter()
    while len(passes) < min_passes or (time.perf_counter() - start < budget_s and len(passes) < 20):
        t0 = time.perf_counter()
        for args in arg_list:
            fn(*args)
        _sync(device)
        passes.append((time.perf_counter() - t0) / len(arg_list) * 1e3)
    return statistics.median(passes)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device copy (read + write counted)."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_per_call(lambda: dst.copy_(src), [()] * 5, device)
    return 2 * src.numel() / (ms / 1e3)


def make_weight(K: int, N: int, bits: int, group_size: int, device: str, gen: torch.Generator) -> PackedLinearWeight:
    """A random packed layer (every byte pattern is a valid packing)."""
    G = num_groups(K, group_size)
    qweight = torch.randint(0, 256, (N, packed_row_bytes(K, bits)), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 1 << bits, (N, G), dtype=torch.uint8, generator=gen)
    return PackedLinearWeight(qweight.to(device), zeros.to(device), bits, K, N, group_size)


def tenant_counts(M: int, llama: bool) -> list[int]:
    counts = sorted({1, min(8, M), M})
    return sorted({min(t, LLAMA_MAX_TENANTS) for t in counts}) if llama else counts


def bench_shape(K, N, llama, args, device, gen, records, dense_cache):
    """Time dense float and every (bits, group_size, M, tenants) of one shape; append records."""
    copies = max(2, -(-STREAM_BYTES // (N * K * 4)))
    float_dtype = torch.float16 if device == "cuda" else torch.float32
    dense_path = "cublas-fp16" if device == "cuda" else "torch-fp32-dense"
    if (K, N) not in dense_cache:
        dense_cache[(K, N)] = [torch.randn(N, K, generator=gen).to(device, float_dtype) * 0.02 for _ in range(copies)]
    dense_ws = dense_cache[(K, N)]
    dense_ms = {}
    for M in args.ms:
        x = torch.randn(M, K, generator=gen).to(device, float_dtype)
        dense_ms[M] = time_per_call(lambda w: F.linear(x, w), [(w,) for w in dense_ws], device)
        records.append(dict(N=N, K=K, M=M, tenants=1, bits=16 if device == "cuda" else 32, group_size=-1,
                            device=device, path=dense_path, ms=dense_ms[M], vs_dense=1.0, vs_single_tenant=1.0))
        print_record(records[-1])
    bw = copy_bandwidth(device) if device == "cuda" else None
    for bits in args.bits:
        for group_size in args.group_sizes:
            G = num_groups(K, group_size)
            weights = [make_weight(K, N, bits, group_size, device, gen) for _ in range(copies)]
            for w in weights:
                w.prepare(device)
            for M in args.ms:
                x = torch.randn(M, K, generator=gen).to(device, float_dtype)
                single = None
                for T in tenant_counts(M, llama):
                    num_slots = T + 1
                    num_banks = max(1, min(copies, BANK_BYTES // (num_slots * N * G * 4)))
                    banks = [torch.rand(num_slots, N, G, generator=gen).to(device) * 0.02 + 0.005
                             for _ in range(num_banks)]
                    slots = (1 + torch.arange(M, dtype=torch.int32) % T).to(device)  # T == 1: every row slot 1
                    calls = [(w, banks[i % num_banks]) for i, w in enumerate(weights)]
                    ms = time_per_call(lambda w, b: multi_tenant_linear(x, w, b, slots), calls, device)
                    single = ms if T == 1 else single
                    path = "triton" if device == "cuda" else cpu_path.plan(weights[0], M, T)
                    records.append(dict(N=N, K=K, M=M, tenants=T, bits=bits, group_size=group_size, device=device,
                                        path=path, ms=ms, vs_dense=ms / dense_ms[M], vs_single_tenant=ms / single))
                    if bw is not None:
                        moved = (weights[0].qweight.numel() + weights[0].zeros.numel() + min(T, M) * N * G * 4
                                 + M * K * 2 + M * N * 2)
                        roof = moved / bw * 1e3
                        records.append(dict(N=N, K=K, M=M, tenants=T, bits=bits, group_size=group_size,
                                            device=device, path="roofline", ms=roof, vs_dense=roof / dense_ms[M],
                                            vs_single_tenant=None))
                    print_record(records[-1 if bw is None else -2])
            del weights


HEADER = f"{'K→N':>12} {'M':>4} {'T':>4} {'bits':>4} {'g':>4} {'path':>22} {'ms':>9} {'vs_dense':>9} {'vs_1t':>6}"


def print_record(r: dict) -> None:
    vs1 = "" if r["vs_single_tenant"] is None else f"{r['vs_single_tenant']:.2f}"
    print(f"{str(r['K']) + '→' + str(r['N']):>12} {r['M']:>4} {r['tenants']:>4} {r['bits']:>4} {r['group_size']:>4} "
          f"{r['path']:>22} {r['ms']:>9.4f} {r['vs_dense']:>9.3f} {vs1:>6}", flush=True)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["K"], r["N"]) for r in records})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False)
    for ax, (K, N) in zip(axes[0], shapes):
        rs = [r for r in records if (r["K"], r["N"]) == (K, N)]
        series: dict[str, list] = {}
        for r in rs:
            if r["path"] in ("torch-fp32-dense", "cublas-fp16", "roofline"):
                if r["path"] == "roofline" and r["tenants"] != 1:
                    continue
                label = r["path"] if r["path"] != "roofline" else f"roofline {r['bits']}b g{r['group_size']}"
            elif r["tenants"] in (1, r["M"]) or r["M"] == 1:
                label = f"{r['bits']}b g{r['group_size']} {'1 tenant' if r['tenants'] == 1 else 'T=M'}"
            else:
                continue
            series.setdefault(label, []).append((r["M"], r["ms"]))
        for label, pts in sorted(series.items()):
            pts = sorted(set(pts))
            style = "--" if "T=M" in label else (":" if "roofline" in label else "-")
            extra = {"color": "k", "lw": 2.5} if label in ("torch-fp32-dense", "cublas-fp16") else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label, **extra)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{K}→{N}")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("ms per call")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="model shapes, 4-bit, g ∈ {-1, 64}, M ∈ {1, 8, 32, 128}")
    p.add_argument("--json", type=Path, help="write the records (and the machine) to this JSON file")
    p.add_argument("--png", type=Path, help="plot (default: the JSON path with .png, else kernels_bench.png)")
    p.add_argument("--shapes", default=None, help="comma list of: model, llama7b (default both; --quick: model)")
    p.add_argument("--bits", default=None, help="comma list (default 3,4; --quick: 4)")
    p.add_argument("--group-sizes", default=None, help="comma list, -1 = per channel (default -1,64,128; --quick: -1,64)")
    p.add_argument("--ms", default=None, help="comma list of M (default 1,8,32,128,512; --quick: 1,8,32,128)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 gives steadier figures on a shared, loaded machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        global BUDGET_S
        BUDGET_S = 0.3

    def ints(s):
        return [int(v) for v in s.split(",")]

    args.shapes = (args.shapes or ("model" if args.quick else "model,llama7b")).split(",")
    args.bits = ints(args.bits or ("4" if args.quick else "3,4"))
    args.group_sizes = ints(args.group_sizes or ("-1,64" if args.quick else "-1,64,128"))
    args.ms = ints(args.ms or ("1,8,32,128" if args.quick else "1,8,32,128,512"))
    for s in args.shapes:
        if s not in ("model", "llama7b"):
            p.error(f"--shapes: unknown {s!r}; choose from model, llama7b")

    info = machine_info(args.device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"timing: cycling >= {STREAM_BYTES >> 20} MB of float32 weight copies per measurement; median of passes")
    print(HEADER)
    gen = torch.Generator().manual_seed(0)
    records: list[dict] = []
    started = time.perf_counter()
    for group in args.shapes:
        for K, N in (MODEL_SHAPES if group == "model" else LLAMA7B_SHAPES):
            dense_cache: dict = {}
            bench_shape(K, N, group == "llama7b", args, args.device, gen, records, dense_cache)
    print(f"done in {time.perf_counter() - started:.0f} s")
    summarize(records)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "records": records}, indent=1))
        print(f"wrote {args.json}")
    png = args.png or (args.json.with_suffix(".png") if args.json else Path("kernels_bench.png"))
    plot(records, png)
    print(f"wrote {png}")
    return 0


def summarize(records: list[dict]) -> None:
    """The issue's targets, checked on these records."""
    ours = [r for r in records if r["path"] not in ("torch-fp32-dense", "cublas-fp16", "roofline")]
    for label, gw, limit in (("per channel", False, 1.1), ("group-wise", True, 1.3)):
        rs = [r for r in ours if (r["group_size"] != -1) == gw and r["tenants"] > 1]
        if rs:
            worst = max(rs, key=lambda r: r["vs_single_tenant"])
            over = sum(r["vs_single_tenant"] > limit for r in rs)
            print(f"target mixed ≤ {limit}× single ({label}): worst {worst['vs_single_tenant']:.2f}× at "
                  f"{worst['K']}→{worst['N']} M={worst['M']} T={worst['tenants']} ({worst['path']}); "
                  f"{over}/{len(rs)} over")
    for K, N in ((576, 1536), (1536, 576)):
        rs = [r for r in ours if (r["K"], r["N"]) == (K, N) and r["M"] == 1]
        for r in rs:
            print(f"target M=1 ≥ 2× faster than dense, {K}→{N} {r['bits']}b g{r['group_size']}: "
                  f"{1 / r['vs_dense']:.2f}× ({r['path']})")


if __name__ == "__main__":
    sys.exit(main())
