"""What a timing was measured on: the CPU, its core count and widest vector extension, the torch build.

Training speed on a CPU depends on more than its core count: the tiny curriculum's one-fit run took 16-19 min on 2
cores of an AVX-512 EPYC and 28 min on 2 cores of an AVX2-only one (docs/ablation.md), so every recorded runtime
carries this description.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def vector_extension() -> str:
    """The widest x86 SIMD extension the CPU reports ('avx512', 'avx2', 'other'; 'unknown' without cpuinfo)."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        return "unknown"
    flags = set(flags.split())
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def describe() -> dict:
    import torch

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "vector_extension": vector_extension(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def label(machine: dict) -> str:
    """One line for a table: 'AMD EPYC, 2 cores, avx2'."""
    return f"{machine.get('cpu', 'unknown')}, {machine.get('cpu_count', '?')} cores, {machine.get('vector_extension', '?')}"
