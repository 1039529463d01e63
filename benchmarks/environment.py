"""The machine a benchmark ran on, recorded with every result: CPU, kernels, cores, load, versions, GPU."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import transformers

__all__ = ["cpu_model", "gpu_name", "load_average", "environment"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; what ``platform`` knows elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first GPU's name, or None. Asks nvidia-smi, not torch: initialising CUDA in this
    process would poison the ranks the CPU benchmarks fork (they must never touch CUDA)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines()
    return names[0].strip() if out.returncode == 0 and names else None


def load_average() -> float:
    """The 1-minute load average: runnable processes competing for the cores (0 on Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def environment(load_before: float, gpu: str | None = None) -> dict[str, object]:
    """Everything about the machine that moves a timing; call at the end of a measurement, with
    :func:`load_average` as it was at its start. ``gpu``: the device's name when one was used."""
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_model(),
        # The ATen kernel set in use (DEFAULT, AVX2, AVX512, ...): ATEN_CPU_CAPABILITY can lower it.
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_before": round(load_before, 2),
        "load_after": round(load_average(), 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": gpu if gpu is not None else gpu_name(),
    }
