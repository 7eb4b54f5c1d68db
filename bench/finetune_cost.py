"""What a fine-tuning job running inside the server costs serving: aggregate decode throughput with and without.

    python bench/finetune_cost.py [--quick] [--shares 0.5,1.0] [--clients 4] [--seconds 30] [--json FILE]

For each CPU share of the training thread (``SCALESWAP_FINETUNE_CPU_SHARE``; the thread sleeps between steps
so it runs that fraction of the wall time), one real ``scaleswap serve`` process on the default 4-bit g64 base:
``--clients`` closed-loop clients send greedy completions (32 new tokens) to a tenant for ``--seconds``, first
with no job, then while a long PEQA job trains another tenant (Python docs windows of 128 tokens, batch 2). Reported: completion tokens/s in both phases, their ratio, and the job's median step time
(compute only; the share's pause comes on top) and how many steps finished in the window.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine, machine_line  # noqa: E402
from corpus import corpus, describe  # noqa: E402

PROMPT = "Explain what a Python generator is."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(base_dir: Path, data_dir: Path, share: float, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "SCALESWAP_FINETUNE_CPU_SHARE": str(share)}
    env.pop("SCALESWAP_ADMIN_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "scaleswap.server.cli", "serve", "--model", str(base_dir),
                             "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"],
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server not ready")


def _load(url: str, model: str, clients: int, seconds: float) -> float:
    """Closed-loop load; -> completion tokens per second over the window."""
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 32,
                                                    "temperature": 0, "ignore_eos": True})
                r.raise_for_status()
                counts[i] += r.json()["usage"]["completion_tokens"]

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one share (0.5), 30 s windows")
    ap.add_argument("--shares", default=None, help="comma list of CPU shares (default 0.5,1.0; quick 0.5)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=None, help="window per phase (default 60; quick 30)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shares = [float(s) for s in (args.shares or ("0.5" if args.quick else "0.5,1.0")).split(",")]
    seconds = args.seconds or (30.0 if args.quick else 60.0)

    from scaleswap.runtime.quantize import ensure_default_base
    from scaleswap.runtime.tokenizer import Tokenizer

    base = ensure_default_base(4, 64, show_progress=False)
    tok = Tokenizer.from_dir(base)
    ids = tok.encode(corpus("train"))[: 64 * 128]
    texts = [{"text": tok.decode(ids[i : i + 128])} for i in range(0, len(ids), 128)]
    print(machine_line())
    print(f"serving: {args.clients} closed-loop clients, 32 greedy tokens each, {seconds:.0f} s per phase; "
          f"training: PEQA on {describe()} windows of 128 tokens, batch 2")
    records = []
    for share in shares:
        work = Path(tempfile.mkdtemp(prefix="scaleswap-ftcost-"))
        proc, url = _serve(base, work / "data", share, work / "server.log")
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                for t in ("served", "trained"):
                    c.post("/v1/tenants", json={"id": t}).raise_for_status()
                _load(url, "served", args.clients, 3.0)  # warm-up
                idle = _load(url, "served", args.clients, seconds)
                r = c.post("/v1/fine_tuning/jobs", json={"model": "trained", "training_data": texts,
                                                         "hyperparameters": {"max_steps": 100000, "batch_size": 2,
                                                                             "max_seq_len": 128}})
                r.raise_for_status()
                job_id = r.json()["id"]
                while c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["metrics"].get("step", 0) < 1:
                    time.sleep(0.5)
                t_start = time.time()
                busy = _load(url, "served", args.clients, seconds)
                t_end = time.time()
                c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
                events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 10000}).json()["data"]
                step_s = sorted(e["data"]["step_seconds"] for e in events if e["type"] == "metrics")
                in_window = sum(1 for e in events if e["type"] == "metrics" and t_start <= e["created_at"] <= t_end + 1)
        finally:
            proc.terminate()
            proc.wait(60)
        med = step_s[len(step_s) // 2]
        rec = {"cpu_share": share, "idle_tok_s": idle, "with_job_tok_s": busy, "ratio": busy / idle,
               "train_step_s_median": med, "train_steps_in_window": in_window}
        records.append(rec)
        print(f"share {share:.2f}: serving {idle:.1f} tok/s idle -> {busy:.1f} tok/s with a job "
              f"({100 * rec['ratio']:.0f}%); training step {med:.1f} s (median of {len(step_s)}), "
              f"{in_window} step(s) finished in the window", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), "clients": args.clients, "seconds": seconds,
                                               "records": records}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
