"""Bit packing of quantized integers at their true width (the on-disk and in-kernel format).

Format (docs/architecture.md, "Numerics and formats"): every row of an integer matrix
``Q (N, K)`` with values in ``[0, 2**bits - 1]`` is a little-endian bit stream: element ``k``
occupies bits ``[k*bits, k*bits + bits)`` of the row, bit ``i`` of the stream is bit ``i % 8``
of byte ``i // 8``. A row takes ``ceil(K * bits / 8)`` bytes; unused high bits of the last byte
are zero. For 4-bit this is "low nibble first"; for 3-bit an element may straddle two bytes.

Both directions are vectorised torch (no Python loop over elements): 8 consecutive elements
make exactly ``bits`` bytes, so a row is cut into chunks of 8 elements, each chunk is combined
into one int64 word and split again into bytes (or the reverse).
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
    padded = torch.zeros((N, num_chunks * 8), dtype=torch.int64, device=q.device)
    padded[:, :K] = q.to(torch.int64)
    chunks = padded.view(N, num_chunks, 8)  # (N, C, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits  # (8,)
    words = (chunks << shifts).sum(dim=-1)  # (N, C), 8*bits <= 32 bits used
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8  # (bits,)
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # (N, C, bits)
    return packed.reshape(N, num_chunks * bits)[:, :row_bytes].to(torch.uint8).contiguous()


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
    padded = torch.zeros((N, num_chunks * bits), dtype=torch.int64, device=packed.device)
    padded[:, :row_bytes] = packed.to(torch.int64)
    chunks = padded.view(N, num_chunks, bits)  # (N, C, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8  # (bits,)
    words = (chunks << byte_shifts).sum(dim=-1)  # (N, C)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits  # (8,)
    q = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (N, C, 8)
    return q.reshape(N, num_chunks * 8)[:, :K].to(torch.uint8).contiguous()
