"""Load generator for any OpenAI-compatible server (scaleswap, llama.cpp's server, vLLM).

Sends streaming ``/v1/chat/completions`` (or ``/v1/completions``) requests and
measures, per request, time to first token (TTFT), time per output token after
the first (TPOT = (e2e − TTFT) / (output_tokens − 1)) and end-to-end latency;
reports requests/s, generated tokens/s and p50/p90/p99 of each, with errors
counted by kind (``http_429``, ``http_500``, exception class name, ...).

Load shapes (the same definitions as vLLM's ``benchmark_serving``):
- closed loop, ``--concurrency C``: C workers, each sends its next request as
  soon as the previous one finished;
- open loop, ``--request-rate R``: Poisson arrivals at R requests/s (seeded
  exponential inter-arrival times), requests never wait for each other.
A run stops issuing after ``--duration`` seconds or ``--num-requests``
requests (whichever comes first), then waits for those in flight; elapsed time
runs from the first measured request to the last completion. ``--warmup``
requests are sent first, one at a time, and excluded.

Prompts come from a real text available offline on every machine: Python's
reference documentation as shipped in ``pydoc_data.topics`` (the text of
``help('topic')``, the same source as bench/corpus.py; ``--prompt-file`` takes
any UTF-8 text instead). Each prompt is a seeded random window of about
``--input-tokens`` tokens (words × 1.5, measured with SmolLM2's tokenizer on
this corpus) after a one-line instruction (15 more tokens, plus the server's
chat template); ``--output-tokens`` is sent as ``max_tokens``
(add ``--ignore-eos`` where the server supports it, to pin output length).
Actual token counts come from the stream's ``usage`` (``stream_options.include_usage``)
or, when the server sends none, from the number of content chunks.

Tenants: each request draws one of ``--tenants N`` tenants, uniformly or Zipf
(p(i) ∝ 1/(i+1)^s, ``--zipf-s``). Against scaleswap (``--scaleswap-admin-key``
or ``$SCALESWAP_ADMIN_KEY``) the tool first creates the N tenants
(``POST /v1/tenants``) and uploads a distinct scale set to each: the base set
from ``GET /v1/scales/base`` with every tensor multiplied by a seeded
per-tenant factor 1 + σ·ε (ε ~ N(0, 1), ``--scale-noise`` σ), metadata kept.
Requests then name the tenant as ``model`` and carry the tenant's own API key.
Against other servers all requests use ``--api-key``, and tenants are labels
unless ``--tenant-model-template`` (e.g. ``lora-{i}`` for vLLM multi-LoRA)
gives each its own ``model``.

Examples::

    python bench/load.py --base-url http://127.0.0.1:8000 --concurrency 4 --duration 60
    python bench/load.py --serve --sweep --duration 60 --json bench/results/load.json --png bench/results/load.png
    python bench/load.py --base-url http://127.0.0.1:8080 --request-rate 2 --num-requests 100   # llama.cpp

``--serve`` starts ``scaleswap serve`` itself on a free port (default model, a
temporary data dir unless ``--serve-args`` names one) and stops it at the end. ``--sweep`` runs concurrency 1,4,16 × tenants 1,64 (Zipf)
and prints one table with the 64-tenant / 1-tenant throughput ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

TOKENS_PER_WORD = 1.5  # SmolLM2 tokens per word of the pydoc corpus (measured 1.48-1.52)
PROMPT_INSTRUCTION = "Summarise the following passage from the Python documentation in plain words.\n\n"
PERCENTILES = (50, 90, 99)


# ----------------------------------------------------------------------------- prompts
def stdlib_corpus_words() -> list[str]:
    """Words of Python's reference documentation as shipped in ``pydoc_data.topics`` (``help('topic')``), topics sorted."""
    import pydoc_data.topics

    words = [w for _, text in sorted(pydoc_data.topics.topics.items()) for w in text.split()]
    assert len(words) > 10_000, f"pydoc_data corpus unexpectedly small ({len(words)} words)"
    return words


