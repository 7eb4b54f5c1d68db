"""The fast CPU path of the multi-tenant low-bit linear (forward only; backward is in :mod:`.backward`).

Semantics: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias), as :func:`.reference.multi_tenant_linear_ref`.

PyTorch offers no fused "gather a scale per row" matmul on CPU, so the path composes the fastest
primitives it has, chosen per number of rows M (measurements: docs in ``/work/notes/kernels.md``
and ``bench/kernels.py``):

* **int4pack path** (bits <= 4, M <= :func:`int4_max_rows`): ``aten._weight_int4pack_mm_for_cpu``
  with bf16 activations. That op computes ``x @ ((q − 8)·s + z')ᵀ`` per K-group; it is fast only
  with bf16 activations (with fp32 ones it takes a 2–100× slower path). For bits <= 3 the op's
  nibbles hold ``Q − Z + 8`` (in [1, 15]) so ``z' = 0``; 4-bit ``Q − Z`` does not fit a nibble, so
  they hold ``Q`` and ``z' = s·(8 − Z)``.
    - per channel: ONE call for the whole mixed batch with unit scales (so it returns the shared
      integer product ``U = X (Q − Z)ᵀ``), then the epilogue ``Y = U ⊙ S[slot]`` gathers each
      row's tenant scales (DESIGN §2): a mixed batch costs one (M, N) gather more.
    - group-wise: the tenant's scale sits inside the K loop and the op has no per-row scales, so
      one call per distinct tenant with that tenant's ``(s, z')`` in bf16 ("int4pack-per-tenant",
      rows grouped by tenant, chosen while the rows per tenant stay in the op's fast range and
      T <= 16). Each call re-reads the (cached) weight: a batch of T tenants costs ~T calls.
* **native path** (group-wise, M <= 64, mixed batches with many tenants: T > 2 + M/4, or above the
  int4pack range; needs a C compiler, bits <= 4, 32 | K, 32 | g, g | K): :mod:`.native`'s C kernel
  reads the weights once for the whole mixed batch and applies each row's tenant scales per group
  (fp32 FMA). Its cost does not depend on T, but it is ~2× slower than int4pack for one tenant,
  hence the rule (measured: int4pack-per-tenant ≈ T·a + M·b, native ≈ 2a + M·(b + 0.27a)).
* **dense path** (M above the threshold, 8-bit weights, or group sizes that are not multiples
  of 32): a lazily built float32 cache of the centered integers ``C = Q − Z`` and MKL sgemm:
  per channel ``Y = (X Cᵀ) ⊙ S[slot]`` (one GEMM for every tenant); group-wise either per
  distinct tenant ``X_t (C ⊙ S_t)ᵀ`` (the tenant's weight dequantized into a reused scratch
  buffer) or, when many tenants share a batch, per-group partial products
  ``Σ_g S[slot, :, g] ⊙ (X_g C_gᵀ)`` (one batched GEMM for every tenant, ~2–3× a dense GEMM).
:func:`plan` makes the choice; ``force_plan`` overrides it (benchmarks); inside :func:`fp32_only` it never
picks int4pack (group-wise: native for M <= 64, else the dense branches).

Memory per weight element (N·K): packed Q on disk 0.25–0.5 B; int4pack copy 0.5 B (always built
for bits <= 4); the float32 dense cache 4 B, built only the first time a call needs it (a prefill
of more than :func:`int4_max_rows` rows, 8-bit weights, or a backward pass). For SmolLM2-135M
(106 M quantized weights) that is 53 MB + 425 MB. Group-wise int4 additionally keeps a bf16
``(scale, zero)`` copy per slot in use, the size of that slot's scales; the native kernel's
nibble copy, 0.5 B, is built for group-wise layers it serves (``prepare`` or first use); group-wise dense calls
share one float32 scratch buffer per thread of the largest layer's N·K (4 B each; 7 MB for the
135M model's MLP).

Numerics: the int4pack path rounds activations, and its output, to bf16 (8-bit mantissa: ~3
significant digits); group-wise it also rounds each tenant's scales (and for 4-bit ``s·(8 − Z)``,
whose cancellation against ``(Q − 8)·s`` costs up to s/32 per weight) to bf16. Bound checked by the
tests: |Y − Y_ref| <= 2^-7 · Σ_k |X||W| (4-bit group-wise: 2^-6); in practice max |Y − Y_ref| /
max |Y_ref| ≈ 3e-3 to 5e-3. The dense and native paths are float32 throughout (~1e-6). Through the 30
layers of SmolLM2-135M these per-layer errors move the logits by up to ~0.8 (of a range of ~±35) against
the float32 path, while held-out perplexity changes by < 0.3 %: a greedy token can flip where the top
two logits are that close, so the same request may decode differently alone and inside a batch (which
changes M and so the branch). :func:`fp32_only` removes that (tests/runtime/test_fast_numerics.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F

from . import native

_INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_dot() -> bool:
    """True when PyTorch's CPU kernels can use AVX512-BF16 (then bf16 matmuls are fast)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


