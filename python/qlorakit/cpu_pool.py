"""Which threads run the Rust core's per-call CPU kernels (gemv and dequantize, once per layer call).

A model's forward interleaves them with torch's own kernels, which run on torch's OpenMP team. Two thread pools on
the same cores fight: the idle workers of each spin for a while after their parallel region, so the other's tasks
share cores with spinning threads (a 1.1B model decoded at 10-14 tokens/s on 2 cores, at 18 with OpenMP told not
to spin). By default qlorakit therefore runs these kernels as OpenMP parallel regions on torch's own runtime
(found among the libraries this process has loaded; none is ever loaded by qlorakit), with torch's thread count
(``torch.set_num_threads``). Results are the same on either pool: every task has a fixed order of operations.

``QLORAKIT_CPU_POOL`` chooses: ``torch`` (the default) or ``rayon`` (the core's own pool, sized by
``RAYON_NUM_THREADS``). Where torch has no OpenMP runtime loaded, the rayon pool is used. Offline work
(``quantize``, the checkpoint pipeline, scale search, GPTQ) always runs on rayon, sized by its ``threads`` option.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

from qlorakit import _core
from qlorakit.env_settings import env_choice

CPU_POOL_ENV = "QLORAKIT_CPU_POOL"
#: ``torch``: torch's OpenMP runtime; ``rayon``: the core's own pool.
CPU_POOLS = ("torch", "rayon")
#: File-name prefixes of the OpenMP runtimes torch builds link (GNU, LLVM, Intel); all export the GNU ABI.
_OPENMP_LIBRARIES = ("libgomp", "libomp", "libiomp5")


def loaded_openmp_runtime(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The path of the OpenMP runtime library mapped into this process, if exactly one is (Linux; else ``None``)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    found = {
        fields[-1]
        for fields in (line.split() for line in lines)
        if len(fields) >= 6 and Path(fields[-1]).name.startswith(_OPENMP_LIBRARIES)
    }
    return found.pop() if len(found) == 1 else None


@functools.cache
def _choice() -> str:
    return env_choice(CPU_POOL_ENV, CPU_POOLS, "CPU pool")


@functools.cache
def share_torch_threads() -> str | None:
    """Hands torch's OpenMP runtime to the core (once per process); returns its path, or ``None`` where the rayon
    pool runs the kernels. Raises :class:`~qlorakit.errors.QlorakitError` (on every call) for an unknown
    ``QLORAKIT_CPU_POOL``."""
    if _choice() != "torch":
        return None
    import torch

    if not torch.backends.openmp.is_available():
        return None
    path = loaded_openmp_runtime()
    if path is None:
        return None
    try:
        _core.share_openmp_runtime(path)
    except OSError as exc:  # not the GNU ABI, or another runtime shared first: the kernels keep rayon's pool
        warnings.warn(f"qlorakit's CPU kernels keep their own thread pool: {exc}", RuntimeWarning, stacklevel=2)
        return None
    return path


def cpu_pool() -> str:
    """``"torch"`` if the per-call kernels run on torch's OpenMP threads, else ``"rayon"``."""
    return "torch" if share_torch_threads() is not None else "rayon"
