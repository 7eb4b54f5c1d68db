"""The FastAPI application: shared state built in ``lifespan``, one router per resource.

Start-up order: the tenant store and the metrics come up at once (``/health`` answers, tenant management
works); the model is resolved (quantized on first use if needed) and loaded in the background, and ``/ready``
says 503 until the engine runs. Shutdown (uvicorn on SIGTERM stops accepting and waits up to
``shutdown_timeout_s`` for in-flight requests; ``serve`` marks the state "draining" at the signal so new requests
get 503): then the fine-tuning hooks stop, the engine aborts what is left, and the store closes.

Routes: ``routes_openai`` (completions, chat, models), ``routes_tenants`` (tenants, scale sets),
``routes_finetune`` (issue 6), and here ``/health``, ``/ready``, ``/metrics``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from scaleswap.runtime.tenant_store import TenantStore
from scaleswap.server import routes_finetune, routes_openai, routes_tenants
from scaleswap.server.errors import install_error_handlers
from scaleswap.server.limits import TenantLimiter
from scaleswap.server.metrics import Metrics
from scaleswap.server.protocol import ChatCompletionChunk, CompletionStreamResponse, HealthResponse, ReadyResponse
from scaleswap.server.settings import ServerSettings
from scaleswap.server.state import ServerState

log = logging.getLogger("scaleswap.server")


# ------------------------------------------------------------------------------------------------ model
def resolve_model_dir(model: str | None, bits: int, group_size: int) -> Path:
    """``--model`` -> a quantized-base directory.

    None: the default model, quantized on first use and cached. A quantized base: as is. A float model (HF
    directory or GGUF file): quantized to (bits, group_size) on first use into the cache, keyed by its path,
    size and mtime, under a file lock (two servers starting together quantize once).
    """
    from scaleswap.runtime.quantize import cached_base, ensure_default_base, is_quantized_base

    if model is None:
        return ensure_default_base(bits, group_size, show_progress=False)
    src = Path(model).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"model not found: {src}")
    if is_quantized_base(src):
        return src
    from scaleswap.runtime.checkpoint import load_checkpoint
    from scaleswap.runtime.config import QuantConfig
    from scaleswap.runtime.quantize import quantize_checkpoint

    quant = QuantConfig(bits=bits, group_size=group_size)
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    gs = "pc" if group_size == -1 else f"g{group_size}"

    def build(out: Path) -> None:
        print(f"scaleswap: quantizing {src} to {bits}-bit {gs} (first use; cached in {out})", file=sys.stderr)
        quantize_checkpoint(load_checkpoint(src), quant, out, source=str(src), show_progress=False)

    return cached_base("bases", f"{src.stem}-{key}-{bits}bit-{gs}", build)


def _engine_config(settings: ServerSettings):
    from scaleswap.runtime.config import EngineConfig

    kwargs: dict[str, Any] = {"max_waiting": settings.max_waiting, "device": settings.resolved_device(),
                              "precision": settings.precision}
    for name in ("max_num_seqs", "max_model_len", "max_resident_tenants"):
        if getattr(settings, name) is not None:
            kwargs[name] = getattr(settings, name)
    return EngineConfig(**kwargs)


async def _in_fresh_thread(fn, *args):
    """Run ``fn(*args)`` in a new thread that ends with it; await its result."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(e))
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

    threading.Thread(target=run, name="scaleswap-load", daemon=True).start()
    return await fut


async def _load_model(state: ServerState) -> None:
    """Background task: resolve, load and start the engine; publish the tenants' current versions."""
    from scaleswap.runtime.config import SamplingParams
    from scaleswap.runtime.engine import Engine

    s = state.settings
    try:
        model_dir = await asyncio.to_thread(resolve_model_dir, s.model, s.bits, s.group_size)
        meta = json.loads((model_dir / "quant_config.json").read_text())
        state.store.bind_base(meta["fingerprint"], model_dir / "base_scales.safetensors")
        t0 = time.perf_counter()
        # Loading and the warm-up run multi-threaded torch ops; they run in a thread of their own that then exits
        # (not the executor's, whose threads live on), so the step thread ends up owning the only multi-threaded
        # OpenMP team (see Engine.start).
        engine = await _in_fresh_thread(Engine.from_pretrained, model_dir, _engine_config(s), state.store.scale_loader)
        t1 = time.perf_counter()
        for rec in state.store.list_tenants():
            engine.set_tenant_version(rec.id, rec.current_version)
        # Warm-up: the first forward builds lazy per-layer caches (seconds on CPU); pay it before /ready says so.
        await _in_fresh_thread(engine.generate_batch, ["Hello"], SamplingParams(max_tokens=2, temperature=0.0))
        engine.start()
        log.info("loaded %s in %.1f s, warm-up %.1f s", model_dir, t1 - t0, time.perf_counter() - t1)
        state.model_dir = model_dir
        state.base = engine.base
        state.base_model_id = s.served_model_name or model_dir.name
        state.engine = engine
        state.status = "ready"
        state.metrics.ready.set(1)
        log.info("model %s ready (context %d tokens)", state.base_model_id, engine.max_model_len)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported by /ready and every generation request
        state.status = "failed"
        state.detail = f"{type(e).__name__}: {e}"
        log.exception("loading the model failed")


