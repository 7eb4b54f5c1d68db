"""Triton kernel: multi-tenant low-bit linear with per-channel scales (G = 1).

Semantics: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias), S[t] of shape (N, 1).

Algorithm (DESIGN §2). With one scale per output channel the tenant factors out of the K sum,

    Y[r, n] = S[slot[r], n] · Σ_k X[r, k] · (Q[n, k] − Z[n])

so every tile runs ONE shared integer GEMM for all the rows of the batch, whatever tenant each row
belongs to, and only the epilogue differs per row: it gathers S[slot[r], n] for its (BLOCK_M, BLOCK_N)
tile and multiplies. A batch with a different tenant on every row costs one gather of M×N floats more
than a single-tenant batch. The K loop unpacks BLOCK_K × BLOCK_N packed integers (1 byte load per
element, 2 for 3-bit, see :mod:`.triton_common`), subtracts the zero point, converts to X's dtype
(integers up to 255 are exact in fp16/bf16) and calls ``tl.dot`` with a float32 accumulator; fp32 X
uses IEEE fp32 dots (no TF32). Program order is grouped (GROUP_M) for L2 reuse, as in Triton's matmul
tutorial. Decode shapes (M <= 64) may split K over SPLIT_K programs that atomically add their
(already scaled: the epilogue is linear) partial tiles into a zeroed float32 output.

Configs are data: ``DECODE_CONFIGS`` (M <= 64: BLOCK_M = 16, wide K tiles, split-K for the small-N
layers that would otherwise leave most of a Hopper GPU's 132 SMs idle) and ``PREFILL_CONFIGS``
(M >= 512-class: 64–128 × 64–256 tiles, 3–4 pipeline stages). Autotuned per (N, K, M bucket).
Under ``TRITON_INTERPRET=1`` no autotuning: ``INTERPRET_CONFIG`` (or the ``config`` argument) runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import grouped_tile, launch, load_q_tile, m_bucket

DECODE_MAX_ROWS = 64


def _cfg(bm, bn, bk, split_k, warps, stages, group_m=1):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SPLIT_K": split_k},
        num_warps=warps, num_stages=stages,
    )


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
DECODE_CONFIGS = [
    _cfg(16, 64, 128, 1, 4, 4), _cfg(16, 128, 128, 1, 4, 4), _cfg(16, 64, 256, 1, 4, 3),
    _cfg(16, 32, 128, 4, 4, 4), _cfg(16, 64, 128, 4, 4, 4), _cfg(16, 64, 64, 8, 4, 4),
    _cfg(16, 128, 64, 2, 4, 4), _cfg(16, 32, 256, 8, 4, 3),
]
PREFILL_CONFIGS = [
    _cfg(128, 128, 64, 1, 8, 3, 8), _cfg(128, 256, 64, 1, 8, 3, 8), _cfg(64, 128, 64, 1, 4, 4, 8),
    _cfg(128, 64, 64, 1, 4, 4, 8), _cfg(64, 256, 32, 1, 4, 4, 8), _cfg(128, 128, 32, 1, 4, 4, 8),
]
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SPLIT_K": 1}


@triton.jit
def per_channel_kernel(
    # pointers
    x_ptr, qweight_ptr, zeros_ptr, bank_ptr, slot_ptr, bias_ptr, y_ptr,
    # dimensions
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_qn, stride_zn, stride_bs, stride_bn, stride_ym, stride_yn,
    # meta-parameters
    BITS: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    z = tl.load(zeros_ptr + offs_n * stride_zn, mask=mask_n, other=0).to(tl.int32)  # (BN,)

    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # (BM, BN) fp32 accumulator
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mask_k = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # (BM, BK)
        q = load_q_tile(qweight_ptr, stride_qn, offs_k, offs_n, mask_k, mask_n, BITS)  # (BK, BN)
        w = (q - z[None, :]).to(x.dtype)  # centered integers, exact in x's dtype
        if IEEE_DOT:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)

    # epilogue: each row's own tenant scales
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # (BM,)
    else:
        slot = tl.zeros((BLOCK_M,), dtype=tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    s = tl.load(bank_ptr + slot[:, None] * stride_bs + offs_n[None, :] * stride_bn, mask=mask_mn, other=0.0)
    out = acc * s  # (BM, BN)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, 1.0, 0.0) * b[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K == 1:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_mn)
    else:
        tl.atomic_add(y_ptrs, out, mask=mask_mn)


_decode_tuned = triton.autotune(DECODE_CONFIGS, key=["N", "K", "M_BUCKET"], reset_to_zero=["y_ptr"])(per_channel_kernel)
_prefill_tuned = triton.autotune(PREFILL_CONFIGS, key=["N", "K", "M_BUCKET"])(per_channel_kernel)


def per_channel_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scale_bank: torch.Tensor,
    slot_ids: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    config: dict | None = None,
) -> torch.Tensor:
    """x (M, K), qweight (N, row_bytes) uint8, zeros (N, 1), scale_bank (S, N, 1), slot_ids (M,) -> (M, N) x.dtype.

    ``config`` (a dict of the meta-parameters, e.g. ``INTERPRET_CONFIG``) skips autotuning.
    """
    M, K = x.shape
    N = qweight.shape[0]
    assert zeros.shape == (N, 1) and scale_bank.shape[1:] == (N, 1), "per-channel needs G = 1"
    assert slot_ids is None or slot_ids.shape == (M,)
    assert x.device == qweight.device == scale_bank.device
    head = (x, qweight, zeros, scale_bank, slot_ids if slot_ids is not None else x, bias if bias is not None else x)
    mid = (M, N, K, m_bucket(M), x.stride(0), x.stride(1), qweight.stride(0), zeros.stride(0), scale_bank.stride(0),
           scale_bank.stride(1))
    meta = dict(BITS=bits, HAS_SLOTS=slot_ids is not None, HAS_BIAS=bias is not None, IEEE_DOT=x.dtype == torch.float32)
    return launch((per_channel_kernel, _decode_tuned, _prefill_tuned), x, N, config, INTERPRET_CONFIG, DECODE_MAX_ROWS,
                  head, mid, meta)
