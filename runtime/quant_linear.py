"""QuantLinear: the module swap that turns a float ``nn.Linear`` into a PEQA linear.

    y[r] = x[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias)

``Q`` (packed at true width) and ``Z`` are frozen and shared by all tenants; ``bank`` (num_slots, N, G) holds
the scale sets resident in memory (slot 0 = the base scales). Which slot each token row uses comes from the
per-step :class:`ForwardContext` (``slot_ids``); the trainer passes its own trainable scales through
``ForwardContext.scale_override`` and never touches the served bank.
"""
from __future__ import annotations

import torch
from torch import nn

from scaleswap.kernels.ops import PackedLinearWeight, multi_tenant_linear

from .forward_context import get_forward_context


class QuantLinear(nn.Module):
    def __init__(self, name: str, weight: PackedLinearWeight, base_scales: torch.Tensor):
        super().__init__()
        self.name = name
        self.weight = weight  # frozen packed integers, zero points, optional bias
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        assert base_scales.shape == (weight.out_features, weight.num_groups), (base_scales.shape, weight.num_groups)
        # (num_slots, N, G); the engine's scale bank may replace it with a larger one (same slot 0).
        self.bank = base_scales.detach().to(torch.float32).unsqueeze(0).contiguous()

    @property
    def base_scales(self) -> torch.Tensor:
        return self.bank[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        bank, slot_ids = self.bank, None
        if ctx is not None:
            slot_ids = ctx.slot_ids
            if ctx.scale_override is not None:
                bank = ctx.scale_override.get(self.name, bank)
        lead = x.shape[:-1]
        y = multi_tenant_linear(x.reshape(-1, self.in_features), self.weight, bank, slot_ids)  # (T, N)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        w = self.weight
        return f"{self.name}: in={w.in_features}, out={w.out_features}, bits={w.bits}, group_size={w.group_size}"