# ------------------------------------------------------------------------------------------------ metrics middleware
class RequestMetricsMiddleware:
    """Counts every HTTP request by route template, method and status (pure ASGI: streaming-safe)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            state: ServerState | None = getattr(scope["app"].state, "server", None) if "app" in scope else None
            if state is not None:
                state.metrics.requests.labels(template, scope["method"], str(status["code"])).inc()


# ------------------------------------------------------------------------------------------------ OpenAPI
_STREAM_MODELS = {"/v1/completions": CompletionStreamResponse, "/v1/chat/completions": ChatCompletionChunk}


def _openapi_with_stream_models(app: FastAPI) -> dict:
    """FastAPI's schema plus the server-sent-event chunk models of the two streaming routes
    (``text/event-stream`` bodies are not pydantic responses, so FastAPI leaves them undescribed)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in _STREAM_MODELS.items():
        js = model.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
        for name, sub in js.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = js
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok["content"]["text/event-stream"] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    # Validation errors are answered 400 with an OpenAI error object (errors.py), never FastAPI's 422.
    for ops in schema["paths"].values():
        for op in ops.values():
            if op.get("responses", {}).pop("422", None) is not None and "400" not in op["responses"]:
                op["responses"]["400"] = {"description": "invalid request",
                                          "content": {"application/json": {
                                              "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for name in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{name}"' not in json.dumps(schema["paths"]):
            components.pop(name, None)
    app.openapi_schema = schema
    return schema


# ------------------------------------------------------------------------------------------------ app
def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = TenantStore(settings.data_dir)
        state_ref: dict[str, ServerState] = {}
        metrics = Metrics(settings.metrics_max_tenant_labels,
                          stats_fn=lambda: state_ref["s"].engine.stats() if state_ref["s"].engine else None)
        state = ServerState(settings=settings, store=store, metrics=metrics,
                            limiter=TenantLimiter(settings.max_concurrent_per_tenant))
        state_ref["s"] = state
        app.state.server = state
        metrics.tenants.set(len(store.list_tenants()))
        if store.removed_orphans:
            log.info("tenant store: removed %d orphan blob(s) left by an interrupted write", store.removed_orphans)
        loader = asyncio.create_task(_load_model(state))
        await routes_finetune.startup(app)
        try:
            yield
        finally:
            state.status = "draining"
            await routes_finetune.shutdown(app)
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.engine is not None:
                await state.engine.shutdown(timeout_s=max(1.0, settings.shutdown_timeout_s))
            store.close()

    app = FastAPI(
        title="scaleswap",
        version="0.1.0",
        summary="Multi-tenant serving of one low-bit LLM: PEQA scale sets hot-swapped per request",
        lifespan=lifespan,
    )
    app.openapi = lambda: _openapi_with_stream_models(app)
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    app.include_router(routes_openai.router)
    app.include_router(routes_tenants.router)
    app.include_router(routes_finetune.router)

    @app.get("/health", response_model=HealthResponse, tags=["ops"])
    async def health() -> HealthResponse:
        """Alive (the process answers), whether or not the model is loaded."""
        return HealthResponse()

    @app.get("/ready", response_model=ReadyResponse, tags=["ops"],
             responses={503: {"model": ReadyResponse, "description": "loading, failed or draining"}})
    async def ready(request: Request) -> JSONResponse:
        """200 once the model is loaded and the engine runs; 503 before, after a failed load, and while draining."""
        state: ServerState = request.app.state.server
        body = ReadyResponse(status=state.status, model=state.base_model_id, detail=state.detail)
        return JSONResponse(body.model_dump(), status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics", response_class=Response, tags=["ops"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (see server/metrics.py for the series and their label bounds)."""
        return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
