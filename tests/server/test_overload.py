"""Overload behaviour of a real ``scaleswap serve`` (subprocess uvicorn on a free port).

The server runs the 4-bit default base with a tiny engine: ``max_num_seqs=2`` decoded together and a waiting
queue of ``--max-waiting 4``, and ``--max-concurrent-per-tenant 3``. On 2 CPU cores a request of 16 output
tokens takes over a second, so a burst of simultaneous requests overflows the queue at once.

Checks:
- queue limit: a burst of 12 streaming requests spread over 6 tenants (2 each, below the per-tenant limit) gets
  only 200 and 429 (no 5xx); every 429 has ``Retry-After`` ≥ 1 s and arrives promptly; every admitted request
  streams to ``[DONE]`` with exactly ``max_tokens`` tokens (``ignore_eos``); the server's resident memory does
  not grow from one burst to the next; afterwards the server still serves.
- per-tenant limit: with tenant A holding 3 requests in flight, A's 4th and 5th get 429
  (``tenant_limit_exceeded``) while tenant B is served.
- bench/load.py end to end below the limits: zero errors, distinct uploaded scale sets, token counts that agree
  with the server's.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_harness import ServerProcess

MAX_WAITING = 4
MAX_NUM_SEQS = 2
MAX_PER_TENANT = 3
MAX_TOKENS = 16
PROMPT = "Explain in a few sentences why the sky is blue."
STARTUP_TIMEOUT_S = 120.0  # model load: ~10 s on a quiet 2-core machine, 50 s seen under heavy load
PROMPT_429_S = 5.0  # a refusal must come back this fast (an admitted request takes longer than this in total)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc status")


@pytest.fixture(scope="module")
def server(quantized_base_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overload")
    srv = ServerProcess(
        quantized_base_dir, tmp / "data", tmp / "server.log", admin_key=secrets.token_urlsafe(16),
        extra_args=("--max-waiting", str(MAX_WAITING), "--max-num-seqs", str(MAX_NUM_SEQS),
                    "--max-concurrent-per-tenant", str(MAX_PER_TENANT)),
    )  # fmt: skip
    srv.start(timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield srv
    finally:
        srv.stop()


def _create_tenant(srv: ServerProcess, tenant_id: str) -> str:
    r = httpx.post(f"{srv.base_url}/v1/tenants", json={"id": tenant_id},
                   headers={"Authorization": f"Bearer {srv.admin_key}"}, timeout=30)  # fmt: skip
    assert r.status_code in (200, 201), r.text
    return r.json()["api_key"]


async def _stream_one(client: httpx.AsyncClient, url: str, key: str, model: str, max_tokens: int,
                      head_seen: asyncio.Event | None = None) -> dict:
    """One streaming chat request. Returns status, seconds to the response head, headers, and for 200 the
    completion tokens from usage, whether [DONE] arrived, and any in-band error."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    out: dict = {"done": False, "completion_tokens": None, "stream_error": None}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
        out["status"] = resp.status_code
        out["head_s"] = time.perf_counter() - t0
        out["headers"] = dict(resp.headers)
        if head_seen is not None:
            head_seen.set()  # the server has admitted (or refused) the request: its tenant slot is taken
        if resp.status_code != 200:
            out["body"] = json.loads(await resp.aread())
            return out
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                out["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out["stream_error"] = chunk["error"]
            if chunk.get("usage"):
                out["completion_tokens"] = chunk["usage"]["completion_tokens"]
    out["e2e_s"] = time.perf_counter() - t0
    return out


async def _burst(url: str, calls: list[tuple[str, str]], max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=None)) as c:
        return await asyncio.gather(*(_stream_one(c, url, key, model, max_tokens) for key, model in calls))


def _check_refusal(r: dict, code: str) -> None:
    assert r["status"] == 429
    assert int(r["headers"]["retry-after"]) >= 1
    assert r["head_s"] < PROMPT_429_S, f"429 took {r['head_s']:.1f} s"
    assert r["body"]["error"]["code"] == code, r["body"]
    assert r["body"]["error"]["type"] == "rate_limit_error"


def _check_completed(r: dict) -> None:
    assert r["status"] == 200
    assert r["stream_error"] is None, r["stream_error"]
    assert r["done"], "admitted stream ended without [DONE]"
    assert r["completion_tokens"] == MAX_TOKENS


@pytest.mark.timeout(90 + STARTUP_TIMEOUT_S)  # whichever test runs first also pays for the server's start
def test_queue_limit_gives_prompt_429_and_admitted_requests_finish(server: ServerProcess) -> None:
    tenants = [f"burst-{i}" for i in range(6)]
    keys = {t: _create_tenant(server, t) for t in tenants}
    calls = [(keys[t], t) for t in tenants for _ in range(2)]  # 12 requests, 2 per tenant (< per-tenant limit)

    rss = []
    for _ in range(2):
        results = asyncio.run(_burst(server.base_url, calls, MAX_TOKENS))
        rss.append(_rss_mb(server.proc.pid))
        statuses = sorted(r["status"] for r in results)
        assert set(statuses) <= {200, 429}, f"unexpected statuses {statuses}\n{server.log()}"
        ok = [r for r in results if r["status"] == 200]
        refused = [r for r in results if r["status"] == 429]
        # the first MAX_WAITING arrivals find an empty queue; at most running + waiting fit at once
        assert len(ok) >= MAX_WAITING, statuses
        assert refused, f"12 simultaneous requests never overflowed a queue of {MAX_WAITING}: {statuses}"
        for r in refused:
            _check_refusal(r, "queue_full")
        for r in ok:
            _check_completed(r)
    # bounded memory: a second identical burst does not grow the server (no leaked sequences/KV/streams)
    assert rss[1] - rss[0] < 64, f"server RSS grew {rss[1] - rss[0]:.0f} MB between identical bursts"
    # and nothing is left holding a slot or a queue entry: a fresh request is served
    (after,) = asyncio.run(_burst(server.base_url, [(keys[tenants[0]], tenants[0])], MAX_TOKENS))
    _check_completed(after)
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200


