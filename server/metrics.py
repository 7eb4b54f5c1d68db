"""Prometheus metrics of one server, on its own ``CollectorRegistry`` (so two apps in one process never clash).

Request-side series are updated by the routes as requests finish; engine-side series (running/waiting requests,
KV blocks, resident tenants, scale loads/evictions) are read from ``engine.stats()`` at scrape time by a custom
collector, so they are exact at the moment of the scrape and cost nothing between scrapes.

Label cardinality is bounded:
- ``route`` is the route *template* (``/v1/tenants/{tenant_id}/scales``), never the raw path; unmatched paths
  are ``"unmatched"``. ``status`` is the HTTP status code. So requests_total has at most routes x statuses series.
- ``tenant``: ``"_base"`` for the base model, the tenant id for the first ``max_tenant_labels`` distinct tenants
  seen since start (default 32, ``--metrics-max-tenant-labels``), ``"_other"`` for every later one (tenant ids
  start with a letter or digit, so neither can collide with a tenant). At most
  ``max_tenant_labels + 2`` values, whatever the number of tenants.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "scaleswap"
BASE_LABEL = "_base"  # tenant label of base-model requests
OTHER_LABEL = "_other"  # tenant label beyond the first max_tenant_labels tenants

# Latency buckets in seconds: CPU serving of a small model spans ms (per token) to minutes (long generations).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class TenantLabeler:
    """Maps a tenant id to a bounded label value: the id for the first ``max_labels`` tenants, else "_other"."""

    def __init__(self, max_labels: int) -> None:
        assert max_labels >= 0
        self.max_labels = max_labels
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant_id: str | None) -> str:
        if tenant_id is None:
            return BASE_LABEL
        with self._lock:
            if tenant_id in self._known:
                return tenant_id
            if len(self._known) < self.max_labels:
                self._known.add(tenant_id)
                return tenant_id
        return OTHER_LABEL


class _EngineCollector(Collector):
    """Engine gauges and counters read from ``stats_fn()`` at scrape time (nothing when no engine yet)."""

    # (EngineStats attribute, metric suffix, kind, help)
    FIELDS = (
        ("running", "requests_running", "gauge", "requests being decoded or prefilled"),
        ("waiting", "requests_waiting", "gauge", "requests waiting to be scheduled"),
        ("kv_blocks_used", "kv_blocks_used", "gauge", "KV-cache blocks in use"),
        ("kv_blocks_total", "kv_blocks_total", "gauge", "KV-cache blocks in all"),
        ("resident_tenants", "resident_tenants", "gauge", "tenants whose scales are resident in the scale bank"),
        ("max_resident_tenants", "max_resident_tenants", "gauge", "scale-bank slots for tenants (besides the base)"),
        ("scale_loads", "scale_loads", "counter", "tenant scale sets loaded into the scale bank"),
        ("scale_evictions", "scale_evictions", "counter", "tenant scale sets evicted from the scale bank"),
        ("num_preemptions", "preemptions", "counter", "sequences preempted when the KV cache ran out"),
    )

    def __init__(self, stats_fn: Callable[[], Any | None]) -> None:
        self._stats_fn = stats_fn

    def describe(self) -> Iterable:
        return []  # dynamic: avoid calling the engine at registration time

    def collect(self) -> Iterable:
        stats = self._stats_fn()
        if stats is None:
            return
        for attr, suffix, kind, help_text in self.FIELDS:
            value = getattr(stats, attr, None)
            if value is None:
                continue
            if kind == "gauge":
                yield GaugeMetricFamily(f"{PREFIX}_{suffix}", help_text, value=float(value))
            else:
                yield CounterMetricFamily(f"{PREFIX}_{suffix}", help_text, value=float(value))


class Metrics:
    """All series of one server. ``stats_fn`` returns the engine's ``EngineStats`` or None before it is loaded."""

    def __init__(self, max_tenant_labels: int = 32, stats_fn: Callable[[], Any | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.tenant_label = TenantLabeler(max_tenant_labels)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "arrival to first generated token",
                              ["tenant"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "mean time between output tokens",
                              ["tenant"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "arrival to last token of a generation request",
                             ["tenant", "endpoint"], buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens processed", ["tenant"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", ["tenant"], registry=r)
        self.finished = Counter(f"{PREFIX}_requests_finished", "generation sequences by finish reason",
                                ["tenant", "finish_reason"], registry=r)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "generation requests refused before running",
                                ["reason"], registry=r)
        self.disconnects = Counter(f"{PREFIX}_client_disconnects", "generation requests whose client went away "
                                   "before the end (their sequences were aborted)", registry=r)
        self.uploads = Counter(f"{PREFIX}_scale_uploads", "scale-set uploads by result", ["result"], registry=r)
        self.rollbacks = Counter(f"{PREFIX}_scale_rollbacks", "scale version rollbacks", registry=r)
        self.published = Counter(f"{PREFIX}_scale_versions_published", "scale versions made current",
                                 ["source"], registry=r)
        self.tenants = Gauge(f"{PREFIX}_tenants", "tenants in the store", registry=r)
        self.ready = Gauge(f"{PREFIX}_model_ready", "1 once the model is loaded and serving", registry=r)
        for result in ("accepted", "rejected"):
            self.uploads.labels(result)  # export zeros from the start
        r.register(_EngineCollector(stats_fn))

    def observe_generation(self, tenant_id: str | None, endpoint: str, timings: dict[str, float | None],
                           e2e_s: float, num_prompt_tokens: int, num_output_tokens: int, finish_reason: str | None) -> None:
        """Record one finished sequence (one choice)."""
        label = self.tenant_label(tenant_id)
        if timings.get("ttft_s") is not None:
            self.ttft.labels(label).observe(timings["ttft_s"])
        if timings.get("per_token_s") is not None:
            self.tpot.labels(label).observe(timings["per_token_s"])
        self.e2e.labels(label, endpoint).observe(e2e_s)
        self.prompt_tokens.labels(label).inc(num_prompt_tokens)
        self.generation_tokens.labels(label).inc(num_output_tokens)
        self.finished.labels(label, finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
