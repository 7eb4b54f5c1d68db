"""PEQA base quantization: float checkpoint -> shared integer base + base scale set.

Asymmetric round-to-nearest (RTN) per output channel or per (channel, K-group):

    S = (max − min) / (2^b − 1),   Z = round(−min / S),   Q = clamp(round(W / S) + Z, 0, 2^b − 1)
    W ≈ S ⊙ (Q − Z)

with [min, max] the group's range widened to include 0 (as GPTQ's asymmetric quantizer does), optionally
shrunk by a small grid search that minimises the group's squared error (``mse_clip``; it matters at 3 and
2 bits). ``Q`` and ``Z`` are frozen and shared by every tenant; ``S`` is the base scale set, the starting
point of every tenant's own (Kim et al. 2023, PEQA, §3).

The quantized-base directory format is in docs/architecture.md. Writing goes to a temporary directory that
is renamed into place at the end, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from scaleswap.kernels.ops import PackedLinearWeight
from scaleswap.kernels.packing import pack_bits

from .config import ModelConfig, QuantConfig
from .model import LlamaForCausalLM
from .quant_linear import QuantLinear
from .scale_set import BaseInfo, scale_set_bytes

BASE_FORMAT = "scaleswap-base"
BASE_FORMAT_VERSION = 1
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- RTN
def rtn_quantize(
    w: torch.Tensor, bits: int, group_size: int, mse_clip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q uint8 (N, K), zeros uint8 (N, G), scales float32 (N, G))."""
    N, K = w.shape
    G = 1 if group_size == -1 else K // group_size
    assert G * (K // G) == K, f"group size {group_size} must divide K={K}"
    qmax = (1 << bits) - 1
    wg = w.detach().to(torch.float32).reshape(N, G, K // G)  # (N, G, g)
    wmin = wg.amin(dim=-1).clamp(max=0.0)  # (N, G)
    wmax = wg.amax(dim=-1).clamp(min=0.0)
    both_zero = (wmin == 0) & (wmax == 0)
    wmax = torch.where(both_zero, torch.ones_like(wmax), wmax)

    def quant(lo: torch.Tensor, hi: torch.Tensor):
        scale = ((hi - lo) / qmax).clamp(min=1e-10)  # (N, G)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, qmax)
        return q, zero, scale

    q, zero, scale = quant(wmin, wmax)
    if mse_clip and bits < 8:
        best_err = ((scale[..., None] * (q - zero[..., None]) - wg) ** 2).sum(-1)  # (N, G)
        for shrink in torch.linspace(0.95, 0.55, 9).tolist():
            q2, z2, s2 = quant(wmin * shrink, wmax * shrink)
            err = ((s2[..., None] * (q2 - z2[..., None]) - wg) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            q = torch.where(better[..., None], q2, q)
            zero = torch.where(better, z2, zero)
            scale = torch.where(better, s2, scale)
    return q.reshape(N, K).to(torch.uint8), zero.to(torch.uint8), scale.to(torch.float32)


def fingerprint(qweights: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int, group_size: int) -> str:
    """sha256 over (name, packed integers, zero points) of every quantized module in name order + bits/group."""
    h = hashlib.sha256(f"scaleswap-base/bits={bits}/group_size={group_size}".encode())
    for name in sorted(qweights):
        qweight, zeros = qweights[name]
        h.update(name.encode())
        h.update(qweight.contiguous().numpy().tobytes())
        h.update(zeros.contiguous().numpy().tobytes())
    return h.hexdigest()


def _is_target(name: str, quant: QuantConfig) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in quant.targets and ".layers." in name


# ----------------------------------------------------------------------------- writing
def quantize_checkpoint(
    ckpt,
    quant: QuantConfig,
    out_dir: str | Path,
    float_dtype: str = "float32",
    mse_clip: bool = True,
    source: str = "",
    show_progress: bool = True,
) -> Path:
    """Quantize a :class:`FloatCheckpoint` and write a quantized-base directory atomically. Returns out_dir."""
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float dtype must be one of {', '.join(FLOAT_DTYPES)}, got {float_dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output directory {out_dir} exists and is not empty; choose a new path")
    config: ModelConfig = ckpt.config
    sd = ckpt.state_dict
    targets = [k for k in sd if _is_target(k, quant)]
    if not targets:
        raise ValueError("the checkpoint has no linear layers to quantize (expected HF names like *.q_proj.weight)")
    for k in targets:  # fail before any work if a group size does not fit
        quant.num_groups(sd[k].shape[1])

    t0 = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    base_scales: dict[str, torch.Tensor] = {}
    it = tqdm(targets, desc=f"quantizing to {quant.bits}-bit g{quant.group_size}", unit="linear", disable=not show_progress, file=sys.stderr)
    for k in it:
        name = k[: -len(".weight")]
        q, z, s = rtn_quantize(sd[k], quant.bits, quant.group_size, mse_clip=mse_clip)
        qweight = pack_bits(q, quant.bits)
        packed[name] = (qweight, z)
        base_scales[name] = s
        tensors[f"{name}.qweight"] = qweight
        tensors[f"{name}.zeros"] = z
    dtype = FLOAT_DTYPES[float_dtype]
    quantized_names = set(packed)
    for k, v in sd.items():
        owner = k.rsplit(".", 1)[0]
        if owner in quantized_names and k.endswith(".weight"):
            continue
        if config.tie_word_embeddings and k == "lm_head.weight":
            continue
        tensors[k] = v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
    fp = fingerprint(packed, quant.bits, quant.group_size)
    shapes = {n: tuple(s.shape) for n, s in base_scales.items()}
    base = BaseInfo(fingerprint=fp, bits=quant.bits, group_size=quant.group_size, shapes=shapes)
    seconds = time.perf_counter() - t0

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": BASE_FORMAT})
        (tmp / "base_scales.safetensors").write_bytes(scale_set_bytes(base_scales, base, {"version": 0}))
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(ckpt.tokenizer_config, indent=2))
        qc = {
            "format": BASE_FORMAT,
            "format_version": BASE_FORMAT_VERSION,
            "bits": quant.bits,
            "group_size": quant.group_size,
            "fingerprint": fp,
            "float_dtype": float_dtype,
            "mse_clip": mse_clip,
            "quantized_modules": sorted(quantized_names),
            "source": str(source),
            "quantize_seconds": round(seconds, 2),
        }
        (tmp / "quant_config.json").write_text(json.dumps(qc, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- loading
@dataclass
class QuantizedModel:
    """A loaded quantized base: the model (QuantLinear modules), its identity and its tokenizer."""

    path: Path
    model: LlamaForCausalLM
    config: ModelConfig
    quant: QuantConfig
    fingerprint: str
    base_scales: dict[str, torch.Tensor]  # name -> (N, G) float32
    tokenizer: object
    meta: dict

    @property
    def base_info(self) -> BaseInfo:
        return BaseInfo(
            fingerprint=self.fingerprint,
            bits=self.quant.bits,
            group_size=self.quant.group_size,
            shapes={n: tuple(s.shape) for n, s in self.base_scales.items()},
        )

    def quant_linears(self) -> dict[str, QuantLinear]:
        return {m.name: m for m in self.model.modules() if isinstance(m, QuantLinear)}


def is_quantized_base(path: str | Path) -> bool:
    return (Path(path) / "quant_config.json").is_file()


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> QuantizedModel:
    """Load a quantized-base directory written by :func:`quantize_checkpoint`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"quantized model directory not found: {path}")
    qc_path = path / "quant_config.json"
    if not qc_path.is_file():
        raise ValueError(f"{path} is not a scaleswap quantized base (no quant_config.json); run `scaleswap quantize` first")
    try:
        meta = json.loads(qc_path.read_text())
        config = ModelConfig.from_file(path / "config.json")
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"corrupt quantized base in {path}: {e}") from None
    if meta.get("format") != BASE_FORMAT or meta.get("format_version") != BASE_FORMAT_VERSION:
        raise ValueError(f"{path}: unknown base format {meta.get('format')!r} v{meta.get('format_version')!r}")
    quant = QuantConfig(bits=int(meta["bits"]), group_size=int(meta["group_size"]))
    from .scale_set import load_scale_set

    base = load_scale_set(path / "base_scales.safetensors")
    if base.metadata.get("fingerprint") != meta["fingerprint"]:
        raise ValueError(f"{path}: base_scales.safetensors does not belong to this base (fingerprint differs)")
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"corrupt or truncated {path / 'model.safetensors'}: {e}") from None

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    names = meta["quantized_modules"]
    for name in names:
        if f"{name}.qweight" not in tensors or name not in base.scales:
            raise ValueError(f"{path}: quantized module {name} is missing from the files")
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, attr)
        bias = tensors.pop(f"{name}.bias", None)
        weight = PackedLinearWeight(
            qweight=tensors.pop(f"{name}.qweight"),
            zeros=tensors.pop(f"{name}.zeros"),
            bits=quant.bits,
            in_features=old.in_features,
            out_features=old.out_features,
            group_size=quant.group_size,
            bias=bias.float() if bias is not None else None,
        )
        setattr(parent, attr, QuantLinear(name, weight, base.scales[name].to(device)))
    floats = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(floats, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: tensors missing {missing[:3]} / unexpected {result.unexpected_keys[:3]}")
    model.eval().requires_grad_(False)

    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(path)
    return QuantizedModel(
        path=path,
        model=model,
        config=config,
        quant=quant,
        fingerprint=meta["fingerprint"],
        base_scales={k: v for k, v in base.scales.items()},
        tokenizer=tokenizer,
        meta=meta,
    )


# ----------------------------------------------------------------------------- default base
def cache_dir() -> Path:
    return Path(os.environ.get("SCALESWAP_CACHE", Path.home() / ".cache" / "scaleswap"))


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_base(subdir: str, name: str, build) -> Path:
    """``$SCALESWAP_CACHE/<subdir>/<name>``, built once by ``build(out_dir)`` under a file lock (parallel
    processes build it once; ``quantize_checkpoint`` renames a finished directory into place)."""
    out = cache_dir() / subdir / name
    if is_quantized_base(out):
        return out
    with _file_lock(cache_dir() / subdir / ".lock"):
        if not is_quantized_base(out):
            build(out)
    return out


def ensure_default_base(bits: int = 4, group_size: int = 64, show_progress: bool = True) -> Path:
    """The default model quantized to (bits, group_size), quantized on first use and cached."""
    from .checkpoint import load_checkpoint
    from .default_model import default_model_path

    quant = QuantConfig(bits=bits, group_size=group_size)
    gs = "pc" if group_size == -1 else f"g{group_size}"

    def build(out: Path) -> None:
        src = default_model_path()
        print(f"scaleswap: quantizing the default model to {bits}-bit {gs} (first use; cached in {out})", file=sys.stderr)
        quantize_checkpoint(load_checkpoint(src), quant, out, source=str(src), show_progress=show_progress)

    return cached_base("bases", f"SmolLM2-135M-Instruct-{bits}bit-{gs}", build)
