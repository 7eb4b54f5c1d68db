"""Per-tenant limits: concurrent requests in flight and queued fine-tuning jobs.

One tenant must not starve the others. The engine's global queue limit
(``--max-waiting``, ``QueueFullError`` → 429) protects the server as a whole;
these limits protect tenants from each other:

- :class:`TenantLimiter` caps how many requests one tenant may have in flight
  at once (``--max-concurrent-per-tenant``). A request over the cap is refused
  at once with :class:`TenantLimitExceeded` (the server answers 429 with a
  ``Retry-After`` header) instead of queueing behind the tenant's own requests
  and occupying the shared queue.
- :class:`JobQuota` caps how many fine-tuning jobs one tenant may have queued.

Both are in-process and single-server: state lives in memory and is guarded by
a ``threading.Lock`` so that the counters stay right even when called from a
worker thread. ``None`` as a limit means unlimited.

Usage in a route (the slot must be held for the whole response, streaming
included)::

    try:
        release = limiter.acquire(tenant_id)     # raises TenantLimitExceeded
    except TenantLimitExceeded as e:
        return error_429(retry_after=e.retry_after_header)
    ... stream; call release() when the stream ends (finally:)

or, when the whole request fits inside one block::

    async with limiter.slot(tenant_id):
        ...
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

# Bounds on the Retry-After hint, in seconds. Clients treat it as advice.
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0


class TenantLimitExceeded(Exception):
    """A tenant is over one of its limits; the request is refused (HTTP 429).

    Attributes:
        tenant_id: the tenant that hit the limit.
        kind: ``"concurrent_requests"`` or ``"queued_jobs"``.
        limit: the configured limit.
        current: how many the tenant had when refused.
        retry_after_s: suggested wait in seconds (float, ≥ 1).
    """

    def __init__(self, tenant_id: str, kind: str, limit: int, current: int, retry_after_s: float) -> None:
        self.tenant_id = tenant_id
        self.kind = kind
        self.limit = limit
        self.current = current
        self.retry_after_s = float(retry_after_s)
        what = "requests in flight" if kind == "concurrent_requests" else "fine-tuning jobs queued"
        super().__init__(
            f"tenant {tenant_id!r} already has {current} {what} (limit {limit}); "
            f"retry after {self.retry_after_header} s"
        )

    @property
    def retry_after_header(self) -> str:
        """The ``Retry-After`` header value: whole seconds, rounded up (RFC 9110 §10.2.3)."""
        return str(max(1, math.ceil(self.retry_after_s)))


def _check_limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None (unlimited), got {value!r}")
    return value


class TenantLimiter:
    """Caps the number of requests each tenant has in flight.

    ``retry_after_s`` of a refusal is an estimate of when one of the tenant's
    slots frees up: an exponential moving average of how long admitted requests
    held their slot (all tenants pooled, so a new tenant gets a sensible figure),
    clamped to [MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S].
    """

    def __init__(self, max_concurrent_per_tenant: int | None, *, ewma_alpha: float = 0.2) -> None:
        self.max_concurrent_per_tenant = _check_limit("max_concurrent_per_tenant", max_concurrent_per_tenant)
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha}")
        self._alpha = ewma_alpha
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._mean_hold_s: float | None = None
        self.num_rejected = 0  # total refusals since start (for metrics)

    # -- queries -----------------------------------------------------------------
    def in_flight(self, tenant_id: str) -> int:
        """Requests of ``tenant_id`` currently holding a slot."""
        with self._lock:
            return self._in_flight.get(tenant_id, 0)

    def total_in_flight(self) -> int:
        with self._lock:
            return sum(self._in_flight.values())

    def retry_after_s(self) -> float:
        """Current Retry-After estimate in seconds (see class docstring)."""
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> float:
        est = self._mean_hold_s if self._mean_hold_s is not None else MIN_RETRY_AFTER_S
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, est))

    # -- acquire / release -------------------------------------------------------
    def acquire(self, tenant_id: str) -> Callable[[], None]:
        """Take a slot for ``tenant_id`` or raise :class:`TenantLimitExceeded` at once.

        Returns an idempotent ``release()`` callable; call it exactly when the
        request is over (finished, failed, or client gone).
        """
        start = time.monotonic()
        with self._lock:
            current = self._in_flight.get(tenant_id, 0)
            limit = self.max_concurrent_per_tenant
            if limit is not None and current >= limit:
                self.num_rejected += 1
                raise TenantLimitExceeded(
                    tenant_id, "concurrent_requests", limit, current, self._retry_after_locked()
                )
            self._in_flight[tenant_id] = current + 1

        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                n = self._in_flight[tenant_id] - 1
                assert n >= 0, f"slot count of tenant {tenant_id!r} went negative"
                if n:
                    self._in_flight[tenant_id] = n
                else:
                    del self._in_flight[tenant_id]  # keep the dict bounded by active tenants
                held = time.monotonic() - start
                a = self._alpha
                self._mean_hold_s = held if self._mean_hold_s is None else (1 - a) * self._mean_hold_s + a * held

        return release

    @contextlib.asynccontextmanager
    async def slot(self, tenant_id: str) -> AsyncIterator[None]:
        """``async with limiter.slot(t):`` holds one of ``t``'s slots for the block."""
        release = self.acquire(tenant_id)
        try:
            yield
        finally:
            release()


@dataclass
class JobQuota:
    """Caps how many fine-tuning jobs one tenant may have queued (not yet running).

    The caller counts the tenant's queued jobs (the job store knows) and calls
    :meth:`check` before enqueueing one more.
    """

    max_queued_jobs_per_tenant: int | None
    retry_after_s: float = 60.0  # jobs take minutes; ask the client to come back later

    def __post_init__(self) -> None:
        _check_limit("max_queued_jobs_per_tenant", self.max_queued_jobs_per_tenant)
        if not self.retry_after_s > 0:
            raise ValueError(f"retry_after_s must be positive, got {self.retry_after_s}")

    def check(self, tenant_id: str, queued_count: int) -> None:
        """Raise :class:`TenantLimitExceeded` if ``tenant_id`` may not queue another job."""
        if queued_count < 0:
            raise ValueError(f"queued_count must be ≥ 0, got {queued_count}")
        limit = self.max_queued_jobs_per_tenant
        if limit is not None and queued_count >= limit:
            raise TenantLimitExceeded(tenant_id, "queued_jobs", limit, queued_count, self.retry_after_s)
