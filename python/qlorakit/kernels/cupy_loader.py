"""The one loader of qlorakit's CUDA kernels: compiles with CuPy's ``RawModule`` (NVRTC) once per device,
file and defines, and launches on PyTorch's current stream with torch memory passed by pointer (no copies).

CuPy is an optional dependency (extras ``cuda12`` / ``cuda13``); nothing here imports it before it is needed.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from qlorakit.errors import QlorakitError
from qlorakit.kernels.sources import NVRTC_OPTIONS, kernel_source

INSTALL_HINT = "pip install 'qlorakit[cuda12]' (CUDA 12 drivers) or pip install 'qlorakit[cuda13]' (CUDA 13)"

_lock = threading.Lock()
_modules: dict[tuple[int, str, tuple[tuple[str, str], ...]], Any] = {}
_kernels: dict[tuple[int, str, tuple[tuple[str, str], ...], str], Any] = {}
_streams: dict[tuple[int, int], Any] = {}


def require_cupy() -> ModuleType:
    """``cupy``, or a :class:`~qlorakit.errors.QlorakitError` saying which extra to install."""
    try:
        import cupy
    except ImportError as exc:
        raise QlorakitError(f"qlorakit's CUDA kernels need CuPy, which is not installed: {INSTALL_HINT}") from exc
    return cupy


def _device_index(device: torch.device | str | int) -> int:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA kernels need a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def get_kernel(file: str, name: str, device: torch.device | str | int, defines: Mapping[str, str] | None = None) -> Any:
    """Kernel ``name`` of ``kernels/cuda/FILE`` compiled for ``device`` (a CuPy ``RawKernel``). The module is compiled
    once per (device, file, defines) in this process; CuPy also caches the binary on disk."""
    cupy = require_cupy()
    index = _device_index(device)
    define_key = tuple(sorted((defines or {}).items()))
    key = (index, file, define_key, name)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _kernels.get(key)
        if kernel is None:
            with cupy.cuda.Device(index):
                module = _modules.get(key[:3])
                if module is None:
                    module = cupy.RawModule(code=kernel_source(file, defines), options=NVRTC_OPTIONS)
                    _modules[key[:3]] = module
                kernel = _kernels[key] = module.get_function(name)
    return kernel


def current_stream(index: int) -> Any:
    """PyTorch's current stream on device ``index``, as a CuPy stream object (cached per stream)."""
    cupy = require_cupy()
    handle = torch.cuda.current_stream(index).cuda_stream
    stream = _streams.get((index, handle))
    if stream is None:
        with warnings.catch_warnings():
            # CuPy 14 deprecates ExternalStream (for Stream.from_external, which CuPy 13 lacks) and warns on
            # every construction; the device id lets CuPy check the stream against the current device.
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _streams[(index, handle)] = cupy.cuda.ExternalStream(handle, index)
    return stream


def launch(
    kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: Sequence[object], shared_mem: int = 0
) -> None:
    """Launches ``kernel`` on PyTorch's current stream of the device its tensor arguments live on.

    ``args``: torch CUDA tensors (passed as device pointers, no copy; keep them alive and unmodified until the
    stream reaches the kernel, as with any torch op), ``None`` (a null pointer), or numpy scalars of the
    kernel's C parameter types (``np.int32``, ``np.int64``, ``np.float32``, ...). Python ints and floats are
    refused: their C type would be a guess."""
    cupy = require_cupy()
    device: torch.device | None = None
    values: list[object] = []
    for position, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            if arg.device.type != "cuda":
                raise ValueError(f"kernel argument {position} is a tensor on {arg.device}, not on a CUDA device")
            if device is None:
                device = arg.device
            elif arg.device != device:
                raise ValueError(f"kernel argument {position} is on {arg.device}, the others on {device}")
            values.append(np.uint64(arg.data_ptr()))
        elif arg is None:
            values.append(np.uint64(0))
        elif isinstance(arg, np.generic):
            values.append(arg)
        else:
            raise TypeError(
                f"kernel argument {position}: expected a CUDA tensor, None or a numpy scalar, got {type(arg).__name__}"
            )
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index), current_stream(index):
        kernel(tuple(grid), tuple(block), tuple(values), shared_mem=shared_mem)
