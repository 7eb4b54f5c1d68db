"""Pure-torch reference of the multi-tenant low-bit linear (dequantize, then matmul).

Semantics: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias), with

    W_t[n, k] = S[t, n, g(k)] * (Q[n, k] - Z[n, g(k)]),   g(k) = k // group_size (group_size = -1: g(k) = 0)

``Q`` packed per :mod:`scaleswap.kernels.packing`, ``Z`` uint8 (N, G), ``S`` float32 (num_slots, N, G).
G = ceil(K / group_size): K need not be a multiple of the group size (the last group is then
partial). Every kernel and the CPU fast path are tested against these functions; they are written
for clarity, not speed, and are differentiable (autograd) w.r.t. ``x`` and the scales.
"""

from __future__ import annotations

import torch

from .packing import unpack_bits


def num_groups(K: int, group_size: int) -> int:
    """G for a row of K elements: 1 per channel (group_size = -1), else ceil(K / group_size)."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 (per channel) or a positive integer, got {group_size}")
    return (K + group_size - 1) // group_size


def expand_groups(t: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """Repeat a per-group tensor (..., G) along K: (..., G) -> (..., K), element k takes group k // group_size."""
    if group_size == -1:
        return t.expand(*t.shape[:-1], K)
    return t.repeat_interleave(group_size, dim=-1)[..., :K]


def centered_weight(qweight: torch.Tensor, zeros: torch.Tensor, bits: int, K: int, group_size: int) -> torch.Tensor:
    """Q − Z as float32 (N, K): the integer part shared by every tenant."""
    q = unpack_bits(qweight, bits, K).to(torch.float32)  # (N, K)
    z = expand_groups(zeros.to(torch.float32), K, group_size)  # (N, K)
    return q - z


def dequantize(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    K: int,
    group_size: int,
) -> torch.Tensor:
    """W = S ⊙ (Q − Z) as float32 (N, K). ``scales`` float (N, G); differentiable w.r.t. ``scales``."""
    G = num_groups(K, group_size)
    N = qweight.shape[0]
    if zeros.shape != (N, G) or scales.shape != (N, G):
        raise ValueError(
            f"zeros and scales must be (N, G) = ({N}, {G}); got {tuple(zeros.shape)} and {tuple(scales.shape)}"
        )
    s = expand_groups(scales.to(torch.float32), K, group_size)  # (N, K)
    return s * centered_weight(qweight, zeros, bits, K, group_size)


def multi_tenant_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scale_bank: torch.Tensor,
    slot_ids: torch.Tensor | None,
    bits: int,
    K: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference multi-tenant linear: x (M, K), scale_bank (S, N, G), slot_ids (M,) -> float32 (M, N).

    Row r uses the weight of slot ``slot_ids[r]`` (slot 0 for every row when ``slot_ids`` is None).
    Computes in float32 whatever the dtype of ``x``; loops over the distinct slots of the batch.
    """
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be (M, K={K}), got {tuple(x.shape)}")
    M = x.shape[0]
    N = qweight.shape[0]
    if slot_ids is None:
        slot_ids = torch.zeros(M, dtype=torch.int64, device=x.device)
    if slot_ids.shape != (M,):
        raise ValueError(f"slot_ids must be (M,) = ({M},), got {tuple(slot_ids.shape)}")
    x32 = x.to(torch.float32)
    out = x32.new_zeros((M, N))
    for slot in torch.unique(slot_ids).tolist():
        rows = (slot_ids == slot).nonzero().squeeze(1)  # (R,)
        w = dequantize(qweight, zeros, scale_bank[slot], bits, K, group_size)  # (N, K)
        out = out.index_copy(0, rows, x32[rows] @ w.t())
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out
