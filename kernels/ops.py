"""Public op: the batched multi-tenant low-bit linear, dispatched by device.

Semantics: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias)   (docs/architecture.md, "Numerics")

    y = multi_tenant_linear(x, weight, scale_bank, slot_ids)

* ``x`` (..., K) float16 / bfloat16 / float32; the output (..., N) has x's dtype (accumulation in
  float32). Rows are the flattened leading dimensions.
* ``weight``: :class:`PackedLinearWeight` (packed Q, zero points Z, optional bias), shared by all tenants.
* ``scale_bank`` (num_slots, N, G) float32; ``slot_ids`` (M,) int32/int64 with one slot per row,
  or None for slot 0 on every row. Out-of-range slot ids are an error on CPU and undefined on GPU.

Backends (``backend=`` or the environment variable ``SCALESWAP_KERNEL_BACKEND``):
``"auto"`` (default: CUDA tensors → Triton, CPU tensors → the fast CPU path of :mod:`.cpu_path`),
``"triton"`` (forces the Triton kernels; with ``TRITON_INTERPRET=1`` they run on CPU tensors, which
is how the tests check them), ``"cpu"``, ``"reference"`` (the pure-torch :mod:`.reference`).

Gradients flow to ``x`` and ``scale_bank`` (summed per slot) through a ``torch.autograd.Function``
whose backward is :mod:`.backward`; without grad (inference) the function is bypassed so the per-call
path stays a handful of torch ops. Precomputed formats are cached on the weight object:
``weight.prepare(device)`` builds them eagerly (otherwise the first call does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .backward import multi_tenant_linear_backward
from .cpu_path import CpuWeightCache, cpu_forward
from .packing import SUPPORTED_BITS, packed_row_bytes, unpack_bits
from .reference import multi_tenant_linear_ref, num_groups

BACKENDS = ("auto", "triton", "cpu", "reference")


@dataclass(eq=False)
class PackedLinearWeight:
    """The frozen integer part of one quantized linear (out N × in K), shared by every tenant.

    qweight: uint8 (N, ceil(K·bits/8)) packed Q (:mod:`.packing`); zeros: uint8 (N, G) zero points;
    bias: float32 (N,) or None. G = 1 (group_size = -1) or ceil(K / group_size).
    Caches (CPU int4pack copy, float32 centered integers per device) are built lazily and kept;
    treat the tensors as immutable once the weight has been used.
    """

    qweight: torch.Tensor
    zeros: torch.Tensor
    bits: int
    in_features: int
    out_features: int
    group_size: int
    bias: torch.Tensor | None = None
    _caches: dict = field(default_factory=dict, init=False, repr=False)
    _num_groups: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        G = self._num_groups = num_groups(self.in_features, self.group_size)  # validates group_size
        N, K = self.out_features, self.in_features
        if self.qweight.dtype != torch.uint8 or tuple(self.qweight.shape) != (N, packed_row_bytes(K, self.bits)):
            raise ValueError(
                f"qweight must be uint8 (N, ceil(K*bits/8)) = ({N}, {packed_row_bytes(K, self.bits)}), "
                f"got {self.qweight.dtype} {tuple(self.qweight.shape)}"
            )
        if self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != (N, G):
            raise ValueError(f"zeros must be uint8 (N, G) = ({N}, {G}), got {self.zeros.dtype} {tuple(self.zeros.shape)}")
        if self.zeros.device != self.qweight.device:
            raise ValueError("qweight and zeros must be on the same device")
        if self.bias is not None and tuple(self.bias.shape) != (N,):
            raise ValueError(f"bias must be (N,) = ({N},), got {tuple(self.bias.shape)}")
        self.qweight = self.qweight.contiguous()
        self.zeros = self.zeros.contiguous()

    @property
    def num_groups(self) -> int:
        """G: 1 per channel, else ceil(K / group_size)."""
        return self._num_groups

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def unpacked(self) -> torch.Tensor:
        """Q as uint8 (N, K) (not cached)."""
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def cpu_cache(self) -> CpuWeightCache:
        """The CPU path's precomputed formats (built on first use)."""
        cache = self._caches.get("cpu")
        if cache is None:
            if self.qweight.device.type != "cpu":
                raise ValueError(f"the CPU path needs the weight on the CPU, it is on {self.qweight.device}")
            cache = self._caches["cpu"] = CpuWeightCache(self)
        return cache

    def dense_centered(self, device: torch.device) -> torch.Tensor:
        """Q − Z as float32 (N, G, group_len) on ``device``, zero padded past K (backward, CPU dense path)."""
        if device.type == "cpu":
            return self.cpu_cache().dense3
        key = ("dense3", str(device))
        dense = self._caches.get(key)
        if dense is None:
            dense = self._caches[key] = self.build_dense_centered().to(device)
        return dense

    def build_dense_centered(self) -> torch.Tensor:
        """Build (not cache) Q − Z as float32 (N, G, group_len) on the weight's device, zero padded past K."""
        N, K, G = self.out_features, self.in_features, self.num_groups
        gl = K if self.group_size == -1 else self.group_size
        c = torch.zeros((N, G * gl), dtype=torch.float32, device=self.qweight.device)
        z = self.zeros.to(torch.float32)
        if self.group_size != -1:
            z = z.repeat_interleave(gl, dim=1)[:, :K]
        c[:, :K] = self.unpacked().to(torch.float32) - z
        return c.view(N, G, gl)

    def prepare(self, device: torch.device | str | None = None, *, training: bool = False) -> "PackedLinearWeight":
        """Build the caches a device's forward (and with ``training``, backward) needs now rather than on first call."""
        device = torch.device(device) if device is not None else self.qweight.device
        if device.type == "cpu":
            cache = self.cpu_cache()
            if training or cache.int4 is None:
                cache.dense3
            if self.group_size != -1 and cache.native_ok():  # mixed group-wise batches (compiles once)
                cache.native_qb
        elif training:
            self.dense_centered(device)
        return self

    def to(self, device: torch.device | str) -> "PackedLinearWeight":
        """A copy with its tensors on ``device`` (caches are not copied)."""
        return PackedLinearWeight(
            self.qweight.to(device), self.zeros.to(device), self.bits, self.in_features, self.out_features,
            self.group_size, None if self.bias is None else self.bias.to(device),
        )


