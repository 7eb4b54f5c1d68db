"""Fine-tuning, shaped like OpenAI's fine-tuning API: files, jobs, events, cancel.

- ``POST /v1/files`` (multipart: ``file``, ``purpose=fine-tune``): a JSONL training/validation file, checked
  line by line at upload (400 naming the line), size-limited while read (413). ``GET /v1/files``,
  ``GET /v1/files/{id}``, ``DELETE /v1/files/{id}``.
- ``POST /v1/fine_tuning/jobs``: ``model`` = the tenant; ``training_file`` (an uploaded file id) or inline
  ``training_data`` (a list of records); optional ``validation_file`` / ``validation_data``; ``hyperparameters``
  (also accepted under ``method.supervised.hyperparameters``). The data is tokenized before the job is queued;
  bad data fails the job at once and answers 400.
- ``GET /v1/fine_tuning/jobs`` (newest first, ``after``/``limit``), ``GET /v1/fine_tuning/jobs/{id}``,
  ``GET /v1/fine_tuning/jobs/{id}/events`` (loss per step, newest first), ``POST /v1/fine_tuning/jobs/{id}/cancel``.

Who may do what: a tenant key may fine-tune only its own tenant (403 otherwise) and sees only its own files and
jobs (others' are 404); the admin may fine-tune any tenant and sees everything.

Jobs run one at a time in a thread of this process (runtime/jobs.py) on the served model; a succeeded job is
published through ``ServerState.publish_version`` (validate, store, flip the engine), so the tenant's next
request runs on the new scales. The app calls :func:`startup` / :func:`shutdown` from its lifespan.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from scaleswap.runtime.finetune_data import parse_jsonl
from scaleswap.runtime.jobs import FileRecord, JobRecord, JobRunner, JobStore, RunnerSettings, prepare_datasets
from scaleswap.runtime.trainer import SCHEDULES, TrainingConfig
from scaleswap.server.auth import Principal, authenticate
from scaleswap.server.errors import APIError
from scaleswap.server.protocol import ErrorResponse
from scaleswap.server.state import ServerState

log = logging.getLogger("scaleswap.server")
router = APIRouter(tags=["fine-tuning"])
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 503)}

MAX_STEPS_LIMIT = 100_000
MAX_SEQ_LEN_LIMIT = 8192
MAX_QUEUED_JOBS_PER_TENANT = 8


# ----------------------------------------------------------------------------------------------- state
@dataclass
class FinetuneService:
    jobs: JobStore
    runner: JobRunner | None = None
    runner_task: asyncio.Task | None = None

    def require_runner(self) -> JobRunner:
        if self.runner is None:
            from scaleswap.server.errors import not_ready

            raise not_ready()
        return self.runner


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _service(request: Request) -> FinetuneService:
    return request.app.state.finetune


def runner_settings(settings) -> RunnerSettings:
    """CPU share and threads of the training thread: ``settings.finetune_cpu_share`` / ``finetune_threads`` when
    the server settings declare them, else ``SCALESWAP_FINETUNE_CPU_SHARE`` / ``SCALESWAP_FINETUNE_THREADS``."""
    share = getattr(settings, "finetune_cpu_share", None) or os.environ.get("SCALESWAP_FINETUNE_CPU_SHARE")
    threads = getattr(settings, "finetune_threads", None) or os.environ.get("SCALESWAP_FINETUNE_THREADS")
    out = RunnerSettings()
    try:
        if share is not None:
            out.cpu_share = float(share)
        if threads is not None:
            out.num_threads = int(threads)
    except ValueError:
        raise ValueError(f"fine-tuning CPU share must be a number in (0, 1] and threads an integer >= 1, "
                         f"got {share!r} / {threads!r}") from None
    if not 0 < out.cpu_share <= 1 or (out.num_threads is not None and out.num_threads < 1):
        raise ValueError(f"fine-tuning CPU share must be in (0, 1] and threads >= 1, got {share!r} / {threads!r}")
    return out


async def startup(app) -> None:
    """Open the job store, fail jobs a killed process left running, and start the runner once the model is up."""
    state: ServerState = app.state.server
    settings = runner_settings(state.settings)  # refuse bad values at startup, not in the background task
    jobs = await asyncio.to_thread(JobStore, state.settings.data_dir)
    failed = await asyncio.to_thread(jobs.recover_after_restart)
    if failed:
        log.warning("marked %d fine-tuning job(s) interrupted by a restart as failed: %s", len(failed), ", ".join(failed))
    service = FinetuneService(jobs)
    app.state.finetune = service
    loop = asyncio.get_running_loop()

    def publish(tenant_id: str, data: bytes, source: str, note: str):
        # runs in the runner thread: hop onto the event loop, where publish_version serialises with uploads
        fut = asyncio.run_coroutine_threadsafe(state.publish_version(tenant_id, data, source=source, note=note), loop)
        return fut.result()

    async def start_when_ready() -> None:
        while state.status in ("loading",) or (state.status == "ready" and state.engine is None):
            await asyncio.sleep(0.2)
        if state.status != "ready":
            return  # the model failed to load or we are shutting down; jobs stay queued for the next start
        engine = state.engine
        tokenizer = engine.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        runner = JobRunner(jobs, engine.model, tokenizer, state.store, state.base, publish=publish,
                           settings=settings, pad_id=pad if pad is not None else 0)
        runner.start()
        service.runner = runner

    service.runner_task = asyncio.create_task(start_when_ready())


async def shutdown(app) -> None:
    """Stop the runner (a running job is failed with ``server_shutdown``; the tenant keeps its scales)."""
    service: FinetuneService | None = getattr(app.state, "finetune", None)
    if service is None:
        return
    if service.runner_task is not None and not service.runner_task.done():
        service.runner_task.cancel()
    if service.runner is not None:
        timeout = float(app.state.server.settings.shutdown_timeout_s)
        await asyncio.to_thread(service.runner.stop, max(timeout, 1.0))
    service.jobs.close()


# ----------------------------------------------------------------------------------------------- models
class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="the tenant whose scales are trained")
    training_file: str | None = Field(None, description="id of an uploaded JSONL file (purpose fine-tune)")
    training_data: list[dict[str, Any]] | None = Field(None, description="inline records instead of a file")
    validation_file: str | None = None
    validation_data: list[dict[str, Any]] | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = Field(None, description="OpenAI's {type: supervised, supervised: {hyperparameters}}")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64, description="free text kept with the job")


# hyperparameter -> (TrainingConfig field or None, type, lower bound, upper bound)
_HP_SPEC: dict[str, tuple[str | None, type, float, float]] = {
    "n_epochs": ("n_epochs", int, 1, 1000),
    "max_steps": ("max_steps", int, 1, MAX_STEPS_LIMIT),
    "batch_size": ("batch_size", int, 1, 256),
    "learning_rate": ("learning_rate", float, 0, math.inf),
    "learning_rate_multiplier": (None, float, 0, math.inf),
    "warmup_steps": ("warmup_steps", int, 0, MAX_STEPS_LIMIT),
    "grad_accum_steps": ("grad_accum_steps", int, 1, 256),
    "max_seq_len": ("max_seq_len", int, 2, MAX_SEQ_LEN_LIMIT),
    "weight_decay": ("weight_decay", float, 0, 10),
    "max_grad_norm": ("max_grad_norm", float, 0, math.inf),
    "min_lr_ratio": ("min_lr_ratio", float, 0, 1),
    "eval_every": ("eval_every", int, 0, MAX_STEPS_LIMIT),
    "validation_split": (None, float, 0, 0.5),
    "lr_scheduler": ("schedule", str, 0, 0),
    "gradient_checkpointing": ("gradient_checkpointing", bool, 0, 0),
}
_HP_ALIASES = {"steps": "max_steps", "warmup": "warmup_steps", "gradient_accumulation_steps": "grad_accum_steps",
               "schedule": "lr_scheduler", "epochs": "n_epochs"}


def resolve_hyperparameters(raw: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI-style hyperparameters ("auto" = default) -> resolved TrainingConfig fields + validation_split.

    Raises APIError 400 naming the parameter and the valid choices.
    """
    out: dict[str, Any] = {}
    multiplier = None
    for key, value in (raw or {}).items():
        name = _HP_ALIASES.get(key, key)
        if name not in _HP_SPEC:
            raise APIError(400, f"unknown hyperparameter {key!r}; valid: {', '.join(sorted(_HP_SPEC))}",
                           param=f"hyperparameters.{key}", code="invalid_hyperparameter")
        if value == "auto" or value is None:
            continue
        field, typ, lo, hi = _HP_SPEC[name]
        param = f"hyperparameters.{key}"
        if typ is str:
            if value not in SCHEDULES:
                raise APIError(400, f"{key} must be one of {', '.join(SCHEDULES)}", param=param,
                               code="invalid_hyperparameter")
        elif typ is bool:
            if not isinstance(value, bool):
                raise APIError(400, f"{key} must be true or false", param=param, code="invalid_hyperparameter")
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if typ is int and ok:
                ok = float(value).is_integer()
            if ok and name in ("learning_rate", "learning_rate_multiplier"):
                ok = value > 0
            if not ok or not (lo <= value <= hi):
                bounds = f"in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f"> {lo:g}"
                raise APIError(400, f"{key} must be {'an integer' if typ is int else 'a number'} {bounds}, got {value!r}",
                               param=param, code="invalid_hyperparameter")
            value = typ(value)
        if name == "learning_rate_multiplier":
            multiplier = value
        elif field is None:
            out[name] = value
        else:
            out[field] = value
    if multiplier is not None:
        if "learning_rate" in out:
            raise APIError(400, "give learning_rate or learning_rate_multiplier, not both",
                           param="hyperparameters.learning_rate_multiplier", code="invalid_hyperparameter")
        out["learning_rate"] = TrainingConfig.learning_rate * multiplier
    try:
        TrainingConfig(**{k: v for k, v in out.items() if k in TrainingConfig.__dataclass_fields__})
    except ValueError as e:
        raise APIError(400, str(e), param="hyperparameters", code="invalid_hyperparameter") from None
    out.setdefault("learning_rate", TrainingConfig.learning_rate)
    out.setdefault("batch_size", TrainingConfig.batch_size)
    if "max_steps" not in out:
        out.setdefault("n_epochs", TrainingConfig.n_epochs)
    return out


