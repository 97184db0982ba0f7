"""Zero-copy byte views of torch tensors and numpy arrays for the native core."""

from __future__ import annotations

import ctypes
from typing import Union

import numpy as np
import torch

from qlorakit._core import QuantizationError
from qlorakit.tables import ELEMENT_DTYPES

ArrayLike = Union[torch.Tensor, np.ndarray]

_NUMPY_DTYPES: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
}


def as_tensor(x: ArrayLike, what: str = "input") -> torch.Tensor:
    """Returns ``x`` as a CPU torch tensor sharing its memory (numpy arrays are wrapped)."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _NUMPY_DTYPES:
            raise QuantizationError(
                f"{what}: unsupported numpy dtype {x.dtype}; expected float32 or float16 "
                "(pass a torch tensor for bfloat16)"
            )
        if not x.flags.c_contiguous:
            raise QuantizationError(f"{what}: array must be C-contiguous (use np.ascontiguousarray)")
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise QuantizationError(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


#: The core's element type name of each torch dtype it takes.
_ELEMENT_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in ELEMENT_DTYPES.items()}


def element_dtype_name(t: torch.Tensor, what: str) -> str:
    """The core's name for a tensor's float dtype, or a clear error."""
    name = _ELEMENT_NAMES.get(t.dtype)
    if name is None:
        raise QuantizationError(f"{what}: unsupported dtype {t.dtype}; expected float32, bfloat16 or float16")
    return name


def byte_view(t: torch.Tensor, what: str) -> memoryview:
    """The memory of a contiguous CPU tensor as a writable byte buffer (no copy), keeping the tensor alive.

    A ctypes array over the tensor's data rather than ``Tensor.numpy()``: numpy views make a tensor's
    storage non-resizable for good, and FSDP2 frees and re-allocates the storage of every gathered
    parameter (``storage.resize_``) between passes."""
    if t.device.type != "cpu":
        raise QuantizationError(f"{what}: tensor is on {t.device}; the CPU core needs a CPU tensor")
    if not t.is_contiguous():
        raise QuantizationError(f"{what}: tensor must be contiguous (call .contiguous() first)")
    nbytes = t.numel() * t.element_size()
    view = (ctypes.c_uint8 * nbytes).from_address(t.data_ptr()) if nbytes else (ctypes.c_uint8 * 0)()
    view.tensor = t  # the buffer borrows the tensor's memory: keep the tensor alive as long as the buffer
    return memoryview(view).cast("B")


#: Byte views by ``(address, bytes)``: :func:`address_view` builds one per memory region and hands it out again.
_ADDRESS_VIEWS: dict[tuple[int, int], memoryview] = {}
#: Regions remembered before the table starts over (a model's weights and its activation buffers fit).
_MAX_ADDRESS_VIEWS = 8192


def memory_region(t: torch.Tensor) -> tuple[int, int]:
    """``(address, bytes)`` of a contiguous tensor's memory: what :func:`address_view` keys its views by."""
    return t.data_ptr(), t.numel() * t.element_size()


def address_view(t: torch.Tensor, what: str) -> memoryview:
    """:func:`byte_view` for the per-layer-call hot path: the view of a contiguous CPU tensor's memory, built
    once per ``(address, size)`` and reused (building one costs more than a small layer's kernel).

    The view does not keep ``t`` alive: the caller must hold ``t`` (not a temporary) until the view is no
    longer used. A view looked up with a live tensor always covers that tensor's memory, whichever tensor the
    region belonged to when the view was built."""
    if not t.is_cpu:  # (is_cpu, not device.type: this runs for every tensor of every layer call)
        raise QuantizationError(f"{what}: tensor is on {t.device}; the CPU core needs a CPU tensor")
    if not t.is_contiguous():
        raise QuantizationError(f"{what}: tensor must be contiguous (call .contiguous() first)")
    key = memory_region(t)
    view = _ADDRESS_VIEWS.get(key)
    if view is None:
        if len(_ADDRESS_VIEWS) >= _MAX_ADDRESS_VIEWS:
            _ADDRESS_VIEWS.clear()
        address, nbytes = key
        region = (ctypes.c_uint8 * nbytes).from_address(address) if nbytes else (ctypes.c_uint8 * 0)()
        view = _ADDRESS_VIEWS[key] = memoryview(region).cast("B")
    return view
