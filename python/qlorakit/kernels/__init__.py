"""qlorakit's CUDA kernels: sources in ``kernels/cuda/`` (package data of this package), compiled at
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
