"""Tenant store: keys, versions, rollback, persistence, and consistency after a kill at a random moment."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save, save_file

from scaleswap.runtime.tenant_store import (
    API_KEY_PREFIX,
    TenantStore,
    TenantStoreError,
)


def _scale_bytes(seed: int, shapes=((5, 3), (7, 1))) -> bytes:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.mlp.up_proj": torch.rand(s, generator=g) + 0.1 for i, s in enumerate(shapes)}
    return save(tensors, metadata={"format": "scaleswap-scales", "fingerprint": "f" * 64})


@pytest.fixture()
def store(tmp_path):
    base = {"model.layers.0.mlp.up_proj": torch.ones(5, 3), "model.layers.1.mlp.up_proj": torch.ones(7, 1)}
    save_file(base, str(tmp_path / "base.safetensors"))
    s = TenantStore(tmp_path / "data", base_fingerprint="f" * 64, base_scales_path=tmp_path / "base.safetensors")
    yield s
    s.close()


def test_create_authenticate_and_key_is_hashed(store, tmp_path):
    rec, key = store.create_tenant("acme")
    assert key.startswith(API_KEY_PREFIX)
    assert rec.current_version == 0 and rec.latest_version == 0
    assert store.authenticate(key) == "acme"
    # A wrong secret with the right key id, a wrong key id, garbage: all refused.
    key_id, secret = key[len(API_KEY_PREFIX):].split(".")
    assert store.authenticate(f"{API_KEY_PREFIX}{key_id}.{secret[:-1]}x") is None
    assert store.authenticate(f"{API_KEY_PREFIX}000000000000.{secret}") is None
    assert store.authenticate("sk-something-else") is None
    assert store.authenticate(API_KEY_PREFIX) is None
    # The clear secret is nowhere on disk.
    raw = (tmp_path / "data" / "tenants.sqlite3").read_bytes()
    wal = tmp_path / "data" / "tenants.sqlite3-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert secret.encode() not in raw
    new_key = store.rotate_key("acme")
    assert store.authenticate(key) is None and store.authenticate(new_key) == "acme"


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "..", "a" * 65, "ten ant", "é"])
def test_invalid_tenant_ids(store, bad):
    with pytest.raises(TenantStoreError) as e:
        store.create_tenant(bad)
    assert e.value.code == "invalid_tenant_id"


def test_duplicate_and_missing(store):
    store.create_tenant("a")
    with pytest.raises(TenantStoreError) as e:
        store.create_tenant("a")
    assert e.value.code == "tenant_exists"
    for call in (lambda: store.delete_tenant("zz"), lambda: store.list_versions("zz"),
                 lambda: store.set_current_version("zz", 0), lambda: store.add_version("zz", b"x")):
        with pytest.raises(TenantStoreError) as e:
            call()
        assert e.value.code == "tenant_not_found"


def test_versions_rollback_and_loader(store):
    store.create_tenant("a")
    b1, b2 = _scale_bytes(1), _scale_bytes(2)
    v1 = store.add_version("a", b1)
    v2 = store.add_version("a", b2, source="finetune", note="job-1")
    assert (v1.version, v2.version) == (1, 2)
    assert v2.sha256 == hashlib.sha256(b2).hexdigest() and v2.size_bytes == len(b2)
    assert store.current_version("a") == 2
    assert store.read_version_bytes("a") == b2
    assert store.read_version_bytes("a", 1) == b1
    assert [v.version for v in store.list_versions("a")] == [0, 1, 2]
    # Rollback is a pointer move; numbers are never reused.
    store.set_current_version("a", 1)
    assert store.current_version("a") == 1 and store.read_version_bytes("a") == b1
    v3 = store.add_version("a", _scale_bytes(3))
    assert v3.version == 3
    with pytest.raises(TenantStoreError) as e:
        store.set_current_version("a", 7)
    assert e.value.code == "version_not_found"
    # Loader: version 0 = base file, others = blobs.
    base = store.scale_loader("a", 0)
    assert torch.equal(base["model.layers.0.mlp.up_proj"], torch.ones(5, 3))
    got = store.scale_loader("a", 2)
    g = torch.Generator().manual_seed(2)
    assert torch.equal(got["model.layers.0.mlp.up_proj"], torch.rand((5, 3), generator=g) + 0.1)


def test_dedup_delete_and_prune(store):
    store.create_tenant("a")
    store.create_tenant("b")
    shared = _scale_bytes(9)
    store.add_version("a", shared)
    store.add_version("b", shared)
    assert len(list(store.blob_dir.iterdir())) == 1  # content-addressed
    store.delete_tenant("a")
    assert len(list(store.blob_dir.iterdir())) == 1  # b still uses it
    assert store.read_version_bytes("b", 1) == shared
    for i in range(4):
        store.add_version("b", _scale_bytes(20 + i))
    store.set_current_version("b", 2)
    assert store.prune("b", keep_last=1) == [1, 3, 4]  # keeps 5 (newest) and 2 (current) and 0 (base)
    assert [v.version for v in store.list_versions("b")] == [0, 2, 5]
    assert len(list(store.blob_dir.iterdir())) == 2
    store.delete_tenant("b")
    assert list(store.blob_dir.iterdir()) == []
    assert store.get_tenant("b") is None
    # Re-created: starts on the base again, but version numbers continue (never name two scale sets).
    rec, _ = store.create_tenant("b")
    assert rec.current_version == 0 and rec.latest_version == 5
    assert [v.version for v in store.list_versions("b")] == [0]
    assert store.add_version("b", _scale_bytes(40)).version == 6


def test_persists_across_reopen_and_refuses_other_base(store, tmp_path):
    _, key = store.create_tenant("a")
    b1 = _scale_bytes(1)
    store.add_version("a", b1)
    store.add_version("a", _scale_bytes(2))
    store.set_current_version("a", 1)
    store.close()
    again = TenantStore(tmp_path / "data", base_fingerprint="f" * 64)
    assert again.authenticate(key) == "a"
    assert again.current_version("a") == 1 and again.read_version_bytes("a") == b1
    assert [v.version for v in again.list_versions("a")] == [0, 1, 2]
    again.close()
    with pytest.raises(TenantStoreError) as e:
        TenantStore(tmp_path / "data", base_fingerprint="e" * 64)
    assert e.value.code == "base_mismatch"


def test_orphans_removed_at_open(store, tmp_path):
    store.create_tenant("a")
    store.add_version("a", _scale_bytes(1))
    store.close()
    blob_dir = tmp_path / "data" / "blobs"
    (blob_dir / ".tmp-half-written").write_bytes(b"\0" * 10)  # kill during a blob write
    (blob_dir / ("0" * 64 + ".safetensors")).write_bytes(_scale_bytes(5))  # kill between rename and commit
    again = TenantStore(tmp_path / "data")
    assert again.removed_orphans == 2
    assert len(list(blob_dir.iterdir())) == 1
    again.close()


_WRITER = textwrap.dedent(
    """
    import sys, os
    import torch
    from safetensors.torch import save
    from scaleswap.runtime.tenant_store import TenantStore
    s = TenantStore(sys.argv[1])
    for t in ("a", "b"):
        if s.get_tenant(t) is None:
            s.create_tenant(t)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        t = "ab"[i % 2]
        data = save({"w": torch.full((64, 64), float(i))})
        if i % 7 == 0:
            s.set_current_version(t, max(0, s.current_version(t) - 1))
        else:
            s.add_version(t, data)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay_s", [0.05, 0.3])
