"""One request as the engine sees it: tokens, KV blocks, sampling state, text, timings.

A ``Sequence`` is owned by the engine's step thread; the asyncio side only ever sees the
``RequestOutput`` deltas it produces. Token ids are ``prompt + output``; after a preemption by
recompute ``num_computed_tokens`` drops back to 0 and the whole list is prefilled again
(the output generated so far is kept, so greedy output is unchanged by a preemption).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the waiting queue (new, or preempted)
    RUNNING = "running"  # holds KV blocks, scheduled each step
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestTimings:
    """Wall-clock timings of one request in seconds (``time.perf_counter`` based)."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    num_output_tokens: int = 0

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def per_token_s(self) -> float | None:
        """Mean time between output tokens after the first (None until two tokens exist)."""
        if self.first_token is None or self.num_output_tokens < 2:
            return None
        end = self.finished if self.finished is not None else time.perf_counter()
        return (end - self.first_token) / (self.num_output_tokens - 1)

    def as_dict(self) -> dict[str, float | None]:
        return {"queue_s": self.queue_s, "ttft_s": self.ttft_s, "per_token_s": self.per_token_s}


@dataclass
class RequestOutput:
    """A streamed delta of one request: what is new since the previous delta."""

    request_id: str
    text: str  # new text since the last delta
    token_ids: list[int]  # new token ids since the last delta
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # one of FINISH_REASONS once finished
    num_prompt_tokens: int
    num_output_tokens: int
    timings: dict[str, float | None]
    tenant: str | None = None
    version: int | None = None
    error: str | None = None  # set when the engine failed the request (e.g. its scales could not be loaded)


class Sequence:
    """Mutable per-request state. Only the engine's step thread mutates it."""

    __slots__ = (
        "request_id", "params", "tenant", "version", "scale_key", "slot", "token_ids", "num_prompt_tokens",
        "num_computed_tokens", "block_table", "status", "generator", "stop_token_ids", "detok", "output_text",
        "sent_text_len", "sent_token_len", "pending_logprobs", "finish_reason", "timings", "on_output",
        "arrival_index", "num_preemptions", "output_counts",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tenant: str | None,
        version: int | None,
        eos_token_ids: list[int],
        on_output: Callable[[RequestOutput], None],
        arrival_index: int,
    ) -> None:
        assert len(prompt_token_ids) > 0, "empty prompt"
        self.request_id = request_id
        self.params = params
        self.tenant = tenant
        self.version = version
        self.scale_key: tuple[str, int | None] | None = None if tenant is None else (tenant, version)
        self.slot: int | None = 0 if tenant is None else None  # scale-bank slot once resident
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V sit in the cache
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        # NOTE: one generator per seeded request, so its samples do not depend on the batch.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(eos_token_ids)
        self.stop_token_ids = frozenset(stop_ids)
        self.detok = None  # incremental detokenizer, set by the engine
        self.output_text = ""  # detokenized output (after stop-string truncation once finished)
        self.sent_text_len = 0  # chars of output_text already streamed
        self.sent_token_len = 0  # output tokens already streamed
        self.pending_logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.timings = RequestTimings(arrival=time.perf_counter())
        self.on_output = on_output
        self.arrival_index = arrival_index  # FIFO order; preemption picks the newest
        self.num_preemptions = 0
        self.output_counts: dict[int, int] | None = None  # token -> count, only if penalties are used

    # -- sizes -----------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tenant={self.tenant!r}, v={self.version}, status={self.status.value}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, computed={self.num_computed_tokens})")
