"""Shared state of one running server (``app.state.server``), built by the app's lifespan.

Holds the settings, the tenant store, the metrics, the per-tenant limiter and, once loaded in the background,
the engine and the base's identity. ``publish_version`` is THE way a new scale version goes live (uploads here,
finished fine-tuning jobs in ``routes_finetune``): validate fully, store durably, then point the engine at it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scaleswap.runtime.scale_set import BaseInfo, ScaleSetError, load_scale_set
from scaleswap.runtime.tenant_store import TenantStore, VersionRecord
from scaleswap.server.errors import APIError, not_ready
from scaleswap.server.limits import TenantLimiter
from scaleswap.server.metrics import Metrics
from scaleswap.server.settings import ServerSettings

Status = Literal["loading", "ready", "failed", "draining"]

# ScaleSetError.code -> HTTP status (everything else about a bad upload is a 400).
_SCALE_STATUS = {"too_large": 413}


@dataclass
class ServerState:
    settings: ServerSettings
    store: TenantStore
    metrics: Metrics
    limiter: TenantLimiter
    engine: Any | None = None  # runtime.engine.Engine once loaded
    base: BaseInfo | None = None
    model_dir: Path | None = None
    base_model_id: str | None = None
    status: Status = "loading"
    detail: str | None = None
    started_at: float = field(default_factory=time.time)
    publish_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- readiness ------------------------------------------------------------------------------
    def require_ready(self) -> Any:
        """The engine, or a 503 saying why there is none."""
        if self.status == "ready" and self.engine is not None:
            return self.engine
        if self.status == "draining":
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.status == "failed":
            raise APIError(503, f"the model failed to load: {self.detail}", code="model_load_failed")
        raise not_ready()

    def require_base(self) -> BaseInfo:
        if self.base is None or self.model_dir is None:
            if self.status == "failed":
                raise APIError(503, f"the model failed to load: {self.detail}", code="model_load_failed")
            raise not_ready()
        return self.base

    # -- publishing -----------------------------------------------------------------------------
    def validate_scale_set(self, data: bytes) -> None:
        """Raise APIError (400/413) unless ``data`` is a complete, valid scale set for the served base."""
        base = self.require_base()
        try:
            load_scale_set(data, base, max_bytes=self.settings.max_upload_bytes)
        except ScaleSetError as e:
            raise APIError(_SCALE_STATUS.get(e.code, 400), f"invalid scale set: {e}", code=e.code) from None

    async def publish_version(self, tenant_id: str, data: bytes, *, source: str = "upload",
                              note: str | None = None) -> VersionRecord:
        """Validate ``data``, store it as the tenant's next version and make the engine serve it.

        Nothing changes unless validation passes. The store write and the engine flip happen under one lock so
        concurrent publishers cannot leave the engine on an older version than the store's current one.
        Callable from another thread with ``asyncio.run_coroutine_threadsafe(state.publish_version(...), loop)``.
        """
        self.store.require_tenant(tenant_id)
        await asyncio.to_thread(self.validate_scale_set, data)
        async with self.publish_lock:
            rec = await asyncio.to_thread(self.store.add_version, tenant_id, data, source=source, note=note)
            if self.engine is not None:
                self.engine.set_tenant_version(tenant_id, rec.version)
        self.metrics.published.labels(source).inc()
        return rec

    async def rollback(self, tenant_id: str, version: int) -> VersionRecord:
        async with self.publish_lock:
            rec = await asyncio.to_thread(self.store.set_current_version, tenant_id, version)
            if self.engine is not None:
                self.engine.set_tenant_version(tenant_id, rec.version)
        self.metrics.rollbacks.inc()
        self.metrics.published.labels("rollback").inc()
        return rec
