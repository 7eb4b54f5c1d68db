"""Perplexity of a causal LM over a token stream, in non-overlapping windows.

The text is cut into windows of ``context`` tokens; every token of a window but the first is scored given
the tokens before it in the same window (the usual "non-overlapping chunks" protocol, as in GPTQ's and
llama.cpp's ``perplexity`` tools). The last, shorter window is scored too. Windows run in batches.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .forward_context import ForwardContext, forward_context


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    token_ids: list[int],
    context: int = 512,
    batch_size: int = 4,
    scale_override: dict[str, torch.Tensor] | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """-> {"perplexity", "nll" (mean, nats), "tokens" (scored)}; ``scale_override``: name -> (1, N, G)."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    if len(token_ids) < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {len(token_ids)}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    windows = [ids[i : i + context] for i in range(0, len(ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    total_nll, total_tokens = 0.0, 0
    ctx = ForwardContext(scale_override=scale_override)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with forward_context(ctx):
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not show_progress, file=sys.stderr):
            # equal-length windows batch together; the short last window goes alone
            groups: dict[int, list[torch.Tensor]] = {}
            for w in batch:
                groups.setdefault(len(w), []).append(w)
            for seqs in groups.values():
                x = torch.stack(seqs)  # (B, T)
                logits = model(x)  # (B, T, V)
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
                total_nll += float(nll)
                total_tokens += x[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}