def file_object(f: FileRecord) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None}


def job_object(job: JobRecord) -> dict[str, Any]:
    hp = dict(job.hyperparameters)
    error = None
    if job.error_code is not None:
        error = {"code": job.error_code, "message": job.error_message, "param": job.error_param}
    return {
        "object": "fine_tuning.job",
        "id": job.id,
        "model": job.tenant_id,
        "created_at": int(job.created_at),
        "started_at": None if job.started_at is None else int(job.started_at),
        "finished_at": None if job.finished_at is None else int(job.finished_at),
        "fine_tuned_model": job.tenant_id if job.status == "succeeded" else None,
        "organization_id": "scaleswap",
        "result_files": [],
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "trained_tokens": job.trained_tokens,
        "error": error,
        "seed": job.seed,
        "estimated_finish": None,
        "integrations": [],
        "start_version": job.start_version,
        "result_version": job.result_version,
        "metrics": job.metrics,
    }


# ----------------------------------------------------------------------------------------------- files
def _may_see(principal: Principal, owner: str | None) -> bool:
    return principal.is_admin or (principal.tenant_id is not None and principal.tenant_id == owner)


def _require_file(service: FinetuneService, principal: Principal, file_id: str, param: str) -> FileRecord:
    f = service.jobs.get_file(file_id)
    if f is None or not _may_see(principal, f.owner):
        raise APIError(404, f"no file {file_id!r}", param=param, code="file_not_found")
    return f


