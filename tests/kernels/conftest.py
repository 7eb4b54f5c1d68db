"""Fixtures for kernel tests."""

import pytest


@pytest.fixture
def no_int4(monkeypatch):
    """Force the CPU path's float32 dense branch at every M."""
    from scaleswap.kernels import cpu_path

    monkeypatch.setenv("SCALESWAP_CPU_INT4_MAX_ROWS", "0")
    cpu_path.int4_max_rows.cache_clear()
    yield
    monkeypatch.delenv("SCALESWAP_CPU_INT4_MAX_ROWS")
    cpu_path.int4_max_rows.cache_clear()
