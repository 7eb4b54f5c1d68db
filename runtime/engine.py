"""The serving engine: continuous batching of many tenants' requests over one quantized base.

Threads:
- the caller's (asyncio) thread submits requests (``generate`` raises ``QueueFullError`` /
  ``PromptTooLongError`` at once) and commands (abort, version flips, drops) into an inbox;
- the step thread (``start()``) drains the inbox between steps, polls the scale bank for finished loads,
  schedules, runs one forward of the flattened batch (torch releases the GIL inside ops), samples and
  hands ``RequestOutput`` deltas back with ``loop.call_soon_threadsafe``;
- the scale bank's loader thread reads cold tenants' scales (``scale_loader``) without stalling steps.

One step: ``input_ids (1, T)`` = every scheduled chunk's new tokens (single-token ones first), ``positions``,
``slot_ids (T,)`` = each token's tenant slot in the scale bank; attention goes through the paged KV cache
(``attention.PagedAttention``); only the last row of each sequence that completes its tokens reaches the LM head.

``generate_batch`` is the synchronous convenience for the CLI, tests and benchmarks: without a running step
thread it drives the steps in the calling thread.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch

from scaleswap.kernels.cpu_path import fp32_only

from .attention import PagedAttention
from .config import EngineConfig, SamplingParams
from .forward_context import ForwardContext, forward_context
from .kv_cache import BlockManager, KVCache, num_blocks_for
from .model import set_lm_head_precision
from .sampler import Sampler, find_stop, partial_stop_len
from .scale_bank import ScaleBank, ScaleLoader
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, SequenceStatus, TokenLogprob

# torch's intra-op thread count when this module was imported (before any engine made others single-threaded)
_DEFAULT_THREADS = torch.get_num_threads()
log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is full; retry later (the server answers 429)."""


