"""Helpers for kernel tests: random quantized layers in the architecture's format."""

from __future__ import annotations

import torch

from scaleswap.kernels.ops import PackedLinearWeight
from scaleswap.kernels.packing import pack_bits
from scaleswap.kernels.reference import num_groups


def make_layer(N: int, K: int, bits: int, group_size: int, num_slots: int = 6, bias: bool = False, seed: int = 0):
    """A random PackedLinearWeight and a (num_slots, N, G) scale bank with positive scales."""
    g = torch.Generator().manual_seed(seed)
    G = num_groups(K, group_size)
    q = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 1 << bits, (N, G), generator=g, dtype=torch.uint8)
    bank = torch.rand((num_slots, N, G), generator=g) * 0.04 + 0.01
    b = torch.randn((N,), generator=g) * 0.1 if bias else None
    weight = PackedLinearWeight(pack_bits(q, bits), z, bits, K, N, group_size, b)
    return weight, bank


def make_slots(M: int, num_slots: int, mixed: bool, seed: int = 1) -> torch.Tensor | None:
    """None (slot 0 everywhere), or a different slot on (almost) every row, int32."""
    if not mixed:
        return None
    return (torch.arange(M, dtype=torch.int32) * 5 + seed) % num_slots


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y − ref| / max |ref| (the error measure every tolerance in these tests is stated in)."""
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def magnitude(x: torch.Tensor, weight, scale_bank: torch.Tensor, slot_ids: torch.Tensor | None) -> torch.Tensor:
    """Σ_k |X[r, k]| · |W_slot[r][n, k]| (M, N): the scale of the rounding error of a dot product."""
    from scaleswap.kernels.reference import dequantize

    M = x.shape[0]
    slots = torch.zeros(M, dtype=torch.int64) if slot_ids is None else slot_ids.long()
    out = torch.empty((M, weight.out_features))
    for r in range(M):
        w = dequantize(weight.qweight, weight.zeros, scale_bank[slots[r]], weight.bits, weight.in_features,
                       weight.group_size)
        out[r] = w.abs() @ x[r].float().abs()
    return out


def within_bound(y, ref, x, weight, scale_bank, slot_ids, rel: float) -> bool:
    """|y − ref| <= rel · Σ_k |x||w| + 1e-6 elementwise (bf16 rounding: rel = 2^-7 covers x, w and y)."""
    bound = rel * magnitude(x, weight, scale_bank, slot_ids) + 1e-6
    return bool(((y.float() - ref.float()).abs() <= bound).all())
