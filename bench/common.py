"""Shared helpers for the benchmarks: hardware description and timing."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def hardware() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()}; "
            f"{gpu}; torch {torch.__version__}; Python {platform.python_version()}")


def best_of(fn, repeats: int = 3) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn()`` (after it has run once)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
