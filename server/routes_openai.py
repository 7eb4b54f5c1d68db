"""OpenAI-compatible generation: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``.

``model`` names a tenant or the base model. A request becomes ``len(prompts) * n`` engine sequences, submitted
together (all admitted or none: a full queue is a 429 before anything runs), each on the tenant's CURRENT scale
version at submission (a publish or rollback affects the next request; sequences in flight keep theirs).
Version 0 (base scales) runs as the base model, slot 0, with nothing to load.

Streaming answers are server-sent events ``data: {chunk}`` ending with ``data: [DONE]``; with
``stream_options.include_usage`` a last chunk with empty ``choices`` carries ``usage``. A client that disconnects
aborts its sequences (streaming: Starlette cancels the body iterator; non-streaming: a watcher on
``http.disconnect``), which frees their KV blocks at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from scaleswap.runtime.config import SamplingParams
from scaleswap.runtime.engine import PromptTooLongError, QueueFullError
from scaleswap.runtime.sequence import RequestOutput, TokenLogprob
from scaleswap.server.auth import Principal, authenticate
from scaleswap.server.errors import APIError, queue_full
from scaleswap.server.limits import TenantLimitExceeded
from scaleswap.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
)
from scaleswap.server.state import ServerState

log = logging.getLogger("scaleswap.server")
router = APIRouter(tags=["openai"])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 429, 503)}


def _sse_responses(model: type) -> dict:
    return {200: {"description": f"JSON ({model.__name__}), or with stream=true server-sent events, each "
                                 f"'data: <{model.__name__.replace('Response', 'StreamResponse')} JSON>', "
                                 f"ending with 'data: [DONE]'",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_ERRORS}


# ------------------------------------------------------------------------------------------- model resolution
@dataclass
class Target:
    """What a request runs on: the base (tenant None) or a tenant at a scale version."""

    model_id: str
    tenant_id: str | None
    version: int  # 0 = base scales

    @property
    def engine_tenant(self) -> str | None:
        return self.tenant_id if self.version > 0 else None  # version 0 == base scales == slot 0


def resolve_model(state: ServerState, principal: Principal, model: str) -> Target:
    if model == state.base_model_id:
        return Target(model, None, 0)
    rec = state.store.get_tenant(model)
    if rec is None:
        raise APIError(404, f"the model {model!r} does not exist; see GET /v1/models", param="model",
                       code="model_not_found")
    principal.require_tenant_access(rec.id)
    return Target(model, rec.id, rec.current_version)


def _limiter_key(principal: Principal, target: Target) -> str:
    """Whose concurrency budget a request spends: the calling tenant, else the model's tenant, else the base."""
    return principal.tenant_id or target.tenant_id or "__base__"


# ------------------------------------------------------------------------------------------- running sequences
@dataclass
class SeqState:
    index: int  # choice index (prompt-major: prompt_i * n + j)
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    timings: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    finished: bool = False

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens
        self.timings = out.timings
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason
            self.error = getattr(out, "error", None)


