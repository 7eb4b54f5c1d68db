"""Server pieces without a model: auth rules (admin and open mode), settings, protocol mapping, metrics label
bounds, error rendering, and the CLI refusing to expose an open server."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from starlette.requests import Request

from scaleswap.runtime.tenant_store import TenantStore
from scaleswap.server.auth import Principal, authenticate, require_admin
from scaleswap.server.errors import APIError, install_error_handlers
from scaleswap.server.limits import TenantLimiter
from scaleswap.server.metrics import Metrics, TenantLabeler
from scaleswap.server.protocol import ChatCompletionRequest, CompletionRequest
from scaleswap.server.routes_openai import _max_tokens
from scaleswap.server.settings import ServerSettings, is_loopback

ADMIN = "admin-key-123456"


@pytest.fixture()
def store(tmp_path):
    s = TenantStore(tmp_path / "data")
    yield s
    s.close()


def _request(store: TenantStore, admin_key: str | None, auth: str | None) -> Request:
    app = FastAPI()
    app.state.server = SimpleNamespace(settings=ServerSettings(admin_key=admin_key), store=store)
    headers = [(b"authorization", auth.encode())] if auth is not None else []
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "app": app})


def _status(fn, *args) -> int | Principal:
    try:
        return fn(*args)
    except APIError as e:
        return e.status


def test_auth_with_admin_key(store):
    _, key_a = store.create_tenant("a")
    assert _status(authenticate, _request(store, ADMIN, None)) == 401
    assert _status(authenticate, _request(store, ADMIN, "Bearer nope")) == 401
    assert _status(authenticate, _request(store, ADMIN, f"Basic {ADMIN}")) == 401
    assert _status(authenticate, _request(store, ADMIN, f"Bearer {ADMIN}")) == Principal("admin")
    assert _status(authenticate, _request(store, ADMIN, f"Bearer {key_a}")) == Principal("tenant", "a")
    assert _status(authenticate, _request(store, ADMIN, f"Bearer {key_a}x")) == 401
    assert _status(require_admin, _request(store, ADMIN, f"Bearer {key_a}")) == 403
    p = Principal("tenant", "a")
    assert p.may_access_tenant("a") and not p.may_access_tenant("b") and not p.is_admin
    with pytest.raises(APIError) as e:
        p.require_tenant_access("b")
    assert e.value.status == 403


def test_auth_open_mode(store):
    _, key_a = store.create_tenant("a")
    assert _status(authenticate, _request(store, None, None)) == Principal("open")
    assert _status(authenticate, _request(store, None, "Bearer EMPTY")) == Principal("open")
    # A tenant key still confines its holder; a bad tenant key is still refused.
    assert _status(authenticate, _request(store, None, f"Bearer {key_a}")) == Principal("tenant", "a")
    assert _status(authenticate, _request(store, None, "Bearer sk-ss-123456789012.wrong")) == 401


def test_settings_env_flags_and_exposure(monkeypatch):
    monkeypatch.setenv("SCALESWAP_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("SCALESWAP_PORT", "9001")
    s = ServerSettings(port=9002)
    assert s.admin_key.get_secret_value() == ADMIN and s.port == 9002 and s.auth_enabled
    assert ADMIN not in repr(s)  # secret never printed
    s = ServerSettings(host="0.0.0.0")
    s.check_exposure()  # a key is configured: fine
    monkeypatch.setenv("SCALESWAP_ADMIN_KEY", "")
    s = ServerSettings(host="0.0.0.0")
    assert not s.auth_enabled
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0"):
        s.check_exposure()
    ServerSettings(host="127.0.0.1").check_exposure()
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")
    with pytest.raises(ValueError):
        ServerSettings(admin_key="short")
    with pytest.raises(ValueError):
        ServerSettings(bits=5)
    monkeypatch.setenv("SCALESWAP_PRECISION", "fp32")
    from scaleswap.server.app import _engine_config

    assert _engine_config(ServerSettings()).precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        ServerSettings(precision="fp16")


def test_cli_refuses_open_server_on_public_host(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SCALESWAP_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "scaleswap.server.cli", "serve", "--host", "0.0.0.0", "--port", "1",
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: refusing to listen on 0.0.0.0") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "scaleswap.server.cli", "serve", "--port", "99999"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --port")


@pytest.mark.parametrize("prompt,expected", [
    ("hi", ["hi"]),
    ([1, 2, 3], [[1, 2, 3]]),
    (["a", "b"], ["a", "b"]),
    ([[5], [6, 7]], [[5], [6, 7]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


def test_sampling_mapping_and_refusals():
    r = CompletionRequest(model="m", prompt="x", temperature=0, top_p=0.5, seed=3, stop="\n", logprobs=2,
                          presence_penalty=0.5, frequency_penalty=-0.5, n=2, unknown_field=1)
    p = r.sampling_params(max_tokens=7, n_index=1)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.logprobs) == (7, 0, 0.5, 4, ["\n"], 2)
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.5)
    for bad in ({"echo": True}, {"suffix": "x"}, {"logit_bias": {"1": 2.0}}, {"stop": ["a"] * 5}, {"top_k": 0}):
        with pytest.raises(APIError) as e:
            CompletionRequest(model="m", prompt="x", **bad).check_supported()
        assert e.value.status == 400
    c = ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                      {"type": "text", "text": "b"}]}],
                              max_tokens=5, max_completion_tokens=9, logprobs=True, top_logprobs=3)
    assert c.requested_max_tokens() == 9 and c.messages_as_dicts() == [{"role": "system", "content": "ab"}]
    assert c.sampling_params(9, 0).logprobs == 3
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]).sampling_params(4, 0).logprobs is None
    with pytest.raises(APIError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], top_logprobs=2).check_supported()
    with pytest.raises(APIError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                              tools=[{"type": "function"}]).check_supported()


@pytest.mark.parametrize("requested,default,prompt_len,ctx,expected", [
    (None, 16, 10, 100, 16), (None, None, 10, 100, 90), (None, 16, 95, 100, 5), (90, None, 10, 100, 90),
    (91, None, 10, 100, 400), (None, None, 100, 100, 400), (None, 16, 150, 100, 400),
])
def test_max_tokens_budget(requested, default, prompt_len, ctx, expected):
    try:
        got = _max_tokens(requested, default, prompt_len, ctx)
    except APIError as e:
        assert e.status == 400 and str(ctx) in e.message and str(prompt_len) in e.message
        got = e.status
    assert got == expected


def test_tenant_labels_are_bounded():
    lab = TenantLabeler(2)
    assert [lab(t) for t in (None, "a", "b", "c", "a", "d", "b")] == ["_base", "a", "b", "_other", "a", "_other", "b"]
    m = Metrics(max_tenant_labels=3, stats_fn=lambda: SimpleNamespace(running=2, waiting=1, kv_blocks_used=5,
                                                                       kv_blocks_total=9, scale_loads=4))
    for i in range(50):
        m.observe_generation(f"t{i}", "completions", {"ttft_s": 0.1, "per_token_s": 0.01}, 0.5, 3, 4, "length")
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    tenants = {s.labels["tenant"] for s in fams["scaleswap_generation_tokens"].samples}
    assert tenants == {"t0", "t1", "t2", "_other"}
    assert sum(s.value for s in fams["scaleswap_generation_tokens"].samples if s.name.endswith("_total")) == 200
    assert fams["scaleswap_requests_running"].samples[0].value == 2
    assert fams["scaleswap_scale_loads"].samples[0].value == 4
    assert fams["scaleswap_scale_loads"].type == "counter"


class _Body(BaseModel):
    n: int


def test_error_rendering():
    app = FastAPI()
    install_error_handlers(app)
    limiter = TenantLimiter(1)

    @app.post("/v")
    async def v(body: _Body) -> dict:
        return {}

    @app.get("/e")
    async def e() -> dict:
        raise APIError(429, "slow down", code="queue_full", headers={"Retry-After": "3"})

    @app.get("/limit")
    async def lim() -> dict:
        limiter.acquire("t")
        limiter.acquire("t")
        return {}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret detail")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v", json={"n": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = c.get("/e")
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                      "code": "queue_full"}}
        r = c.get("/limit")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "tenant_limit_exceeded"
        r = c.get("/nowhere")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = c.get("/boom")
        assert r.status_code == 500 and "secret detail" not in r.text


@pytest.mark.timeout(120)
def test_open_mode_server_with_a_model_that_fails_to_load(tmp_path):
    """No admin key: loopback only and said so; the store works at once; a model that cannot load makes /ready
    and generation 503 with the reason, while /health stays 200."""
    import httpx

    from server_harness import ServerProcess

    srv = ServerProcess(tmp_path / "no-such-model", tmp_path / "data", tmp_path / "log.txt")
    with pytest.raises(RuntimeError, match="failed to load"):
        srv.start(timeout_s=90, stop_on_failure=False)
    base = srv.base_url
    try:
        assert "no admin key configured" in srv.log() and "127.0.0.1" in srv.log()
        assert httpx.get(f"{base}/health").status_code == 200
        r = httpx.get(f"{base}/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "no-such-model" in r.json()["detail"]
        # Open mode: no key needed for tenant management; a tenant key still confines.
        r = httpx.post(f"{base}/v1/tenants", json={"id": "t1"})
        assert r.status_code == 201
        r = httpx.post(f"{base}/v1/completions", json={"model": "t1", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
        assert httpx.get(f"{base}/v1/tenants", headers={"Authorization": "Bearer EMPTY"}).status_code == 200
        key = httpx.post(f"{base}/v1/tenants", json={"id": "t2"}).json()["api_key"]
        r = httpx.get(f"{base}/v1/tenants", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403
    finally:
        assert srv.stop() in (0, -15)
