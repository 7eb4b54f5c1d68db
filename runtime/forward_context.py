"""Per-step forward context: what every layer of one forward pass needs to know.

Built once per step by the caller (engine, trainer, perplexity) and read by the
layers, so that layers never look tenants up themselves (vLLM's forward context,
nano-vllm's ``Context``). Stored in a ``ContextVar``, so a fine-tuning thread and
the serving thread never see each other's context.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class ForwardContext:
    # (T,) int32: scale-bank slot of every flattened token; None means slot 0 (base scales) everywhere.
    slot_ids: torch.Tensor | None = None
    # Attention backend for the engine's paged KV cache; None means plain causal attention over (B, T).
    attn: Any | None = None
    # name -> (S', N, G) scale bank used instead of the layer's shared bank (training a tenant's scales).
    scale_override: dict[str, torch.Tensor] | None = None


_CTX: ContextVar[ForwardContext | None] = ContextVar("scaleswap_forward_context", default=None)


def get_forward_context() -> ForwardContext | None:
    return _CTX.get()


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)
