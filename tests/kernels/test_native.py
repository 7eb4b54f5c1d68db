"""The native CPU kernel (kernels/native/mt_q4_gemm.c) against the pure-torch reference.

Tolerance: both sides are float32; only the summation order differs, so |Y − Y_ref| <= 1e-5 · max|Y_ref| + 1e-6.
"""
from __future__ import annotations

import pytest
import torch

from scaleswap.kernels import native
from scaleswap.kernels.packing import pack_bits
from scaleswap.kernels.reference import multi_tenant_linear_ref

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler / native kernel not built")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("M,num_slots", [(1, 1), (5, 3), (64, 64), (70, 9)])
@pytest.mark.parametrize("N", [1, 37])
def test_matches_reference(bits, group_size, M, num_slots, N):
    K = 256
    torch.manual_seed(bits * 1000 + M * 10 + N + group_size)
    G = 1 if group_size == -1 else K // group_size
    q = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8)
    z = torch.randint(0, 1 << bits, (N, G), dtype=torch.uint8)
    bank = torch.rand(num_slots, N, G) * 0.02 + 1e-3
    x = torch.randn(M, K)
    slots = torch.randint(0, num_slots, (M,), dtype=torch.int32)
    bias = torch.randn(N)
    y = native.mt_q4_gemm(x, native.block32_nibbles(q), z, bank, slots, bias)
    ref = multi_tenant_linear_ref(x, pack_bits(q, bits), z, bank, slots, bits, K, group_size, bias)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6


def test_every_row_uses_only_its_own_slot():
    """Changing slot 1's scales changes exactly the rows that use slot 1."""
    torch.manual_seed(0)
    N, K, G = 16, 64, 2
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    z = torch.randint(0, 16, (N, G), dtype=torch.uint8)
    bank = torch.rand(3, N, G) + 0.1
    x = torch.randn(6, K)
    slots = torch.tensor([0, 1, 2, 1, 0, 2], dtype=torch.int32)
    qb = native.block32_nibbles(q)
    a = native.mt_q4_gemm(x, qb, z, bank, slots)
    bank2 = bank.clone()
    bank2[1] *= 1.5
    b = native.mt_q4_gemm(x, qb, z, bank2, slots)
    changed = (a - b).abs().amax(dim=1) > 0
    assert changed.tolist() == (slots == 1).tolist()


def test_supports():
    assert native.supports(4, 576, 64) and native.supports(3, 1536, -1)
    assert not native.supports(8, 576, 64) and not native.supports(4, 100, -1) and not native.supports(4, 576, 48)
    assert not native.supports(4, 96, 64)  # a partial last group
