"""Sampler: greedy, truncation (top-k/top-p/min-p) against direct definitions, seeds, penalties, logprobs,
and the stop-string helpers."""
from __future__ import annotations

import math

import pytest
import torch

from scaleswap.runtime.config import SamplingParams
from scaleswap.runtime.sampler import Sampler, find_stop, partial_stop_len
from scaleswap.runtime.sequence import Sequence


def _seq(params: SamplingParams, tokens=(1, 2, 3), out=()) -> Sequence:
    s = Sequence("r", list(tokens), params, None, None, [], lambda o: None, 0)
    s.token_ids.extend(out)
    return s


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 37)
    toks, lps = Sampler()(logits, [_seq(SamplingParams(temperature=0.0)) for _ in range(5)])
    assert toks == logits.argmax(-1).tolist() and lps == [None] * 5


@pytest.mark.parametrize("top_k,top_p,min_p", [(3, 1.0, 0.0), (-1, 0.6, 0.0), (-1, 1.0, 0.3), (5, 0.8, 0.05)])
def test_truncation_support(top_k, top_p, min_p):
    """Samples only ever come from the allowed set, computed here directly from the definitions."""
    torch.manual_seed(1)
    V = 20
    row = torch.randn(V) * 2
    probs = torch.softmax(row / 0.7, -1)
    order = probs.argsort(descending=True).tolist()
    allowed = set(order[: top_k if top_k > 0 else V])
    kept, mass = [], 0.0
    p_k = torch.zeros(V)
    p_k[list(allowed)] = probs[list(allowed)]
    p_k /= p_k.sum()
    for t in order:
        if t in allowed and mass < top_p:
            kept.append(t)
            mass += p_k[t].item()
    allowed = set(kept)
    p_t = torch.zeros(V)
    p_t[kept] = probs[kept]
    p_t /= p_t.sum()
    allowed = {t for t in allowed if p_t[t] >= min_p * p_t.max()}
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p)
    sampler = Sampler(seed=3)
    seen = set()
    for _ in range(30):
        toks, _ = sampler(row.repeat(4, 1), [_seq(params) for _ in range(4)])
        seen.update(toks)
    assert seen <= allowed and len(seen) >= 1


def test_seed_reproducible_and_batch_independent():
    torch.manual_seed(2)
    logits = torch.randn(6, 100)
    p = SamplingParams(temperature=1.0, seed=1234)
    a, b = _seq(p), _seq(p)  # two requests with the same seed
    others = [_seq(SamplingParams(temperature=1.0)) for _ in range(5)]
    alone_tokens, batch_tokens = [], []
    for _ in range(8):
        alone_tokens.append(Sampler(seed=0)(logits[2:3], [a])[0][0])
        toks, _ = Sampler(seed=5)(logits[[0, 2, 1, 3, 4, 5]], [others[0], b, *others[1:]])
        batch_tokens.append(toks[1])
    assert alone_tokens == batch_tokens  # same seed, same logits: same draws, whatever the batch and engine seed
    assert len(set(alone_tokens)) > 1  # and it really samples


def test_penalties_match_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0, 1.5, -0.5, 0.2]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                       logprobs=2)
    seq = _seq(p, tokens=(0, 1), out=(3, 3, 6))
    _, lps = Sampler()(logits, [seq])
    exp = logits[0].clone()
    for t in {0, 1, 3, 6}:  # repetition: prompt + output
        exp[t] = exp[t] / 2.0 if exp[t] > 0 else exp[t] * 2.0
    exp[3] -= 0.5 * 2 + 0.25
    exp[6] -= 0.5 * 1 + 0.25
    ref = torch.log_softmax(exp, -1)
    tok = int(ref.argmax())
    assert lps[0].token_id == tok
    assert math.isclose(lps[0].logprob, ref[tok].item(), rel_tol=1e-5)
    top = ref.topk(2)
    assert [t for t, _ in lps[0].top] == top.indices.tolist()
    assert logits[0, 3].item() == 3.0  # the caller's logits are not modified


def test_logprobs_zero_alternatives_and_mixed_rows():
    logits = torch.randn(3, 12)
    params = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=3)]
    toks, lps = Sampler()(logits, [_seq(p) for p in params])
    assert lps[0].top == [] and lps[1] is None and len(lps[2].top) == 3
    assert math.isclose(lps[2].logprob, torch.log_softmax(logits[2], -1)[toks[2]].item(), rel_tol=1e-5)


@pytest.mark.parametrize("text,stops,start,expected", [
    ("hello world", ["wor"], 0, (6, "wor")),
    ("hello world", ["xyz"], 0, None),
    ("abcSTOPdefEND", ["END", "STOP"], 0, (3, "STOP")),
    ("abcSTOP", ["STOP"], 6, (3, "STOP")),  # found although it started before the new text
    ("", ["a"], 0, None),
])
def test_find_stop(text, stops, start, expected):
    assert find_stop(text, stops, start) == expected


@pytest.mark.parametrize("text,stops,expected", [
    ("hello wo", ["world"], 2),
    ("hello w", ["world", "x"], 1),
    ("hello", ["world"], 0),
    ("a##", ["###"], 2),
    ("STOP", ["STOP"], 0),  # a whole match is not a partial one
])
def test_partial_stop_len(text, stops, expected):
    assert partial_stop_len(text, stops) == expected
