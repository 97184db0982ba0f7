"""Device dispatch for the 4-bit operations — the one place that looks at the device.

CPU: the multithreaded Rust core writes straight into the torch buffer. CUDA: the CuPy kernels of
``kernels/cuda/`` (:mod:`qlorakit.kernels.cuda_ops`), bit-identical to the CPU for dequantization; without CuPy a
CUDA weight gets an error naming the extra to install.
"""

from __future__ import annotations

import threading

import torch

from qlorakit import _core
from qlorakit._native import byte_view, element_dtype_name
from qlorakit.errors import QlorakitError
from qlorakit.packed import PackedWeight
from qlorakit.quantization import decode_absmax, dequantize
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


def _cuda_ops():  # noqa: ANN202 - the module, imported on first CUDA use
    """:mod:`qlorakit.kernels.cuda_ops`, after checking that CuPy is importable (a clear error if not)."""
    from qlorakit.kernels.cupy_loader import require_cupy

    require_cupy()
    from qlorakit.kernels import cuda_ops

    return cuda_ops


def dequantize_weight(packed: PackedWeight, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
    """The weight ``[out_features, in_features]`` in ``dtype``, on the packed data's device.

    ``reuse`` (CPU): write into a shared per-thread scratch buffer instead of a new tensor; the
    result is then valid only until the next reusing call with the same shape and dtype
    (``Linear4bit`` uses it within one matmul). On CUDA every call returns a fresh tensor: the
    caching allocator makes that cheap, and a shared buffer would race with work queued on other streams."""
    device = packed.codes.device
    if device.type == "cpu":
        if dtype in _CORE_DTYPES:
            out = _workspace(tuple(packed.shape), dtype) if reuse else None
            return dequantize(packed, dtype, out=out)
        # float64 (gradcheck) and other dtypes: decode to float32 (exact), then widen.
        return dequantize(packed, torch.float32).to(dtype)
    if device.type == "cuda":
        cuda_ops = _cuda_ops()
        if dtype in cuda_ops.KERNEL_DTYPES:
            return cuda_ops.dequantize_4bit(packed, dtype)
        return cuda_ops.dequantize_4bit(packed, torch.float32).to(dtype)
    raise QlorakitError(f"no 4-bit dequantization for device {device}")


def matvec_weight(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x W^T + b`` for an input holding a single row, by a fused dequantize-and-multiply kernel (batch-1
    decoding: the 4-bit codes are read once, no dequantized weight is written), shaped ``[..., out_features]``
    like ``F.linear``; ``None`` where there is none (several rows, other dtypes) and the caller dequantizes
    and multiplies. CPU: the Rust core's ``gemv_4bit``; CUDA: the CuPy kernel. Both decode each weight element
    as dequantization does and sum in float32, so the result is dequantize-then-``F.linear`` up to the
    summation order."""
    if packed.codes.device != x.device or len(packed.shape) != 2:
        return None
    if x.numel() != packed.shape[1] or x.dim() == 0:
        return None
    if x.device.type == "cpu":
        # Without AVX-512 the fused kernel is the portable one, slower than dequantize + matmul.
        if x.dtype not in _CORE_DTYPES or not _core.GEMV_SIMD:
            return None
        out = _gemv_cpu(packed, x, bias)
    elif x.device.type == "cuda":
        cuda_ops = _cuda_ops()
        if x.dtype not in cuda_ops.KERNEL_DTYPES:
            return None
        out = cuda_ops.gemv_4bit(packed, x, bias)
    else:
        return None
    return out.reshape(*x.shape[:-1], packed.shape[0])


def _gemv_cpu(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``W x (+ bias)`` as ``[out_features]`` in ``x.dtype`` by the Rust core (multithreaded, GIL released).

    The double-quantized scales are decoded on every call rather than cached: it reads one byte per block
    (1/32 of the packed codes at blocksize 64) and keeps the layer's memory at its packed size."""
    rows, cols = packed.shape
    x = x.reshape(-1).contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    out = torch.empty(rows, dtype=x.dtype)
    _core.gemv_4bit(
        byte_view(packed.codes.contiguous(), "packed"),
        byte_view(decode_absmax(packed), "absmax"),
        packed.quant_type,
        packed.blocksize,
        rows,
        cols,
        byte_view(x, "x"),
        element_dtype_name(x, "x"),
        byte_view(out, "out"),
        byte_view(bias, "bias") if bias is not None else None,
    )
    return out