class PromptTooLongError(ValueError):
    """Prompt + max_tokens exceed the context the engine can hold (the server answers 400)."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"this model's maximum context length is {max_model_len} tokens, but {num_prompt_tokens + max_tokens} "
            f"were requested ({num_prompt_tokens} in the prompt, {max_tokens} for the completion); "
            f"shorten the prompt or lower max_tokens"
        )


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    resident_tenants: int
    max_resident_tenants: int
    scale_loads: int
    scale_evictions: int
    num_preemptions: int
    num_steps: int
    num_generated_tokens: int
    # means over the last finished requests (seconds; None before any)
    mean_queue_s: float | None = None
    mean_ttft_s: float | None = None
    mean_per_token_s: float | None = None


@dataclass
class RequestResult:
    """The whole of one finished request (what ``generate_batch`` returns)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    timings: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None

    def add(self, delta: RequestOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason = delta.finish_reason
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_output_tokens = delta.num_output_tokens
        self.timings = delta.timings
        self.error = delta.error


class Engine:
    def __init__(self, quantized, config: EngineConfig | None = None, scale_loader: ScaleLoader | None = None) -> None:
        """``quantized``: a ``quantize.QuantizedModel`` (model with QuantLinear modules, tokenizer, identity)."""
        self.config = config = config or EngineConfig()
        self._fp32 = config.precision == "fp32"
        self._start_threads = _DEFAULT_THREADS  # the step thread's default team size
        self.quantized = quantized
        self.model = quantized.model
        self.model_config = quantized.config
        self.tokenizer = quantized.tokenizer
        self.base = quantized.base_info
        self.device = torch.device(config.device)
        num_blocks = num_blocks_for(config, self.model_config)
        capacity = num_blocks * config.block_size
        limit = min(self.model_config.max_position_embeddings, capacity)
        if config.max_model_len is not None:
            if config.max_model_len > limit:
                raise ValueError(f"max_model_len={config.max_model_len} exceeds what the model and KV cache hold "
                                 f"({limit} tokens: max positions {self.model_config.max_position_embeddings}, "
                                 f"cache {capacity}); lower it or raise kv_cache_memory_bytes")
            limit = config.max_model_len
        self.max_model_len = limit
        self.kv_cache = KVCache(self.model_config, num_blocks, config.block_size, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self._cond = threading.Condition()
        modules = quantized.quant_linears()
        bytes_per_set = sum(4 * m.bank.shape[1] * m.bank.shape[2] for m in modules.values())
        max_resident = config.max_resident_tenants or max(1, config.scale_bank_memory_bytes // bytes_per_set)
        if config.lm_head != "float32" and config.precision == "fast" and self.device.type == "cpu":
            set_lm_head_precision(self.model, config.lm_head)
        # Build every kernel cache now (incl. the fp32 one prefill uses), not in the first requests:
        # no first-request latency spike, and the server's memory is what it is at start.
        for m in modules.values():
            m.weight.prepare(self.device, training=True)
        self.scale_bank = ScaleBank(modules, max_resident, scale_loader, wake=self._wake)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   is_ready=self._is_ready)
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids))
        # -- shared with submitting threads (under self._cond) --
        self._inbox: list[tuple] = []
        self._inbox_adds = 0
        self._num_waiting = 0  # scheduler.waiting as of the last step
        self._tenant_versions: dict[str, int | None] = {}
        self._request_ids: set[str] = set()
        self._arrivals = itertools.count()
        # -- step-thread state --
        self._seqs: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stepping_inline = False
        self.num_steps = 0
        self.num_generated_tokens = 0
        self._recent = collections.deque(maxlen=256)  # timings of finished requests

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig | None = None,
                        scale_loader: ScaleLoader | None = None) -> "Engine":
        from .quantize import load_quantized

        config = config or EngineConfig()
        return cls(load_quantized(model_dir, device=config.device), config, scale_loader)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the step thread (idempotent); return once it has set up its torch intra-op threads.

        The step thread should own the process's only multi-threaded OpenMP team: GNU OpenMP spins only ~100
        iterations (instead of ``GOMP_SPINCOUNT``) between parallel regions once it manages more threads than
        there are CPUs, and each other thread that ran a large torch op keeps its own team for its life. Then
        every small op of a decode step pays a futex wake-up (measured on 2 cores: batch-1 decode 1.6x slower).
        So the server loads the model in a thread that exits (server/app.py), and ``scaleswap serve`` sets
        ``GOMP_SPINCOUNT`` (server/commands/serve.py).
        """
        if self._thread is not None:
            return
        assert not self._stepping_inline, "generate_batch is stepping in another thread"
        self._stopping = False
        ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name="scaleswap-engine", daemon=True)
        self._thread.start()
        ready.wait(30)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort what is in flight, stop the step thread and the loader thread."""
        self._stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
            self._thread = None
        self.scale_bank.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Synchronous shutdown (for scripts and tests)."""
        self._stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.scale_bank.close()

    def _stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ submission (any thread)
    def chat_prompt(self, messages: list[dict]) -> str:
        """Messages -> prompt text with the model's own chat template (generation prompt appended)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def _submit(self, prompt: str | list[int], params: SamplingParams, tenant: str | None, version: int | None,
                request_id: str | None, on_output: Callable[[RequestOutput], None]) -> str:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(len(ids), params.max_tokens, self.max_model_len)
        request_id = request_id or uuid.uuid4().hex
        with self._cond:
            if self._stopping and self._thread is not None:
                raise RuntimeError("the engine is shutting down")
            if self._num_waiting + self._inbox_adds >= self.config.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
            if request_id in self._request_ids:
                raise ValueError(f"request id {request_id!r} is already in flight")
            if tenant is not None:
                if version is None:
                    version = self._tenant_versions.get(tenant)
                if self.scale_bank.scale_loader is None:
                    raise ValueError(f"tenant {tenant!r} requested but the engine has no scale_loader")
            seq = Sequence(request_id, ids, params, tenant, version, self.eos_token_ids, on_output,
                           next(self._arrivals))
            self._request_ids.add(request_id)
            self._inbox.append(("add", seq))
            self._inbox_adds += 1
            self._cond.notify_all()
        return request_id

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, tenant: str | None = None,
                 version: int | None = None, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit now (raising ``QueueFullError``/``PromptTooLongError`` at once) and stream the deltas.

        Must be called from a running asyncio loop. Closing the iterator early aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def on_output(out: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        rid = self._submit(prompt, params or SamplingParams(), tenant, version, request_id, on_output)
        return self._stream(queue, rid)

    async def _stream(self, queue: asyncio.Queue, request_id: str) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request: its KV blocks and scale pin are released before the next step."""
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify_all()

    def set_tenant_version(self, tenant: str, version: int | None) -> None:
        """Publish/rollback: requests submitted from now on use ``version``; those in flight keep theirs."""
        with self._cond:
            self._tenant_versions[tenant] = version
            self._inbox.append(("version", tenant, version))
            self._cond.notify_all()

    def drop_tenant(self, tenant: str) -> None:
        """Forget a tenant's resident scales (requests in flight finish on theirs)."""
        with self._cond:
            self._tenant_versions.pop(tenant, None)
            self._inbox.append(("drop", tenant))
            self._cond.notify_all()

    def stats(self) -> EngineStats:
        recent = list(self._recent)

        def mean(key: str) -> float | None:
            vals = [r[key] for r in recent if r[key] is not None]
            return sum(vals) / len(vals) if vals else None

        return EngineStats(
            running=self.scheduler.num_running,
            waiting=self._num_waiting + self._inbox_adds,
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            resident_tenants=self.scale_bank.num_resident,
            max_resident_tenants=self.scale_bank.max_slots - 1,
            scale_loads=self.scale_bank.num_loads,
            scale_evictions=self.scale_bank.num_evictions,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            num_generated_tokens=self.num_generated_tokens,
            mean_queue_s=mean("queue_s"),
            mean_ttft_s=mean("ttft_s"),
            mean_per_token_s=mean("per_token_s"),
        )

    # ------------------------------------------------------------------ synchronous convenience
    def generate_batch(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                       tenants: list[str | None] | None = None, versions: list[int | None] | None = None,
                       timeout_s: float | None = None) -> list[RequestResult]:
        """Run ``prompts`` to completion and return one ``RequestResult`` each (in order).

        Uses the step thread if started, else steps in the calling thread. All requests are submitted at
        once, so ``max_waiting`` must allow ``len(prompts)``."""
        n = len(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * n
        tlist = tenants or [None] * n
        vlist = versions or [None] * n
        if not (len(plist) == len(tlist) == len(vlist) == n):
            raise ValueError("prompts, params, tenants and versions must have the same length")
        results: list[RequestResult] = []
        done = threading.Event()
        remaining = [n]
        lock = threading.Lock()

        def make_cb(res: RequestResult) -> Callable[[RequestOutput], None]:
            def cb(out: RequestOutput) -> None:
                res.add(out)
                if out.finished:
                    with lock:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()
            return cb

        rids = []
        for i in range(n):
            res = RequestResult(f"batch-{uuid.uuid4().hex[:12]}-{i}", "", [], None, None, 0, 0)
            results.append(res)
            rids.append(self._submit(prompts[i], plist[i], tlist[i], vlist[i], res.request_id, make_cb(res)))
        if n == 0:
            return results
        if self._thread is not None:
            if not done.wait(timeout_s):
                for rid in rids:
                    self.abort(rid)
                raise TimeoutError(f"generate_batch did not finish within {timeout_s} s")
            return results
        self._stepping_inline = True
        try:
            deadline = None if timeout_s is None else time.perf_counter() + timeout_s
            with torch.inference_mode():
                while not done.is_set():
                    self._drain_inbox()
                    if not self.step():
                        if self.scale_bank.has_pending():
                            with self._cond:
                                self._cond.wait(0.005)
                        elif not done.is_set():
                            raise RuntimeError("engine idle with unfinished requests")  # invariant
                    if deadline is not None and time.perf_counter() > deadline:
                        for rid in rids:
                            self.abort(rid)
                        self._drain_inbox()
                        raise TimeoutError(f"generate_batch did not finish within {timeout_s} s")
        finally:
            self._stepping_inline = False
        return results

    # ------------------------------------------------------------------ step thread
    def _loop(self, ready: threading.Event | None = None) -> None:
        # this thread's OpenMP team size (a per-thread setting): the configured count, else the process's
        torch.set_num_threads(self.config.num_threads or self._start_threads)
        if ready is not None:
            ready.set()
        with torch.inference_mode():
            while True:
                with self._cond:
                    while (not self._inbox and not self._stopping and not self.scheduler.has_work()
                           and not self.scale_bank.has_results()):
                        self._cond.wait(0.5)
                    stopping = self._stopping
                if stopping:
                    self._drain_inbox()
                    for seq in list(self._seqs.values()):
                        self._finish(seq, "abort")
                    return
                self._drain_inbox()
                try:
                    progressed = self.step()
                except Exception:  # noqa: BLE001 - fail what is in flight, keep serving
                    log.exception("engine step failed; aborting the requests in flight")
                    for seq in list(self._seqs.values()):
                        if seq.status is SequenceStatus.RUNNING:
                            self._finish(seq, "abort", error="internal error in the engine step")
                    continue
                if not progressed:
                    with self._cond:
                        if not self._inbox and not self._stopping and not self.scale_bank.has_results():
                            self._cond.wait(0.05)  # waiting only on scale loads

    def _drain_inbox(self) -> None:
        with self._cond:
            cmds, self._inbox = self._inbox, []
            self._inbox_adds = 0
        for cmd in cmds:
            kind = cmd[0]
            if kind == "add":
                seq: Sequence = cmd[1]
                seq.detok = self._make_detok(seq)
                self._seqs[seq.request_id] = seq
                if seq.scale_key is not None:
                    self.scale_bank.undrop(seq.tenant)
                    self.scale_bank.pin(seq.scale_key)
                self.scheduler.add(seq)
            elif kind == "abort":
                seq = self._seqs.get(cmd[1])
                if seq is not None:
                    self._finish(seq, "abort")
            elif kind == "version":
                self.scale_bank.undrop(cmd[1])
                self.scale_bank.evict_unpinned(cmd[1], keep_version=cmd[2])
            elif kind == "drop":
                self.scale_bank.drop_tenant(cmd[1])
        self._fail_unloadable()
        with self._cond:
            self._num_waiting = self.scheduler.num_waiting

    def _make_detok(self, seq: Sequence):
        from .tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, seq.token_ids[-8:])

    def _is_ready(self, seq: Sequence) -> bool:
        if seq.slot is None:
            seq.slot = self.scale_bank.slot_of(seq.scale_key)
        return seq.slot is not None

    def _fail_unloadable(self) -> None:
        for seq in [s for s in self.scheduler.waiting if s.slot is None]:
            err = self.scale_bank.failure(seq.scale_key)
            if err is not None:
                self._finish(seq, "abort", error=f"could not load scales of tenant {seq.tenant!r} "
                                                  f"version {seq.version}: {err}")

    def step(self) -> bool:
        """One engine iteration. Returns False when nothing could be scheduled."""
        if self.scale_bank.poll():
            self._fail_unloadable()
        out = self.scheduler.schedule()
        with self._cond:
            self._num_waiting = self.scheduler.num_waiting
        if out.is_empty:
            return False
        now = time.perf_counter()
        for seq in out.preempted:
            log.debug("preempted %s (KV cache full)", seq.request_id)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        attn_chunks: list[tuple[list[int], int, int]] = []
        logits_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        any_tenant = False
        for c in out.chunks:
            s, n = c.seq, c.num_new_tokens
            st = s.num_computed_tokens
            if s.timings.first_scheduled is None:
                s.timings.first_scheduled = now
            if n == 1:
                ids.append(s.token_ids[st])
                pos.append(st)
                slots.append(s.slot)
            else:
                ids.extend(s.token_ids[st:st + n])
                pos.extend(range(st, st + n))
                slots.extend([s.slot] * n)
            any_tenant |= s.slot != 0
            attn_chunks.append((s.block_table, st, n))
            if st + n == s.num_tokens:
                logits_rows.append(len(ids) - 1)
                sample_seqs.append(s)
        dev = self.device
        input_ids = torch.tensor([ids], dtype=torch.int64, device=dev)  # (1, T)
        positions = torch.tensor([pos], dtype=torch.int64, device=dev)  # (1, T)
        slot_ids = None
        if any_tenant:
            with torch.inference_mode(False):  # a normal tensor: kernels cache per-step slot grouping on it
                slot_ids = torch.tensor(slots, dtype=torch.int32, device=dev)  # (T,)
        attn = PagedAttention.build(self.kv_cache, attn_chunks, logits_rows, dev)
        with forward_context(ForwardContext(slot_ids=slot_ids, attn=attn)), fp32_only(self._fp32):
            logits = self.model(input_ids, positions)[0]  # (num_sampled, V)
        self.scheduler.advance(out)
        self.num_steps += 1
        if sample_seqs:
            tokens, lps = self.sampler(logits.cpu() if logits.device.type != "cpu" else logits, sample_seqs)
            self._process_samples(sample_seqs, tokens, lps)
        return True

    def _process_samples(self, seqs: list[Sequence], tokens: list[int], lps: list[TokenLogprob | None]) -> None:
        now = time.perf_counter()
        for seq, tok, lp in zip(seqs, tokens, lps):
            seq.token_ids.append(tok)
            self.num_generated_tokens += 1
            t = seq.timings
            t.num_output_tokens += 1
            if t.first_token is None:
                t.first_token = now
            if lp is not None:
                seq.pending_logprobs.append(lp)
            p = seq.params
            finish = None
            if tok in seq.stop_token_ids:
                finish = "stop"  # the stop token's text is not part of the output
            else:
                before = len(seq.output_text)
                seq.output_text += seq.detok.add(tok)
                if p.stop:
                    hit = find_stop(seq.output_text, p.stop, before)
                    if hit is not None:
                        idx, s = hit
                        seq.output_text = seq.output_text[: idx + (len(s) if p.include_stop_str_in_output else 0)]
                        finish = "stop"
            if finish is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
                finish = "length"
            if finish is not None:
                self._finish(seq, finish)
            else:
                self._emit(seq)

    def _emit(self, seq: Sequence, error: str | None = None) -> None:
        finished = seq.status is SequenceStatus.FINISHED
        text = seq.output_text
        end = len(text) if finished or not seq.params.stop else len(text) - partial_stop_len(text, seq.params.stop)
        end = max(end, seq.sent_text_len)
        delta_text = text[seq.sent_text_len:end]
        seq.sent_text_len = end
        new_ids = seq.token_ids[seq.num_prompt_tokens + seq.sent_token_len:]
        seq.sent_token_len += len(new_ids)
        lps = None
        if seq.params.logprobs is not None:
            lps, seq.pending_logprobs = seq.pending_logprobs, []
        if not finished and not delta_text and not new_ids:
            return
        out = RequestOutput(
            request_id=seq.request_id, text=delta_text, token_ids=new_ids, logprobs=lps, finished=finished,
            finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens, timings=seq.timings.as_dict(), tenant=seq.tenant,
            version=seq.version, error=error,
        )
        try:
            seq.on_output(out)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
            log.exception("output callback of request %s failed", seq.request_id)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        self.scheduler.remove(seq)  # frees KV blocks now
        if seq.scale_key is not None:
            self.scale_bank.unpin(seq.scale_key)
        if reason == "length" and seq.detok is not None:
            seq.output_text += seq.detok.flush()  # an incomplete character at the very end, as is
        seq.finish_reason = reason
        seq.timings.finished = time.perf_counter()
        self._seqs.pop(seq.request_id, None)
        with self._cond:
            self._request_ids.discard(seq.request_id)
            self._num_waiting = self.scheduler.num_waiting
        self._recent.append(seq.timings.as_dict())
        self._emit(seq, error)
