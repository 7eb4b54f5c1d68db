"""Tenants and their scale sets.

- ``POST /v1/tenants`` (admin) creates a tenant on the base scales and returns its API key, once.
- ``GET /v1/tenants`` (admin), ``DELETE /v1/tenants/{id}`` (admin).
- ``PUT /v1/tenants/{id}/scales``: raw safetensors body → a new version, served by the next request. The body
  is size-limited while it is read (413) and validated completely (fingerprint, names, shapes, dtype, finite,
  positive) before anything changes.
- ``GET /v1/tenants/{id}/scales[?version=N]``, ``GET .../scales/versions``, ``POST .../scales/rollback``.
- ``GET /v1/scales/base``: the base scale set, the starting point of a tenant's own.
A tenant key may read and change only its own tenant's scales; tenant management needs the admin key.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request, Response

from scaleswap.runtime.tenant_store import TenantRecord, VersionRecord
from scaleswap.server.auth import Principal, authenticate, require_admin
from scaleswap.server.errors import APIError
from scaleswap.server.protocol import (
    ErrorResponse,
    RollbackRequest,
    ScaleVersion,
    ScaleVersionList,
    Tenant,
    TenantCreated,
    TenantCreateRequest,
    TenantDeleted,
    TenantList,
)
from scaleswap.server.state import ServerState

router = APIRouter(tags=["tenants"])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 503)}
_SAFETENSORS = "application/octet-stream"
_BINARY_RESPONSE = {200: {"content": {_SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
                          "description": "a scale set (safetensors)"}}


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _tenant(rec: TenantRecord) -> Tenant:
    return Tenant(id=rec.id, created_at=int(rec.created_at), current_version=rec.current_version,
                  latest_version=rec.latest_version)


def _version(rec: VersionRecord, current: int) -> ScaleVersion:
    return ScaleVersion(tenant=rec.tenant_id, version=rec.version, created_at=int(rec.created_at),
                        size_bytes=rec.size_bytes, sha256=rec.sha256, source=rec.source, note=rec.note,
                        current=rec.version == current)


# ------------------------------------------------------------------------------------------------ tenants
@router.post("/v1/tenants", response_model=TenantCreated, status_code=201, responses=_ERRORS)
async def create_tenant(body: TenantCreateRequest, request: Request,
                        _: Principal = Depends(require_admin)) -> TenantCreated:
    """Create a tenant on the base scales (version 0). The API key is in this response only."""
    state = _state(request)
    if body.id == state.base_model_id:
        raise APIError(409, f"{body.id!r} is the base model's id; choose another tenant id", param="id",
                       code="tenant_exists")
    rec, key = await asyncio.to_thread(state.store.create_tenant, body.id)
    state.metrics.tenants.set(len(state.store.list_tenants()))
    return TenantCreated(**_tenant(rec).model_dump(), api_key=key)


@router.get("/v1/tenants", response_model=TenantList, responses=_ERRORS)
async def list_tenants(request: Request, _: Principal = Depends(require_admin)) -> TenantList:
    recs = await asyncio.to_thread(_state(request).store.list_tenants)
    return TenantList(data=[_tenant(r) for r in recs])


@router.get("/v1/tenants/{tenant_id}", response_model=Tenant, responses=_ERRORS)
async def get_tenant(tenant_id: str, request: Request, principal: Principal = Depends(authenticate)) -> Tenant:
    principal.require_tenant_access(tenant_id)
    return _tenant(_state(request).store.require_tenant(tenant_id))


@router.delete("/v1/tenants/{tenant_id}", response_model=TenantDeleted, responses=_ERRORS)
async def delete_tenant(tenant_id: str, request: Request, _: Principal = Depends(require_admin)) -> TenantDeleted:
    """Delete a tenant, its key and all its scale versions. Its requests in flight finish on their scales."""
    state = _state(request)
    async with state.publish_lock:
        await asyncio.to_thread(state.store.delete_tenant, tenant_id)
        if state.engine is not None:
            state.engine.drop_tenant(tenant_id)
    state.metrics.tenants.set(len(state.store.list_tenants()))
    return TenantDeleted(id=tenant_id)


# ------------------------------------------------------------------------------------------------ scales
async def _read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing with 413 as soon as it exceeds ``limit`` bytes (never buffers more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"scale set is {declared} bytes; the limit is {limit} bytes", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"scale set exceeds the limit of {limit} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.put(
    "/v1/tenants/{tenant_id}/scales",
    response_model=ScaleVersion,
    status_code=201,
    responses={**_ERRORS, 413: {"model": ErrorResponse}},
    openapi_extra={"requestBody": {"required": True, "description": "a scale set (safetensors)",
                                   "content": {_SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_scales(tenant_id: str, request: Request, note: str | None = Query(None, max_length=500),
                        principal: Principal = Depends(authenticate)) -> ScaleVersion:
    """Upload a scale set as the tenant's next version; the next request is served with it."""
    principal.require_tenant_access(tenant_id)
    state = _state(request)
    state.store.require_tenant(tenant_id)
    state.require_base()
    try:
        data = await _read_body_limited(request, state.settings.max_upload_bytes)
        rec = await state.publish_version(tenant_id, data, source="upload", note=note)
    except APIError:
        state.metrics.uploads.labels("rejected").inc()
        raise
    state.metrics.uploads.labels("accepted").inc()
    return _version(rec, rec.version)


