"""Scale bank residency: loads off-thread, LRU eviction of unpinned slots only, growth, version keys, drops."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from scaleswap.runtime.scale_bank import ScaleBank


class _Layer(nn.Module):
    """What the bank manages: a module holding ``bank (S, N, G)``."""

    def __init__(self, n: int, g: int):
        super().__init__()
        self.bank = torch.ones(1, n, g)


def _make(max_resident: int, loader, initial_slots: int = 2):
    mods = {"a": _Layer(3, 2), "b": _Layer(4, 1)}
    return mods, ScaleBank(mods, max_resident, loader, initial_slots=initial_slots)


def _scales(tenant: str, version):
    v = float(hash((tenant, version)) % 97 + 2)
    return {"a": torch.full((3, 2), v), "b": torch.full((4, 1), v)}


def _wait_resident(bank: ScaleBank, key, timeout=5.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        bank.poll()
        slot = bank.slot_of(key)
        if slot is not None:
            return slot
        time.sleep(0.005)
    raise AssertionError(f"{key} never became resident")


def test_load_copies_into_slot_and_grows():
    mods, bank = _make(5, _scales)
    keys = [("t", 1), ("u", None), ("v", 3)]
    for k in keys:
        bank.pin(k)
    slots = [_wait_resident(bank, k) for k in keys]
    assert len(set(slots)) == 3 and 0 not in slots
    assert bank.capacity >= 4 and mods["a"].bank.shape[0] == bank.capacity
    for k, s in zip(keys, slots):
        torch.testing.assert_close(mods["a"].bank[s], _scales(*k)["a"])
        torch.testing.assert_close(mods["b"].bank[s], _scales(*k)["b"])
    assert torch.all(mods["a"].bank[0] == 1)  # base untouched
    assert bank.num_loads == 3 and bank.num_resident == 3
    bank.close()


def test_lru_evicts_only_unpinned():
    mods, bank = _make(2, _scales)
    bank.pin(("a", 1))
    bank.pin(("b", 1))
    sa = _wait_resident(bank, ("a", 1))
    sb = _wait_resident(bank, ("b", 1))
    bank.pin(("c", 1))
    time.sleep(0.05)
    bank.poll()
    assert bank.slot_of(("c", 1)) is None  # both slots pinned: c waits, nothing is overwritten
    torch.testing.assert_close(mods["a"].bank[sa], _scales("a", 1)["a"])
    bank.unpin(("b", 1))
    sc = _wait_resident(bank, ("c", 1))
    assert sc == sb and bank.num_evictions == 1
    assert bank.slot_of(("b", 1)) is None and bank.slot_of(("a", 1)) == sa
    bank.close()


def test_loader_runs_off_thread_and_failures_are_reported():
    gate = threading.Event()

    def loader(tenant, version):
        if tenant == "bad":
            raise FileNotFoundError("no such tenant")
        if tenant == "shape":
            return {"a": torch.ones(2, 2), "b": torch.ones(4, 1)}
        gate.wait(5)
        return _scales(tenant, version)

    _, bank = _make(4, loader)
    bank.pin(("slow", 1))
    bank.pin(("bad", 1))
    bank.pin(("shape", 1))
    t0 = time.time()
    bank.poll()  # returns at once although the slow load is blocked
    assert time.time() - t0 < 0.5
    deadline = time.time() + 5
    while (bank.failure(("bad", 1)) is None or bank.failure(("shape", 1)) is None) and time.time() < deadline:
        time.sleep(0.01)
        bank.poll()
    assert "no such tenant" in bank.failure(("bad", 1))
    assert "shape" in bank.failure(("shape", 1))
    assert bank.slot_of(("slow", 1)) is None and bank.has_pending()
    gate.set()
    _wait_resident(bank, ("slow", 1))
    bank.close()


def test_drop_and_version_flip_eviction():
    _, bank = _make(4, _scales)
    for k in [("t", 1), ("t", 2), ("u", 1)]:
        bank.pin(k)
        _wait_resident(bank, k)
    bank.unpin(("t", 1))
    bank.evict_unpinned("t", keep_version=2)
    assert bank.slot_of(("t", 1)) is None and bank.slot_of(("t", 2)) is not None
    bank.drop_tenant("t")  # t/2 is pinned: stays until its request ends
    assert bank.slot_of(("t", 2)) is not None
    bank.unpin(("t", 2))
    assert bank.slot_of(("t", 2)) is None
    assert bank.resident_keys() == [("u", 1)]
    bank.close()


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_resident"):
        ScaleBank({"a": _Layer(2, 2)}, 0, _scales)
    with pytest.raises(ValueError, match="no quantized layers"):
        ScaleBank({}, 2, _scales)
