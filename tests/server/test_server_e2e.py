"""End to end: the real server (uvicorn subprocess on 127.0.0.1) with the 4-bit g64 default base, talked to with
the official ``openai`` client (streaming and not) and httpx.

Shows: two tenants with different uploaded scale sets answer differently while the base is unchanged; keys
are confined to their tenant; every bad upload is refused with a 4xx and changes nothing; rollback restores the
old outputs; a client that disconnects aborts its generation; /metrics parses and moves; /openapi.json describes
every route; SIGTERM drains an in-flight request; a restart keeps tenants, keys and versions.
Tests in this module share one server and run in file order (the last one restarts it).
"""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server_harness import ServerProcess

pytestmark = pytest.mark.timeout(300)

ADMIN_KEY = "test-admin-key-0123456789"
PROMPT = "The capital of France is"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(quantized_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    srv = ServerProcess(quantized_base_dir, root / "data", root / "server.log", admin_key=ADMIN_KEY,
                        extra_args=("--max-model-len", "256", "--max-upload-mb", "12", "--shutdown-timeout", "20"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def base_id(admin):
    return admin.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def base_scales(admin):
    r = admin.get("/v1/scales/base")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    return r.content


def _oai(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60.0)


def _complete(client: openai.OpenAI, model: str, prompt: str = PROMPT, **kw) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kw)
    return r.choices[0].text


def _perturbed(base_bytes: bytes, seed: int, spread: float = 0.5) -> bytes:
    """The base scale set with every scale multiplied by a factor in [1 - spread, 1 + spread] (still positive)."""
    tensors = st_load(base_bytes)
    meta = json.loads(base_bytes[8: 8 + int.from_bytes(base_bytes[:8], "little")])["__metadata__"]
    g = torch.Generator().manual_seed(seed)
    out = {k: v * (1 - spread + 2 * spread * torch.rand(v.shape, generator=g)) for k, v in tensors.items()}
    return st_save(out, metadata=meta)


def _create_tenant(admin: httpx.Client, tenant_id: str) -> str:
    r = admin.post("/v1/tenants", json={"id": tenant_id})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == tenant_id and body["current_version"] == 0
    return body["api_key"]


def _upload(client: httpx.Client, tenant: str, data: bytes) -> httpx.Response:
    return client.put(f"/v1/tenants/{tenant}/scales", content=data,
                      headers={"Content-Type": "application/octet-stream"})


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ------------------------------------------------------------------------------------------------ basics
def test_health_ready_and_openapi(server, admin):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.base_url}/ready").json()["status"] == "ready"
    # While the model loaded, /ready answered 503 "loading" (the server answers before the model is in).
    assert server.not_ready_answers and set(server.not_ready_answers) == {(503, "loading")}
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    expected = {
        ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
        ("POST", "/v1/tenants"), ("GET", "/v1/tenants"), ("GET", "/v1/tenants/{tenant_id}"),
        ("DELETE", "/v1/tenants/{tenant_id}"), ("PUT", "/v1/tenants/{tenant_id}/scales"),
        ("GET", "/v1/tenants/{tenant_id}/scales"), ("GET", "/v1/tenants/{tenant_id}/scales/versions"),
        ("POST", "/v1/tenants/{tenant_id}/scales/rollback"), ("GET", "/v1/scales/base"),
        ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"),
    }
    assert expected <= routes
    for method, path in expected:
        op = spec["paths"][path][method.lower()]
        ok = op["responses"].get("200") or op["responses"].get("201")
        assert ok and ok.get("content"), f"{method} {path} has no described success response"
        if method in ("POST", "PUT"):
            assert "requestBody" in op, f"{method} {path} has no request body schema"
        if path.startswith("/v1/"):
            assert {"401", "403"} <= set(op["responses"]) or path == "/v1/models", f"{method} {path}: error responses"
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "CompletionResponse", "ChatCompletionRequest", "ChatCompletionResponse",
                 "ModelList", "TenantCreated", "ScaleVersion", "ScaleVersionList", "RollbackRequest", "ErrorResponse"):
        assert name in schemas, name
    put = spec["paths"]["/v1/tenants/{tenant_id}/scales"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    # Streaming bodies are described by their chunk models; validation errors are 400s, never 422.
    for path, chunk in (("/v1/completions", "CompletionStreamResponse"), ("/v1/chat/completions", "ChatCompletionChunk")):
        sse = spec["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        assert sse["schema"]["$ref"] == f"#/components/schemas/{chunk}" and chunk in schemas
    assert '"422"' not in json.dumps(spec)


def test_openai_client_streaming_and_not(server, base_id):
    client = _oai(server, ADMIN_KEY)
    models = client.models.list()
    assert models.data[0].id == base_id
    text = _complete(client, base_id)
    assert "Paris" in text
    # Streaming gives the same greedy text, and usage in the last chunk when asked.
    chunks = list(client.completions.create(model=base_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-2].choices[0].finish_reason == "length"
    # Chat, both ways.
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=base_id, messages=msgs, max_completion_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model=base_id, messages=msgs, max_completion_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for c in stream:
        if c.choices:
            pieces.append(c.choices[0].delta.content or "")
        if c.usage:
            usage = c.usage
    assert "".join(pieces) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens


def test_sampling_fields(server, base_id):
    client = _oai(server, ADMIN_KEY)
    # n > 1 with a seed: per-choice indices, reproducible.
    kw = dict(model=base_id, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == sum(1 for _ in range(3)) * 8 or a.usage.completion_tokens <= 24
    # stop sequence ends the text before it.
    r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=10, temperature=0, stop=[","])
    assert "," not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    # logprobs: completions (int) and chat (bool + top_logprobs).
    r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs) and "".join(lp.tokens) == r.choices[0].text
    chat = client.chat.completions.create(model=base_id, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    # penalties and user are accepted; unknown fields are ignored.
    r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=4, presence_penalty=0.5,
                                  frequency_penalty=0.5, user="u1", extra_body={"some_unknown_field": 1})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_errors_are_openai_objects(server, admin, base_id):
    _assert_error(admin.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model_not_found")
    err = _assert_error(admin.post("/v1/completions", json={"model": base_id, "prompt": "x", "max_tokens": "many"}),
                        400)
    assert err["param"] == "max_tokens"
    _assert_error(admin.post("/v1/completions", json={"model": base_id}), 400)
    _assert_error(admin.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
                  400)
    _assert_error(admin.post("/v1/completions", json={"model": base_id, "prompt": "x", "echo": True}), 400,
                  "unsupported")
    long_prompt = "hello " * 400
    err = _assert_error(admin.post("/v1/completions", json={"model": base_id, "prompt": long_prompt}), 400,
                        "context_length_exceeded")
    assert "256" in err["message"] and "prompt" in err["message"]
    err = _assert_error(admin.post("/v1/completions", json={"model": base_id, "prompt": "hi", "max_tokens": 1000}),
                        400, "context_length_exceeded")
    assert "256" in err["message"] and "1000" in err["message"]
    with pytest.raises(openai.NotFoundError):
        _complete(_oai(server, ADMIN_KEY), "no-such-model")


# ------------------------------------------------------------------------------------------------ tenants
@pytest.fixture(scope="module")
def tenants(server, admin, base_id, base_scales):
    """Tenants a and b with different uploaded scale sets (version 1 each); c stays on the base scales."""
    keys = {t: _create_tenant(admin, t) for t in ("a", "b", "c")}
    base_text = _complete(_oai(server, ADMIN_KEY), base_id)
    for t, seed in (("a", 1), ("b", 2)):
        r = _upload(admin, t, _perturbed(base_scales, seed))
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["current"]
    return {"keys": keys, "base_text": base_text}


def test_tenants_differ_base_unchanged(server, admin, base_id, tenants):
    client = _oai(server, ADMIN_KEY)
    out = {m: _complete(client, m) for m in (base_id, "a", "b", "c")}
    assert out[base_id] == tenants["base_text"]  # uploads did not touch the base
    assert out["c"] == out[base_id]  # a new tenant serves the base scales
    assert out["a"] != out["b"] and out["a"] != out[base_id] and out["b"] != out[base_id]
    # The same through each tenant's own key, and mixed in one concurrent batch.
    results: dict[str, str] = {}

    def run(model: str, key: str) -> None:
        results[model] = _complete(_oai(server, key), model)

    threads = [threading.Thread(target=run, args=(m, tenants["keys"][m])) for m in ("a", "b")]
    threads.append(threading.Thread(target=run, args=(base_id, tenants["keys"]["c"])))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results["a"] != results["b"] and results["a"] != results[base_id]
    models = [m.id for m in _oai(server, tenants["keys"]["a"]).models.list().data]
    assert models == [base_id, "a"]  # a key sees the base and its own tenant only


def test_tenant_key_is_confined(server, admin, base_id, tenants, base_scales):
    key_a = tenants["keys"]["a"]
    a = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key_a}"}, timeout=60.0)
    # Its own tenant and the base: fine.
    assert _complete(_oai(server, key_a), "a")
    assert _complete(_oai(server, key_a), base_id) == tenants["base_text"]
    assert a.get("/v1/tenants/a/scales/versions").status_code == 200
    # Another tenant: 403, through the OpenAI client too.
    with pytest.raises(openai.PermissionDeniedError):
        _complete(_oai(server, key_a), "b")
    _assert_error(a.post("/v1/chat/completions", json={"model": "b", "messages": [{"role": "user", "content": "x"}]}),
                  403, "forbidden_tenant")
    _assert_error(_upload(a, "b", _perturbed(base_scales, 5)), 403)
    _assert_error(a.get("/v1/tenants/b/scales"), 403)
    _assert_error(a.post("/v1/tenants/b/scales/rollback", json={"version": 0}), 403)
    # Tenant management: admin only.
    _assert_error(a.post("/v1/tenants", json={"id": "evil"}), 403, "admin_required")
    _assert_error(a.get("/v1/tenants"), 403)
    _assert_error(a.delete("/v1/tenants/b"), 403)
    # No key / wrong key / revoked-looking key: 401.
    _assert_error(httpx.get(f"{server.base_url}/v1/models"), 401, "missing_api_key")
    _assert_error(httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer wrong-key"}), 401)
    _assert_error(httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": key_a[:-2] + "xx"}), 401)
    with pytest.raises(openai.AuthenticationError):
        _complete(_oai(server, "sk-ss-000000000000.bogus"), base_id)
    assert admin.get("/v1/tenants/b/scales/versions").json()["current_version"] == 1  # nothing changed
    a.close()


def _bad_uploads(base_scales: bytes) -> dict[str, tuple[bytes, int]]:
    tensors = st_load(base_scales)
    meta = json.loads(base_scales[8: 8 + int.from_bytes(base_scales[:8], "little")])["__metadata__"]
    name = sorted(tensors)[0]

    def edit(fn, metadata=None) -> bytes:
        t = {k: v.clone() for k, v in tensors.items()}
        fn(t)
        return st_save(t, metadata=metadata or meta)

    def nan(t):
        t[name][0, 0] = float("nan")

    def neg(t):
        t[name][1, 0] = -1.0

    def shape(t):
        t[name] = t[name][:-1]

    def missing(t):
        del t[name]

    def dtype(t):
        t[name] = t[name].double()

    return {
        "wrong_fingerprint": (st_save(tensors, metadata={**meta, "fingerprint": "0" * 64}), 400),
        "wrong_shape": (edit(shape), 400),
        "nan": (edit(nan), 400),
        "non_positive": (edit(neg), 400),
        "missing_tensor": (edit(missing), 400),
        "wrong_dtype": (edit(dtype), 400),
        "truncated": (base_scales[: len(base_scales) // 2], 400),
        "not_safetensors": (b"PK\x03\x04 this is a zip, not safetensors" * 10, 400),
        "empty": (b"", 400),
        "too_big": (base_scales + b"\0" * (13 * 2**20 - len(base_scales)), 413),
    }


def test_bad_uploads_refused_and_change_nothing(server, admin, tenants, base_scales):
    client = _oai(server, ADMIN_KEY)
    before_text = _complete(client, "a")
    before = admin.get("/v1/tenants/a/scales/versions").json()
    metrics_before = _metric_value(admin, "scaleswap_scale_uploads_total", {"result": "rejected"})
    cases = _bad_uploads(base_scales)
    for case, (data, status) in cases.items():
        r = _upload(admin, "a", data)
        assert r.status_code == status, (case, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, case
    assert admin.get("/v1/tenants/a/scales/versions").json() == before
    assert _complete(client, "a") == before_text
    assert _metric_value(admin, "scaleswap_scale_uploads_total", {"result": "rejected"}) == metrics_before + len(cases)
    # Unknown tenant: 404 before reading anything.
    _assert_error(_upload(admin, "zz", base_scales), 404, "tenant_not_found")


def test_new_version_rollback_and_download(server, admin, tenants, base_scales):
    client = _oai(server, ADMIN_KEY)
    v1_text = _complete(client, "a")
    v1_bytes = admin.get("/v1/tenants/a/scales").content
    r = _upload(admin, "a", _perturbed(base_scales, 3))
    assert r.status_code == 201 and r.json()["version"] == 2
    v2_text = _complete(client, "a")  # the next request, no restart
    assert v2_text != v1_text
    r = admin.post("/v1/tenants/a/scales/rollback", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert _complete(client, "a") == v1_text
    versions = admin.get("/v1/tenants/a/scales/versions").json()
    assert versions["current_version"] == 1 and [v["version"] for v in versions["data"]] == [0, 1, 2]
    assert [v["current"] for v in versions["data"]] == [False, True, False]
    assert admin.get("/v1/tenants/a/scales").content == v1_bytes
    assert admin.get("/v1/tenants/a/scales", params={"version": 0}).content == base_scales
    assert st_load(admin.get("/v1/tenants/a/scales", params={"version": 2}).content).keys() == st_load(v1_bytes).keys()
    _assert_error(admin.get("/v1/tenants/a/scales", params={"version": 9}), 404, "version_not_found")
    _assert_error(admin.post("/v1/tenants/a/scales/rollback", json={"version": 9}), 404, "version_not_found")
    _assert_error(admin.post("/v1/tenants/a/scales/rollback", json={"version": -1}), 400)
    # Roll to the base scales and back.
    assert admin.post("/v1/tenants/a/scales/rollback", json={"version": 0}).status_code == 200
    assert _complete(client, "a") == tenants["base_text"]
    assert admin.post("/v1/tenants/a/scales/rollback", json={"version": 1}).status_code == 200


def test_tenant_crud(server, admin, base_id):
    _assert_error(admin.post("/v1/tenants", json={"id": "a"}), 409, "tenant_exists")
    _assert_error(admin.post("/v1/tenants", json={"id": "bad/id"}), 400)
    _assert_error(admin.post("/v1/tenants", json={"id": base_id}), 409)
    key = _create_tenant(admin, "tmp")
    assert "tmp" in [t["id"] for t in admin.get("/v1/tenants").json()["data"]]
    assert admin.delete("/v1/tenants/tmp").json() == {"id": "tmp", "object": "tenant", "deleted": True}
    _assert_error(admin.delete("/v1/tenants/tmp"), 404)
    with pytest.raises(openai.AuthenticationError):  # its key died with it
        _complete(_oai(server, key), base_id)
    with pytest.raises(openai.NotFoundError):
        _complete(_oai(server, ADMIN_KEY), "tmp")


def test_scales_unreadable_at_load_time_fail_cleanly(server, admin, base_scales):
    """A blob damaged on disk after upload: the request fails with a 500 error object, the server keeps serving."""
    _create_tenant(admin, "d")
    r = _upload(admin, "d", _perturbed(base_scales, 11))
    assert r.status_code == 201
    blob = server.data_dir / "blobs" / f"{r.json()['sha256']}.safetensors"
    blob.write_bytes(blob.read_bytes()[:1000])
    err = _assert_error(admin.post("/v1/completions", json={"model": "d", "prompt": PROMPT, "max_tokens": 4}), 500,
                        "generation_failed")
    assert "could not load scales" in err["message"]
    # Rolling back to the base scales makes the tenant usable again.
    assert admin.post("/v1/tenants/d/scales/rollback", json={"version": 0}).status_code == 200
    r = admin.post("/v1/completions", json={"model": "d", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 200
    assert admin.delete("/v1/tenants/d").status_code == 200


# ------------------------------------------------------------------------------------------------ metrics, disconnect
def _metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric_value(client: httpx.Client, name: str, labels: dict[str, str] | None = None) -> float:
    return _metrics(client).get((name, tuple(sorted((labels or {}).items()))), 0.0)


def test_metrics_parse_and_move(server, admin, base_id, tenants):
    before = _metrics(admin)
    _complete(_oai(server, ADMIN_KEY), "b")
    after = _metrics(admin)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("scaleswap_http_requests_total", route="/v1/completions", method="POST", status="200") == 1
    assert delta("scaleswap_generation_tokens_total", tenant="b") == MAX_TOKENS
    assert delta("scaleswap_prompt_tokens_total", tenant="b") > 0
    assert delta("scaleswap_time_to_first_token_seconds_count", tenant="b") == 1
    assert delta("scaleswap_e2e_request_latency_seconds_count", tenant="b", endpoint="completions") == 1
    for name in ("scaleswap_requests_running", "scaleswap_requests_waiting", "scaleswap_kv_blocks_used",
                 "scaleswap_kv_blocks_total", "scaleswap_resident_tenants", "scaleswap_scale_loads_total",
                 "scaleswap_scale_evictions_total", "scaleswap_scale_rollbacks_total", "scaleswap_model_ready"):
        assert (name, ()) in after, name
    assert after[("scaleswap_scale_loads_total", ())] >= 2  # a and b were loaded
    assert after[("scaleswap_kv_blocks_total", ())] > 0 and after[("scaleswap_model_ready", ())] == 1
    assert after[("scaleswap_scale_uploads_total", (("result", "accepted"),))] >= 3
    assert after[("scaleswap_scale_rollbacks_total", ())] >= 2
    # Route labels are templates, never raw paths (bounded cardinality).
    assert not any("/v1/tenants/a/" in dict(k[1]).get("route", "") for k in after)


def test_client_disconnect_aborts_generation(server, admin, base_id):
    aborted = lambda: _metric_value(admin, "scaleswap_requests_finished_total",  # noqa: E731
                                    {"tenant": "_base", "finish_reason": "abort"})
    before = aborted()
    tokens = lambda: _metric_value(admin, "scaleswap_generation_tokens_total", {"tenant": "_base"})  # noqa: E731
    tokens_before = tokens()
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    # Streaming: read one event, then hang up.
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
    # Non-streaming: give up after a moment.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=0.5,
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (aborted() < before + 2
                                           or _metric_value(admin, "scaleswap_requests_running") > 0):
        time.sleep(0.1)
    assert aborted() == before + 2
    assert _metric_value(admin, "scaleswap_requests_running") == 0
    assert _metric_value(admin, "scaleswap_kv_blocks_used") == 0
    # Generation stopped early: far fewer than the 2 x 200 tokens asked for were generated.
    assert tokens() - tokens_before < 200


# ------------------------------------------------------------------------------------------------ shutdown, restart
def test_sigterm_drains_then_restart_keeps_everything(server, admin, base_id, tenants):
    client = _oai(server, ADMIN_KEY)
    texts = {m: _complete(client, m) for m in ("a", "b", "c")}
    versions = {t: admin.get(f"/v1/tenants/{t}/scales/versions").json() for t in ("a", "b", "c")}
    listing = admin.get("/v1/tenants").json()

    # A request in flight when SIGTERM arrives finishes normally.
    result: dict = {}

    def long_request() -> None:
        try:
            r = client.completions.create(model="b", prompt=PROMPT, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
            result["choice"] = r.choices[0]
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    th = threading.Thread(target=long_request)
    th.start()
    deadline = time.monotonic() + 30
    while _metric_value(admin, "scaleswap_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    # uvicorn re-raises the signal after a graceful shutdown, so the exit status is -SIGTERM (or 0).
    assert server.stop(signal.SIGTERM, timeout_s=60) in (0, -signal.SIGTERM)
    th.join(30)
    assert "error" not in result, result
    assert result["choice"].finish_reason == "length"

    server.start()  # same data dir, new process and port
    admin2 = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert admin2.get("/v1/tenants").json() == listing
    for t in ("a", "b", "c"):
        assert admin2.get(f"/v1/tenants/{t}/scales/versions").json() == versions[t]
    client2 = _oai(server, ADMIN_KEY)
    assert {m: _complete(client2, m) for m in ("a", "b", "c")} == texts
    # Keys survive: a's key still works for a and only a.
    key_a = tenants["keys"]["a"]
    assert _complete(_oai(server, key_a), "a") == texts["a"]
    with pytest.raises(openai.PermissionDeniedError):
        _complete(_oai(server, key_a), "b")
    admin2.close()