async def _read_upload_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"file exceeds the limit of {limit} bytes", param="file", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/v1/files", responses=_ERRORS)
async def upload_file(request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    """Upload a JSONL file for fine-tuning (multipart form: ``file``, ``purpose=fine-tune``)."""
    state, service = _state(request), _service(request)
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise APIError(413, f"upload is {declared} bytes; the limit is {limit} bytes", param="file", code="too_large")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:  # malformed multipart
        raise APIError(400, f"expected a multipart/form-data body with 'file' and 'purpose' ({e})") from None
    purpose = form.get("purpose")
    upload = form.get("file")
    if purpose != "fine-tune":
        raise APIError(400, f"purpose must be 'fine-tune', got {purpose!r}", param="purpose", code="invalid_purpose")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "missing the 'file' part of the form", param="file", code="missing_file")
    data = await _read_upload_limited(upload, limit)
    try:
        await asyncio.to_thread(parse_jsonl, data)
    except ValueError as e:
        raise APIError(400, f"invalid training file: {e}", param="file", code="invalid_file") from None
    owner = principal.tenant_id if principal.kind == "tenant" else None
    rec = await asyncio.to_thread(service.jobs.create_file, data, upload.filename or "upload.jsonl", owner)
    return file_object(rec)


@router.get("/v1/files", responses=_ERRORS)
async def list_files(request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    jobs = _service(request).jobs
    files = jobs.list_files(all_owners=True) if principal.is_admin else jobs.list_files(principal.tenant_id)
    return {"object": "list", "data": [file_object(f) for f in files], "has_more": False}


@router.get("/v1/files/{file_id}", responses=_ERRORS)
async def get_file(file_id: str, request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    return file_object(_require_file(_service(request), principal, file_id, "file_id"))


@router.delete("/v1/files/{file_id}", responses=_ERRORS)
async def delete_file(file_id: str, request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    service = _service(request)
    _require_file(service, principal, file_id, "file_id")
    await asyncio.to_thread(service.jobs.delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# ----------------------------------------------------------------------------------------------- jobs
def _require_job(service: FinetuneService, principal: Principal, job_id: str) -> JobRecord:
    job = service.jobs.get_job(job_id)
    if job is None or not principal.may_access_tenant(job.tenant_id):
        raise APIError(404, f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="job_not_found")
    return job


def _inline_file(service: FinetuneService, records: list[dict[str, Any]], owner: str | None, name: str,
                 limit: int) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if len(data) > limit:
        raise APIError(413, f"inline data is {len(data)} bytes; the limit is {limit} bytes", param=name,
                       code="too_large")
    return service.jobs.create_file(data, f"{name}.jsonl", owner).id


@router.post("/v1/fine_tuning/jobs", responses=_ERRORS)
async def create_job(body: FineTuningJobCreate, request: Request,
                     principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    """Queue a PEQA fine-tuning job of the tenant ``model``'s scales."""
    state, service = _state(request), _service(request)
    tenant = body.model
    principal.require_tenant_access(tenant)  # 403 before anything that could reveal whether it exists
    if tenant == state.base_model_id:
        raise APIError(400, f"{tenant!r} is the base model; fine-tune a tenant (model = its tenant id)",
                       param="model", code="invalid_model")
    state.store.require_tenant(tenant)
    engine = state.require_ready()
    if (body.training_file is None) == (body.training_data is None):
        raise APIError(400, "give exactly one of training_file and training_data", param="training_file",
                       code="invalid_training_file")
    if body.validation_file is not None and body.validation_data is not None:
        raise APIError(400, "give at most one of validation_file and validation_data", param="validation_file")
    raw_hp = dict(body.hyperparameters or {})
    if body.method is not None:
        if body.method.get("type", "supervised") != "supervised":
            raise APIError(400, "method.type must be 'supervised' (PEQA trains the scales on labelled data)",
                           param="method.type")
        raw_hp.update(((body.method.get("supervised") or {}).get("hyperparameters")) or {})
    if "seed" in raw_hp and body.seed is None:
        body.seed = raw_hp.pop("seed")
    raw_hp.pop("seed", None)
    hp = resolve_hyperparameters(raw_hp)
    seed = int(body.seed) if body.seed is not None else 0
    if hp.get("validation_split") and (body.validation_file or body.validation_data):
        raise APIError(400, "validation_split and a validation file exclude each other",
                       param="hyperparameters.validation_split")
    if service.jobs.count_jobs(tenant) >= MAX_QUEUED_JOBS_PER_TENANT:
        raise APIError(429, f"tenant {tenant!r} already has {MAX_QUEUED_JOBS_PER_TENANT} queued jobs",
                       code="too_many_jobs", headers={"Retry-After": "60"})
    owner = principal.tenant_id if principal.kind == "tenant" else None
    limit = state.settings.max_upload_bytes
    if body.training_file is not None:
        training_file = _require_file(service, principal, body.training_file, "training_file").id
    else:
        training_file = await asyncio.to_thread(_inline_file, service, body.training_data, owner, "training_data", limit)
    validation_file = None
    if body.validation_file is not None:
        validation_file = _require_file(service, principal, body.validation_file, "validation_file").id
    elif body.validation_data is not None:
        validation_file = await asyncio.to_thread(_inline_file, service, body.validation_data, owner,
                                                  "validation_data", limit)
    if body.suffix:
        hp["suffix"] = body.suffix
    job = service.jobs.create_job(tenant, principal.tenant_id, training_file, validation_file, hp, seed)
    try:
        train, val = await asyncio.to_thread(
            prepare_datasets, hp, service.jobs.read_file(training_file),
            service.jobs.read_file(validation_file) if validation_file else None, engine.tokenizer, seed)
    except ValueError as e:
        param = "validation_file" if str(e).startswith("validation") else "training_file"
        service.jobs.transition(job.id, ("validating_files",), "failed", error_code="invalid_training_file",
                                error_message=str(e), error_param=param)
        service.jobs.add_event(job.id, "message", f"Validation failed: {e}", level="error")
        raise APIError(400, f"invalid training data: {e}", param=param, code="invalid_training_file") from None
    service.jobs.add_event(job.id, "message", f"Validated {len(train)} training and {len(val)} validation examples")
    service.jobs.transition(job.id, ("validating_files",), "queued")
    service.jobs.add_event(job.id, "message", "Job queued")
    if service.runner is not None:
        service.runner.notify()
    return job_object(service.jobs.require_job(job.id))


@router.get("/v1/fine_tuning/jobs", responses=_ERRORS)
async def list_jobs(request: Request, after: str | None = Query(None), limit: int = Query(20, ge=1, le=100),
                    principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    jobs, has_more = _service(request).jobs.list_jobs(None if principal.is_admin else principal.tenant_id, after, limit)
    return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": has_more}


@router.get("/v1/fine_tuning/jobs/{job_id}", responses=_ERRORS)
async def get_job(job_id: str, request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    return job_object(_require_job(_service(request), principal, job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events", responses=_ERRORS)
async def list_events(job_id: str, request: Request, after: str | None = Query(None),
                      limit: int = Query(20, ge=1, le=10_000),
                      principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    """Newest first; ``after`` = an event id (``ftevent-<n>``): list older ones."""
    service = _service(request)
    _require_job(service, principal, job_id)
    after_n = None
    if after is not None:
        try:
            after_n = int(after.removeprefix("ftevent-"))
        except ValueError:
            raise APIError(400, f"after must be an event id like 'ftevent-12', got {after!r}", param="after") from None
    events, has_more = service.jobs.list_events(job_id, after_n, limit)
    data = [{"object": "fine_tuning.job.event", "id": f"ftevent-{e.id}", "created_at": int(e.created_at),
             "level": e.level, "message": e.message, "type": e.type, "data": e.data} for e in events]
    return {"object": "list", "data": data, "has_more": has_more}


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=_ERRORS)
async def cancel_job(job_id: str, request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
    """Cancel a queued or running job; a running one stops after its current micro-batch (poll the job)."""
    service = _service(request)
    job = _require_job(service, principal, job_id)
    if job.is_final:
        raise APIError(400, f"job {job_id} already {job.status}; only queued or running jobs can be cancelled",
                       param="fine_tuning_job_id", code="job_finished")
    if service.runner is not None:
        job = await asyncio.to_thread(service.runner.cancel, job_id)
    elif service.jobs.transition(job_id, ("validating_files", "queued"), "cancelled"):
        service.jobs.add_event(job_id, "message", "Job cancelled before it started")
        job = service.jobs.require_job(job_id)
    assert job is not None
    return job_object(job)
