"""Backward of the multi-tenant low-bit linear: dX and dS (scales only), in torch, any device.

Semantics of the forward: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ. With C = Q − Z split into K-groups
(per channel: one group of K elements) and U_g[r, n] = Σ_{k∈g} X[r, k] C[n, k] (DESIGN §4):

    dX[r, k]    = Σ_n dY[r, n] · S[slot[r], n, g(k)] · C[n, k]
    dS[t, n, g] = Σ_{r : slot[r] = t} dY[r, n] · U_g[r, n]        (scatter-add over rows)

Both are batched GEMMs over the groups, (G, M, N) @ (G, N, gl) and (G, M, gl) @ (G, gl, N), so a
batch with a different tenant on every row costs what a single-tenant batch costs. Rows are
processed in chunks so the (G, M, N) temporaries stay under ~64 MB. Float32 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 24  # rows per chunk × N × G, float32: 64 MB


def multi_tenant_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight,
    scale_bank: torch.Tensor,
    slot_ids: torch.Tensor | None,
    need_grad_x: bool,
    need_grad_scales: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_y (M, N), x (M, K) -> (dX (M, K) in x.dtype | None, dS (S, N, G) float32 | None)."""
    M, K = x.shape
    dense3 = weight.dense_centered(x.device)  # (N, G, gl) float32, zero padded past K
    N, G, gl = dense3.shape
    bank = scale_bank.detach().to(torch.float32)
    grad_x = torch.empty((M, K), dtype=torch.float32, device=x.device) if need_grad_x else None
    grad_s = torch.zeros_like(bank) if need_grad_scales else None
    chunk = max(1, _CHUNK_ELEMENTS // (N * G))
    for r0 in range(0, M, chunk):
        r1 = min(M, r0 + chunk)
        dy = grad_y[r0:r1].to(torch.float32)  # (m, N)
        if need_grad_x:
            if slot_ids is None:
                s = bank[0].t().unsqueeze(1)  # (G, 1, N)
            else:
                s = bank.index_select(0, slot_ids[r0:r1]).permute(2, 0, 1)  # (G, m, N)
            a = dy.unsqueeze(0) * s  # (G, m, N)
            gx = torch.bmm(a, dense3.transpose(0, 1))  # (G, m, gl)
            grad_x[r0:r1] = gx.transpose(0, 1).reshape(r1 - r0, G * gl)[:, :K]
        if need_grad_scales:
            xr = x[r0:r1].to(torch.float32)
            if G * gl != K:
                xr = F.pad(xr, (0, G * gl - K))
            xg = xr.view(r1 - r0, G, gl).transpose(0, 1)  # (G, m, gl)
            u = torch.bmm(xg, dense3.permute(1, 2, 0))  # (G, m, N) partial products per group
            p = (u * dy.unsqueeze(0)).permute(1, 2, 0)  # (m, N, G)
            if slot_ids is None:
                grad_s[0] += p.sum(0)
            else:
                grad_s.index_add_(0, slot_ids[r0:r1].to(torch.int64), p)
    if grad_x is not None and grad_x.dtype != x.dtype:
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_s