def test_kill_at_random_moment_leaves_consistent_store(tmp_path, delay_s):
    """SIGKILL a process in the middle of uploads and rollbacks: every row's blob exists and matches its hash."""
    data = tmp_path / "data"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay_s)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    s = TenantStore(data)
    try:
        for t in ("a", "b"):
            versions = s.list_versions(t)
            assert versions[0].version == 0
            assert s.current_version(t) in {v.version for v in versions}
            for v in versions[1:]:
                blob = s.blob_path(v.sha256).read_bytes()
                assert hashlib.sha256(blob).hexdigest() == v.sha256 and len(blob) == v.size_bytes
        referenced = {v.sha256 for t in ("a", "b") for v in s.list_versions(t) if v.sha256}
        assert {p.stem for p in s.blob_dir.iterdir()} == referenced
    finally:
        s.close()


def test_concurrent_threads(store):
    """Uploads, rollbacks, deletes and auth from several threads: numbering stays dense, nothing dangles."""
    import threading

    keys = {t: store.create_tenant(t)[1] for t in ("t0", "t1", "t2", "gone")}
    errors: list[BaseException] = []

    def uploader(t: str, seed: int) -> None:
        try:
            for i in range(6):
                store.add_version(t, _scale_bytes(seed * 100 + i))
                assert store.authenticate(keys[t]) == t
                if i == 3:
                    store.set_current_version(t, 2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=uploader, args=(t, i)) for i, t in enumerate(("t0", "t1", "t2"))]
    threads.append(threading.Thread(target=store.delete_tenant, args=("gone",)))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in ("t0", "t1", "t2"):
        assert [v.version for v in store.list_versions(t)] == list(range(7))
        assert store.current_version(t) == 6
        for v in store.list_versions(t)[1:]:
            assert hashlib.sha256(store.blob_path(v.sha256).read_bytes()).hexdigest() == v.sha256
    assert store.get_tenant("gone") is None and store.authenticate(keys["gone"]) is None
    assert len(list(store.blob_dir.iterdir())) == 18
