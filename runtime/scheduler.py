"""Iteration-level continuous batching (Orca, Yu et al. 2022) with chunked prefill and preemption by recompute.

Every step the scheduler picks, under a token budget (``max_num_batched_tokens``):
1. the running sequences, oldest first: a decode takes 1 token, an unfinished prefill takes the next chunk
   (as much as the budget leaves). When the KV cache cannot hold a sequence's next tokens, the newest running
   sequence is preempted (its blocks freed, its tokens recomputed later: vLLM's recompute preemption),
   possibly the sequence itself; the engine never fails for lack of KV blocks.
2. then, if nothing was preempted, waiting sequences in FIFO order (skipping ones whose tenant scales are not
   resident yet, so a cold tenant never blocks the others) while blocks, budget and ``max_num_seqs`` allow.
Chunks come back single-token ones first (the attention backend batches those into one SDPA).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .kv_cache import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int

    @property
    def is_last(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # single-token chunks first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 is_ready: Callable[[Sequence], bool] = lambda seq: True) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.is_ready = is_ready
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or cancelled) and free its KV blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # keep FIFO order by arrival among the preempted ones at the head of the queue
        i = 0
        while i < len(self.waiting) and self.waiting[i].num_preemptions and self.waiting[i].arrival_index < seq.arrival_index:
            i += 1
        self.waiting.insert(i, seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            assert n > 0, f"running sequence with nothing to compute: {seq}"
            while not bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                assert id(victim) not in scheduled
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # preempted itself: everything after it is gone too
            bm.grow(seq, seq.num_computed_tokens + n)
            out.chunks.append(ScheduledChunk(seq, n))
            scheduled.add(id(seq))
            budget -= n
            i += 1
        if not out.preempted:
            skipped: list[Sequence] = []
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting.popleft()
                if not self.is_ready(seq):
                    skipped.append(seq)
                    continue
                n = min(seq.num_uncomputed_tokens, budget)
                if not bm.can_grow(seq, seq.num_computed_tokens + n):
                    self.waiting.appendleft(seq)
                    break
                bm.grow(seq, seq.num_computed_tokens + n)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.chunks.append(ScheduledChunk(seq, n))
                budget -= n
            self.waiting.extendleft(reversed(skipped))
        out.chunks.sort(key=lambda c: c.num_new_tokens != 1)  # stable: single-token chunks first
        return out

    def advance(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled tokens now sit in the KV cache."""
        for c in out.chunks:
            c.seq.num_computed_tokens += c.num_new_tokens
