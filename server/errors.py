"""OpenAI-shaped errors: one exception type for routes, and the handlers that render every failure as

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

with the HTTP status OpenAI's server uses: 400 invalid request, 401 no/bad key, 403 not permitted, 404 unknown
model/resource, 413 body too large, 429 overloaded (with ``Retry-After``), 503 not ready / shutting down.
FastAPI's request validation errors (422 by default) become 400 with the failing field in ``param``.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaleswap.runtime.tenant_store import TenantStoreError
from scaleswap.server.limits import TenantLimitExceeded

log = logging.getLogger("scaleswap.server")

# OpenAI's error "type" per status.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}

# TenantStoreError.code -> HTTP status.
_STORE_STATUS = {
    "invalid_tenant_id": 400,
    "tenant_exists": 409,
    "tenant_not_found": 404,
    "version_not_found": 404,
    "base_mismatch": 409,
}


class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_ready(message: str = "the model is still loading; retry shortly") -> APIError:
    return APIError(503, message, code="not_ready", headers={"Retry-After": "5"})


def from_store_error(e: TenantStoreError) -> APIError:
    return APIError(_STORE_STATUS.get(e.code, 400), e.message, code=e.code)


def queue_full(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(429, message, code="queue_full", headers={"Retry-After": str(max(1, int(retry_after_s)))})


def _validation_param(err: dict[str, Any]) -> str | None:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    return ".".join(loc) or None


def install_error_handlers(app: FastAPI) -> None:
    """Render every failure as an OpenAI error object."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(TenantStoreError)
    async def _store_error(_: Request, e: TenantStoreError) -> JSONResponse:
        return from_store_error(e).response()

    @app.exception_handler(TenantLimitExceeded)
    async def _limit(_: Request, e: TenantLimitExceeded) -> JSONResponse:
        return APIError(429, str(e), code="tenant_limit_exceeded",
                        headers={"Retry-After": e.retry_after_header}).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        param = _validation_param(first)
        msg = first.get("msg", "invalid request")
        if param:
            msg = f"{param}: {msg}"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem(s))"
        return APIError(400, msg, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}", code="internal_error").response()
