"""``quantize`` / ``dequantize``: blockwise NF4/FP4 with double quantization on the CPU.

The work is done by the Rust core (multithreaded, GIL released) directly on the
memory of the given tensor or array; nothing is copied on the way in.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from qlorakit import _core
from qlorakit._core import QuantizationError
from qlorakit._native import ArrayLike, as_tensor, byte_view, element_dtype_name
from qlorakit.cpu_pool import share_torch_threads
from qlorakit.formats import DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE
from qlorakit.packed import PackedWeight, QuantLayout
from qlorakit.tables import dynamic_map


def quantize(
    x: ArrayLike,
    quant_type: str = "nf4",
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    *,
    scale_search: bool = False,
    importance: ArrayLike | None = None,
    out: PackedWeight | None = None,
) -> PackedWeight:
    """Quantizes ``x`` (float32/bfloat16/float16 torch tensor, or float32/float16 numpy
    array; contiguous, on the CPU) blockwise to 4 bits.

    Output bytes equal bitsandbytes' ``quantize_4bit`` on the same input (see README).
    ``out``: a ``PackedWeight`` of the same layout whose buffers are reused, which
    avoids fresh allocations when quantizing many tensors of one shape.

    ``scale_search``: pick each block's scale to minimize its squared reconstruction error
    (largest values may clip) instead of absmax — same format, lower error, no longer
    byte-equal to bitsandbytes. The codes are chosen for the scales as stored (after
    double quantization); if the search does not beat absmax on this tensor, absmax's
    result (bitsandbytes' bytes) is returned. ``importance``: optional non-negative
    weights, one per input column (``x.shape[-1]``), e.g. mean squared activations of the
    layer's input (:func:`qlorakit.collect_importance`); the search then minimizes the
    weighted error.

    Raises :class:`~qlorakit.errors.NonFiniteError` on NaN/Inf and
    :class:`~qlorakit.errors.QuantizationError` on any other invalid input.
    """
    _core.check_format(quant_type, blocksize)  # before the buffers are sized by it
    tensor = as_tensor(x)
    dtype = element_dtype_name(tensor, "input")
    n = tensor.numel()
    if n == 0:
        raise QuantizationError("input: cannot quantize an empty tensor")
    blocks = math.ceil(n / blocksize)
    if out is None:
        out = _empty_packed(tuple(tensor.shape), tensor.dtype, quant_type, blocksize, double_quant)
    elif (out.shape, out.quant_type, out.blocksize, out.double_quant) != (
        tuple(tensor.shape),
        quant_type,
        blocksize,
        double_quant,
    ):
        raise QuantizationError("out: PackedWeight layout does not match the input and options")
    out.layout = replace(out.layout, dtype=tensor.dtype)
    if importance is not None and not scale_search:
        raise QuantizationError("importance: only used with scale_search=True")
    if scale_search:
        _search_into(out, tensor, dtype, importance)
        return out
    absmax = torch.empty(blocks, dtype=torch.float32) if double_quant else out.absmax
    _core.quantize_4bit(
        byte_view(tensor, "input"),
        dtype,
        quant_type,
        blocksize,
        byte_view(out.codes, "packed"),
        byte_view(absmax, "absmax"),
    )
    if double_quant:
        assert out.nested_absmax is not None
        offset = _core.double_quantize(
            byte_view(absmax, "absmax"),
            byte_view(out.absmax, "nested codes"),
            byte_view(out.nested_absmax, "nested scales"),
        )
        out.layout = replace(out.layout, offset=offset)
    return out


def _search_into(out: PackedWeight, tensor: torch.Tensor, dtype: str, importance: ArrayLike | None) -> None:
    weights = None
    if importance is not None:
        weights = as_tensor(importance).to(torch.float32).contiguous()
        if weights.dim() != 1 or weights.numel() != tensor.shape[-1]:
            raise QuantizationError(
                f"importance: expected one weight per input column ({tensor.shape[-1]}), "
                f"got shape {tuple(weights.shape)}"
            )
    nested = out.nested_absmax
    report = _core.quantize_4bit_searched(
        byte_view(tensor, "input"),
        dtype,
        out.quant_type,
        out.blocksize,
        byte_view(out.codes, "packed"),
        byte_view(out.absmax, "nested codes" if nested is not None else "absmax"),
        byte_view(nested, "nested scales") if nested is not None else None,
        byte_view(weights, "importance") if weights is not None else None,
    )
    out.layout = replace(out.layout, offset=report.offset)


def empty_buffers(
    numel: int, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Uninitialized codes ``[(numel + 1) // 2, 1]`` (uint8), absmax (uint8 nested codes with double
    quantization, else float32 scales) and nested absmax (float32, or ``None``) of a tensor of ``numel``
    elements: the buffers the core quantizes into, shaped as bitsandbytes stores them."""
    blocks = math.ceil(numel / blocksize)
    codes = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8)
    if not double_quant:
        return codes, torch.empty(blocks, dtype=torch.float32), None
    nested = torch.empty(math.ceil(blocks / NESTED_BLOCKSIZE), dtype=torch.float32)
    return codes, torch.empty(blocks, dtype=torch.uint8), nested


