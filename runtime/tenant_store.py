"""Tenant store: tenants, hashed API keys and scale-set versions under one data directory.

Layout of ``data_dir``::

    data_dir/
      tenants.sqlite3            metadata (WAL journal): tenants, key hashes, versions, current-version pointer
      blobs/<sha256>.safetensors scale-set blobs, content-addressed, written atomically

Durability (a kill at any moment leaves a consistent store):

- a blob is written to ``blobs/.tmp-*`` then fsync'd, renamed to its final name and the directory fsync'd
  BEFORE the metadata row that points at it is committed, so a committed row never points at a missing or
  partial file;
- metadata changes are single SQLite transactions (WAL, ``synchronous=FULL``): an upload inserts the version
  row and moves the current pointer in one commit; a rollback is one pointer update;
- at open, temporary files and blobs no row references (left by a kill between the rename and the commit,
  or by a deleted tenant) are removed.

Versions: version 0 is the base scale set (no blob; every tenant starts there). Uploads get 1, 2, 3, ...;
numbers are never reused for a tenant id, even after a rollback (rollback only moves the pointer) or a delete
and re-create (the new tenant continues after the old one's last number), so ``(tenant, version)`` always names
one scale set: the engine's scale bank caches by that pair. Every version
is kept until :meth:`TenantStore.prune` removes it.

API keys: ``sk-ss-<key_id>.<secret>``; ``key_id`` (12 hex) is stored in clear to find the tenant,
the secret (256 random bits) is stored as ``sha256(salt || secret)`` with a per-key 16-byte salt and compared
in constant time (``hmac.compare_digest``). A plain salted hash suffices because the secret is random with
256 bits of entropy (no dictionary to attack); the clear key exists only in the creation response.

Thread safety: one SQLite connection guarded by a re-entrant lock; every public method is safe to call from
any thread (the server's event loop via ``asyncio.to_thread``, the engine's scale loader, a job runner).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file

SCHEMA_VERSION = 1
API_KEY_PREFIX = "sk-ss-"
TENANT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BASE_VERSION = 0


class TenantStoreError(Exception):
    """A request the store refuses. ``code`` is a stable machine-readable reason."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code  # one of: invalid_tenant_id, tenant_exists, tenant_not_found, version_not_found, base_mismatch


@dataclass(frozen=True)
class TenantRecord:
    id: str
    created_at: float  # unix seconds
    current_version: int
    latest_version: int  # highest version number ever created (0 if none uploaded)
    key_id: str  # public part of the tenant's API key


@dataclass(frozen=True)
class VersionRecord:
    tenant_id: str
    version: int
    created_at: float  # unix seconds
    size_bytes: int  # 0 for the base version
    sha256: str | None  # blob content hash; None for version 0 (the base scales)
    source: str  # "base" | "upload" | "finetune" | ...
    note: str | None


def validate_tenant_id(tenant_id: str) -> str:
    """Return ``tenant_id`` or raise: 1-64 chars of letters, digits, '.', '_', '-', starting with a letter/digit."""
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.match(tenant_id):
        raise TenantStoreError(
            f"invalid tenant id {tenant_id!r}: use 1-64 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit",
            "invalid_tenant_id",
        )
    return tenant_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the complete new one."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


