"""What the examples' studies share in their reports: mean ± sd over seeds, and the machine a study ran on."""

import math
import multiprocessing
import platform
from pathlib import Path

import torch


def stats(values) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def machine() -> str:
    """The CPU model, its cores and the torch release."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {multiprocessing.cpu_count()} cores, torch {torch.__version__}"
