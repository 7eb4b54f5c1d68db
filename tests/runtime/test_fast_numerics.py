"""The CPU fast path against float32 at the level of the whole model (SmolLM2-135M, 4-bit g64).

The per-op bounds are in tests/kernels/test_cpu_path.py; here is what they add up to through 30 layers:
the bf16 int4pack branch (forced for every row count) and the int8 decode LM head, each against
the float32 branch (``fp32_only``) and head. Stated tolerances (measured on AVX-512-BF16 and AVX2 CPUs):
logits max |Δ| 0.78 (kernels), 0.68 (head), 1.09 (both) -> asserted < 1.0, 1.0, 1.5; held-out perplexity
within 0.2 % -> asserted within 1 %.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaleswap.kernels import cpu_path
from scaleswap.kernels.cpu_path import fp32_only
from scaleswap.runtime.forward_context import ForwardContext, forward_context
from scaleswap.runtime.model import DecodeLMHead

PROMPTS = ["The capital of France is", "def add(a, b):", "The quick brown fox", "Roses are red,"]


def _hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode(), forward_context(ForwardContext(slot_ids=torch.zeros(len(ids), dtype=torch.int32))):
        return model.hidden_states(torch.tensor([ids]))[0]


@pytest.fixture(scope="module")
def sequences(quantized_model):
    """Each prompt extended by 12 greedy float32 tokens."""
    model, w = quantized_model.model, quantized_model.model.lm_head.weight
    out = []
    with fp32_only():
        for p in PROMPTS:
            ids = quantized_model.tokenizer.encode(p)
            for _ in range(12):
                ids.append(int((_hidden(model, ids)[-1] @ w.T).argmax()))
            out.append(ids)
    return out


def test_fast_kernels_and_int8_head_logits_within_tolerance(quantized_model, sequences, monkeypatch):
    model, w = quantized_model.model, quantized_model.model.lm_head.weight
    head = DecodeLMHead(w, "int8")

    def int8_head(h):
        return torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), head.w_low, head.scales).float()

    worst = {"kernels": 0.0, "head": 0.0, "both": 0.0}
    for ids in sequences:
        with fp32_only():
            h_ref = _hidden(model, ids)
        monkeypatch.setattr(cpu_path, "force_plan", "int4pack")
        h_fast = _hidden(model, ids)
        monkeypatch.setattr(cpu_path, "force_plan", None)
        ref = h_ref @ w.T
        worst["kernels"] = max(worst["kernels"], (h_fast @ w.T - ref).abs().max().item())
        worst["head"] = max(worst["head"], (int8_head(h_ref) - ref).abs().max().item())
        worst["both"] = max(worst["both"], (int8_head(h_fast) - ref).abs().max().item())
        assert ref.abs().max() > 10  # logits of a real model, not zeros
    assert worst["kernels"] < 1.0 and worst["head"] < 1.0 and worst["both"] < 1.5, worst
    assert worst["kernels"] > 1e-3  # the fast branch really ran (it rounds to bf16)


def test_fast_kernels_perplexity_within_one_percent(quantized_model, monkeypatch):
    from pydoc_data.topics import topics

    tok, model = quantized_model.tokenizer, quantized_model.model
    ids = tok.encode("\n".join(list(topics.values())[::5][:8]))[:513]
    assert len(ids) == 513

    def ppl() -> float:
        nll = 0.0
        with torch.inference_mode(), forward_context(ForwardContext(slot_ids=torch.zeros(64, dtype=torch.int32))):
            for s in range(0, 512, 64):
                logits = model(torch.tensor([ids[s:s + 64]]))[0].float()
                nll += F.cross_entropy(logits, torch.tensor(ids[s + 1:s + 65]), reduction="sum").item()
        return math.exp(nll / 512)

    with fp32_only():
        ref = ppl()
    monkeypatch.setattr(cpu_path, "force_plan", "int4pack")
    fast = ppl()
    assert abs(fast / ref - 1) < 0.01, (fast, ref)
