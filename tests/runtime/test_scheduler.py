"""Scheduler: token budget, chunked prefill, FIFO admission, readiness skipping, preemption by recompute."""
from __future__ import annotations

import pytest

from scaleswap.runtime.config import SamplingParams
from scaleswap.runtime.kv_cache import BlockManager
from scaleswap.runtime.scheduler import Scheduler
from scaleswap.runtime.sequence import Sequence, SequenceStatus

_arrival = iter(range(10**9))


def _seq(n_prompt: int, rid: str) -> Sequence:
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=100), None, None, [],
                    lambda o: None, next(_arrival))


def _run(sched: Scheduler, out) -> None:
    """Pretend the forward ran and every sequence that completed its tokens sampled one."""
    for c in out.chunks:
        last = c.is_last
        c.seq.num_computed_tokens += c.num_new_tokens
        if last:
            c.seq.token_ids.append(7)


@pytest.mark.parametrize("budget", [5, 16, 33])
def test_chunked_prefill_respects_budget(budget):
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget)
    a, b = _seq(40, "a"), _seq(3, "b")
    s.add(a)
    s.add(b)
    steps = 0
    while a.num_output_tokens < 2 or b.num_output_tokens < 2:
        out = s.schedule()
        assert 0 < out.num_tokens <= budget
        ones = [c.num_new_tokens == 1 for c in out.chunks]
        assert ones == sorted(ones, reverse=True)  # single-token chunks first
        for c in out.chunks:  # KV blocks cover what will be computed
            assert len(c.seq.block_table) * 4 >= c.seq.num_computed_tokens + c.num_new_tokens
        _run(s, out)
        steps += 1
        assert steps < 100
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.RUNNING


def test_max_num_seqs_and_fifo():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [_seq(3, f"s{i}") for i in range(4)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["s0", "s1"]
    _run(s, out)
    s.remove(seqs[0])
    assert bm.num_used_blocks == 1
    out = s.schedule()
    assert {c.seq.request_id for c in out.chunks} == {"s1", "s2"}


def test_not_ready_sequences_are_skipped_not_blocking():
    ready = {"b"}
    s = Scheduler(BlockManager(64, 4), 8, 100, is_ready=lambda q: q.request_id in ready)
    a, b = _seq(3, "a"), _seq(3, "b")
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["b"]
    assert list(s.waiting) == [a]
    ready.add("a")
    _run(s, out)
    out = s.schedule()
    assert {c.seq.request_id for c in out.chunks} == {"a", "b"}


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(4, 4)  # 16 token slots
    s = Scheduler(bm, 8, 100)
    a, b = _seq(7, "a"), _seq(7, "b")  # 2 blocks each: the cache is full after prefill
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert len(out.chunks) == 2 and bm.num_free_blocks == 0
    _run(s, out)  # both now hold 8 tokens, 7 computed
    out = s.schedule()  # decode writes token 8 (position 7): fits in block 2
    assert len(out.chunks) == 2 and not out.preempted
    _run(s, out)  # 9 tokens each: the next decode needs a third block
    out = s.schedule()
    assert out.preempted == [b]  # the newest goes
    assert [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.token_ids[-2:] == [7, 7]  # its output is kept and will be recomputed
    assert s.num_preemptions == 1
    _run(s, out)
    s.remove(a)
    out = s.schedule()  # b comes back with its whole prompt + output as prefill
    assert [(c.seq, c.num_new_tokens) for c in out.chunks] == [(b, 9)]


def test_preempting_itself_when_alone_does_not_loop():
    bm = BlockManager(2, 4)
    s = Scheduler(bm, 8, 100)
    a = _seq(8, "a")
    s.add(a)
    out = s.schedule()
    _run(s, out)  # 9 tokens, cache holds 8
    out = s.schedule()
    assert out.preempted == [a] and out.is_empty
