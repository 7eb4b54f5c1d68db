"""scaleswap.kernels: batched multi-tenant low-bit matmul (Triton + CPU path).

Semantics of every op here: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias), one tenant slot per row.

- :mod:`.packing`: the on-disk / in-kernel bit packing (little-endian bit stream per row, bits 2/3/4/8).
- :mod:`.reference`: the pure-torch reference (dequantize, then matmul) everything is tested against.
- :mod:`.ops`: the public API, ``PackedLinearWeight`` and ``multi_tenant_linear`` (dispatch by device,
  autograd w.r.t. x and the scale bank).
- :mod:`.cpu_path` (with :mod:`.native`), :mod:`.triton_per_channel`, :mod:`.triton_group_wise`,
  :mod:`.backward`: the implementations.
"""
