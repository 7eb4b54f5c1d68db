"""Who is calling: the admin, a tenant, or anyone (open mode).

Keys arrive as ``Authorization: Bearer <key>`` (what the OpenAI client sends).

- **Admin key** configured (``--admin-key`` / ``SCALESWAP_ADMIN_KEY``): every API route needs a key. The admin key
  may do everything; a tenant key (``sk-ss-...``, hashed in the tenant store) may use only its own tenant and the
  base model, and manage only its own scale versions; anything else is 401.
- **No admin key** (open mode, loopback only, see ``ServerSettings.check_exposure``): a request without a key, or
  with a key that is not a tenant key (the OpenAI client insists on sending one), acts as the admin; a tenant key
  still restricts the caller to its tenant, and a malformed/revoked tenant key is 401.

Keys are compared in constant time (``hmac.compare_digest``; the store does the same for tenant keys).
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from scaleswap.runtime.tenant_store import API_KEY_PREFIX
from scaleswap.server.errors import APIError


@dataclass(frozen=True)
class Principal:
    kind: Literal["admin", "tenant", "open"]
    tenant_id: str | None = None  # set iff kind == "tenant"

    @property
    def is_admin(self) -> bool:
        return self.kind in ("admin", "open")

    @property
    def label(self) -> str:
        return self.tenant_id if self.kind == "tenant" else self.kind

    def may_access_tenant(self, tenant_id: str) -> bool:
        return self.is_admin or self.tenant_id == tenant_id

    def require_tenant_access(self, tenant_id: str) -> None:
        if not self.may_access_tenant(tenant_id):
            raise APIError(403, f"this API key may not use tenant {tenant_id!r}", code="forbidden_tenant")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise APIError(403, "tenant management needs the admin key", code="admin_required")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "malformed Authorization header; expected 'Bearer <key>'", code="invalid_api_key")
    return token.strip()


def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the caller's :class:`Principal`, or 401."""
    state = request.app.state.server
    key = _bearer(request)
    admin_key = state.settings.admin_key
    if key is not None and key.startswith(API_KEY_PREFIX):
        tenant_id = state.store.authenticate(key)
        if tenant_id is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return Principal("tenant", tenant_id)
    if admin_key is None:
        return Principal("open")
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if hmac.compare_digest(key.encode(), admin_key.get_secret_value().encode()):
        return Principal("admin")
    raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request) -> Principal:
    """FastAPI dependency for tenant management routes: admin (or open mode), else 403."""
    principal = authenticate(request)
    principal.require_admin()
    return principal
