"""scaleswap.kernels: batched multi-tenant low-bit matmul (Triton + CPU path)."""
