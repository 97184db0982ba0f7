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


def cpu_model(fallback: str = "unknown") -> str:
    """The CPU's model name (else ``platform.processor()``, else ``fallback``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or fallback


def print_machine(threads: int | None, other_versions: str, threads_note: str = "") -> None:
    """Applies ``threads`` to torch, then prints the CPU, the versions (python, qlorakit, torch, then
    ``other_versions``) and the thread settings (then ``threads_note``)."""
    import torch

    import qlorakit

    if threads is not None:
        torch.set_num_threads(threads)
    n_rayon, source = rayon_threads()
    print(f"CPU: {cpu_model()}; {len(os.sched_getaffinity(0))} cores available (os.cpu_count()={os.cpu_count()})")
    print(
        f"versions: python {platform.python_version()}, qlorakit {qlorakit.__version__}, torch {torch.__version__}, "
        f"{other_versions}"
    )
    print(
        f"threads: qlorakit (rayon) {n_rayon} [{source}], torch.get_num_threads() {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}{threads_note}"
    )
