"""qlorakit's CUDA kernels: sources in ``cuda/`` (shipped inside this package as ``kernels/cuda``), compiled at
run time by CuPy (:mod:`qlorakit.kernels.cupy_loader`), by NVRTC in CI (``tools/check_kernels.py``) and by the
host compiler for the CPU emulation in the tests.

Importing this package needs neither torch nor CuPy."""

from qlorakit.kernels.sources import (
    CUDA_DIR,
    NVRTC_OPTIONS,
    kernel_files,
    kernel_names,
    kernel_source,
    kernel_source_from_text,
    kernel_variants,
)

__all__ = [
    "CUDA_DIR",
    "NVRTC_OPTIONS",
    "kernel_files",
    "kernel_names",
    "kernel_source",
    "kernel_source_from_text",
    "kernel_variants",
]
