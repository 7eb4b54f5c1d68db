"""Fine-tuning jobs: a persistent job store (SQLite) and a runner thread that trains one job at a time.

Layout under the server's data dir (beside the tenant store)::

    data_dir/
      finetune.sqlite3        files, jobs and job events (WAL, synchronous=FULL)
      files/<file-id>.jsonl   uploaded training/validation files (written atomically)

Lifecycle (OpenAI's statuses): ``validating_files`` (the request checks the data) -> ``queued`` -> ``running``
-> ``succeeded`` | ``failed`` | ``cancelled``. On success the trained scale set is validated against the base,
stored as the tenant's next version and made current in one tenant-store transaction, then the engine flips to it
(the ``publish`` callback). Any other ending publishes nothing, so the tenant keeps the scales it had.

Restart policy (:meth:`JobStore.recover_after_restart`): a job found ``running`` (or ``validating_files``) at
startup was interrupted by a killed process: it is marked ``failed`` with code ``server_restarted`` and never
re-run (it might be what killed the server, and its partial state is gone). A ``queued`` job never started:
its data is persisted, so it stays queued and runs as the client asked.

CPU sharing: the runner is one thread; the trainer sets its own torch intra-op thread count (per-thread under
the OpenMP backend) and sleeps between steps for the share it leaves to serving (``TrainingConfig.cpu_share``).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .finetune_data import load_examples, split_validation
from .scale_set import BaseInfo, load_scale_set, scale_set_bytes
from .tenant_store import TenantStore, VersionRecord, atomic_write_bytes
from .trainer import ScaleTrainer, StepMetrics, TrainingConfig

log = logging.getLogger("scaleswap.finetune")

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
FILE_PURPOSES = ("fine-tune",)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str | None  # tenant id, or None for the admin
    filename: str
    purpose: str
    bytes: int
    created_at: float


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant_id: str
    created_by: str | None  # tenant id, or None for the admin
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]  # resolved TrainingConfig fields (+ validation_split)
    seed: int
    start_version: int | None  # the tenant's version the run started from
    result_version: int | None
    trained_tokens: int | None
    error_code: str | None
    error_message: str | None
    error_param: str | None
    metrics: dict[str, Any]  # last train_loss, valid_loss, steps, seconds

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: str
    created_at: float
    level: str  # "info" | "warn" | "error"
    message: str
    type: str  # "message" | "metrics"
    data: dict[str, Any] | None


class JobStore:
    """SQLite store for uploaded files, jobs and their events. Thread-safe (one connection + lock)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.file_dir = self.data_dir / "files"
        self.file_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.data_dir / "finetune.sqlite3", check_same_thread=False,
                                     isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(
                """
                CREATE TABLE IF NOT EXISTS files (
                    id TEXT PRIMARY KEY, owner TEXT, filename TEXT NOT NULL, purpose TEXT NOT NULL,
                    bytes INTEGER NOT NULL, created_at REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS jobs (
                    id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, created_by TEXT, status TEXT NOT NULL,
                    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
                    training_file TEXT NOT NULL, validation_file TEXT, hyperparameters TEXT NOT NULL,
                    seed INTEGER NOT NULL, start_version INTEGER, result_version INTEGER, trained_tokens INTEGER,
                    error_code TEXT, error_message TEXT, error_param TEXT, metrics TEXT NOT NULL DEFAULT '{}');
                CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
                CREATE TABLE IF NOT EXISTS events (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at REAL NOT NULL,
                    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
                CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
                """
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    # -- files ------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        assert "/" not in file_id and not file_id.startswith(".")
        return self.file_dir / f"{file_id}.jsonl"

    def create_file(self, data: bytes, filename: str, owner: str | None, purpose: str = "fine-tune") -> FileRecord:
        if purpose not in FILE_PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}")
        rec = FileRecord(_new_id("file"), owner, filename, purpose, len(data), time.time())
        atomic_write_bytes(self.file_path(rec.id), data)  # durable before the row that names it
        with self._lock:
            self._conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                               (rec.id, rec.owner, rec.filename, rec.purpose, rec.bytes, rec.created_at))
        return rec

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self._exec("SELECT * FROM files WHERE id=?", (file_id,)).fetchone()
        return None if row is None else FileRecord(**dict(row))

    def list_files(self, owner: str | None = None, all_owners: bool = False) -> list[FileRecord]:
        if all_owners:
            rows = self._exec("SELECT * FROM files ORDER BY created_at DESC").fetchall()
        else:
            rows = self._exec("SELECT * FROM files WHERE owner IS ? ORDER BY created_at DESC", (owner,)).fetchall()
        return [FileRecord(**dict(r)) for r in rows]

    def read_file(self, file_id: str) -> bytes:
        return self.file_path(file_id).read_bytes()

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            n = self._conn.execute("DELETE FROM files WHERE id=?", (file_id,)).rowcount
        self.file_path(file_id).unlink(missing_ok=True)
        return n > 0

    # -- jobs -------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        d = dict(row)
        d["hyperparameters"] = json.loads(d["hyperparameters"])
        d["metrics"] = json.loads(d["metrics"] or "{}")
        return JobRecord(**d)

    def create_job(self, tenant_id: str, created_by: str | None, training_file: str, validation_file: str | None,
                   hyperparameters: dict[str, Any], seed: int, status: str = "validating_files") -> JobRecord:
        assert status in JOB_STATUSES
        job_id = _new_id("ftjob")
        with self._lock:
            self._conn.execute(
                "INSERT INTO jobs (id, tenant_id, created_by, status, created_at, training_file, validation_file, "
                "hyperparameters, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, tenant_id, created_by, status, time.time(), training_file, validation_file,
                 json.dumps(hyperparameters), seed),
            )
        return self.require_job(job_id)

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._exec("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def require_job(self, job_id: str) -> JobRecord:
        job = self.get_job(job_id)
        assert job is not None, job_id
        return job

    def list_jobs(self, tenant_id: str | None = None, after: str | None = None, limit: int = 20) -> tuple[list[JobRecord], bool]:
        """Newest first; ``after``: a job id, list the ones created before it. -> (jobs, has_more)."""
        where, args = [], []
        if tenant_id is not None:
            where.append("tenant_id=?")
            args.append(tenant_id)
        if after is not None:
            ref = self.get_job(after)
            if ref is not None:
                where.append("(created_at < ? OR (created_at = ? AND id < ?))")
                args += [ref.created_at, ref.created_at, ref.id]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = self._exec(sql, tuple(args) + (limit + 1,)).fetchall()
        return [self._job(r) for r in rows[:limit]], len(rows) > limit

    def count_jobs(self, tenant_id: str, statuses: tuple[str, ...] = ("validating_files", "queued")) -> int:
        marks = ",".join("?" * len(statuses))
        row = self._exec(f"SELECT COUNT(*) AS n FROM jobs WHERE tenant_id=? AND status IN ({marks})",
                         (tenant_id, *statuses)).fetchone()
        return int(row["n"])

    def next_queued(self) -> JobRecord | None:
        row = self._exec("SELECT * FROM jobs WHERE status='queued' ORDER BY created_at, id LIMIT 1").fetchone()
        return None if row is None else self._job(row)

    def transition(self, job_id: str, from_statuses: tuple[str, ...], to_status: str, **fields: Any) -> bool:
        """Compare-and-set the status (and other columns). Returns False when the job was not in ``from_statuses``."""
        assert to_status in JOB_STATUSES
        cols = {"status": to_status, **fields}
        if to_status in FINAL_STATUSES:
            cols.setdefault("finished_at", time.time())
        if "metrics" in cols:
            cols["metrics"] = json.dumps(cols["metrics"])
        sets = ", ".join(f"{k}=?" for k in cols)
        marks = ",".join("?" * len(from_statuses))
        with self._lock:
            n = self._conn.execute(f"UPDATE jobs SET {sets} WHERE id=? AND status IN ({marks})",
                                   (*cols.values(), job_id, *from_statuses)).rowcount
        return n == 1

    def update_metrics(self, job_id: str, metrics: dict[str, Any], trained_tokens: int) -> None:
        self._exec("UPDATE jobs SET metrics=?, trained_tokens=? WHERE id=?", (json.dumps(metrics), trained_tokens, job_id))

    def recover_after_restart(self) -> list[str]:
        """Mark jobs a killed process left running as failed (see the module docstring). -> their ids."""
        with self._lock:
            rows = self._conn.execute("SELECT id FROM jobs WHERE status IN ('running', 'validating_files')").fetchall()
            ids = [r["id"] for r in rows]
            for job_id in ids:
                self.transition(job_id, ("running", "validating_files"), "failed", error_code="server_restarted",
                                error_message="the server stopped while this job was running; the tenant's scales "
                                              "were not changed. Create a new job to retry.")
                self.add_event(job_id, "message", "Job failed: the server restarted while it was running", level="error")
        return ids

    # -- events -----------------------------------------------------------------------------
    def add_event(self, job_id: str, type: str, message: str, data: dict[str, Any] | None = None,
                  level: str = "info") -> None:
        self._exec("INSERT INTO events (job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?)",
                   (job_id, time.time(), level, message, type, None if data is None else json.dumps(data)))

    def list_events(self, job_id: str, after: int | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Newest first (as OpenAI lists them); ``after``: an event id, list older ones. -> (events, has_more)."""
        sql, args = "SELECT * FROM events WHERE job_id=?", [job_id]
        if after is not None:
            sql += " AND id < ?"
            args.append(after)
        rows = self._exec(sql + " ORDER BY id DESC LIMIT ?", (*args, limit + 1)).fetchall()
        events = [JobEvent(id=r["id"], job_id=r["job_id"], created_at=r["created_at"], level=r["level"],
                           message=r["message"], type=r["type"], data=None if r["data"] is None else json.loads(r["data"]))
                  for r in rows[:limit]]
        return events, len(rows) > limit


# ----------------------------------------------------------------------------- runner
@dataclass
class RunnerSettings:
    num_threads: int | None = None  # torch threads of the training thread (None: half the cores, at least 1)
    cpu_share: float = 0.5  # fraction of wall time the trainer runs while the server serves
    poll_s: float = 1.0

    def resolved_threads(self) -> int:
        return self.num_threads or max(1, (os.cpu_count() or 2) // 2)


@dataclass
class _Running:
    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)


def training_config_from(hp: dict[str, Any], settings: RunnerSettings) -> TrainingConfig:
    """A job's resolved hyperparameters -> TrainingConfig (validation_split is not a trainer field)."""
    fields = {k: v for k, v in hp.items() if k in TrainingConfig.__dataclass_fields__}
    fields.setdefault("num_threads", settings.resolved_threads())
    fields.setdefault("cpu_share", settings.cpu_share)
    return TrainingConfig(**fields)


def prepare_datasets(job_hp: dict[str, Any], training: bytes, validation: bytes | None, tokenizer: Any, seed: int):
    """Parse + tokenize a job's files. -> (train_examples, validation_examples). ValueError names the file and line."""
    max_len = int(job_hp.get("max_seq_len", TrainingConfig.max_seq_len))
    try:
        train = load_examples(training, tokenizer, max_len)
    except ValueError as e:
        raise ValueError(f"training file: {e}") from None
    if validation is not None:
        try:
            val = load_examples(validation, tokenizer, max_len)
        except ValueError as e:
            raise ValueError(f"validation file: {e}") from None
        return train, val
    split = float(job_hp.get("validation_split", 0.0))
    return split_validation(train, split, seed)


class JobRunner:
    """Runs queued jobs one at a time in a daemon thread, beside serving.

    ``model``/``tokenizer``: the served quantized model (never written; see trainer.py). ``tenant_store``: where
    the run's starting scales come from. ``publish(tenant_id, data, source, note) -> VersionRecord``: makes a
    validated scale-set blob the tenant's current version (the server passes its ``publish_version``, which stores
    it and flips the engine); default: ``tenant_store.add_version(..., make_current=True)`` alone.
    """

    def __init__(self, store: JobStore, model: Any, tokenizer: Any, tenant_store: TenantStore, base_info: BaseInfo,
                 publish: Callable[[str, bytes, str, str], VersionRecord] | None = None,
                 settings: RunnerSettings | None = None,
                 pad_id: int = 0) -> None:
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.tenant_store = tenant_store
        self.base_info = base_info
        self.publish = publish or (lambda tenant, data, source, note: tenant_store.add_version(
            tenant, data, source=source, note=note, make_current=True))
        self.settings = settings or RunnerSettings()
        self.pad_id = pad_id
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running: _Running | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------------------
    def start(self) -> None:
        assert self._thread is None, "runner already started"
        self._thread = threading.Thread(target=self._loop, name="scaleswap-finetune", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A job was queued: wake the runner."""
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the runner; a running job is interrupted and marked failed (code ``server_shutdown``)."""
        self._stop.set()
        with self._lock:
            if self._running is not None:
                self._running.cancel.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued or running job (a finished one is returned unchanged). None if unknown."""
        job = self.store.get_job(job_id)
        if job is None or job.is_final:
            return job
        if self.store.transition(job_id, ("validating_files", "queued"), "cancelled"):
            self.store.add_event(job_id, "message", "Job cancelled before it started")
            return self.store.get_job(job_id)
        with self._lock:
            if self._running is not None and self._running.job_id == job_id:
                self._running.cancel.set()
        return self.store.get_job(job_id)

    @property
    def running_job_id(self) -> str | None:
        with self._lock:
            return None if self._running is None else self._running.job_id

    # -- the thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(self.settings.poll_s)
                self._wake.clear()
                continue
            running = _Running(job.id)
            with self._lock:
                if self._stop.is_set():
                    break
                if not self.store.transition(job.id, ("queued",), "running", started_at=time.time()):
                    continue  # cancelled meanwhile
                self._running = running
            try:
                self._run(job, running.cancel)
            except Exception as e:  # never let one job kill the runner
                log.exception("fine-tuning job %s crashed", job.id)
                self._finish_failed(job.id, "internal_error", f"internal error: {type(e).__name__}: {e}")
                self.store.add_event(job.id, "message", traceback.format_exception_only(e)[-1].strip(), level="error")
            finally:
                with self._lock:
                    self._running = None

    def _finish_failed(self, job_id: str, code: str, message: str, **fields: Any) -> None:
        self.store.transition(job_id, ("running",), "failed", error_code=code, error_message=message, **fields)

    def _run(self, job: JobRecord, cancel: threading.Event) -> None:
        store = self.store
        store.add_event(job.id, "message", "Fine-tuning job started")
        try:
            training = store.read_file(job.training_file)
            validation = store.read_file(job.validation_file) if job.validation_file else None
            train, val = prepare_datasets(job.hyperparameters, training, validation, self.tokenizer, job.seed)
            cfg = training_config_from(job.hyperparameters, self.settings)
        except (ValueError, OSError) as e:
            self._finish_failed(job.id, "invalid_training_file", str(e))
            store.add_event(job.id, "message", f"Job failed: {e}", level="error")
            return
        start_version = self.tenant_store.current_version(job.tenant_id)
        init = self.tenant_store.scale_loader(job.tenant_id, start_version)
        store.transition(job.id, ("running",), "running", start_version=start_version)
        trainer = ScaleTrainer(self.model, cfg, init_scales=init, pad_id=self.pad_id)
        total = cfg.total_steps(len(train))
        store.add_event(job.id, "message",
                        f"Training {trainer.num_trainable_params} scales from version {start_version} for {total} "
                        f"steps on {len(train)} examples ({len(val)} held out)")

        def on_step(m: StepMetrics) -> None:
            data = {"step": m.step, "total_steps": m.total_steps, "train_loss": m.loss,
                    "learning_rate": m.learning_rate, "grad_norm": m.grad_norm, "trained_tokens": m.trained_tokens,
                    "step_seconds": m.seconds}
            msg = f"Step {m.step}/{m.total_steps}: training loss={m.loss:.4f}"
            if m.validation_loss is not None:
                data["valid_loss"] = m.validation_loss
                msg += f", validation loss={m.validation_loss:.4f}"
            store.add_event(job.id, "metrics", msg, data)
            store.update_metrics(job.id, {"step": m.step, "total_steps": m.total_steps, "train_loss": m.loss,
                                          **({"valid_loss": m.validation_loss} if m.validation_loss is not None else {})},
                                 m.trained_tokens)

        result = trainer.train(train, val, cancel=cancel, on_step=on_step)
        metrics = {"steps": result.steps, "total_steps": total, "seconds": round(result.seconds, 3)}
        if result.train_losses:
            metrics["first_train_loss"] = result.train_losses[0]
            metrics["train_loss"] = result.train_losses[-1]
        if result.validation_losses:
            metrics["initial_valid_loss"] = result.validation_losses[0][1]
            metrics["valid_loss"] = result.validation_losses[-1][1]
        if result.status == "cancelled":
            if self._stop.is_set():
                self._finish_failed(job.id, "server_shutdown", "the server shut down while this job was running; "
                                    "the tenant's scales were not changed", metrics=metrics,
                                    trained_tokens=result.trained_tokens)
                store.add_event(job.id, "message", "Job failed: server shutdown", level="error")
            else:
                store.transition(job.id, ("running",), "cancelled", metrics=metrics, trained_tokens=result.trained_tokens)
                store.add_event(job.id, "message", "Job cancelled; the tenant's scales were not changed")
            return
        if not result.succeeded:
            self._finish_failed(job.id, result.error_code or "training_failed", result.error_message or "training failed",
                                metrics=metrics, trained_tokens=result.trained_tokens)
            store.add_event(job.id, "message", f"Job failed: {result.error_message}; the tenant's scales were not "
                            f"changed", level="error")
            return
        assert result.scales is not None
        data = scale_set_bytes(result.scales, self.base_info,
                               {"tenant": job.tenant_id, "source": "finetune", "job": job.id,
                                "start_version": start_version})
        load_scale_set(data, self.base_info)  # same validation as an upload (fingerprint, names, finite, > 0)
        if cancel.is_set():  # cancelled after the last step: still publish nothing
            store.transition(job.id, ("running",), "cancelled", metrics=metrics, trained_tokens=result.trained_tokens)
            store.add_event(job.id, "message", "Job cancelled; the tenant's scales were not changed")
            return
        rec = self.publish(job.tenant_id, data, "finetune", job.id)
        store.transition(job.id, ("running",), "succeeded", result_version=rec.version,
                         trained_tokens=result.trained_tokens, metrics=metrics)
        store.add_event(job.id, "message", f"Job succeeded: tenant {job.tenant_id!r} now serves scale version "
                        f"{rec.version}")
