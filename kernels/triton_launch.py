"""Triton backend of :func:`.ops.multi_tenant_linear`: picks the per-channel or the group-wise kernel.

Semantics: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias). One kernel launch per call for the whole
mixed batch (no loop over tenants). Imported only when the Triton backend is used.
"""

from __future__ import annotations

import torch

from .triton_group_wise import group_wise_linear
from .triton_per_channel import per_channel_linear


def triton_forward(x: torch.Tensor, weight, scale_bank: torch.Tensor, slot_ids: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 -> (M, N) in x.dtype, on x's device (weight and bank must be there too)."""
    if weight.qweight.device != x.device or scale_bank.device != x.device:
        raise ValueError(
            f"x ({x.device}), the weight ({weight.qweight.device}) and the scale bank ({scale_bank.device}) "
            "must be on the same device; move the weight with weight.to(device)"
        )
    if scale_bank.dtype != torch.float32:
        scale_bank = scale_bank.float()
    if weight.group_size == -1:
        return per_channel_linear(x, weight.qweight, weight.zeros, scale_bank, slot_ids, weight.bias, weight.bits)
    return group_wise_linear(
        x, weight.qweight, weight.zeros, scale_bank, slot_ids, weight.bias, weight.bits, weight.group_size
    )
