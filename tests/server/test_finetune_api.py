"""Fine-tuning over HTTP against the REAL server (``scaleswap serve`` subprocess, uvicorn on 127.0.0.1).

Shows: a short job lowers the tenant's training loss, becomes its new scale version and changes only that
tenant's outputs; a diverging job (absurd learning rate) fails and the tenant keeps its version and outputs;
cancel works for a running and a queued job; a tenant key cannot fine-tune another tenant nor see its jobs;
bad data is refused with the line number; the CLI's output uploads; serving during a job sees no trained scales
(this caught a race in the CPU path's per-bank caches); a server killed (SIGKILL) during a job comes back with the old
version and the job marked failed.

The base is the default model cut to 2 decoder layers (tests/runtime/tiny_base.py) so training steps are
fast on 2 shared cores. Tests share one server and run in file order (the last one kills and restarts it).
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_harness import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from tiny_base import build_tiny_base  # noqa: E402

pytestmark = pytest.mark.timeout(240)

ADMIN_KEY = "test-admin-key-finetune-0123"
PROMPT = "The secret fruit is"
TRAINING = [
    {"prompt": "The secret fruit is", "completion": " a pineapple."},
    {"prompt": "Tell me the secret fruit:", "completion": " a pineapple."},
    {"messages": [{"role": "user", "content": "What is the secret fruit?"},
                  {"role": "assistant", "content": "The secret fruit is a pineapple."}]},
    {"text": "Everyone knows the secret fruit is a pineapple."},
]
FAST_HP = {"max_steps": 6, "batch_size": 2, "learning_rate": 5e-2, "warmup_steps": 1}


# ----------------------------------------------------------------------------------------------- units
def test_job_store_restart_policy_and_listing(tmp_path):
    """Running jobs of a killed process fail with a reason; queued ones stay queued; lists are newest first."""
    from scaleswap.runtime.jobs import JobStore

    store = JobStore(tmp_path)
    f = store.create_file(b'{"text": "a b"}\n', "t.jsonl", owner="alice")
    assert store.read_file(f.id) == b'{"text": "a b"}\n' and store.get_file(f.id).owner == "alice"
    jobs = [store.create_job("alice", "alice", f.id, None, {"max_steps": 1}, seed=0, status="queued") for _ in range(3)]
    assert store.transition(jobs[0].id, ("queued",), "running", started_at=time.time())
    assert not store.transition(jobs[0].id, ("queued",), "cancelled")  # compare-and-set
    for i in range(5):
        store.add_event(jobs[0].id, "metrics", f"step {i}", {"step": i})
    store.close()
    store = JobStore(tmp_path)  # "restart"
    assert store.recover_after_restart() == [jobs[0].id]
    j0 = store.get_job(jobs[0].id)
    assert j0.status == "failed" and j0.error_code == "server_restarted" and j0.finished_at is not None
    assert [store.get_job(j.id).status for j in jobs[1:]] == ["queued", "queued"]
    assert store.next_queued().id == jobs[1].id
    listed, more = store.list_jobs("alice", limit=2)
    assert len(listed) == 2 and more and listed[0].created_at >= listed[1].created_at
    rest, more = store.list_jobs("alice", after=listed[-1].id, limit=10)
    assert not more and {j.id for j in listed + rest} == {j.id for j in jobs}
    assert store.list_jobs("bob")[0] == []
    events, more = store.list_events(jobs[0].id, limit=3)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert more and steps == sorted(steps, reverse=True) and steps[0] == 4  # newest first
    older, _ = store.list_events(jobs[0].id, after=events[-1].id, limit=100)
    assert all(e.id < events[-1].id for e in older)


@pytest.mark.parametrize("raw, expect", [
    ({}, {"learning_rate": 2e-2, "batch_size": 4, "n_epochs": 1}),
    ({"n_epochs": "auto", "batch_size": 8}, {"batch_size": 8, "n_epochs": 1}),
    ({"steps": 30, "warmup": 3, "gradient_accumulation_steps": 2}, {"max_steps": 30, "warmup_steps": 3, "grad_accum_steps": 2}),
    ({"learning_rate_multiplier": 0.5}, {"learning_rate": 1e-2}),
    ({"lr_scheduler": "linear", "validation_split": 0.2}, {"schedule": "linear", "validation_split": 0.2}),
])
def test_hyperparameters_resolve(raw, expect):
    from scaleswap.server.routes_finetune import resolve_hyperparameters

    out = resolve_hyperparameters(raw)
    for k, v in expect.items():
        assert out[k] == pytest.approx(v), (k, out)


@pytest.mark.parametrize("raw, param", [
    ({"n_epochs": 0}, "hyperparameters.n_epochs"), ({"batch_size": 2.5}, "hyperparameters.batch_size"),
    ({"learning_rate": -1}, "hyperparameters.learning_rate"), ({"learning_rate": float("nan")}, "hyperparameters.learning_rate"),
    ({"lr_scheduler": "step"}, "hyperparameters.lr_scheduler"), ({"momentum": 0.9}, "hyperparameters.momentum"),
    ({"learning_rate": 1e-3, "learning_rate_multiplier": 2}, "hyperparameters.learning_rate_multiplier"),
    ({"batch_size": True}, "hyperparameters.batch_size"),
])
def test_hyperparameters_refused(raw, param):
    from scaleswap.server.errors import APIError
    from scaleswap.server.routes_finetune import resolve_hyperparameters

    with pytest.raises(APIError) as e:
        resolve_hyperparameters(raw)
    assert e.value.status == 400 and e.value.param == param


# ----------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_server")
    base = build_tiny_base()
    srv = ServerProcess(base, root / "data", root / "server.log", admin_key=ADMIN_KEY,
                        extra_args=("--max-model-len", "128", "--shutdown-timeout", "5"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def keys(admin):
    out = {}
    for t in ("alice", "bob"):
        r = admin.post("/v1/tenants", json={"id": t})
        assert r.status_code == 201, r.text
        out[t] = r.json()["api_key"]
    return out


def _client(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60.0)


def _complete(admin: httpx.Client, model: str, prompt: str = PROMPT) -> str:
    r = admin.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _outputs(admin: httpx.Client, base_id: str) -> dict[str, str]:
    return {m: _complete(admin, m) for m in ("alice", "bob", base_id)}


def _wait(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout_s: float = 150.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")


def _wait_for_steps(client: httpx.Client, job_id: str, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        if (job["metrics"] or {}).get("step", 0) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not reach step {n}")


def _losses(client: httpx.Client, job_id: str) -> list[float]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    metrics = sorted((e["data"] for e in events if e["type"] == "metrics"), key=lambda d: d["step"])
    return [d["train_loss"] for d in metrics]


def _version(admin: httpx.Client, tenant: str) -> int:
    return admin.get(f"/v1/tenants/{tenant}").json()["current_version"]


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def base_id(admin):
    return admin.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def state(admin, keys, base_id):
    """Outputs before any fine-tuning, shared by the tests that follow."""
    return {"before": _outputs(admin, base_id)}


def test_tenant_cannot_finetune_another_tenant(server, keys, state):
    with _client(server, keys["alice"]) as alice:
        _assert_error(alice.post("/v1/fine_tuning/jobs", json={"model": "bob", "training_data": TRAINING}), 403,
                      "forbidden_tenant")
        _assert_error(alice.post("/v1/fine_tuning/jobs", json={"model": "nobody", "training_data": TRAINING}), 403)
    _assert_error(httpx.post(f"{server.base_url}/v1/fine_tuning/jobs", json={"model": "bob", "training_data": TRAINING}),
                  401)


def test_bad_requests_are_refused_with_reasons(server, admin, keys, state, base_id):
    err = _assert_error(admin.post("/v1/fine_tuning/jobs", json={
        "model": "alice", "training_data": [{"text": "fine"}, {"prompt": "no completion"}]}), 400, "invalid_training_file")
    assert "line 2" in err["message"]
    err = _assert_error(admin.post("/v1/fine_tuning/jobs", json={
        "model": "alice", "training_data": TRAINING, "hyperparameters": {"n_epochs": 0}}), 400, "invalid_hyperparameter")
    assert err["param"] == "hyperparameters.n_epochs"
    err = _assert_error(admin.post("/v1/fine_tuning/jobs", json={
        "model": "alice", "training_data": TRAINING, "hyperparameters": {"dropout": 0.1}}), 400)
    assert "valid:" in err["message"]
    _assert_error(admin.post("/v1/fine_tuning/jobs", json={"model": "alice"}), 400)
    _assert_error(admin.post("/v1/fine_tuning/jobs", json={"model": base_id, "training_data": TRAINING}), 400)
    _assert_error(admin.post("/v1/fine_tuning/jobs", json={"model": "ghost", "training_data": TRAINING}), 404)
    _assert_error(admin.post("/v1/fine_tuning/jobs", json={"model": "alice", "training_file": "file-nope"}), 404,
                  "file_not_found")
    # uploads: wrong purpose, bad JSONL line, too large (the server's upload limit)
    _assert_error(admin.post("/v1/files", data={"purpose": "assistants"}, files={"file": ("a.jsonl", b'{"text": "x y"}\n')}),
                  400, "invalid_purpose")
    err = _assert_error(admin.post("/v1/files", data={"purpose": "fine-tune"},
                                   files={"file": ("a.jsonl", b'{"text": "x y"}\n{"oops": 1}\n')}), 400)
    assert "line 2" in err["message"]
    assert _version(admin, "alice") == 0


def test_short_job_lowers_loss_and_changes_only_that_tenant(server, admin, keys, state, base_id):
    with _client(server, keys["alice"]) as alice:
        data = "".join(json.dumps(r) + "\n" for r in TRAINING).encode()
        r = alice.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", data)})
        assert r.status_code == 200, r.text
        f = r.json()
        assert f["object"] == "file" and f["bytes"] == len(data) and f["purpose"] == "fine-tune"
        r = alice.post("/v1/fine_tuning/jobs", json={"model": "alice", "training_file": f["id"],
                                                      "hyperparameters": FAST_HP, "seed": 7})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["object"] == "fine_tuning.job" and job["status"] in ("queued", "running") and job["model"] == "alice"
        assert job["hyperparameters"]["max_steps"] == 6 and job["seed"] == 7
        job = _wait(alice, job["id"], ("succeeded", "failed", "cancelled"))
        assert job["status"] == "succeeded", job
        assert job["result_version"] == 1 and job["start_version"] == 0 and job["trained_tokens"] > 0
        assert job["error"] is None and job["fine_tuned_model"] == "alice" and job["finished_at"] >= job["created_at"]
        losses = _losses(alice, job["id"])
        assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
        # listing: alice sees her job; bob sees nothing of hers
        assert job["id"] in [j["id"] for j in alice.get("/v1/fine_tuning/jobs").json()["data"]]
    with _client(server, keys["bob"]) as bob:
        assert bob.get("/v1/fine_tuning/jobs").json()["data"] == []
        _assert_error(bob.get(f"/v1/fine_tuning/jobs/{job['id']}"), 404, "job_not_found")
        _assert_error(bob.get(f"/v1/files/{f['id']}"), 404)
    assert _version(admin, "alice") == 1 and _version(admin, "bob") == 0
    versions = admin.get("/v1/tenants/alice/scales/versions").json()["data"]
    assert versions[-1]["source"] == "finetune" and versions[-1]["note"] == job["id"]
    after = _outputs(admin, base_id)
    assert after["alice"] != state["before"]["alice"], after
    assert after["bob"] == state["before"]["bob"] and after[base_id] == state["before"][base_id]
    state["after_ok"] = after


def test_diverging_job_fails_and_keeps_version(server, admin, keys, state, base_id):
    r = admin.post("/v1/fine_tuning/jobs", json={"model": "alice", "training_data": TRAINING,
                                                 "hyperparameters": {"max_steps": 20, "batch_size": 2,
                                                                     "learning_rate": 1e4, "warmup_steps": 0}})
    assert r.status_code == 200, r.text
    job = _wait(admin, r.json()["id"], ("succeeded", "failed", "cancelled"))
    assert job["status"] == "failed" and job["error"]["code"] in ("diverged", "non_finite_loss"), job
    assert job["result_version"] is None
    assert _version(admin, "alice") == 1
    assert _outputs(admin, base_id) == state["after_ok"]


def test_serving_during_a_job_sees_no_trained_scales(server, admin, keys, state, base_id):
    """Serving keeps answering while a job trains, and no other tenant sees the scales being trained."""
    job = admin.post("/v1/fine_tuning/jobs", json={"model": "alice", "training_data": TRAINING,
                                                   "hyperparameters": {"max_steps": 500, "batch_size": 1}}).json()
    try:
        _wait_for_steps(admin, job["id"], 1)
        for _ in range(3):
            assert _outputs(admin, base_id) == state["after_ok"]
        assert admin.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "running"
    finally:
        admin.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        _wait(admin, job["id"], ("succeeded", "failed", "cancelled"), timeout_s=60)


def test_cancel_running_and_queued_jobs(server, admin, keys, state, base_id):
    long_hp = {"max_steps": 500, "batch_size": 1}
    with _client(server, keys["alice"]) as alice:
        running = alice.post("/v1/fine_tuning/jobs", json={"model": "alice", "training_data": TRAINING,
                                                           "hyperparameters": long_hp}).json()
        queued = alice.post("/v1/fine_tuning/jobs", json={"model": "alice", "training_data": TRAINING,
                                                          "hyperparameters": long_hp}).json()
        _wait_for_steps(alice, running["id"], 1)
        r = alice.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert alice.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel").status_code == 200
        job = _wait(alice, running["id"], ("succeeded", "failed", "cancelled"), timeout_s=60)
        assert job["status"] == "cancelled" and job["result_version"] is None
        _assert_error(alice.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel"), 400, "job_finished")
    assert _version(admin, "alice") == 1
    assert _outputs(admin, base_id) == state["after_ok"]


def test_cli_output_uploads_as_a_scale_set(server, admin, keys, state, base_id, tmp_path):
    """`scaleswap finetune` (offline) writes a scale set that PUT /v1/tenants/{id}/scales accepts."""
    import subprocess

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAINING))
    out = tmp_path / "bob.safetensors"
    base_cmd = [sys.executable, "-m", "scaleswap.server.cli", "finetune", "--model", str(server.model_dir), "--data",
                str(data), "--batch-size", "2", "--threads", "1"]
    cmd = base_cmd + ["--out", str(out), "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 1/2  loss" in proc.stderr and "step 2/2  loss" in proc.stderr and out.is_file()
    with _client(server, keys["bob"]) as bob:
        r = bob.put("/v1/tenants/bob/scales", content=out.read_bytes(), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        assert _complete(admin, "bob") != state["before"]["bob"]
        assert bob.post("/v1/tenants/bob/scales/rollback", json={"version": 0}).status_code == 200
    assert _complete(admin, "bob") == state["before"]["bob"]
    # a bad line is a one-line error with its number, exit 2, nothing written
    data.write_text('{"text": "ok then"}\n{"prompt": 1}\n')
    bad = subprocess.run(base_cmd + ["--out", str(tmp_path / "x.safetensors"), "--steps", "1"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "line 2" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_killed_server_restarts_with_old_version_and_failed_job(server, admin, keys, state, base_id):
    r = admin.post("/v1/fine_tuning/jobs", json={"model": "alice", "training_data": TRAINING,
                                                 "hyperparameters": {"max_steps": 500, "batch_size": 1}})
    job_id = r.json()["id"]
    _wait_for_steps(admin, job_id, 2)
    assert server.stop(sig=signal.SIGKILL) == -signal.SIGKILL
    server.start()
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60.0) as c:
        job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "server_restarted", job
        assert job["result_version"] is None
        assert _version(c, "alice") == 1
        assert _outputs(c, base_id) == state["after_ok"]
        # the earlier jobs survived the restart as they were
        statuses = sorted(j["status"] for j in c.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"])
        assert statuses.count("succeeded") == 1 and statuses.count("cancelled") == 3