def _empty_packed(
    shape: tuple[int, ...], dtype: torch.dtype, quant_type: str, blocksize: int, double_quant: bool
) -> PackedWeight:
    codes, absmax, nested = empty_buffers(math.prod(shape), blocksize, double_quant)
    layout = QuantLayout(quant_type, blocksize, shape, dtype, offset=0.0 if double_quant else None)
    return PackedWeight(codes=codes, absmax=absmax, nested_absmax=nested, layout=layout)


def decode_absmax(packed: PackedWeight) -> torch.Tensor:
    """The float32 block scales as the decoder uses them.

    With double quantization: ``map[code] * scale`` rounded to float32, then ``+ offset``
    rounded again (no fused multiply-add), as bitsandbytes' ``dequantize_4bit`` does.
    """
    if packed.nested_absmax is None:
        return packed.absmax.float().contiguous()
    if packed.nested_dtype != torch.float32:
        return decode_absmax_low_precision(packed)
    out = torch.empty(packed.absmax.numel(), dtype=torch.float32)
    _core.dequantize_absmax(
        byte_view(packed.absmax.contiguous(), "nested codes"),
        byte_view(packed.nested_absmax.float().contiguous(), "nested scales"),
        float(packed.offset),  # type: ignore[arg-type]
        byte_view(out, "absmax out"),
    )
    return out


def core_scale_args(packed: PackedWeight) -> tuple[memoryview, memoryview | None, float]:
    """The block scales as the Rust core's ``dequantize_4bit`` / ``gemv_4bit`` take them: ``(absmax, nested,
    offset)``. Double-quantized scales go in as stored (uint8 codes, float32 nested scales, the offset) and are
    decoded inline by the core, block by block, bit-identical to :func:`decode_absmax` but without allocating
    the float32 absmax; plain scales, and nested ones recorded in a low-precision ``nested_dtype`` (decoded here
    as bitsandbytes does), go in as float32 absmax with ``nested`` None."""
    if packed.nested_absmax is None or packed.nested_dtype != torch.float32:
        return byte_view(decode_absmax(packed), "absmax"), None, 0.0
    codes = byte_view(packed.absmax.contiguous(), "nested codes")
    nested = byte_view(packed.nested_absmax.float().contiguous(), "nested scales")
    return codes, nested, float(packed.offset)  # type: ignore[arg-type]


def decode_absmax_low_precision(packed: PackedWeight) -> torch.Tensor:
    """Scales of a file that records a non-float32 ``nested_dtype`` (bitsandbytes writes
    ``"bfloat16"`` after a CPU inference pass): bitsandbytes decodes the nested level to
    that dtype, adds the offset in it, then widens to float32; we do the same, on the scales'
    device (the CUDA path uses this too). Each step is spelled out so that the rounding does not
    depend on a device's type-promotion rules: ``map[code] * scale`` in float32, rounded to the
    nested dtype; the offset rounded to it; their float32 sum rounded to it; widened to float32."""
    assert packed.nested_absmax is not None and packed.offset is not None
    device = packed.absmax.device
    nested_dtype = packed.nested_dtype
    codes = packed.absmax.long()
    scales = packed.nested_absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
    decoded = (dynamic_map().to(device)[codes] * scales).to(nested_dtype)
    offset = torch.tensor(packed.offset, dtype=torch.float32).to(nested_dtype).float().to(device)
    return (decoded.float() + offset).to(nested_dtype).float()


def dequantize(
    packed: PackedWeight,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decodes ``packed`` to a tensor of its original shape.

    ``dtype``: float32, bfloat16 or float16 (default: the original dtype). ``out``: a
    contiguous CPU tensor of that shape and dtype to write into (reused buffers are much
    faster than fresh allocations). Each element is ``code * absmax`` in float32,
    rounded once to ``dtype`` — equal to bitsandbytes' ``dequantize_4bit``. A weight on a CUDA device
    is decoded there by the ``qlorakit::dequantize_4bit`` op (CuPy kernels, bit-identical to the CPU).
    """
    dtype = dtype or (out.dtype if out is not None else packed.dtype)
    if packed.codes.device.type != "cpu":
        return _dequantize_on_device(packed, dtype, out)
    if out is None:
        out = torch.empty(packed.shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != tuple(packed.shape):
        raise QuantizationError(
            f"out: expected shape {list(packed.shape)} and dtype {dtype}, got {list(out.shape)} {out.dtype}"
        )
    dtype_name = element_dtype_name(out, "out")
    absmax, nested, offset = core_scale_args(packed)
    share_torch_threads()
    _core.dequantize_4bit(
        byte_view(packed.codes.contiguous(), "packed"),
        absmax,
        packed.quant_type,
        packed.blocksize,
        byte_view(out, "out"),
        dtype_name,
        nested,
        offset,
    )
    return out


def _dequantize_on_device(packed: PackedWeight, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """:func:`dequantize` of a weight that is not on the CPU, through the op registry (any shape: the op
    decodes a flat ``[1, numel]`` view)."""
    from qlorakit import ops

    flat = packed.with_layout(shape=(1, packed.numel))
    result = ops.dequantize_4bit(flat, dtype).reshape(packed.shape)
    if out is None:
        return result
    if out.dtype != dtype or tuple(out.shape) != tuple(packed.shape) or out.device != result.device:
        raise QuantizationError(
            f"out: expected shape {list(packed.shape)}, dtype {dtype} on {result.device}, "
            f"got {list(out.shape)} {out.dtype} on {out.device}"
        )
    return out.copy_(result)
