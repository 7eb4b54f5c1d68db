"""Pieces shared by the Triton kernels: reading packed Q tiles, config selection, interpret mode.

The packed format (:mod:`.packing`) is a little-endian bit stream per row, so element k of row n
starts at bit k·BITS of the row: byte (k·BITS) >> 3, bit offset (k·BITS) & 7. For 2, 4 and 8 bits an
element never leaves its byte (one byte load); a 3-bit element at bit offset 6 or 7 straddles two
bytes, so the kernel loads the next byte too (masked to where it is needed) and shifts the pair.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def m_bucket(M: int) -> int:
    """Autotune key for the number of rows: the next power of two (so M = 1..64 tunes 7 times, not 64)."""
    return 1 << max(0, (M - 1).bit_length())


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile col) in grouped order: GROUP_M tile rows sweep the columns together,
    so the weight tiles they share stay in L2 (Triton's matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_rows)
    pid_n = (pid % num_pid_in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def load_q_tile(qweight_ptr, stride_qn, offs_k, offs_n, mask_k, mask_n, BITS: tl.constexpr):
    """Q[offs_n, offs_k] as an int32 (BLOCK_K, BLOCK_N) tile, 0 where masked (transposed for tl.dot)."""
    bit = offs_k[:, None] * BITS  # (BK, 1) bit offset inside the row
    ptrs = qweight_ptr + offs_n[None, :] * stride_qn + (bit >> 3)  # (BK, BN)
    mask = mask_k[:, None] & mask_n[None, :]
    shift = bit & 7
    word = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    if BITS == 3:
        # bits [shift, shift + 3) reach into the next byte when shift > 5
        nxt = tl.load(ptrs + 1, mask=mask & (shift > 5), other=0).to(tl.int32)
        word = word | (nxt << 8)
    return (word >> shift) & ((1 << BITS) - 1)


def launch(kernels: tuple, x: torch.Tensor, N: int, config: dict | None, interpret_config: dict,
           decode_max_rows: int, head: tuple, mid: tuple, meta: dict) -> torch.Tensor:
    """The launch both multi-tenant kernels share: a fixed ``config`` (``interpret_config`` under the
    interpreter) or the decode / prefill autotuned variant by M; Y is a zeroed float32 buffer when split-K
    tiles add into it atomically; grid (tiles, SPLIT_K). ``kernels`` = (kernel, decode-tuned, prefill-tuned);
    the kernel's arguments are ``(*head, y, *mid, y.stride(0), y.stride(1))``. Returns Y in x.dtype.
    """
    kernel, decode_tuned, prefill_tuned = kernels
    M = x.shape[0]
    if config is None and is_interpreting():
        config = interpret_config
    decode = M <= decode_max_rows
    split = (config or {}).get("SPLIT_K", 1) > 1 or (config is None and decode)
    y = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split else torch.empty(
        (M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.to(x.dtype)
    args = (*head, y, *mid, y.stride(0), y.stride(1))

    def grid(p):
        return (triton.cdiv(M, p["BLOCK_M"]) * triton.cdiv(N, p["BLOCK_N"]), p["SPLIT_K"])

    if config is not None:
        kernel[grid](*args, **meta, **config)
    elif decode:
        decode_tuned[grid](*args, **meta)
    else:
        prefill_tuned[grid](*args, **meta)
    return y if y.dtype == x.dtype else y.to(x.dtype)