def _resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    backend = backend or os.environ.get("SCALESWAP_KERNEL_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "cpu"
    return backend


def _forward(x, weight, scale_bank, slot_ids, backend):
    if backend == "cpu":
        return cpu_forward(x, weight, scale_bank, slot_ids)
    if backend == "triton":
        from .triton_launch import triton_forward  # imports triton only when used

        return triton_forward(x, weight, scale_bank, slot_ids)
    y = multi_tenant_linear_ref(
        x, weight.qweight, weight.zeros, scale_bank, slot_ids, weight.bits, weight.in_features,
        weight.group_size, weight.bias,
    )
    return y.to(x.dtype)


class _MultiTenantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale_bank, weight, slot_ids, backend):
        ctx.save_for_backward(x, scale_bank)
        ctx.weight, ctx.slot_ids = weight, slot_ids
        return _forward(x, weight, scale_bank, slot_ids, backend)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale_bank = ctx.saved_tensors
        grad_x, grad_s = multi_tenant_linear_backward(
            grad_y, x, ctx.weight, scale_bank, ctx.slot_ids, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        if grad_s is not None and grad_s.dtype != scale_bank.dtype:
            grad_s = grad_s.to(scale_bank.dtype)
        return grad_x, grad_s, None, None, None


def multi_tenant_linear(
    x: torch.Tensor,
    weight: PackedLinearWeight,
    scale_bank: torch.Tensor,
    slot_ids: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias): x (..., K), scale_bank (S, N, G), slot_ids (M,) -> (..., N)."""
    K, N = weight.in_features, weight.out_features
    if x.shape[-1] != K:
        raise ValueError(f"x must end in K={K} features, got shape {tuple(x.shape)}")
    if scale_bank.dim() != 3 or scale_bank.shape[1] != N or scale_bank.shape[2] != weight.num_groups:
        raise ValueError(
            f"scale_bank must be (num_slots, N, G) = (S, {N}, {weight.num_groups}), got {tuple(scale_bank.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (M, K)
    if slot_ids is not None and (slot_ids.dim() != 1 or slot_ids.shape[0] != x2.shape[0]):
        raise ValueError(f"slot_ids must be (M,) = ({x2.shape[0]},), got {tuple(slot_ids.shape)}")
    backend = _resolve_backend(backend, x)
    if torch.is_grad_enabled() and (x.requires_grad or scale_bank.requires_grad):
        y = _MultiTenantLinear.apply(x2, scale_bank, weight, slot_ids, backend)
    else:
        y = _forward(x2, weight, scale_bank, slot_ids, backend)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)
