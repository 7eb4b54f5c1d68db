"""Perplexity, size on disk and quantization time of the default model at several bit widths and group sizes.

    python bench/quantize.py [--quick] [--json FILE]

Held-out text: Python's reference documentation topics (``bench/corpus.py``; every 5th topic), windows of
512 tokens. Rows: the float model (the GGUF dequantized to float32) and PEQA RTN bases. Size on disk is
the whole quantized-base directory (integers packed at true width + float32 embeddings/norms + base scales);
the "linears" column is the packed integers + zero points + base scales alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine, machine_line  # noqa: E402
from corpus import corpus, describe  # noqa: E402

CONFIGS = [(4, 64), (4, -1), (3, 64), (3, -1), (2, 64)]


def linear_bytes(base_dir: Path) -> int:
    from safetensors import safe_open

    total = (base_dir / "base_scales.safetensors").stat().st_size
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(".qweight") or k.endswith(".zeros"):
                total += f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1] if len(f.get_slice(k).get_shape()) > 1 else 1)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="score 4k held-out tokens instead of all (~20k)")
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()

    from scaleswap.runtime.checkpoint import load_checkpoint
    from scaleswap.runtime.config import QuantConfig
    from scaleswap.runtime.default_model import default_model_path
    from scaleswap.runtime.model import LlamaForCausalLM
    from scaleswap.runtime.perplexity import perplexity
    from scaleswap.runtime.quantize import load_quantized, quantize_checkpoint
    from scaleswap.runtime.tokenizer import Tokenizer

    print(machine_line())
    src = default_model_path()
    ckpt = load_checkpoint(src)
    tok = Tokenizer.from_checkpoint(ckpt)
    ids = tok.encode(corpus("heldout"))
    if args.quick:
        ids = ids[:4096]
    print(f"held-out text: {describe()}: {len(ids)} tokens, windows of {args.context}")

    records = []
    fm = LlamaForCausalLM(ckpt.config)
    fm.load_state_dict(ckpt.state_dict, strict=False)
    if ckpt.config.tie_word_embeddings:
        fm.lm_head.weight = fm.model.embed_tokens.weight
    fm.eval()
    t0 = time.perf_counter()
    r = perplexity(fm, ids, context=args.context, show_progress=True)
    float_params = sum(v.numel() for v in ckpt.state_dict.values() if v is not fm.lm_head.weight)
    records.append({"model": "float32", "bits": 32, "group_size": None, "perplexity": r["perplexity"],
                    "tokens": r["tokens"], "size_mb": src.stat().st_size / 1e6, "linears_mb": None,
                    "quantize_s": None, "eval_s": time.perf_counter() - t0, "note": "GGUF Q4_1 source, dequantized"})
    del fm
    work = Path(tempfile.mkdtemp(prefix="scaleswap-bench-"))
    try:
        for bits, gs in CONFIGS:
            out = work / f"q{bits}g{gs}"
            t0 = time.perf_counter()
            quantize_checkpoint(ckpt, QuantConfig(bits, gs), out, show_progress=False)
            qs = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.iterdir())
            qm = load_quantized(out)
            t0 = time.perf_counter()
            r = perplexity(qm.model, ids, context=args.context, show_progress=True)
            records.append({"model": f"{bits}-bit " + ("per-channel" if gs == -1 else f"g{gs}"), "bits": bits,
                            "group_size": gs, "perplexity": r["perplexity"], "tokens": r["tokens"],
                            "size_mb": size / 1e6, "linears_mb": linear_bytes(out) / 1e6, "quantize_s": qs,
                            "eval_s": time.perf_counter() - t0})
            del qm
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_ppl = records[0]["perplexity"]
    print(f"\n{'model':<18}{'ppl':>9}{'Δ vs float':>12}{'dir MB':>9}{'linears MB':>12}{'quant s':>9}")
    for rec in records:
        rec["ppl_vs_float"] = rec["perplexity"] / base_ppl
        lm = f"{rec['linears_mb']:.1f}" if rec["linears_mb"] is not None else "-"
        qs = f"{rec['quantize_s']:.1f}" if rec["quantize_s"] is not None else "-"
        print(f"{rec['model']:<18}{rec['perplexity']:>9.3f}{rec['ppl_vs_float']:>11.3f}x{rec['size_mb']:>9.1f}{lm:>12}{qs:>9}")
    print(f"(float32 size: the source GGUF file; params {float_params/1e6:.1f} M)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "corpus": describe(), "context": args.context,
                                               "records": records}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
