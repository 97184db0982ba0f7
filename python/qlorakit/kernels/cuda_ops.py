"""The 4-bit operations on CUDA tensors: dequantize and the batch-1 matrix-vector product.

Called by :mod:`qlorakit.nn.dispatch` (the one place that looks at the device); needs CuPy.
"""

from __future__ import annotations

import torch

from qlorakit.errors import QlorakitError
from qlorakit.kernels.cupy_loader import get_kernel, launch
from qlorakit.kernels.launches import (
    DEQUANTIZE_ALIGNMENT,
    GEMV_VECTOR_ALIGNMENT,
    GEMV_VECTOR_COLS,
    KernelLaunch,
    dequantize_4bit_launch,
    gemv_4bit_launch,
)
from qlorakit.packed import PackedWeight
from qlorakit.quantization import decode_absmax_low_precision
from qlorakit.tables import dtype_name

#: Compute dtypes the kernels read and write.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run(spec: KernelLaunch, device: torch.device) -> None:
    launch(get_kernel(spec.file, spec.name, device), spec.grid, spec.block, spec.args)


def _aligned(tensor: torch.Tensor, alignment: int) -> torch.Tensor:
    """``tensor`` contiguous and starting on an ``alignment``-byte boundary (a copy only if it is not: fresh
    CUDA allocations are aligned, views into a larger buffer may not be)."""
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % alignment == 0 else tensor.clone()


def _scales(packed: PackedWeight, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(absmax, nested_absmax, offset) as the kernels take them, all on ``device``."""
    for name, tensor in (("absmax", packed.absmax), ("nested_absmax", packed.nested_absmax)):
        if tensor is not None and tensor.device != device:
            raise QlorakitError(f"{name} is on {tensor.device} but the packed codes are on {device}")
    if packed.nested_absmax is None:
        return packed.absmax.float().contiguous(), None, None
    if packed.nested_dtype != torch.float32:
        return decode_absmax_low_precision(packed), None, None
    return packed.absmax.contiguous(), packed.nested_absmax.float().contiguous(), float(packed.offset)  # type: ignore[arg-type]


def dequantize_4bit(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``packed`` (on a CUDA device) decoded to a new tensor of its shape in ``dtype`` (float32, float16 or
    bfloat16), bit-identical to :func:`qlorakit.dequantize` on the CPU."""
    if dtype not in KERNEL_DTYPES:
        raise QlorakitError(f"the CUDA dequantize kernels write float32, float16 or bfloat16, not {dtype}")
    device = packed.codes.device
    codes = _aligned(packed.codes.reshape(-1), DEQUANTIZE_ALIGNMENT["packed"])
    absmax, nested_absmax, offset = _scales(packed, device)
    out = torch.empty(packed.shape, dtype=dtype, device=device)
    assert out.data_ptr() % DEQUANTIZE_ALIGNMENT["out"] == 0  # the caching allocator aligns to 512 bytes
    spec = dequantize_4bit_launch(
        packed=codes,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        quant_type=packed.quant_type,
        blocksize=packed.blocksize,
        numel=packed.numel,
        out=out,
        dtype=dtype_name(dtype),
    )
    _run(spec, device)
    return out


def gemv_4bit(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``W @ x (+ bias)`` for the 2-D weight ``packed`` ``[rows, cols]`` and one input row ``x`` (``cols``
    elements; float32, float16 or bfloat16), without materializing W. Returns ``[rows]`` in ``x.dtype``."""
    if len(packed.shape) != 2:
        raise QlorakitError(f"gemv needs a 2-D weight, got shape {packed.shape}")
    rows, cols = packed.shape
    if x.dtype not in KERNEL_DTYPES:
        raise QlorakitError(f"the CUDA gemv kernels take float32, float16 or bfloat16, not {x.dtype}")
    if x.numel() != cols:
        raise QlorakitError(f"gemv needs one input row of {cols} elements, got shape {list(x.shape)}")
    device = packed.codes.device
    codes = packed.codes.reshape(-1).contiguous()
    x = x.reshape(-1).contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    absmax, nested_absmax, offset = _scales(packed, device)
    out = torch.empty(rows, dtype=x.dtype, device=device)
    vectorized = (
        cols % GEMV_VECTOR_COLS == 0
        and codes.data_ptr() % GEMV_VECTOR_ALIGNMENT == 0
        and x.data_ptr() % GEMV_VECTOR_ALIGNMENT == 0
    )
    spec = gemv_4bit_launch(
        packed=codes,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        quant_type=packed.quant_type,
        blocksize=packed.blocksize,
        rows=rows,
        cols=cols,
        x=x,
        bias=bias,
        out=out,
        dtype=dtype_name(x.dtype),
        vectorized=vectorized,
    )
    _run(spec, device)
    return out
