"""Device dispatch for dequantizing a packed weight — the one place that looks at the device.

CPU: the multithreaded Rust core writes straight into the torch buffer. CUDA: the CuPy
kernels are a separate milestone; until they land a CUDA weight gets a clear error.
"""

from __future__ import annotations

import torch

from qlorakit.errors import QlorakitError
from qlorakit.packed import PackedWeight
from qlorakit.quantization import dequantize
from qlorakit.tables import ELEMENT_DTYPES

_CORE_DTYPES = tuple(ELEMENT_DTYPES.values())


def dequantize_weight(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[out_features, in_features]`` in ``dtype``, on the packed data's device."""
    device = packed.packed.device
    if device.type == "cpu":
        if dtype in _CORE_DTYPES:
            return dequantize(packed, dtype)
        # float64 (gradcheck) and other dtypes: decode to float32 (exact), then widen.
        return dequantize(packed, torch.float32).to(dtype)
    if device.type == "cuda":
        raise QlorakitError(
            "dequantizing on CUDA needs qlorakit's CuPy kernels, which this version does not ship yet; "
            "keep the model on the CPU for now"
        )
    raise QlorakitError(f"no 4-bit dequantization for device {device}")