class Generation:
    """All engine sequences of one HTTP request: submit together, merge their deltas, abort on exit."""

    def __init__(self, state: ServerState, target: Target, endpoint: str, seqs: list[SeqState],
                 n_per_prompt: int) -> None:
        self.state = state
        self.n_per_prompt = n_per_prompt  # seqs[i * n_per_prompt] is the first choice of prompt i
        self.engine = state.engine
        self.target = target
        self.endpoint = endpoint
        self.seqs = seqs
        self.start = time.perf_counter()
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._recorded: set[int] = set()

    def submit(self) -> None:
        """Submit every sequence now, or none: QueueFullError → 429, PromptTooLongError → 400."""
        streams = []
        try:
            for s in self.seqs:
                streams.append(self.engine.generate(s.prompt_ids, s.params, self.target.engine_tenant,
                                                    self.target.version if self.target.engine_tenant else None,
                                                    s.request_id))
        except QueueFullError as e:
            self._abort_streams(streams)
            self.state.metrics.rejected.labels("queue_full").inc()
            raise queue_full(str(e)) from None
        except PromptTooLongError as e:
            self._abort_streams(streams)
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except ValueError as e:
            self._abort_streams(streams)
            raise APIError(400, str(e), param="prompt") from None
        except RuntimeError as e:  # the engine is shutting down
            self._abort_streams(streams)
            raise APIError(503, str(e), code="shutting_down") from None
        for i, stream in enumerate(streams):
            self._tasks.append(asyncio.create_task(self._pump(i, stream)))

    def _abort_streams(self, streams: list) -> None:
        for s in self.seqs[: len(streams)]:
            self.engine.abort(s.request_id)

    async def _pump(self, i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - hand the failure to the consumer
            self._queue.put_nowait((i, e))
        finally:
            await _aclose(stream)

    async def deltas(self) -> AsyncIterator[tuple[SeqState, RequestOutput]]:
        """Yield (sequence, delta) as they arrive until every sequence has finished."""
        remaining = len(self.seqs)
        while remaining:
            i, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            seq = self.seqs[i]
            seq.add(item)
            if item.finished:
                remaining -= 1
                self._record(seq)
            yield seq, item

    def _record(self, seq: SeqState) -> None:
        if seq.index in self._recorded:
            return
        self._recorded.add(seq.index)
        self.state.metrics.observe_generation(
            self.target.tenant_id, self.endpoint, seq.timings, time.perf_counter() - self.start,
            seq.num_prompt_tokens, seq.num_output_tokens, seq.finish_reason)

    async def close(self) -> None:
        """Abort whatever has not finished (client gone, error) and stop the pumps."""
        for s in self.seqs:
            if not s.finished:
                self.engine.abort(s.request_id)
                s.finish_reason = "abort"
                self._record(s)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def usage(self) -> Usage:
        prompt = sum(s.num_prompt_tokens for s in self.seqs[:: self.n_per_prompt])  # once per prompt, as OpenAI
        completion = sum(s.num_output_tokens for s in self.seqs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001
            pass


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (the ASGI server sends ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _run_to_completion(request: Request, gen: Generation) -> bool:
    """Drive ``gen`` until all sequences finish (True); abort them if the client disconnects first (False)."""

    async def consume() -> None:
        async for _ in gen.deltas():
            pass

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # client gone
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return False
        work.result()
        return True
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await gen.close()


class GenerationStream(StreamingResponse):
    """SSE response that always runs ``cleanup`` (free the tenant slot, abort unfinished sequences), even when
    the client is gone before the body iterator ever started (then its own ``finally`` never runs)."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], Any]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _error_event(e: BaseException) -> bytes:
    err = e if isinstance(e, APIError) else APIError(500, f"generation failed: {e}", code="internal_error")
    return _sse(err.body())


# ------------------------------------------------------------------------------------------- request preparation
def _max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int, max_model_len: int) -> int:
    """The completion budget; 400 with the numbers if prompt + budget exceed the context."""
    if num_prompt_tokens >= max_model_len:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{num_prompt_tokens} tokens; shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    room = max_model_len - num_prompt_tokens
    if requested is None:
        return min(default, room) if default is not None else room
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but "
                            f"{num_prompt_tokens + requested} were requested ({num_prompt_tokens} in the prompt, "
                            f"{requested} for the completion); shorten the prompt or lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def _encode_prompt(engine: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    else:
        vocab = engine.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        ids = [int(t) for t in prompt]
    if not ids:
        raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
    return ids


def _token_text(engine: Any, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(engine: Any, lps: list[TokenLogprob], text_start: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = text_start
    for lp in lps:
        tok = _token_text(engine, lp.token_id)
        out.tokens.append(tok)
        out.token_logprobs.append(float(lp.logprob))
        out.top_logprobs.append({_token_text(engine, t): float(v) for t, v in lp.top} if lp.top else None)
        out.text_offset.append(offset)
        offset += len(tok)
    return out


def _chat_logprobs(engine: Any, lps: list[TokenLogprob]) -> ChatChoiceLogprobs:
    content = []
    for lp in lps:
        tok = _token_text(engine, lp.token_id)
        content.append(ChatTokenLogprob(
            token=tok, logprob=float(lp.logprob), bytes=list(tok.encode("utf-8")),
            top_logprobs=[TopLogprob(token=(t := _token_text(engine, tid)), logprob=float(v),
                                     bytes=list(t.encode("utf-8"))) for tid, v in lp.top]))
    return ChatChoiceLogprobs(content=content)


def _begin(request: Request, principal: Principal, model: str) -> tuple[ServerState, Any, Target]:
    state: ServerState = request.app.state.server
    engine = state.require_ready()
    return state, engine, resolve_model(state, principal, model)


def _finish_reason(seq: SeqState) -> str | None:
    if seq.error:
        log.warning("request %s failed in the engine: %s", seq.request_id, seq.error)
    return seq.finish_reason


def _raise_if_failed(gen: Generation) -> None:
    for s in gen.seqs:
        if s.error:
            raise APIError(500, f"generation failed: {s.error}", code="generation_failed")


async def _respond(request: Request, state: ServerState, principal: Principal, target: Target,
                   gen: Generation, stream: bool, build_final: Callable[[], Any],
                   stream_events: Callable[[], AsyncIterator[bytes]]):
    """Common tail: take a tenant slot, submit, then stream or collect. The slot is held until the end."""
    try:
        release = state.limiter.acquire(_limiter_key(principal, target))
    except TenantLimitExceeded:  # → 429 with Retry-After (errors.py)
        state.metrics.rejected.labels("tenant_limit").inc()
        raise
    try:
        gen.submit()
    except BaseException:
        release()
        raise
    if not stream:
        try:
            completed = await _run_to_completion(request, gen)
        finally:
            release()
        if not completed:
            state.metrics.disconnects.inc()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        _raise_if_failed(gen)
        return JSONResponse(build_final().model_dump(exclude_none=False))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream_events():
                yield chunk
        except asyncio.CancelledError:
            state.metrics.disconnects.inc()
            raise
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, then end the stream
            log.exception("streaming generation failed")
            yield _error_event(e)
        finally:
            await cleanup()
        yield _sse("[DONE]")

    async def cleanup() -> None:  # idempotent: release() and gen.close() may run twice
        release()
        await gen.close()

    return GenerationStream(body(), cleanup)


# ------------------------------------------------------------------------------------------- /v1/completions
@router.post("/v1/completions", response_model=CompletionResponse, responses=_sse_responses(CompletionResponse))
async def completions(body: CompletionRequest, request: Request, principal: Principal = Depends(authenticate)):
    """Text completion of one prompt or a batch of prompts (OpenAI's legacy completions API)."""
    state, engine, target = _begin(request, principal, body.model)
    body.check_supported()
    rid = f"cmpl-{uuid.uuid4().hex}"
    seqs: list[SeqState] = []
    for p_idx, prompt in enumerate(body.prompts()):
        ids = _encode_prompt(engine, prompt)
        max_tokens = _max_tokens(body.max_tokens, 16, len(ids), engine.max_model_len)
        for j in range(body.n):
            seqs.append(SeqState(p_idx * body.n + j, ids, body.sampling_params(max_tokens, j), f"{rid}-{p_idx}-{j}",
                                 num_prompt_tokens=len(ids)))
    gen = Generation(state, target, "completions", seqs, body.n)
    created = int(time.time())

    def final() -> CompletionResponse:
        choices = [CompletionChoice(index=s.index, text=s.text, finish_reason=_finish_reason(s),
                                    logprobs=_completion_logprobs(engine, s.logprobs, 0)
                                    if body.logprobs is not None else None) for s in gen.seqs]
        return CompletionResponse(id=rid, created=created, model=target.model_id, choices=choices, usage=gen.usage())

    async def events() -> AsyncIterator[bytes]:
        offsets = {s.index: 0 for s in gen.seqs}
        async for seq, out in gen.deltas():
            if not out.text and not out.finished and not out.logprobs:
                continue
            lps = None
            if body.logprobs is not None:
                lps = _completion_logprobs(engine, out.logprobs or [], offsets[seq.index])
            offsets[seq.index] += len(out.text)
            if out.finished and seq.error:
                raise APIError(500, f"generation failed: {seq.error}", code="generation_failed")
            chunk = CompletionStreamResponse(
                id=rid, created=created, model=target.model_id,
                choices=[CompletionChoice(index=seq.index, text=out.text, logprobs=lps,
                                          finish_reason=out.finish_reason if out.finished else None)])
            yield _sse(chunk.model_dump())
        if body.include_usage_in_stream:
            yield _sse(CompletionStreamResponse(id=rid, created=created, model=target.model_id, choices=[],
                                                usage=gen.usage()).model_dump())

    return await _respond(request, state, principal, target, gen, body.stream, final, events)


# ------------------------------------------------------------------------------------------- /v1/chat/completions
@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=_sse_responses(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           principal: Principal = Depends(authenticate)):
    """Chat completion: the messages are rendered with the model's own chat template."""
    state, engine, target = _begin(request, principal, body.model)
    body.check_supported()
    try:
        prompt = engine.chat_prompt(body.messages_as_dicts())
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    ids = _encode_prompt(engine, prompt)
    max_tokens = _max_tokens(body.requested_max_tokens(), None, len(ids), engine.max_model_len)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    seqs = [SeqState(j, ids, body.sampling_params(max_tokens, j), f"{rid}-{j}", num_prompt_tokens=len(ids))
            for j in range(body.n)]
    gen = Generation(state, target, "chat", seqs, body.n)
    created = int(time.time())

    def final() -> ChatCompletionResponse:
        choices = [ChatCompletionChoice(index=s.index, message=ChatResponseMessage(content=s.text),
                                        finish_reason=_finish_reason(s),
                                        logprobs=_chat_logprobs(engine, s.logprobs) if body.logprobs else None)
                   for s in gen.seqs]
        return ChatCompletionResponse(id=rid, created=created, model=target.model_id, choices=choices,
                                      usage=gen.usage())

    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> bytes:
        return _sse(ChatCompletionChunk(id=rid, created=created, model=target.model_id, choices=choices,
                                        usage=usage).model_dump())

    async def events() -> AsyncIterator[bytes]:
        for s in gen.seqs:  # OpenAI sends the role first, with empty content
            yield chunk([ChatStreamChoice(index=s.index, delta=ChatDelta(role="assistant", content=""))])
        async for seq, out in gen.deltas():
            if not out.text and not out.finished and not out.logprobs:
                continue
            if out.finished and seq.error:
                raise APIError(500, f"generation failed: {seq.error}", code="generation_failed")
            lps = _chat_logprobs(engine, out.logprobs or []) if body.logprobs else None
            yield chunk([ChatStreamChoice(index=seq.index, delta=ChatDelta(content=out.text or None), logprobs=lps,
                                          finish_reason=out.finish_reason if out.finished else None)])
        if body.include_usage_in_stream:
            yield chunk([], usage=gen.usage())

    return await _respond(request, state, principal, target, gen, body.stream, final, events)


# ------------------------------------------------------------------------------------------- /v1/models
@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request, principal: Principal = Depends(authenticate)) -> ModelList:
    """The base model and the tenants this key may use."""
    state: ServerState = request.app.state.server
    state.require_base()
    base_id = state.base_model_id
    cards = [ModelCard(id=base_id, created=int(state.started_at), owned_by="scaleswap", scale_version=0)]
    for rec in await asyncio.to_thread(state.store.list_tenants):
        if principal.may_access_tenant(rec.id):
            cards.append(ModelCard(id=rec.id, created=int(rec.created_at), owned_by=rec.id, root=base_id,
                                   scale_version=rec.current_version))
    return ModelList(data=cards)