def corpus_words(prompt_file: str | None) -> tuple[list[str], str]:
    if prompt_file is None:
        return stdlib_corpus_words(), f"pydoc_data.topics of Python {platform.python_version()}"
    words = Path(prompt_file).read_text(encoding="utf-8", errors="replace").split()
    if len(words) < 100:
        raise ValueError(f"--prompt-file {prompt_file} has only {len(words)} words; need at least 100")
    return words, str(prompt_file)


def make_prompt(words: list[str], input_tokens: int, rng: np.random.Generator) -> str:
    """A window of ~input_tokens tokens from the corpus at a seeded random offset."""
    n = max(1, round(input_tokens / TOKENS_PER_WORD))
    if n >= len(words):
        body = (words * (n // len(words) + 1))[:n]
    else:
        start = int(rng.integers(0, len(words) - n))
        body = words[start : start + n]
    return PROMPT_INSTRUCTION + " ".join(body)


def tenant_probs(num_tenants: int, dist: str, zipf_s: float) -> np.ndarray:
    """Probability of each tenant index: uniform, or Zipf p(i) ∝ (i+1)^-s."""
    if num_tenants < 1:
        raise ValueError(f"--tenants must be ≥ 1, got {num_tenants}")
    if dist == "uniform":
        p = np.ones(num_tenants)
    elif dist == "zipf":
        if zipf_s <= 0:
            raise ValueError(f"--zipf-s must be > 0, got {zipf_s}")
        p = 1.0 / np.arange(1, num_tenants + 1) ** zipf_s
    else:
        raise ValueError(f"--tenant-dist must be one of zipf, uniform; got {dist!r}")
    return p / p.sum()  # (num_tenants,)


# ----------------------------------------------------------------------------- safetensors
def read_safetensors(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors blob into numpy arrays and its ``__metadata__`` (which the numpy loader drops)."""
    from safetensors.numpy import load

    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    return load(blob), dict(header.get("__metadata__") or {})


def perturb_scale_set(
    tensors: dict[str, np.ndarray], seed: int, tenant_index: int, noise: float
) -> dict[str, np.ndarray]:
    """Multiply every tensor by a seeded factor 1 + noise·N(0,1), clipped to [0.5, 1.5] (scales stay > 0)."""
    rng = np.random.default_rng([seed, tenant_index])
    out = {}
    for name in sorted(tensors):  # fixed order → same draws on every machine
        t = tensors[name]
        factor = np.clip(1.0 + noise * rng.standard_normal(t.shape), 0.5, 1.5)
        out[name] = (t * factor).astype(t.dtype)
    return out


# ----------------------------------------------------------------------------- target
def api_root(base_url: str) -> str:
    """Server root from ``--base-url`` given with or without the trailing ``/v1``."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class Target:
    root: str  # http://host:port
    model: str  # the base model's id
    api_keys: list[str]  # per tenant (all equal for non-scaleswap targets)
    tenant_models: list[str]  # per tenant: the request's `model` (scaleswap: the tenant id)
    kind: str  # "scaleswap" or "openai"

    def subset(self, num_tenants: int) -> "Target":
        return Target(self.root, self.model, self.api_keys[:num_tenants], self.tenant_models[:num_tenants], self.kind)


async def discover_model(client: httpx.AsyncClient, root: str, api_key: str | None) -> str:
    r = await client.get(f"{root}/v1/models", headers=auth_headers(api_key))
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{root}/v1/models lists no model; pass --model")
    return data[0]["id"]


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def looks_like_scaleswap(client: httpx.AsyncClient, root: str) -> bool:
    try:
        r = await client.get(f"{root}/v1/scales/base")
    except httpx.HTTPError:
        return False
    return r.status_code != 404


async def create_scaleswap_tenants(
    client: httpx.AsyncClient, root: str, admin_key: str, num_tenants: int, seed: int, noise: float, prefix: str
) -> tuple[list[str], list[str]]:
    """Create ``num_tenants`` tenants with distinct perturbed scale sets; return (ids, api keys)."""
    from safetensors.numpy import save

    admin = auth_headers(admin_key)
    r = await client.get(f"{root}/v1/scales/base", headers=admin)
    r.raise_for_status()
    base, metadata = read_safetensors(r.content)
    ids, keys = [], []
    sem = asyncio.Semaphore(4)

    async def one(i: int) -> tuple[str, str]:
        tid = f"{prefix}{i:03d}"
        async with sem:
            r = await client.post(f"{root}/v1/tenants", json={"id": tid}, headers=admin)
            if r.status_code >= 400:
                raise RuntimeError(f"creating tenant {tid}: HTTP {r.status_code} {r.text[:300]}")
            key = r.json()["api_key"]
            blob = save(perturb_scale_set(base, seed, i, noise), metadata={**metadata, "tenant": tid})
            r = await client.put(
                f"{root}/v1/tenants/{tid}/scales",
                content=blob,
                headers={**admin, "Content-Type": "application/octet-stream"},
            )
            if r.status_code >= 400:
                raise RuntimeError(f"uploading scales of {tid}: HTTP {r.status_code} {r.text[:300]}")
        return tid, key

    for tid, key in await asyncio.gather(*(one(i) for i in range(num_tenants))):
        ids.append(tid)
        keys.append(key)
    return ids, keys


SERVER_COUNTERS = ("scaleswap_scale_loads_total", "scaleswap_scale_evictions_total", "scaleswap_preemptions_total",
                   "scaleswap_generation_tokens_total")  # fmt: skip
SERVER_GAUGES = ("scaleswap_max_resident_tenants", "scaleswap_resident_tenants")


async def scrape_metrics(client: httpx.AsyncClient, root: str, key: str | None) -> dict[str, float]:
    """Prometheus text from ``/metrics``, summed over labels per sample name ({} if unavailable)."""
    try:
        r = await client.get(f"{root}/metrics", headers=auth_headers(key))
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def server_metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters as increases over the run, gauges as their value at the end (scaleswap's series)."""
    d = {k.removeprefix("scaleswap_").removesuffix("_total"): after[k] - before.get(k, 0.0)
         for k in SERVER_COUNTERS if k in after}  # fmt: skip
    d |= {k.removeprefix("scaleswap_"): after[k] for k in SERVER_GAUGES if k in after}
    return d


# ----------------------------------------------------------------------------- one request
@dataclass
class RequestResult:
    tenant: int
    start_s: float  # relative to run start
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LoadConfig:
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None
    endpoint: str = "chat"
    concurrency: int | None = 1
    request_rate: float | None = None
    duration_s: float | None = 60.0
    num_requests: int | None = None
    warmup: int = 2
    input_tokens: int = 256
    output_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = False
    include_usage: bool = True
    tenants: int = 1
    tenant_dist: str = "zipf"
    zipf_s: float = 1.1
    scale_noise: float = 0.01
    scaleswap_admin_key: str | None = None
    tenant_model_template: str | None = None
    prewarm_tenants: bool = False
    seed: int = 0
    timeout_s: float = 600.0
    prompt_file: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"--endpoint must be one of chat, completions; got {self.endpoint!r}")
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("give exactly one of --concurrency (closed loop) or --request-rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be ≥ 1, got {self.concurrency}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0, got {self.request_rate}")
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("give --duration and/or --num-requests so the run stops by itself")
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("--input-tokens and --output-tokens must be ≥ 1")
        tenant_probs(self.tenants, self.tenant_dist, self.zipf_s)


def request_body(cfg: LoadConfig, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": cfg.output_tokens,
        "temperature": cfg.temperature,
        "stream": True,
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM / llama.cpp extension
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """Generated text carried by one streamed chunk (chat delta or completion text)."""
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if delta is not None:
            text += delta.get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def send_request(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any], tenant: int, t0: float
) -> RequestResult:
    """Send one streaming request and time it. Never raises: failures become ``error`` kinds."""
    start = time.perf_counter()
    res = RequestResult(tenant=tenant, start_s=start - t0, ok=False)
    num_chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                res.error = f"http_{resp.status_code}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # SSE comments, event names, blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = "stream_error"
                    return res
                if chunk_text(chunk):
                    num_chunks += 1
                    if res.ttft_s is None:
                        res.ttft_s = time.perf_counter() - start
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
                    res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
        res.e2e_s = time.perf_counter() - start
        res.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
        if res.ttft_s is None:  # the server produced no text at all (e.g. immediate EOS)
            res.ttft_s = res.e2e_s
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.error = type(e).__name__
    return res


# ----------------------------------------------------------------------------- a run
def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    arr = np.asarray(values) * 1e3
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES} | {"mean": float(arr.mean())}


def summarise(results: list[RequestResult], elapsed_s: float, num_tenants: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "requests": len(results),
        "completed": len(ok),
        "num_errors": len(results) - len(ok),
        "errors": dict(sorted(errors.items())),
        "elapsed_s": elapsed_s,
        "requests_per_s": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        "output_tokens_per_s": out_tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "total_output_tokens": out_tokens,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "mean_prompt_tokens": float(np.mean(prompt)) if prompt else None,
        "ttft_ms": percentiles_ms([r.ttft_s for r in ok]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_ms": percentiles_ms([r.e2e_s for r in ok]),
        "requests_per_tenant": np.bincount([r.tenant for r in results], minlength=num_tenants).tolist(),
    }


async def prepare_target(client: httpx.AsyncClient, cfg: LoadConfig, tenant_prefix: str | None = None) -> Target:
    """Resolve the model and, for scaleswap, create the tenants with distinct scale sets."""
    root = api_root(cfg.base_url)
    model = cfg.model or await discover_model(client, root, cfg.api_key or cfg.scaleswap_admin_key)
    if cfg.scaleswap_admin_key:
        prefix = tenant_prefix or f"load-{secrets.token_hex(3)}-"
        ids, keys = await create_scaleswap_tenants(
            client, root, cfg.scaleswap_admin_key, cfg.tenants, cfg.seed, cfg.scale_noise, prefix
        )
        return Target(root, model, keys, ids, "scaleswap")  # a tenant is addressed as model=<tenant id>
    if cfg.tenants > 1 and await looks_like_scaleswap(client, root):
        raise ValueError(
            "the target serves /v1/scales/base (scaleswap): pass --scaleswap-admin-key or set "
            "SCALESWAP_ADMIN_KEY so the tenants get created with their own scale sets"
        )
    if cfg.tenant_model_template:  # e.g. vLLM multi-LoRA: one served adapter name per tenant
        models = [cfg.tenant_model_template.format(i=i) for i in range(cfg.tenants)]
    else:
        models = [model] * cfg.tenants  # tenants are labels only
    return Target(root, model, [cfg.api_key or ""] * cfg.tenants, models, "openai")


async def run_load(cfg: LoadConfig, target: Target | None = None) -> dict[str, Any]:
    """Run one load test; return the summary dict (see module docstring)."""
    cfg.validate()
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=30.0), limits=limits) as client:
        if target is None:
            target = await prepare_target(client, cfg)
        assert len(target.api_keys) == len(target.tenant_models) == cfg.tenants, "target/config tenant count differ"
        words, source = corpus_words(cfg.prompt_file)
        path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
        url = target.root + path
        rng = np.random.default_rng(cfg.seed)
        probs = tenant_probs(cfg.tenants, cfg.tenant_dist, cfg.zipf_s)

        def next_request() -> tuple[int, dict[str, str], dict[str, Any]]:
            tenant = int(rng.choice(cfg.tenants, p=probs))
            body = request_body(cfg, target.tenant_models[tenant], make_prompt(words, cfg.input_tokens, rng))
            return tenant, auth_headers(target.api_keys[tenant] or None), body

        if cfg.prewarm_tenants:  # one 1-token request per tenant, so no scale set is loaded cold while measuring
            sem = asyncio.Semaphore(4)

            async def prewarm(i: int) -> None:
                body = {**request_body(cfg, target.tenant_models[i], PROMPT_INSTRUCTION), "max_tokens": 1}
                async with sem:
                    for attempt in range(5):
                        r = await send_request(client, url, auth_headers(target.api_keys[i] or None), body, i, 0.0)
                        if r.error != "http_429":
                            break
                        await asyncio.sleep(1.0 + attempt)
                if not r.ok:
                    raise RuntimeError(f"prewarm request of tenant {i} failed: {r.error}")

            await asyncio.gather(*(prewarm(i) for i in range(cfg.tenants)))
        for _ in range(cfg.warmup):  # sequential, excluded from the figures
            tenant, headers, body = next_request()
            await send_request(client, url, headers, body, tenant, time.perf_counter())

        metrics_key = cfg.scaleswap_admin_key or cfg.api_key
        metrics_before = await scrape_metrics(client, target.root, metrics_key) if target.kind == "scaleswap" else {}
        results: list[RequestResult] = []
        bar = tqdm(total=cfg.num_requests, disable=not cfg.progress, unit="req", dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s if cfg.duration_s is not None else math.inf
        issued = 0

        def may_issue() -> bool:
            return (cfg.num_requests is None or issued < cfg.num_requests) and time.perf_counter() < deadline

        def record(r: RequestResult) -> None:
            results.append(r)
            bar.update(1)
            if not r.ok:
                bar.set_postfix(errors=sum(not x.ok for x in results))

        if cfg.concurrency is not None:

            async def worker() -> None:
                nonlocal issued
                while may_issue():
                    issued += 1
                    tenant, headers, body = next_request()
                    record(await send_request(client, url, headers, body, tenant, t0))

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            tasks: list[asyncio.Task] = []
            next_at = t0
            while True:
                next_at += float(rng.exponential(1.0 / cfg.request_rate))
                now = time.perf_counter()
                if next_at > deadline or not may_issue():
                    break
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                issued += 1
                tenant, headers, body = next_request()
                task = asyncio.create_task(send_request(client, url, headers, body, tenant, t0))
                task.add_done_callback(lambda t: record(t.result()))
                tasks.append(task)
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        bar.close()
        metrics_after = await scrape_metrics(client, target.root, metrics_key) if metrics_before else {}

    summary = summarise(results, elapsed, cfg.tenants)
    cfg_dict = asdict(cfg)
    cfg_dict.pop("api_key"), cfg_dict.pop("scaleswap_admin_key")  # never write secrets
    summary["config"] = cfg_dict
    summary["target"] = {"root": target.root, "model": target.model, "kind": target.kind, "prompt_source": source}
    summary["server_metrics"] = server_metrics_delta(metrics_before, metrics_after) if metrics_after else {}
    summary["per_request"] = [asdict(r) | {"tpot_s": r.tpot_s} for r in results]
    return summary


# ----------------------------------------------------------------------------- reporting
def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "num_cpus": os.cpu_count()}  # fmt: skip
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        info["gpus"] = [g.strip() for g in q.stdout.splitlines() if g.strip()]
    return info


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_summary(s: dict[str, Any]) -> None:
    c = s["config"]
    load = f"concurrency {c['concurrency']}" if c["concurrency"] is not None else f"rate {c['request_rate']}/s"
    print(f"\n{s['target']['kind']} {s['target']['root']} model={s['target']['model']}  {load}  "
          f"tenants {c['tenants']} ({c['tenant_dist']})")  # fmt: skip
    print(f"requests {s['requests']}  completed {s['completed']}  errors {s['num_errors']} {s['errors'] or ''}")
    print(f"elapsed {s['elapsed_s']:.1f} s  requests/s {s['requests_per_s']:.2f}  "
          f"output tokens/s {s['output_tokens_per_s']:.1f}  mean output tokens {fmt(s['mean_output_tokens'])}  "
          f"mean prompt tokens {fmt(s['mean_prompt_tokens'])}")  # fmt: skip
    if s.get("server_metrics"):
        print("server: " + "  ".join(f"{k} {v:g}" for k, v in s["server_metrics"].items()))
    print(f"{'metric':<10}" + "".join(f"{'p' + str(p):>10}" for p in PERCENTILES) + f"{'mean':>10}")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        d = s[key]
        print(f"{key:<10}" + "".join(f"{fmt(d['p' + str(p)]):>10}" for p in PERCENTILES) + f"{fmt(d['mean']):>10}")


def plot_run(s: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in s["per_request"] if r["ok"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT (ms)", "TPOT (ms)", "end-to-end (ms)")):
        vals = [r[key] * 1e3 for r in rows if r[key] is not None]
        if vals:
            ax.hist(vals, bins=30)
        ax.set_xlabel(label)
        ax.set_ylabel("requests")
    c = s["config"]
    fig.suptitle(f"{s['target']['kind']}: conc={c['concurrency']} rate={c['request_rate']} tenants={c['tenants']}  "
                 f"{s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} tok/s, errors {s['num_errors']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_table(points: list[dict[str, Any]], concurrencies: list[int], tenant_counts: list[int]) -> list[dict]:
    """One row per concurrency: figures per tenant count (medians over repeats) and the ratio many/1 tenant(s)."""
    by: dict[tuple[int, int], list[dict]] = {}
    for p in points:
        by.setdefault((p["config"]["concurrency"], p["config"]["tenants"]), []).append(p)

    def med(c: int, t: int, f) -> float | None:
        vals = [f(p) for p in by[(c, t)]]
        vals = [v for v in vals if v is not None]
        return float(np.median(vals)) if vals else None

    lo, hi = tenant_counts[0], tenant_counts[-1]
    rows = []
    for c in concurrencies:
        row: dict[str, Any] = {"concurrency": c, "repeats": len(by[(c, lo)])}
        for t in tenant_counts:
            row[f"tok_s_{t}t"] = med(c, t, lambda p: p["output_tokens_per_s"])
            row[f"req_s_{t}t"] = med(c, t, lambda p: p["requests_per_s"])
            row[f"ttft_p50_ms_{t}t"] = med(c, t, lambda p: p["ttft_ms"]["p50"])
            row[f"tpot_p50_ms_{t}t"] = med(c, t, lambda p: p["tpot_ms"]["p50"])
            row[f"errors_{t}t"] = sum(p["num_errors"] for p in by[(c, t)])
            row[f"scale_loads_{t}t"] = med(c, t, lambda p: p.get("server_metrics", {}).get("scale_loads"))
        base = row[f"tok_s_{lo}t"]
        row["ratio"] = row[f"tok_s_{hi}t"] / base if base else None
        rows.append(row)
    return rows


def print_sweep(rows: list[dict], tenant_counts: list[int]) -> None:
    lo, hi = tenant_counts[0], tenant_counts[-1]
    head = f"{'conc':>5}"
    for t in tenant_counts:
        head += f" {f'tok/s {t}t':>11} {f'req/s {t}t':>10} {f'TTFT50 {t}t':>11} {f'TPOT50 {t}t':>11} {f'err {t}t':>7}"
    head += f" {f'{hi}t/{lo}t':>8} {f'loads {hi}t':>9}"
    print("\n" + head)
    for r in rows:
        line = f"{r['concurrency']:>5}"
        for t in tenant_counts:
            line += (f" {r[f'tok_s_{t}t']:>11.1f} {r[f'req_s_{t}t']:>10.2f} {fmt(r[f'ttft_p50_ms_{t}t']):>11}"
                     f" {fmt(r[f'tpot_p50_ms_{t}t']):>11} {r[f'errors_{t}t']:>7}")  # fmt: skip
        line += f" {fmt(r['ratio'], 2):>8} {fmt(r[f'scale_loads_{hi}t'], 0):>9}"
        print(line)


def plot_sweep(rows: list[dict], tenant_counts: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    w = 0.8 / len(tenant_counts)
    for i, t in enumerate(tenant_counts):
        ax.bar(x + i * w, [r[f"tok_s_{t}t"] for r in rows], w, label=f"{t} tenant{'s' if t > 1 else ''}")
    ax.set_xticks(x + w * (len(tenant_counts) - 1) / 2, [str(r["concurrency"]) for r in rows])
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("output tokens/s")
    ax.legend()
    ax.set_title("throughput, one tenant vs many (Zipf)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run_sweep(
    cfg: LoadConfig, concurrencies: list[int], tenant_counts: list[int], repeats: int = 1
) -> dict[str, Any]:
    """Closed-loop runs over concurrency × tenant count (× repeats), tenants created once (the largest count)."""
    points = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=30.0)) as client:
        big = LoadConfig(**{**asdict(cfg), "tenants": max(tenant_counts)})
        full = await prepare_target(client, big)
    for c in concurrencies:
        # ABBA order over repeats (1t, 64t, 64t, 1t, ...) so a drifting machine biases neither side
        order = [t for rep in range(repeats) for t in (tenant_counts if rep % 2 == 0 else tenant_counts[::-1])]
        for t in order:
            point_cfg = LoadConfig(**{**asdict(cfg), "concurrency": c, "request_rate": None, "tenants": t})
            s = await run_load(point_cfg, full.subset(t))
            print_summary(s)
            points.append(s)
    return {"points": points, "table": sweep_table(points, concurrencies, tenant_counts)}


# ----------------------------------------------------------------------------- --serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScaleswapServer:
    """``scaleswap serve`` as a subprocess on a free local port, with a random admin key."""

    def __init__(self, extra_args: list[str], log_path: str | None, startup_timeout_s: float = 600.0) -> None:
        import tempfile

        # a fresh tenant store per run unless --serve-args names one (never ./scaleswap-data by accident)
        self.tmp_dir = None if "--data-dir" in extra_args else tempfile.mkdtemp(prefix="scaleswap-load-")
        if self.tmp_dir is not None:
            extra_args = ["--data-dir", self.tmp_dir, *extra_args]
        self.port = free_port()
        self.admin_key = secrets.token_urlsafe(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
        cmd = [sys.executable, "-m", "scaleswap.server.cli", "serve", "--host", "127.0.0.1", "--port",
               str(self.port), "--admin-key", self.admin_key, *extra_args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scaleswap serve exited with {self.proc.returncode}; see {log_path or 'its log'}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2.0)  # 200 once the model is loaded
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"scaleswap serve failed to load the model: {r.text}")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"scaleswap serve not ready after {startup_timeout_s:.0f} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- CLI
def parse_int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, with or without /v1")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default $OPENAI_API_KEY)")
    t.add_argument("--model", help="model name (default: the first of /v1/models)")
    t.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    t.add_argument("--scaleswap-admin-key", default=os.environ.get("SCALESWAP_ADMIN_KEY"),
                   help="scaleswap admin key: create the tenants and upload distinct scale sets first")  # fmt: skip
    t.add_argument("--serve", action="store_true", help="start `scaleswap serve` on a free port for the run")
    t.add_argument("--serve-args", default="", help="extra arguments for `scaleswap serve` (one string)")
    t.add_argument("--serve-log", default=None, help="file for the server's output (with --serve)")
    ld = p.add_argument_group("load")
    ld.add_argument("--concurrency", type=int, help="closed loop: requests in flight (default 1)")
    ld.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals per second")
    ld.add_argument("--duration", type=float, help="stop issuing after this many seconds (default 60)")
    ld.add_argument("--num-requests", type=int, help="stop after this many requests")
    ld.add_argument("--warmup", type=int, default=2, help="sequential warm-up requests, excluded")
    ld.add_argument("--input-tokens", type=int, default=256, help="approximate prompt length in tokens")
    ld.add_argument("--output-tokens", type=int, default=128, help="max_tokens of each request")
    ld.add_argument("--temperature", type=float, default=0.0)
    ld.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/llama.cpp) to pin output length")
    ld.add_argument("--no-usage", action="store_true", help="do not send stream_options.include_usage")
    ld.add_argument("--prompt-file", help="UTF-8 text to draw prompts from (default: pydoc_data.topics)")
    ld.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    ld.add_argument("--seed", type=int, default=0)
    tn = p.add_argument_group("tenants")
    tn.add_argument("--tenants", type=int, default=1)
    tn.add_argument("--tenant-dist", choices=("zipf", "uniform"), default="zipf")
    tn.add_argument("--zipf-s", type=float, default=1.1)
    tn.add_argument("--tenant-model-template", help="non-scaleswap targets: `model` per tenant, e.g. 'lora-{i}'")
    tn.add_argument("--prewarm-tenants", action="store_true",
                    help="send every tenant one 1-token request before measuring (no cold scale loads)")  # fmt: skip
    tn.add_argument("--scale-noise", type=float, default=0.01, help="σ of the per-tenant multiplicative scale noise")
    sw = p.add_argument_group("sweep")
    sw.add_argument("--sweep", action="store_true", help="closed loop over --sweep-concurrency × --sweep-tenants")
    sw.add_argument("--sweep-concurrency", type=parse_int_list, default=[1, 4, 16])
    sw.add_argument("--sweep-tenants", type=parse_int_list, default=[1, 64])
    sw.add_argument("--sweep-repeats", type=int, default=1,
                    help="runs per point in ABBA order; the table shows medians")  # fmt: skip
    out = p.add_argument_group("output")
    out.add_argument("--json", help="write the results as JSON here")
    out.add_argument("--png", help="write a figure here")
    out.add_argument("--quick", action="store_true",
                     help="smoke run: 5 s per point, 64 in / 16 out tokens, sweep 1,4 × 1,8")  # fmt: skip
    out.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> LoadConfig:
    if a.quick:
        a.duration = a.duration or 5.0
        a.input_tokens, a.output_tokens, a.warmup = min(a.input_tokens, 64), min(a.output_tokens, 16), 1
        a.sweep_concurrency = [c for c in a.sweep_concurrency if c <= 4] or [1]
        a.sweep_tenants = [min(t, 8) for t in a.sweep_tenants]
    if a.duration is None and a.num_requests is None:
        a.duration = 60.0
    if a.concurrency is None and a.request_rate is None:
        a.concurrency = 1
    return LoadConfig(
        base_url=a.base_url, api_key=a.api_key, model=a.model, endpoint=a.endpoint, concurrency=a.concurrency,
        request_rate=a.request_rate, duration_s=a.duration, num_requests=a.num_requests, warmup=a.warmup,
        input_tokens=a.input_tokens, output_tokens=a.output_tokens, temperature=a.temperature,
        ignore_eos=a.ignore_eos, include_usage=not a.no_usage, tenants=a.tenants, tenant_dist=a.tenant_dist,
        zipf_s=a.zipf_s, scale_noise=a.scale_noise, scaleswap_admin_key=a.scaleswap_admin_key,
        tenant_model_template=a.tenant_model_template, prewarm_tenants=a.prewarm_tenants, seed=a.seed,
        timeout_s=a.timeout, prompt_file=a.prompt_file, progress=not a.no_progress,
    )  # fmt: skip


def redacted_command(argv: list[str]) -> str:
    """The command line with the values of secret flags replaced by ``***``."""
    secret = ("--api-key", "--scaleswap-admin-key")
    out, hide_next = ["bench/load.py"], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif arg in secret:
            out.append(arg)
            hide_next = True
        elif arg.startswith(tuple(f"{f}=" for f in secret)):
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
    return shlex.join(out).replace("'***'", "***")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    server = None
    try:
        if a.serve:
            server = ScaleswapServer(shlex.split(a.serve_args), a.serve_log)
            a.base_url, a.scaleswap_admin_key = server.url, server.admin_key
        cfg = config_from_args(a)
        if a.sweep:
            cfg.request_rate, cfg.concurrency = None, 1
            cfg.validate()
            if a.sweep_repeats < 1:
                raise ValueError(f"--sweep-repeats must be ≥ 1, got {a.sweep_repeats}")
            result = asyncio.run(run_sweep(cfg, a.sweep_concurrency, a.sweep_tenants, a.sweep_repeats))
            print_sweep(result["table"], a.sweep_tenants)
            if a.png:
                plot_sweep(result["table"], a.sweep_tenants, a.png)
        else:
            cfg.validate()
            result = asyncio.run(run_load(cfg))
            print_summary(result)
            if a.png:
                plot_run(result, a.png)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.close()
    result["machine"] = machine_info()
    result["command"] = redacted_command(argv if argv is not None else sys.argv[1:])
    print(f"machine: {result['machine']['cpu']} × {result['machine']['num_cpus']}  python {result['machine']['python']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
