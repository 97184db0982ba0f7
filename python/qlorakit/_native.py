"""Zero-copy byte views of torch tensors and numpy arrays for the native core."""

from __future__ import annotations

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


def element_dtype_name(t: torch.Tensor, what: str) -> str:
    """The core's name for a tensor's float dtype, or a clear error."""
    for name, dtype in ELEMENT_DTYPES.items():
        if t.dtype == dtype:
            return name
    raise QuantizationError(f"{what}: unsupported dtype {t.dtype}; expected float32, bfloat16 or float16")


def byte_view(t: torch.Tensor, what: str) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's memory (no copy)."""
    if t.device.type != "cpu":
        raise QuantizationError(f"{what}: tensor is on {t.device}; the CPU core needs a CPU tensor")
    if not t.is_contiguous():
        raise QuantizationError(f"{what}: tensor must be contiguous (call .contiguous() first)")
    if t.requires_grad:
        t = t.detach()
    return t.reshape(-1).view(torch.uint8).numpy()