@functools.lru_cache(maxsize=None)
def int4_max_rows(group_wise: bool = False) -> int:
    """Largest M that takes the int4pack path; above it the float32 dense path is faster.

    Measured with model-like timing (bench/kernels.py): without bf16 instructions (AVX2, emulated
    with ATEN_CPU_CAPABILITY=avx2) int4pack beats sgemm up to M≈16 and loses from M=32, per channel
    and group-wise alike; with AVX512-BF16 it wins up to M≈64.
    Override with the environment variable ``SCALESWAP_CPU_INT4_MAX_ROWS`` (0 disables it).
    """
    env = os.environ.get("SCALESWAP_CPU_INT4_MAX_ROWS")
    if env is not None:
        return int(env)
    return 64 if cpu_has_bf16_dot() else 16


class CpuWeightCache:
    """Everything the CPU path precomputes for one ``PackedLinearWeight`` (built lazily, kept)."""

    def __init__(self, weight) -> None:
        self.weight = weight  # the PackedLinearWeight (holds qweight, zeros, bits, ...)
        N, K, G = weight.out_features, weight.in_features, weight.num_groups
        self.N, self.K, self.G = N, K, G
        self.group_len = K if weight.group_size == -1 else weight.group_size  # elements per group
        self.K_groups = G * self.group_len  # K padded to whole groups
        self._centered: torch.Tensor | None = None  # (N, K) float32
        self._dense3: torch.Tensor | None = None  # (N, G, group_len) float32, zero padded
        self.int4: torch.Tensor | None = None  # packed for _weight_int4pack_mm_for_cpu
        # (id, version, data_ptr) of a bank -> (bank, {slot: (K4/qgs, N4, 2) bf16}); LRU, see sz_for_slot
        self._sz_by_bank: dict[tuple, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        self._sz_lock = threading.Lock()
        self._bank_rows: tuple | None = None  # (bank, (S, N) view, (N,) view)
        self._native_ok: bool | None = None
        self._native_qb: torch.Tensor | None = None  # (N, K/2) uint8, native block-32 nibbles
        self._build_int4()

    # -- int4pack ---------------------------------------------------------------------------
    def _build_int4(self) -> None:
        w = self.weight
        if w.bits > 4:
            return
        self.K4 = -(-self.K // 32) * 32  # K padded to the op's smallest group (x padded with 0)
        if w.group_size == -1:
            self.qgs = next(g for g in _INT4_GROUP_SIZES if self.K4 % g == 0)
        else:
            if w.group_size % 32:
                return  # groups the op cannot express: dense path
            self.qgs = next(g for g in _INT4_GROUP_SIZES if self.K4 % g == 0 and w.group_size % g == 0)
        self.N4 = -(-self.N // 16) * 16  # the op packs 16 output rows together
        n_qgroups = self.K4 // self.qgs
        group_len = self.group_len if w.group_size != -1 else self.K4
        qgroup_to_group = torch.clamp(torch.arange(n_qgroups) * self.qgs // group_len, max=self.G - 1)
        q = w.unpacked().to(torch.int32)  # (N, K)
        z = w.zeros.to(torch.int32)  # (N, G)
        shift = torch.zeros((self.N4, n_qgroups), dtype=torch.float32)  # z' / s per op group
        if w.bits <= 3:
            # Q − Z + 8 lies in [1, 15]: store the centered integers, so z' = 0 and only s is rounded
            z_k = z if w.group_size == -1 else z.repeat_interleave(self.group_len, dim=1)[:, : self.K]
            q = q - z_k + 8
        else:
            # 4-bit Q − Z spans [-15, 15]: store Q and let z' = s·(8 − Z) shift it (bf16 rounded)
            shift[: self.N] = 8.0 - z.to(torch.float32)[:, qgroup_to_group]
        q_op = torch.full((self.N4, self.K4), 8, dtype=torch.int32)  # padding rows/cols
        q_op[: self.N, : self.K] = q
        self.int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_op, 1)  # (N4, K4/2) uint8
        self.qgroup_to_group = qgroup_to_group  # (n_qgroups,)
        self.zero_shift = shift  # (N4, n_qgroups)
        # per channel: unit scales and z' = 8 − Z (4-bit) or 0: the op returns U = X (Q − Z)ᵀ exactly
        self.unit_sz = torch.stack([torch.ones_like(shift), shift], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()

    def sz_for_slot(self, scale_bank: torch.Tensor, slot: int) -> torch.Tensor:
        """The op's ``(scale, zero)`` tensor (K4/qgs, N4, 2) bf16 for one slot of the bank (cached).

        Thread-safe: the serving thread and a fine-tuning thread call it with different banks at once, so
        entries are keyed by bank (identity, version, storage) and slot, kept for a few banks (LRU), and
        touched under a lock. Inference tensors have no version counter and are never cached.
        """
        key = None if scale_bank.is_inference() else (id(scale_bank), scale_bank._version, scale_bank.data_ptr())
        if key is not None:
            with self._sz_lock:
                entry = self._sz_by_bank.pop(key, None)
                if entry is not None:
                    self._sz_by_bank[key] = entry  # most recently used last
                    sz = entry[1].get(slot)
                    if sz is not None:
                        return sz
        s = torch.zeros((self.N4, self.zero_shift.shape[1]), dtype=torch.float32)
        s[: self.N] = scale_bank[slot].detach().to(torch.float32)[:, self.qgroup_to_group]
        sz = torch.stack([s, s * self.zero_shift], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        if key is not None:
            with self._sz_lock:
                entry = self._sz_by_bank.get(key)
                if entry is None:
                    while len(self._sz_by_bank) >= _SZ_CACHED_BANKS:
                        self._sz_by_bank.pop(next(iter(self._sz_by_bank)))
                    # keep the bank alive so its id() stays unique while cached
                    entry = self._sz_by_bank[key] = (scale_bank, {})
                entry[1][slot] = sz
        return sz

    def native_ok(self) -> bool:
        """Whether the native kernel (:mod:`.native`) serves this layer: built, bits <= 4, 32 | K, 32 | g, g | K."""
        if self._native_ok is None:
            w = self.weight
            gs = self.K if w.group_size == -1 else w.group_size
            self._native_ok = (native.supports(w.bits, self.K, w.group_size) and self.K % gs == 0
                               and native.available())
        return self._native_ok

    @property
    def native_qb(self) -> torch.Tensor:
        """Q in the native kernel's block-32 nibble layout (N, K/2) uint8 (built on first use)."""
        if self._native_qb is None:
            self._native_qb = native.block32_nibbles(self.weight.unpacked())
        return self._native_qb

    def bank_rows(self, scale_bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel: the bank as (S, N) and its slot 0 as (N,), views cached per bank tensor."""
        rows = self._bank_rows  # one read: another thread may replace it meanwhile
        if rows is None or rows[0] is not scale_bank:
            bank2d = scale_bank.detach()[:, :, 0]
            rows = self._bank_rows = (scale_bank, bank2d, bank2d[0])
        return rows[1], rows[2]

    def int4_mm(self, xb: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        """(M, K) bf16 -> (M, N) bf16 through the int4pack op (pads K, drops padded columns)."""
        if self.K4 != self.K:
            xb = F.pad(xb, (0, self.K4 - self.K))
        u = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.int4, self.qgs, sz)  # (M, N4)
        return u if self.N4 == self.N else u[:, : self.N]

    # -- dense float32 cache ---------------------------------------------------------------
    @property
    def dense3(self) -> torch.Tensor:
        """Centered integers Q − Z as float32 (N, G, group_len), zero padded past K."""
        if self._dense3 is None:
            self._dense3 = self.weight.build_dense_centered()  # (N, G, gl)
            flat = self._dense3.view(self.N, self.K_groups)
            self._centered = flat[:, : self.K] if self.K_groups != self.K else flat
        return self._dense3

    @property
    def centered(self) -> torch.Tensor:
        """Q − Z as float32 (N, K) (a view of :attr:`dense3`)."""
        self.dense3
        return self._centered

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by each cache (for docs and benchmarks)."""
        out = {"int4pack": 0 if self.int4 is None else self.int4.numel()}
        out["dense_fp32"] = 0 if self._dense3 is None else self._dense3.numel() * 4
        with self._sz_lock:
            out["slot_scales_bf16"] = sum(t.numel() * 2 for _, d in self._sz_by_bank.values() for t in d.values())
        out["native_nibbles"] = 0 if self._native_qb is None else self._native_qb.numel()
        return out


# -- per-step slot grouping (cached on the slot_ids tensor, shared by every layer of a step) ----
_last_groups: tuple | None = None


def slot_groups(slot_ids: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """Distinct slots of a batch with their rows: [(slot, rows (R,) int64 | None when all rows)].

    The engine hands the same ``slot_ids`` tensor to every layer of a step, so the result is
    cached on that tensor (identity + version counter: an in-place change recomputes it).
    """
    global _last_groups
    key = None if slot_ids.is_inference() else (slot_ids._version, slot_ids.data_ptr())
    cached = _last_groups
    if key is not None and cached is not None and cached[0] is slot_ids and cached[1] == key:
        return cached[2]
    uniq = torch.unique(slot_ids)
    if uniq.numel() == 1:
        groups = [(int(uniq[0]), None)]
    else:
        order = torch.argsort(slot_ids, stable=True)
        counts = torch.bincount(slot_ids.to(torch.int64)[order] - int(uniq[0]))
        counts = counts[counts > 0].tolist()
        groups = list(zip(uniq.tolist(), torch.split(order, counts)))
    if key is not None:
        _last_groups = (slot_ids, key, groups)
    return groups


_GROUPED_CHUNK_ELEMENTS = 1 << 22  # rows per chunk × N × G of the partial products (16 MB)


def _grouped_partial(x32: torch.Tensor, cache: CpuWeightCache, scale_rows_of: callable) -> torch.Tensor:
    """Σ_g S_rows[:, :, g] ⊙ (X_g C_gᵀ): x32 (M, K) -> (M, N) float32, in row chunks.

    ``scale_rows_of(r0, r1)`` returns the gathered scales (r1 − r0, N, G) of those rows.
    """
    M = x32.shape[0]
    if cache.K_groups != cache.K:
        x32 = F.pad(x32, (0, cache.K_groups - cache.K))
    cg = cache.dense3.permute(1, 2, 0)  # (G, gl, N)
    y = torch.empty((M, cache.N), dtype=torch.float32)
    chunk = max(1, _GROUPED_CHUNK_ELEMENTS // (cache.N * cache.G))
    for r0 in range(0, M, chunk):
        r1 = min(M, r0 + chunk)
        xg = x32[r0:r1].view(r1 - r0, cache.G, cache.group_len).transpose(0, 1)  # (G, m, gl)
        u = torch.bmm(xg, cg)  # (G, m, N) partial products per group
        y[r0:r1] = torch.einsum("gmn,mng->mn", u, scale_rows_of(r0, r1))
    return y


_FP32_ONLY: ContextVar[bool] = ContextVar("scaleswap_cpu_fp32_only", default=False)


@contextlib.contextmanager
def fp32_only(enabled: bool = True) -> Iterator[None]:
    """Within this context (this thread / task only) the CPU path computes in float32 throughout: no bf16
    int4pack branch. Results then depend on the batch's shape only through float32 rounding (~1e-4 on the
    logits), at the price of slower small batches (the engine's ``precision="fp32"``)."""
    token = _FP32_ONLY.set(enabled)
    try:
        yield
    finally:
        _FP32_ONLY.reset(token)


def fp32_only_enabled() -> bool:
    """Whether the caller is inside :func:`fp32_only`."""
    return _FP32_ONLY.get()


PLANS = ("int4pack", "int4pack-per-tenant", "native", "dense-fp32", "dense-fp32-per-tenant", "dense-fp32-grouped")
force_plan: str | None = None  # benchmarks set this to time a branch the heuristic would not pick


def plan(weight, M: int, num_tenants: int) -> str:
    """Which CPU branch a call with M rows and ``num_tenants`` distinct slots takes (see module docstring)."""
    cache: CpuWeightCache = weight.cpu_cache()
    group_wise = weight.group_size != -1
    if force_plan is not None:
        forced = force_plan
        if not group_wise:
            forced = "int4pack" if forced.startswith("int4pack") else "dense-fp32"
        elif forced == "int4pack" and num_tenants > 1:
            forced = "int4pack-per-tenant"
        if forced.startswith("int4pack") and cache.int4 is None:
            raise ValueError("this weight has no int4pack form (bits > 4 or group size not a multiple of 32)")
        if forced == "native" and not (group_wise and cache.native_ok()):
            raise ValueError("the native kernel does not serve this weight (see CpuWeightCache.native_ok)")
        return forced
    if _FP32_ONLY.get():
        if not group_wise:
            return "dense-fp32"
        if M <= _NATIVE_MAX_ROWS and cache.native_ok():
            return "native"  # reads the 4-bit weights once, float32 FMA, any number of tenants
        int4_rows = -1
    else:
        int4_rows = int4_max_rows(group_wise) if cache.int4 is not None else -1
    if not group_wise:
        return "int4pack" if M <= int4_rows else "dense-fp32"
    if num_tenants == 1:
        return "int4pack" if M <= int4_rows else "dense-fp32-per-tenant"
    native_ok = M <= _NATIVE_MAX_ROWS and cache.native_ok()
    if native_ok and num_tenants > 2 + M // 4:
        return "native"  # one pass over the weights for every tenant; fp32 FMA, no bf16 rounding
    if -(-M // num_tenants) <= int4_rows and num_tenants <= _INT4_MAX_TENANTS:
        return "int4pack-per-tenant"  # one int4pack call per tenant, each in the op's fast range
    if num_tenants * cache.K <= 2 * M * cache.G:
        return "dense-fp32-per-tenant"  # dequantize each tenant's weight: T·N·K extra work
    if native_ok:
        return "native"
    return "dense-fp32-grouped"  # one batched GEMM of per-group partial products: M·N·G extra


_NATIVE_MAX_ROWS = 64  # above it the batched per-group sgemm beats the native kernel (2.0–2.4× vs 2.5–4.7× dense)
_SZ_CACHED_BANKS = 4  # banks whose per-slot (scale, zero) tensors stay cached per layer
_INT4_MAX_TENANTS = 16  # above it one pass for all tenants (native kernel or batched per-group GEMM) wins
_scratch = threading.local()


def _scratch_buffer(numel: int) -> torch.Tensor:
    """A float32 buffer reused across calls of this thread (a fresh multi-MB tensor per call costs page faults)."""
    buf = getattr(_scratch, "buf", None)
    # an inference-mode tensor cannot be used outside inference mode (e.g. perplexity, then training)
    if buf is None or buf.numel() < numel or buf.is_inference() != torch.is_inference_mode_enabled():
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def cpu_forward(
    x: torch.Tensor,
    weight,
    scale_bank: torch.Tensor,
    slot_ids: torch.Tensor | None,
) -> torch.Tensor:
    """CPU forward: x (M, K) any float dtype -> (M, N) in x.dtype. Arguments already validated."""
    cache: CpuWeightCache = weight.cpu_cache()
    M = x.shape[0]
    if weight.group_size == -1:
        if plan(weight, M, 1) == "int4pack":
            u = cache.int4_mm(x.to(torch.bfloat16), cache.unit_sz)  # (M, N) bf16
        else:
            u = F.linear(x.to(torch.float32), cache.centered)  # (M, N) float32
        bank2d, base = cache.bank_rows(scale_bank)  # (S, N), (N,) views
        scale = base if slot_ids is None else bank2d.index_select(0, slot_ids)  # (N,) | (M, N)
        y = torch.mul(u, scale) if weight.bias is None else torch.addcmul(weight.bias, u, scale)  # float32
        return y if y.dtype == x.dtype else y.to(x.dtype)
    else:
        groups = [(0, None)] if slot_ids is None else slot_groups(slot_ids)
        path = plan(weight, M, len(groups))
        if path.startswith("int4pack"):
            xb = x.to(torch.bfloat16)
            if len(groups) == 1:
                y = cache.int4_mm(xb, cache.sz_for_slot(scale_bank, groups[0][0]))  # (M, N) bf16
            else:
                y = torch.empty((M, cache.N), dtype=torch.bfloat16)
                for slot, rows in groups:
                    y.index_copy_(0, rows, cache.int4_mm(xb.index_select(0, rows), cache.sz_for_slot(scale_bank, slot)))
            y = y.to(torch.float32)
        elif path == "native":
            if slot_ids is None:
                slots = torch.zeros(M, dtype=torch.int32)
            else:
                slots = slot_ids if slot_ids.dtype == torch.int32 else slot_ids.to(torch.int32)
            bank = scale_bank.detach()
            if bank.dtype != torch.float32 or not bank.is_contiguous():
                bank = bank.to(torch.float32).contiguous()
            y = native.mt_q4_gemm(x.to(torch.float32).contiguous(), cache.native_qb, weight.zeros, bank,
                                  slots.contiguous(), weight.bias)  # bias added inside
            return y if y.dtype == x.dtype else y.to(x.dtype)
        elif path == "dense-fp32-per-tenant":
            x32 = x.to(torch.float32)
            y = None if len(groups) == 1 else torch.empty((M, cache.N), dtype=torch.float32)
            for slot, rows in groups:
                s = scale_bank[slot].detach().to(torch.float32).unsqueeze(-1)  # (N, G, 1)
                w3 = _scratch_buffer(cache.N * cache.K_groups).view(cache.N, cache.G, cache.group_len)
                w = torch.mul(cache.dense3, s, out=w3).view(cache.N, cache.K_groups)[:, : cache.K]  # (N, K)
                if rows is None:
                    y = F.linear(x32, w)
                else:
                    y.index_copy_(0, rows, F.linear(x32.index_select(0, rows), w))
        else:
            bank = scale_bank.detach().to(torch.float32)
            y = _grouped_partial(x.to(torch.float32), cache, lambda r0, r1: bank.index_select(0, slot_ids[r0:r1]))
    if weight.bias is not None:
        y = y + weight.bias
    return y if y.dtype == x.dtype else y.to(x.dtype)
