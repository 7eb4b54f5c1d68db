"""Unit tests of server/limits.py: per-tenant concurrency cap and job quota."""
from __future__ import annotations

import asyncio
import threading

import pytest

from scaleswap.server.limits import (
    MAX_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    JobQuota,
    TenantLimiter,
    TenantLimitExceeded,
)


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_limiter_caps_each_tenant_independently(limit: int) -> None:
    lim = TenantLimiter(limit)
    releases = [lim.acquire("a") for _ in range(limit)]
    assert lim.in_flight("a") == limit
    with pytest.raises(TenantLimitExceeded) as ei:
        lim.acquire("a")
    e = ei.value
    assert (e.tenant_id, e.kind, e.limit, e.current) == ("a", "concurrent_requests", limit, limit)
    assert e.retry_after_s >= MIN_RETRY_AFTER_S and int(e.retry_after_header) >= 1
    # another tenant is not affected by a's full slots
    rb = lim.acquire("b")
    assert lim.in_flight("b") == 1 and lim.total_in_flight() == limit + 1
    # freeing one of a's slots admits a again
    releases.pop()()
    lim.acquire("a")()
    rb()
    for r in releases:
        r()
    assert lim.total_in_flight() == 0
    assert lim.num_rejected == 1


def test_release_is_idempotent_and_state_stays_bounded() -> None:
    lim = TenantLimiter(1)
    for i in range(100):
        r = lim.acquire(f"t{i}")
        r()
        r()  # second call must not decrement again
    assert lim.total_in_flight() == 0
    assert lim._in_flight == {}  # no per-tenant residue after release


def test_unlimited_never_refuses() -> None:
    lim = TenantLimiter(None)
    rs = [lim.acquire("a") for _ in range(1000)]
    assert lim.in_flight("a") == 1000
    for r in rs:
        r()
    assert lim.in_flight("a") == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_limits_are_rejected(bad) -> None:
    with pytest.raises(ValueError, match="positive integer or None"):
        TenantLimiter(bad)
    with pytest.raises(ValueError, match="positive integer or None"):
        JobQuota(bad)


def test_slot_context_manager_releases_on_error_and_refuses_over_limit() -> None:
    lim = TenantLimiter(2)

    async def main() -> None:
        async with lim.slot("a"):
            async with lim.slot("a"):
                assert lim.in_flight("a") == 2
                with pytest.raises(TenantLimitExceeded):
                    async with lim.slot("a"):
                        pytest.fail("entered a third slot")
                async with lim.slot("b"):
                    assert lim.in_flight("b") == 1
        assert lim.in_flight("a") == 0
        with pytest.raises(RuntimeError):
            async with lim.slot("a"):
                raise RuntimeError("boom")
        assert lim.in_flight("a") == 0

    asyncio.run(main())


def test_concurrent_tasks_never_exceed_limit() -> None:
    """Many asyncio tasks race for 3 slots: the peak seen inside is exactly 3."""
    lim = TenantLimiter(3)
    peak = 0
    admitted = refused = 0

    async def one() -> None:
        nonlocal peak, admitted, refused
        try:
            async with lim.slot("a"):
                admitted += 1
                peak = max(peak, lim.in_flight("a"))
                await asyncio.sleep(0.01)
        except TenantLimitExceeded:
            refused += 1

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(20)))

    asyncio.run(main())
    assert peak == 3 and admitted == 3 and refused == 17
    assert lim.in_flight("a") == 0


def test_threads_keep_counts_consistent() -> None:
    lim = TenantLimiter(4)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(500):
                try:
                    r = lim.acquire("a")
                except TenantLimitExceeded:
                    continue
                assert lim.in_flight("a") <= 4
                r()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert lim.in_flight("a") == 0


def test_retry_after_tracks_hold_time_and_is_clamped(monkeypatch) -> None:
    import scaleswap.server.limits as limits_mod

    now = [1000.0]
    monkeypatch.setattr(limits_mod.time, "monotonic", lambda: now[0])
    lim = TenantLimiter(1, ewma_alpha=1.0)  # alpha 1: estimate = last hold time
    assert lim.retry_after_s() == MIN_RETRY_AFTER_S  # nothing measured yet
    r = lim.acquire("a")
    now[0] += 7.3
    r()
    assert lim.retry_after_s() == pytest.approx(7.3)
    r = lim.acquire("a")
    with pytest.raises(TenantLimitExceeded) as ei:
        lim.acquire("a")
    assert ei.value.retry_after_header == "8"  # rounded up
    now[0] += 10_000
    r()
    assert lim.retry_after_s() == MAX_RETRY_AFTER_S
    r = lim.acquire("a")
    r()  # zero hold time → clamped up to the minimum
    assert lim.retry_after_s() == MIN_RETRY_AFTER_S


@pytest.mark.parametrize("limit", [1, 3])
def test_job_quota(limit: int) -> None:
    q = JobQuota(limit, retry_after_s=30)
    for n in range(limit):
        q.check("a", n)  # below the limit: fine
    with pytest.raises(TenantLimitExceeded) as ei:
        q.check("a", limit)
    assert ei.value.kind == "queued_jobs" and ei.value.retry_after_header == "30"
    assert "fine-tuning jobs queued" in str(ei.value)
    JobQuota(None).check("a", 10**6)
    with pytest.raises(ValueError):
        q.check("a", -1)
