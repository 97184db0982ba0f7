"""Helpers shared by the benchmark scripts: thread settings, a description of the machine, shape arguments and
the best-of timing harness."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    from qlorakit.cpu_pool import CPU_POOL_ENV, cpu_pool

    print(
        f"threads: qlorakit offline work (rayon) {n_rayon} [{source}], qlorakit per-call kernels on "
        f"{cpu_pool()}'s pool [{CPU_POOL_ENV}={os.environ.get(CPU_POOL_ENV, '(unset)')}], "
        f"torch.get_num_threads() {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}{threads_note}"
    )
    from qlorakit.nn.cpu_matmul import CPU_MATMUL_ENV, matmul_dtype, onednn_multiplies
    from qlorakit.tables import dtype_name

    routes = ", ".join(
        f"{dtype_name(dtype)} in {dtype_name(matmul_dtype(dtype))} "
        f"(oneDNN: {'yes' if onednn_multiplies(dtype) else 'no'})"
        for dtype in (torch.bfloat16, torch.float16)
    )
    print(f"CPU dense matmuls of 4-bit layers: {routes} [{CPU_MATMUL_ENV}={os.environ.get(CPU_MATMUL_ENV, '(unset)')}]")


def parse_dims(text: str, what: str = "shape", example: str = "8x512", count: int | None = None) -> tuple[int, ...]:
    """``"8x512"`` -> ``(8, 512)``: positive dimensions joined by 'x' (exactly ``count`` of them if given)."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}; expected e.g. {example}") from None
    if count is not None and (len(dims) != count or any(d <= 0 for d in dims)):
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}; expected {count} positive dimensions joined by 'x'")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}; dimensions must be positive")
    return dims


class TimedCall:
    """Best-of timing for a dataclass with the fields ``fn``, ``best`` (start at ``math.inf``), ``reps``
    (start at 0) and ``last`` (the latest result, kept so that the work is not optimized away)."""

    fn: Callable[[], Any]
    best: float
    reps: int
    last: Any

    def time_once(self) -> float:
        start = time.perf_counter()
        self.last = self.fn()
        elapsed = time.perf_counter() - start
        self.best = min(self.best, elapsed)
        self.reps += 1
        return elapsed


def time_interleaved(
    candidates: Sequence[TimedCall],
    rounds: int,
    pause_s: float,
    budget_s: float | None = None,
    max_factor: int = 1,
) -> None:
    """One untimed warm-up call each, then ``rounds`` round-robin timed calls, best kept.

    Interleaving makes a burst of load from another process hit every candidate alike instead of all
    repetitions of one of them; the pause before each call keeps the previous library's spinning pool
    threads (rayon, OpenMP) off the cores. With ``budget_s``, fast candidates get more rounds: about
    ``budget_s`` of timed calls, at most ``max_factor`` x ``rounds``, as measured on the first timed round
    (the warm-up round includes one-off costs such as bitsandbytes' eval() repacking).
    """

    def one_round() -> float:
        total = 0.0
        for cand in candidates:
            time.sleep(pause_s)
            total += cand.time_once()
        return total

    for cand in candidates:
        cand.last = cand.fn()
    first = one_round()
    if budget_s is not None:
        rounds = max(rounds, min(max_factor * rounds, int(budget_s / max(first, 1e-9))))
    for _ in range(rounds - 1):
        one_round()
