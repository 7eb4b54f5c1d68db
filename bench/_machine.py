"""Describe the machine a benchmark ran on (stated beside every table and JSON)."""
from __future__ import annotations

import os
import platform


def machine() -> dict[str, object]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def machine_line() -> str:
    m = machine()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"machine: {m['cpu']}, {m['cores']} cores, {m.get('mem_gib', '?')} GiB{gpu}; torch {m['torch']} ({m['torch_threads']} threads)"