@router.get("/v1/tenants/{tenant_id}/scales", response_class=Response,
            responses={**_BINARY_RESPONSE, **_ERRORS})
async def download_scales(tenant_id: str, request: Request, version: int | None = Query(None, ge=0),
                          principal: Principal = Depends(authenticate)) -> Response:
    """Download one version (default: the current one) as safetensors."""
    principal.require_tenant_access(tenant_id)
    state = _state(request)
    rec = state.store.get_version(tenant_id, version)
    if rec.version == 0:
        state.require_base()
    data = await asyncio.to_thread(state.store.read_version_bytes, tenant_id, rec.version)
    return Response(data, media_type=_SAFETENSORS, headers={
        "Content-Disposition": f'attachment; filename="{tenant_id}-v{rec.version}.safetensors"',
        "X-Scale-Version": str(rec.version)})


@router.get("/v1/tenants/{tenant_id}/scales/versions", response_model=ScaleVersionList, responses=_ERRORS)
async def list_versions(tenant_id: str, request: Request,
                        principal: Principal = Depends(authenticate)) -> ScaleVersionList:
    principal.require_tenant_access(tenant_id)
    store = _state(request).store
    current = store.current_version(tenant_id)
    recs = await asyncio.to_thread(store.list_versions, tenant_id)
    return ScaleVersionList(tenant=tenant_id, current_version=current, data=[_version(r, current) for r in recs])


@router.post("/v1/tenants/{tenant_id}/scales/rollback", response_model=ScaleVersion, responses=_ERRORS)
async def rollback(tenant_id: str, body: RollbackRequest, request: Request,
                   principal: Principal = Depends(authenticate)) -> ScaleVersion:
    """Serve an earlier (or later) existing version again: a pointer move, effective for the next request."""
    principal.require_tenant_access(tenant_id)
    rec = await _state(request).rollback(tenant_id, body.version)
    return _version(rec, rec.version)


@router.get("/v1/scales/base", response_class=Response, responses={**_BINARY_RESPONSE, **_ERRORS})
async def download_base_scales(request: Request, _: Principal = Depends(authenticate)) -> Response:
    """The base scale set (safetensors): the starting point for a tenant's own."""
    state = _state(request)
    state.require_base()
    data = await asyncio.to_thread((state.model_dir / "base_scales.safetensors").read_bytes)
    return Response(data, media_type=_SAFETENSORS,
                    headers={"Content-Disposition": 'attachment; filename="base_scales.safetensors"',
                             "X-Base-Fingerprint": state.base.fingerprint})
