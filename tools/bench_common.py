"""Helpers shared by the benchmark scripts: thread settings and a description of the machine."""

from __future__ import annotations

import logging
import os
import platform

#: Loggers that print harmless warnings on import (bitsandbytes' optional 'kernels' package).
QUIET_LOGGERS = ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree")


def configure_threads(threads: int | None) -> None:
    """Sets the thread environment; must run before qlorakit/torch/bitsandbytes are imported."""
    if threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def rayon_threads() -> tuple[int, str]:
    """Threads rayon will use: RAYON_NUM_THREADS, else all available cores."""
    env = os.environ.get("RAYON_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "RAYON_NUM_THREADS"
    return len(os.sched_getaffinity(0)), "all available cores"


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
