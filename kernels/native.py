"""Native CPU kernel for the multi-tenant low-bit linear (``native/mt_q4_gemm.c``), built on first use.

Semantics: Y[r] = X[r] @ (S[slot[r]] ⊙ (Q − Z))ᵀ (+ bias), as :func:`.reference.multi_tenant_linear_ref`,
for Q of 2, 3 or 4 bits and K, group size multiples of 32.

The C file is compiled once per machine with the system C compiler (``-O3 -march=native -fopenmp``) into
``$SCALESWAP_CACHE/native/`` (keyed by the source, the compiler and the CPU's flags) and loaded with ctypes;
nothing is compiled at install time. It reads the weights once per call for a whole mixed batch: the tenant
only enters the per-group epilogue (see the C file). If no compiler is found or the build fails, or with
``SCALESWAP_NATIVE=0``, :func:`available` is False and callers use the PyTorch path.

Memory: the kernel's weight copy is 0.5 B per weight (block-32 nibble layout, built once per layer from the
packed bit stream), the same as the packed 4-bit integers.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).resolve().parent / "native" / "mt_q4_gemm.c"


def _cache_dir() -> Path:
    return Path(os.environ.get("SCALESWAP_CACHE", Path.home() / ".cache" / "scaleswap")) / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SCALESWAP_NATIVE", "1") == "0" or not _SRC.is_file():
        return None
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(_SRC.read_bytes() + " ".join([cc, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"mt_q4_gemm-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(_SRC), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, out)
        except (OSError, subprocess.SubprocessError) as e:
            Path(tmp).unlink(missing_ok=True)
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(f"scaleswap: native CPU kernel not built ({detail.strip()[:300]}); using the PyTorch path")
            return None
    lib = ctypes.CDLL(str(out))
    f = lib.mt_q4_gemm
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    f.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _library() is not None


def supports(bits: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel handles this layer shape (bits <= 4, K and the group size multiples of 32, whole groups)."""
    gs = in_features if group_size == -1 else group_size
    return bits <= 4 and in_features % 32 == 0 and gs % 32 == 0 and in_features % gs == 0


def block32_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Integers q (N, K) uint8 in [0, 15], K % 32 == 0 -> the kernel's layout, uint8 (N, K/2)."""
    N, K = q.shape
    assert K % 32 == 0, K
    blocks = q.reshape(N, K // 32, 2, 16)  # (N, B, half, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def mt_q4_gemm(
    x: torch.Tensor,  # (M, K) float32 contiguous
    qb: torch.Tensor,  # (N, K/2) uint8, block32_nibbles layout
    zeros: torch.Tensor,  # (N, G) uint8
    scale_bank: torch.Tensor,  # (S, N, G) float32
    slot_ids: torch.Tensor,  # (M,) int32, values < S
    bias: torch.Tensor | None = None,  # (N,) float32
) -> torch.Tensor:
    lib = _library()
    assert lib is not None, "native kernel unavailable"
    M, K = x.shape
    N, G = zeros.shape
    assert x.dtype == torch.float32 and x.is_contiguous() and qb.shape == (N, K // 2)
    assert scale_bank.dtype == torch.float32 and scale_bank.is_contiguous() and scale_bank.shape[1:] == (N, G)
    assert slot_ids.dtype == torch.int32 and slot_ids.shape == (M,) and slot_ids.is_contiguous()
    y = torch.empty((M, N), dtype=torch.float32)
    rc = lib.mt_q4_gemm(
        x.data_ptr(), M, K, qb.data_ptr(), zeros.data_ptr(), scale_bank.data_ptr(), slot_ids.data_ptr(),
        bias.data_ptr() if bias is not None else None, N, G, y.data_ptr(), torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("mt_q4_gemm: out of memory for scratch space")
    return y
