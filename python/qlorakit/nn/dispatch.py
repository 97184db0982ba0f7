"""Device dispatch for dequantizing a packed weight — the one place that looks at the device.

CPU: the multithreaded Rust core writes straight into the torch buffer. CUDA: the CuPy
kernels are a separate milestone; until they land a CUDA weight gets a clear error.
"""

from __future__ import annotations

import threading

import torch

from qlorakit.errors import QlorakitError
from qlorakit.packed import PackedWeight
from qlorakit.quantization import dequantize
from qlorakit.tables import ELEMENT_DTYPES

_CORE_DTYPES = tuple(ELEMENT_DTYPES.values())
_workspaces = threading.local()


def _workspace(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer for one weight shape and dtype, reused across calls and
    layers: writing into memory already touched is several times faster than filling a
    fresh allocation (page faults), and only one weight per shape is ever held."""
    buffers = getattr(_workspaces, "buffers", None)
    if buffers is None:
        buffers = _workspaces.buffers = {}
    key = (shape, dtype)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=dtype)
    return buffers[key]


def dequantize_weight(packed: PackedWeight, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
    """The weight ``[out_features, in_features]`` in ``dtype``, on the packed data's device.

    ``reuse``: write into a shared per-thread scratch buffer instead of a new tensor; the
    result is then valid only until the next reusing call with the same shape and dtype
    (``Linear4bit`` uses it within one matmul)."""
    device = packed.packed.device
    if device.type == "cpu":
        if dtype in _CORE_DTYPES:
            out = _workspace(tuple(packed.shape), dtype) if reuse else None
            return dequantize(packed, dtype, out=out)
        # float64 (gradcheck) and other dtypes: decode to float32 (exact), then widen.
        return dequantize(packed, torch.float32).to(dtype)
    if device.type == "cuda":
        raise QlorakitError(
            "dequantizing on CUDA needs qlorakit's CuPy kernels, which this version does not ship yet; "
            "keep the model on the CPU for now"
        )
    raise QlorakitError(f"no 4-bit dequantization for device {device}")
