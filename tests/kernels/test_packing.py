"""Packing round trips and the bit-level layout (docs/architecture.md: little-endian bit stream per row)."""

import pytest
import torch

from scaleswap.kernels.packing import pack_bits, packed_row_bytes, unpack_bits
from scaleswap.kernels.reference import dequantize, multi_tenant_linear_ref, num_groups


def _naive_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit packer written independently of the vectorised one."""
    N, K = q.shape
    out = torch.zeros((N, packed_row_bytes(K, bits)), dtype=torch.uint8)
    for n in range(N):
        for k in range(K):
            v = int(q[n, k])
            for b in range(bits):
                if (v >> b) & 1:
                    pos = k * bits + b
                    out[n, pos // 8] |= 1 << (pos % 8)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [1, 7, 8, 13, 67, 200])
def test_round_trip(bits, K):
    g = torch.Generator().manual_seed(K * 10 + bits)
    q = torch.randint(0, 1 << bits, (5, K), generator=g, dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, (K * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, K), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("K", [3, 11, 19])
def test_layout_matches_bitwise_definition(bits, K):
    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 1 << bits, (3, K), generator=g, dtype=torch.int32)
    assert torch.equal(pack_bits(q, bits), _naive_pack(q, bits))


def test_four_bit_is_low_nibble_first():
    q = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack_bits(q, 4).tolist() == [[0x21, 0x03]]


def test_three_bit_straddles_bytes():
    # elements 0..2 at bits 0-2, 3-5, 6-8: element 2 = 0b111 spans byte 0 bits 6-7 and byte 1 bit 0
    q = torch.tensor([[0, 0, 7]], dtype=torch.uint8)
    assert pack_bits(q, 3).tolist() == [[0xC0, 0x01]]


def test_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.zeros((1, 4), dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="values of q"):
        pack_bits(torch.full((1, 4), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_bits(torch.zeros((1, 3), dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("group_size", [-1, 4, 5])
def test_reference_dequantize_and_linear(group_size):
    g = torch.Generator().manual_seed(3)
    N, K, bits = 6, 13, 3
    G = num_groups(K, group_size)
    q = torch.randint(0, 8, (N, K), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 8, (N, G), generator=g, dtype=torch.uint8)
    bank = torch.rand((3, N, G), generator=g) + 0.5
    w = dequantize(pack_bits(q, bits), z, bank[1], bits, K, group_size)
    for n in range(N):
        for k in range(K):
            gi = 0 if group_size == -1 else k // group_size
            assert w[n, k] == pytest.approx(float(bank[1, n, gi]) * (int(q[n, k]) - int(z[n, gi])))
    x = torch.randn((4, K), generator=g)
    slots = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    y = multi_tenant_linear_ref(x, pack_bits(q, bits), z, bank, slots, bits, K, group_size)
    for r in range(4):
        wr = dequantize(pack_bits(q, bits), z, bank[int(slots[r])], bits, K, group_size)
        torch.testing.assert_close(y[r], wr @ x[r], rtol=1e-5, atol=1e-5)
