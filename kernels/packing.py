"""Bit packing of quantized integers at their true width (the on-disk and in-kernel format).

Format (docs/architecture.md, "Numerics and formats"): every row of an integer matrix
``Q (N, K)`` with values in ``[0, 2**bits - 1]`` is a little-endian bit stream: element ``k``
occupies bits ``[k*bits, k*bits + bits)`` of the row, bit ``i`` of the stream is bit ``i % 8``
of byte ``i // 8``. A row takes ``ceil(K * bits / 8)`` bytes; unused high bits of the last byte
are zero. For 4-bit this is "low nibble first"; for 3-bit an element may straddle two bytes.

Both directions are vectorised torch (no Python loop over elements): 8 consecutive elements
make exactly ``bits`` bytes, so a row is cut into chunks of 8 elements, each chunk is combined
into one int32 word (8·bits <= 24 bits used) and split again into bytes (or the reverse): 8 + bits
whole-tensor ops per direction.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packed_row_bytes(K: int, bits: int) -> int:
    """Number of bytes one packed row of ``K`` elements of ``bits`` bits takes: ceil(K*bits/8)."""
    _check_bits(bits)
    if K < 0:
        raise ValueError(f"K must be >= 0, got {K}")
    return (K * bits + 7) // 8


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``q`` (N, K) in [0, 2**bits) into ``uint8 (N, ceil(K*bits/8))``.

    Accepts any integer dtype; raises ValueError for values out of range.
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D (N, K), got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool or q.is_complex():
        raise ValueError(f"q must have an integer dtype, got {q.dtype}")
    N, K = q.shape
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"values of q must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    row_bytes = packed_row_bytes(K, bits)
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    num_chunks = (K + 7) // 8
    padded = torch.zeros((N, num_chunks * 8), dtype=torch.int32, device=q.device)
    padded[:, :K] = q
    chunks = padded.view(N, num_chunks, 8)  # (N, C, 8)
    words = chunks[:, :, 0].clone()  # (N, C): 8 elements = 8*bits <= 32 bits
    for j in range(1, 8):  # loop over the 8 positions of a chunk, not over elements
        words |= chunks[:, :, j] << (j * bits)
    packed = torch.empty((N, num_chunks, bits), dtype=torch.uint8, device=q.device)
    for i in range(bits):
        packed[:, :, i] = (words >> (8 * i)) & 0xFF
    return packed.view(N, num_chunks * bits)[:, :row_bytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 (N, ceil(K*bits/8))`` -> ``uint8 (N, K)``."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    N, row_bytes = packed.shape
    if row_bytes != packed_row_bytes(K, bits):
        raise ValueError(
            f"packed has {row_bytes} bytes per row; K={K} at bits={bits} needs {packed_row_bytes(K, bits)}"
        )
    if bits == 8:
        return packed.contiguous()
    num_chunks = (K + 7) // 8
    padded = torch.zeros((N, num_chunks * bits), dtype=torch.int32, device=packed.device)
    padded[:, :row_bytes] = packed
    chunks = padded.view(N, num_chunks, bits)  # (N, C, bits)
    words = chunks[:, :, 0].clone()  # (N, C)
    for i in range(1, bits):
        words |= chunks[:, :, i] << (8 * i)
    q = torch.empty((N, num_chunks, 8), dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(8):  # loop over the 8 positions of a chunk, not over elements
        q[:, :, j] = (words >> (j * bits)) & mask
    return q.view(N, num_chunks * 8)[:, :K].contiguous()
