"""Triton kernel: multi-tenant low-bit linear with group-wise scales (G = ceil(K / group_size)).

Semantics: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias), S[t] of shape (N, G), group g(k) = k // group_size.

Algorithm (DESIGN §2). The tenant's scale now changes along K, so it cannot wait for the epilogue.
The K loop runs over whole groups (BLOCK_K = group_size): for group g the tile computes the partial
integer product P_g = X[:, g] · (Q[:, g] − Z[:, g])ᵀ with ``tl.dot`` (shared by every row of the tile,
whatever its tenant), gathers the (BLOCK_M, BLOCK_N) tile of per-row scales S[slot[r], n, g] and
accumulates acc += P_g ⊙ S_g in float32. A mixed batch therefore costs one extra gather per group
(BLOCK_M × BLOCK_N floats, mostly from L2: a bank slot is N·G·4 bytes) and no extra GEMM work; rows
need not be sorted by tenant. Unpacking, zero points, dtypes, masks, grouped program order and
split-K (here over groups) are as in :mod:`.triton_per_channel`. The group size must be a power of
two >= 16 (``tl.dot``'s minimum); K need not be a multiple of it (masks cover the last group).

Configs are data (BLOCK_K is fixed by the group size): ``DECODE_CONFIGS`` (M <= 64) and
``PREFILL_CONFIGS``; autotuned per (N, K, group size, M bucket); ``INTERPRET_CONFIG`` under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import grouped_tile, launch, load_q_tile, m_bucket

DECODE_MAX_ROWS = 64


def _cfg(bm, bn, split_k, warps, stages, group_m=1):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages
    )


# (BLOCK_M, BLOCK_N, SPLIT_K (over groups), num_warps, num_stages)
DECODE_CONFIGS = [
    _cfg(16, 64, 1, 4, 4), _cfg(16, 128, 1, 4, 4), _cfg(16, 32, 4, 4, 4),
    _cfg(16, 64, 4, 4, 4), _cfg(16, 64, 8, 4, 3), _cfg(16, 128, 2, 4, 4),
]
PREFILL_CONFIGS = [
    _cfg(128, 128, 1, 8, 3, 8), _cfg(64, 128, 1, 4, 4, 8), _cfg(128, 64, 1, 4, 4, 8),
    _cfg(64, 256, 1, 8, 3, 8), _cfg(128, 256, 1, 8, 3, 8),
]
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 2, "SPLIT_K": 1}


@triton.jit
def group_wise_kernel(
    # pointers
    x_ptr, qweight_ptr, zeros_ptr, bank_ptr, slot_ptr, bias_ptr, y_ptr,
    # dimensions
    M, N, K, G, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_qn, stride_zn, stride_zg, stride_bs, stride_bn, stride_bg, stride_ym, stride_yn,
    # meta-parameters
    BITS: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # (BM,)
    else:
        slot = tl.zeros((BLOCK_M,), dtype=tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    s_ptrs = bank_ptr + slot[:, None] * stride_bs + offs_n[None, :] * stride_bn  # (BM, BN), group 0

    g_per_split = tl.cdiv(G, SPLIT_K)
    g_begin = pid_k * g_per_split
    g_end = tl.minimum(G, g_begin + g_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # (BM, BN) fp32 accumulator
    for g in range(g_begin, g_end):
        offs_k = g * GROUP_SIZE + tl.arange(0, GROUP_SIZE)  # (GS,)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # (BM, GS)
        q = load_q_tile(qweight_ptr, stride_qn, offs_k, offs_n, mask_k, mask_n, BITS)  # (GS, BN)
        z = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.int32)  # (BN,)
        w = (q - z[None, :]).to(x.dtype)  # centered integers, exact in x's dtype
        if IEEE_DOT:
            part = tl.dot(x, w, input_precision="ieee")  # (BM, BN) this group's partial product
        else:
            part = tl.dot(x, w)
        s = tl.load(s_ptrs + g * stride_bg, mask=mask_mn, other=0.0)  # (BM, BN) per-row tenant scales
        acc += part * s

    out = acc
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, 1.0, 0.0) * b[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K == 1:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_mn)
    else:
        tl.atomic_add(y_ptrs, out, mask=mask_mn)


_KEY = ["N", "K", "M_BUCKET", "GROUP_SIZE"]
_decode_tuned = triton.autotune(DECODE_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])(group_wise_kernel)
_prefill_tuned = triton.autotune(PREFILL_CONFIGS, key=_KEY)(group_wise_kernel)


def group_wise_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scale_bank: torch.Tensor,
    slot_ids: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """x (M, K), qweight (N, row_bytes) uint8, zeros (N, G), scale_bank (S, N, G), slot_ids (M,) -> (M, N) x.dtype.

    ``config`` (a dict of the meta-parameters, e.g. ``INTERPRET_CONFIG``) skips autotuning.
    """
    M, K = x.shape
    N = qweight.shape[0]
    G = -(-K // group_size)
    assert zeros.shape == (N, G) and scale_bank.shape[1:] == (N, G)
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"the Triton group-wise kernel needs a power-of-two group_size >= 16, got {group_size}")
    assert slot_ids is None or slot_ids.shape == (M,)
    assert x.device == qweight.device == scale_bank.device
    head = (x, qweight, zeros, scale_bank, slot_ids if slot_ids is not None else x, bias if bias is not None else x)
    mid = (M, N, K, G, m_bucket(M), x.stride(0), x.stride(1), qweight.stride(0), zeros.stride(0), zeros.stride(1),
           scale_bank.stride(0), scale_bank.stride(1), scale_bank.stride(2))
    meta = dict(BITS=bits, HAS_SLOTS=slot_ids is not None, HAS_BIAS=bias is not None, IEEE_DOT=x.dtype == torch.float32,
                GROUP_SIZE=group_size)
    return launch((group_wise_kernel, _decode_tuned, _prefill_tuned), x, N, config, INTERPRET_CONFIG, DECODE_MAX_ROWS,
                  head, mid, meta)
