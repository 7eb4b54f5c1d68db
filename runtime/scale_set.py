"""Scale sets: a tenant's whole adaptation, one float32 (N, G) tensor per quantized linear.

File format (docs/architecture.md): safetensors, tensors named by module path
(``model.layers.0.self_attn.q_proj``), metadata ``{"format": "scaleswap-scales", "fingerprint", "bits",
"group_size", "version"?, "tenant"?}``. A scale set is only meaningful for the exact integers it was
trained on, so loading checks the base fingerprint, then every name, shape and dtype, then that all values
are finite and positive. Every refusal is a :class:`ScaleSetError` with a machine-readable ``code``; nothing
is changed by a refused load (it only parses bytes).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "scaleswap-scales"


class ScaleSetError(ValueError):
    """An invalid scale set. ``code``: invalid_file | wrong_format | fingerprint_mismatch | missing_tensor |
    unexpected_tensor | wrong_shape | wrong_dtype | non_finite | non_positive | too_large."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BaseInfo:
    """What a scale set must match: the quantized base's identity and the expected tensors."""

    fingerprint: str
    bits: int
    group_size: int
    shapes: dict[str, tuple[int, int]] = field(hash=False)  # name -> (N, G)

    @property
    def num_scales(self) -> int:
        return sum(n * g for n, g in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return 4 * self.num_scales


@dataclass
class ScaleSet:
    scales: dict[str, torch.Tensor]  # name -> float32 (N, G)
    metadata: dict[str, str]


def _metadata(base: BaseInfo, extra: dict[str, object] | None) -> dict[str, str]:
    meta = {"format": FORMAT, "fingerprint": base.fingerprint, "bits": str(base.bits), "group_size": str(base.group_size)}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def validate_scales(scales: dict[str, torch.Tensor], base: BaseInfo) -> None:
    """Raise ScaleSetError unless ``scales`` has exactly the base's tensors, float32, finite and positive."""
    missing = sorted(set(base.shapes) - set(scales))
    if missing:
        raise ScaleSetError(f"scale set lacks {len(missing)} tensor(s), e.g. {missing[0]!r}", "missing_tensor")
    extra = sorted(set(scales) - set(base.shapes))
    if extra:
        raise ScaleSetError(f"scale set has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}", "unexpected_tensor")
    for name, expected in base.shapes.items():
        t = scales[name]
        if tuple(t.shape) != tuple(expected):
            raise ScaleSetError(
                f"tensor {name!r} has shape {list(t.shape)}, expected {list(expected)}", "wrong_shape"
            )
        if t.dtype != torch.float32:
            raise ScaleSetError(f"tensor {name!r} has dtype {t.dtype}, expected torch.float32", "wrong_dtype")
        if not torch.isfinite(t).all():
            raise ScaleSetError(f"tensor {name!r} contains NaN or Inf", "non_finite")
        if not (t > 0).all():
            raise ScaleSetError(f"tensor {name!r} contains a scale <= 0; scales must be positive", "non_positive")


def load_scale_set(src: bytes | str | Path, base: BaseInfo | None = None, max_bytes: int | None = None) -> ScaleSet:
    """Parse and validate a scale set from bytes or a path. With ``base=None`` only the file itself is checked."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"scale set file not found: {path}")
        data = path.read_bytes()
    else:
        data = bytes(src)
    if max_bytes is not None and len(data) > max_bytes:
        raise ScaleSetError(f"scale set is {len(data)} bytes; the limit is {max_bytes}", "too_large")
    try:
        tensors = st_load(data)
        meta = _read_metadata(data)
    except Exception as e:  # safetensors raises several types for malformed input
        raise ScaleSetError(f"not a valid safetensors file ({type(e).__name__}: {e})", "invalid_file") from None
    if meta.get("format") != FORMAT:
        raise ScaleSetError(
            f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r} (a scaleswap scale set)", "wrong_format"
        )
    if base is not None:
        if meta.get("fingerprint") != base.fingerprint:
            raise ScaleSetError(
                f"scale set was made for base {meta.get('fingerprint')!r}, this server's base is {base.fingerprint!r}",
                "fingerprint_mismatch",
            )
        validate_scales(tensors, base)
    return ScaleSet(scales=tensors, metadata=meta)


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than the safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length exceeds file size")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def scale_set_bytes(scales: dict[str, torch.Tensor], base: BaseInfo, extra_metadata: dict[str, object] | None = None) -> bytes:
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in sorted(scales.items())}
    return st_save(tensors, metadata=_metadata(base, extra_metadata))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_scale_set(
    path: str | Path, scales: dict[str, torch.Tensor], base: BaseInfo, extra_metadata: dict[str, object] | None = None
) -> None:
    validate_scales({k: v.detach().float().cpu() for k, v in scales.items()}, base)
    atomic_write_bytes(path, scale_set_bytes(scales, base, extra_metadata))