class TenantStore:
    """SQLite metadata + content-addressed blob files. See the module docstring for layout and guarantees.

    ``base_fingerprint``: the quantized base this store serves. Recorded at first open; opening the same data
    dir with another base raises ``TenantStoreError(code="base_mismatch")`` (the stored scales only make sense
    for the integers they were made for). ``base_scales_path``: the base scale set, returned for version 0.
    """

    def __init__(
        self,
        data_dir: str | Path,
        base_fingerprint: str | None = None,
        base_scales_path: str | Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.base_scales_path = Path(base_scales_path) if base_scales_path is not None else None
        self._lock = threading.RLock()  # the SQLite connection (held for one statement/transaction only)
        # Blob files: writers (blob + its row) vs orphan cleanup. Order: _blob_lock before _lock, never after,
        # so metadata reads (auth on the event loop) never wait for a blob's fsync.
        self._blob_lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.data_dir / "tenants.sqlite3", check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._create_schema()
            self._check_base(base_fingerprint)
        self.removed_orphans = self._remove_orphan_blobs()

    # -- schema -------------------------------------------------------------------------------
    def _create_schema(self) -> None:
        with self._transaction() as c:
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            c.execute(
                """CREATE TABLE IF NOT EXISTS tenants (
                    id TEXT PRIMARY KEY,
                    created_at REAL NOT NULL,
                    key_id TEXT NOT NULL UNIQUE,
                    key_salt BLOB NOT NULL,
                    key_hash BLOB NOT NULL,
                    current_version INTEGER NOT NULL DEFAULT 0,
                    latest_version INTEGER NOT NULL DEFAULT 0)"""
            )
            c.execute(
                """CREATE TABLE IF NOT EXISTS versions (
                    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
                    version INTEGER NOT NULL,
                    created_at REAL NOT NULL,
                    sha256 TEXT,
                    size_bytes INTEGER NOT NULL,
                    source TEXT NOT NULL,
                    note TEXT,
                    PRIMARY KEY (tenant_id, version))"""
            )
            # Highest version a deleted tenant id reached: a re-created tenant continues after it, so a
            # (tenant, version) pair never names two different scale sets (the engine caches by that pair).
            c.execute("CREATE TABLE IF NOT EXISTS retired (id TEXT PRIMARY KEY, latest_version INTEGER NOT NULL)")
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise TenantStoreError(
                    f"tenant store at {self.data_dir} has schema version {row['value']}, this build reads "
                    f"{SCHEMA_VERSION}",
                    "schema_mismatch",
                )

    def _check_base(self, base_fingerprint: str | None) -> None:
        if base_fingerprint is None:
            return
        with self._transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE key='base_fingerprint'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('base_fingerprint', ?)", (base_fingerprint,))
            elif row["value"] != base_fingerprint:
                raise TenantStoreError(
                    f"data dir {self.data_dir} holds tenants of base {row['value'][:16]}..., but the served base "
                    f"is {base_fingerprint[:16]}...; use another --data-dir or serve the original base",
                    "base_mismatch",
                )

    def bind_base(self, fingerprint: str, base_scales_path: str | Path | None = None) -> None:
        """Bind the store to the served base once it is known (the server opens the store before the model
        loads). Raises ``TenantStoreError(code="base_mismatch")`` if the store belongs to another base."""
        self._check_base(fingerprint)
        if base_scales_path is not None:
            self.base_scales_path = Path(base_scales_path)

    @property
    def base_fingerprint(self) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key='base_fingerprint'").fetchone()
        return None if row is None else row["value"]

    def _transaction(self):
        return _Transaction(self._conn, self._lock)

    def _remove_orphan_blobs(self) -> int:
        """Delete temp files and blobs that no version row references. Returns how many were removed."""
        with self._blob_lock:
            with self._lock:
                referenced = {
                    r["sha256"] for r in self._conn.execute("SELECT sha256 FROM versions WHERE sha256 IS NOT NULL")
                }
            removed = 0
            for p in self.blob_dir.iterdir():
                is_tmp = p.name.startswith(".tmp-")
                if is_tmp or (p.suffix == ".safetensors" and p.stem not in referenced):
                    p.unlink(missing_ok=True)
                    removed += 1
            if removed:
                _fsync_dir(self.blob_dir)
            return removed

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- tenants ------------------------------------------------------------------------------
    @staticmethod
    def _record(row: sqlite3.Row) -> TenantRecord:
        return TenantRecord(
            id=row["id"],
            created_at=row["created_at"],
            current_version=row["current_version"],
            latest_version=row["latest_version"],
            key_id=row["key_id"],
        )

    def create_tenant(self, tenant_id: str) -> tuple[TenantRecord, str]:
        """Create a tenant on the base scales (version 0). Returns (record, api_key); the key is not stored."""
        validate_tenant_id(tenant_id)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        now = time.time()
        with self._transaction() as c:
            if c.execute("SELECT 1 FROM tenants WHERE id=?", (tenant_id,)).fetchone():
                raise TenantStoreError(f"tenant {tenant_id!r} already exists", "tenant_exists")
            retired = c.execute("SELECT latest_version FROM retired WHERE id=?", (tenant_id,)).fetchone()
            c.execute(
                "INSERT INTO tenants (id, created_at, key_id, key_salt, key_hash, latest_version) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (tenant_id, now, key_id, salt, _hash_secret(salt, secret), retired[0] if retired else 0),
            )
            c.execute(
                "INSERT INTO versions (tenant_id, version, created_at, sha256, size_bytes, source) "
                "VALUES (?, 0, ?, NULL, 0, 'base')",
                (tenant_id, now),
            )
            row = c.execute("SELECT * FROM tenants WHERE id=?", (tenant_id,)).fetchone()
        return self._record(row), f"{API_KEY_PREFIX}{key_id}.{secret}"

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM tenants WHERE id=?", (tenant_id,)).fetchone()
        return None if row is None else self._record(row)

    def require_tenant(self, tenant_id: str) -> TenantRecord:
        rec = self.get_tenant(tenant_id)
        if rec is None:
            raise TenantStoreError(f"tenant {tenant_id!r} does not exist", "tenant_not_found")
        return rec

    def list_tenants(self) -> list[TenantRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM tenants ORDER BY created_at, id").fetchall()
        return [self._record(r) for r in rows]

    def delete_tenant(self, tenant_id: str) -> None:
        """Delete a tenant, its key and all its versions; blobs no other tenant uses are removed."""
        with self._transaction() as c:
            row = c.execute("SELECT latest_version FROM tenants WHERE id=?", (tenant_id,)).fetchone()
            if row is None:
                raise TenantStoreError(f"tenant {tenant_id!r} does not exist", "tenant_not_found")
            c.execute("INSERT OR REPLACE INTO retired VALUES (?, ?)", (tenant_id, row["latest_version"]))
            c.execute("DELETE FROM tenants WHERE id=?", (tenant_id,))
            # ON DELETE CASCADE removes the version rows.
        self._remove_orphan_blobs()

    def rotate_key(self, tenant_id: str) -> str:
        """Replace a tenant's API key; the old one stops working at once. Returns the new key."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._transaction() as c:
            n = c.execute(
                "UPDATE tenants SET key_id=?, key_salt=?, key_hash=? WHERE id=?",
                (key_id, salt, _hash_secret(salt, secret), tenant_id),
            ).rowcount
            if n == 0:
                raise TenantStoreError(f"tenant {tenant_id!r} does not exist", "tenant_not_found")
        return f"{API_KEY_PREFIX}{key_id}.{secret}"

    def authenticate(self, api_key: str) -> str | None:
        """Return the tenant id owning ``api_key``, or None. Constant-time in the secret."""
        if not api_key.startswith(API_KEY_PREFIX):
            return None
        key_id, sep, secret = api_key[len(API_KEY_PREFIX):].partition(".")
        if not sep or not key_id or not secret:
            return None
        with self._lock:
            row = self._conn.execute("SELECT id, key_salt, key_hash FROM tenants WHERE key_id=?", (key_id,)).fetchone()
        if row is None:
            # Same work as a hit so timing does not reveal which key ids exist.
            hmac.compare_digest(_hash_secret(b"\0" * 16, secret), b"\0" * 32)
            return None
        if hmac.compare_digest(_hash_secret(row["key_salt"], secret), row["key_hash"]):
            return row["id"]
        return None

    # -- versions -----------------------------------------------------------------------------
    @staticmethod
    def _version(row: sqlite3.Row) -> VersionRecord:
        return VersionRecord(
            tenant_id=row["tenant_id"],
            version=row["version"],
            created_at=row["created_at"],
            size_bytes=row["size_bytes"],
            sha256=row["sha256"],
            source=row["source"],
            note=row["note"],
        )

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / f"{sha256}.safetensors"

    def add_version(self, tenant_id: str, data: bytes, *, source: str = "upload", note: str | None = None,
                    make_current: bool = True) -> VersionRecord:
        """Store ``data`` (an already VALIDATED scale-set safetensors) as the tenant's next version.

        The blob is durable before the row that points at it commits. With ``make_current`` the current
        pointer moves to the new version in the same transaction.
        """
        self.require_tenant(tenant_id)
        digest = hashlib.sha256(data).hexdigest()
        now = time.time()
        with self._blob_lock:  # the blob must not be cleaned up as an orphan before its row commits
            path = self.blob_path(digest)
            if not path.exists():  # content-addressed: an existing final name is complete (rename is atomic)
                atomic_write_bytes(path, data)
            with self._transaction() as c:
                row = c.execute("SELECT latest_version FROM tenants WHERE id=?", (tenant_id,)).fetchone()
                if row is None:  # deleted meanwhile
                    raise TenantStoreError(f"tenant {tenant_id!r} does not exist", "tenant_not_found")
                version = row["latest_version"] + 1
                c.execute(
                    "INSERT INTO versions (tenant_id, version, created_at, sha256, size_bytes, source, note) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tenant_id, version, now, digest, len(data), source, note),
                )
                if make_current:
                    c.execute("UPDATE tenants SET latest_version=?, current_version=? WHERE id=?",
                              (version, version, tenant_id))
                else:
                    c.execute("UPDATE tenants SET latest_version=? WHERE id=?", (version, tenant_id))
                vrow = c.execute("SELECT * FROM versions WHERE tenant_id=? AND version=?",
                                 (tenant_id, version)).fetchone()
        return self._version(vrow)

    def list_versions(self, tenant_id: str) -> list[VersionRecord]:
        self.require_tenant(tenant_id)
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM versions WHERE tenant_id=? ORDER BY version", (tenant_id,)
            ).fetchall()
        return [self._version(r) for r in rows]

    def get_version(self, tenant_id: str, version: int | None = None) -> VersionRecord:
        """The version record (``version=None``: the current one)."""
        rec = self.require_tenant(tenant_id)
        v = rec.current_version if version is None else int(version)
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM versions WHERE tenant_id=? AND version=?", (tenant_id, v)
            ).fetchone()
        if row is None:
            raise TenantStoreError(f"tenant {tenant_id!r} has no scale version {v}", "version_not_found")
        return self._version(row)

    def current_version(self, tenant_id: str) -> int:
        return self.require_tenant(tenant_id).current_version

    def set_current_version(self, tenant_id: str, version: int) -> VersionRecord:
        """Point the tenant at an existing version (rollback / roll forward). One committed update."""
        with self._transaction() as c:
            if c.execute("SELECT 1 FROM tenants WHERE id=?", (tenant_id,)).fetchone() is None:
                raise TenantStoreError(f"tenant {tenant_id!r} does not exist", "tenant_not_found")
            row = c.execute("SELECT * FROM versions WHERE tenant_id=? AND version=?",
                            (tenant_id, int(version))).fetchone()
            if row is None:
                raise TenantStoreError(f"tenant {tenant_id!r} has no scale version {version}", "version_not_found")
            c.execute("UPDATE tenants SET current_version=? WHERE id=?", (int(version), tenant_id))
        return self._version(row)

    def prune(self, tenant_id: str, keep_last: int) -> list[int]:
        """Delete all but the newest ``keep_last`` uploaded versions (never version 0 or the current one).

        Returns the deleted version numbers.
        """
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        rec = self.require_tenant(tenant_id)
        with self._transaction() as c:
            rows = c.execute("SELECT version FROM versions WHERE tenant_id=? AND version > 0 ORDER BY version DESC",
                             (tenant_id,)).fetchall()
            doomed = [r["version"] for r in rows[keep_last:] if r["version"] != rec.current_version]
            c.executemany("DELETE FROM versions WHERE tenant_id=? AND version=?", [(tenant_id, v) for v in doomed])
        self._remove_orphan_blobs()
        return sorted(doomed)

    # -- blobs --------------------------------------------------------------------------------
    def read_version_bytes(self, tenant_id: str, version: int | None = None) -> bytes:
        """The safetensors bytes of one version (``None``: current). Version 0 reads the base scale file."""
        rec = self.get_version(tenant_id, version)
        if rec.sha256 is None:
            if self.base_scales_path is None:
                raise TenantStoreError("this store was opened without the base scale set", "version_not_found")
            return self.base_scales_path.read_bytes()
        return self.blob_path(rec.sha256).read_bytes()

    def scale_loader(self, tenant_id: str, version: int) -> dict[str, torch.Tensor]:
        """The engine's ``scale_loader(tenant, version) -> {module name: float32 (N, G)}``."""
        rec = self.get_version(tenant_id, version)
        if rec.sha256 is None:
            if self.base_scales_path is None:
                raise TenantStoreError("this store was opened without the base scale set", "version_not_found")
            return load_safetensors_file(str(self.base_scales_path))
        return load_safetensors_bytes(self.blob_path(rec.sha256).read_bytes())


class _Transaction:
    """``with`` block = one SQLite transaction (BEGIN IMMEDIATE ... COMMIT / ROLLBACK) under the store lock."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn = conn
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