@pytest.mark.timeout(90 + STARTUP_TIMEOUT_S)
def test_tenant_over_its_limit_gets_429_while_another_is_served(server: ServerProcess) -> None:
    key_a, key_b = _create_tenant(server, "greedy-a"), _create_tenant(server, "polite-b")

    async def scenario() -> tuple[list[dict], dict]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=None)) as c:
            # A fills its 3 slots with long requests; once all 3 are admitted, A asks for 2 more and B for 1
            heads = [asyncio.Event() for _ in range(MAX_PER_TENANT)]
            long = [asyncio.create_task(_stream_one(c, server.base_url, key_a, "greedy-a", MAX_TOKENS * 2, h))
                    for h in heads]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*(h.wait() for h in heads)), timeout=30)
            extra = [asyncio.create_task(_stream_one(c, server.base_url, key_a, "greedy-a", MAX_TOKENS)) for _ in range(2)]
            b = await _stream_one(c, server.base_url, key_b, "polite-b", MAX_TOKENS)
            return list(await asyncio.gather(*long)) + list(await asyncio.gather(*extra)), b

    a_results, b = asyncio.run(scenario())
    assert all(r["status"] in (200, 429) for r in a_results), [r["status"] for r in a_results]
    a_long, a_extra = a_results[:MAX_PER_TENANT], a_results[MAX_PER_TENANT:]
    for r in a_long:
        assert r["status"] == 200 and r["done"] and r["stream_error"] is None
        assert r["completion_tokens"] == 2 * MAX_TOKENS
    # the extra requests arrived while A's 3 were still running (each takes seconds): refused for A's limit
    assert all(r["status"] == 429 for r in a_extra), [r.get("body") for r in a_extra]
    for r in a_extra:
        _check_refusal(r, "tenant_limit_exceeded")
    _check_completed(b)
    # B finished while A's long requests were still running: A did not starve B
    assert b["e2e_s"] < max(r["e2e_s"] for r in a_long) + 0.5


def _load_tool():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "load.py"
    spec = importlib.util.spec_from_file_location("scaleswap_bench_load", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(90 + STARTUP_TIMEOUT_S)
def test_load_tool_below_the_limits_has_zero_errors(server: ServerProcess) -> None:
    """bench/load.py end to end: it creates 4 tenants with distinct scale sets, and a closed loop at concurrency 3
    (= the per-tenant limit; running + waiting never overflow) completes every request; its token count agrees
    with the server's own counter."""
    load = _load_tool()
    cfg = load.LoadConfig(base_url=server.base_url + "/v1", concurrency=MAX_PER_TENANT, duration_s=None,
                          num_requests=6, warmup=0, input_tokens=48, output_tokens=8, ignore_eos=True, tenants=4,
                          tenant_dist="zipf", scaleswap_admin_key=server.admin_key, seed=3, progress=False)  # fmt: skip
    s = asyncio.run(load.run_load(cfg))
    assert s["target"]["kind"] == "scaleswap"
    assert (s["requests"], s["completed"], s["errors"]) == (6, 6, {})
    assert s["total_output_tokens"] == 6 * 8 and s["mean_prompt_tokens"] > 48
    assert s["server_metrics"]["generation_tokens"] == s["total_output_tokens"]
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert 0 < s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert s["output_tokens_per_s"] > 0 and sum(s["requests_per_tenant"]) == 6
    # the tenants it created serve distinct scale sets, none equal to the base
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    tenants = [t["id"] for t in httpx.get(f"{server.base_url}/v1/tenants", headers=admin, timeout=30).json()["data"]
               if t["id"].startswith("load-")]  # fmt: skip
    assert len(tenants) == 4
    base, _ = load.read_safetensors(httpx.get(f"{server.base_url}/v1/scales/base", headers=admin, timeout=30).content)
    sets = [load.read_safetensors(httpx.get(f"{server.base_url}/v1/tenants/{t}/scales", headers=admin,
                                            timeout=30).content)[0] for t in tenants]  # fmt: skip
    name = sorted(base)[0]
    firsts = [st[name] for st in sets]
    for i, a in enumerate(firsts):
        assert a.shape == base[name].shape and not (a == base[name]).all()
        rel = abs(a / base[name] - 1)
        assert rel.max() < 0.1 and rel.mean() > 1e-3  # ~1 % multiplicative noise
        for b in firsts[i + 1 :]:
            assert not (a == b).all()
