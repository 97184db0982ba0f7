"""Device dispatch for the 4-bit operations — the one place that looks at the device.

CPU: the multithreaded Rust core writes straight into the torch buffer. Inputs of 1 to ``_core.GEMV_MAX_BATCH`` rows
take its fused dequantize-and-multiply kernel (:func:`matvec_weight`): the CPU's best (AVX512-BF16 for bfloat16
inputs, AVX-512, AVX2 + FMA for bfloat16 inputs, AVX2, else portable), or the one the environment variable
``QLORAKIT_CPU_KERNEL`` forces (``portable``, ``avx2``, ``avx2bf16``, ``avx512``, ``avx512bf16``; read once per
process; an unknown name or a kernel the CPU lacks raises :class:`~qlorakit.errors.QuantizationError` on the first
call instead of being ignored). Without AVX2, and not forced, inputs are dequantized and multiplied instead (the
portable kernel is slower than that). More rows dequantize and multiply (:func:`dense_linear`), in float32 on a CPU
where torch has no fast bf16 / f16 matmul (:mod:`qlorakit.nn.cpu_matmul`).

CUDA: the CuPy kernels of ``kernels/cuda/`` (:mod:`qlorakit.kernels.cuda_ops`), bit-identical to the CPU for
dequantization; without CuPy a CUDA weight gets an error naming the extra to install.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from qlorakit import _core
from qlorakit._native import address_view, element_dtype_name, memory_region
from qlorakit.cpu_pool import share_torch_threads
from qlorakit.errors import QlorakitError
from qlorakit.nn.cpu_matmul import matmul_dtype
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


def dense_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` in ``x.dtype`` by dequantizing W (into the per-thread scratch buffer) and one matmul; on the CPU
    in the dtype :func:`qlorakit.nn.cpu_matmul.matmul_dtype` chooses (float32 where torch has no fast 16-bit
    matmul: the weight's values as in ``x.dtype``, the result rounded once to it)."""
    weight = _matmul_weight(packed, x)
    bias = None if bias is None else bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def dense_grad_input(grad_output: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """``grad_output W`` (the input's gradient of :func:`dense_linear`) in ``grad_output.dtype``, multiplied in
    the same dtype as the forward."""
    weight = _matmul_weight(packed, grad_output)
    return (grad_output.to(weight.dtype) @ weight).to(grad_output.dtype)


def _matmul_weight(packed: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """The weight dequantized in ``x.dtype`` into the per-thread scratch buffer, and where the CPU multiplies
    ``x.dtype`` in float32, widened (exactly) into a float32 scratch buffer: the weight in the dtype the matmul
    runs in (``.to`` of the operands to it is then a no-op on the native route)."""
    weight = dequantize_weight(packed, x.dtype, reuse=True)
    if x.device.type != "cpu":
        return weight
    compute = matmul_dtype(x.dtype)
    if compute == x.dtype:
        return weight
    return _workspace(tuple(weight.shape), compute).copy_(weight)


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


@functools.cache
def _cpu_gemv_routed() -> bool:
    """Whether CPU inputs of a few rows go to the fused kernel: with a SIMD kernel, or any forced one (tests). Raises
    ``QuantizationError`` (not cached, so on every call) if ``QLORAKIT_CPU_KERNEL`` is invalid."""
    kernel = _core.cpu_kernel()
    return kernel != "portable" or bool(os.environ.get(_core.CPU_KERNEL_ENV, "").strip())


def matvec_weight(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x W^T + b`` for an input of a few rows (decoding: a single row, or 2 to ``_core.GEMV_MAX_BATCH`` rows of
    speculative or batched decoding; CUDA: a single row) by a fused dequantize-and-multiply kernel (the 4-bit codes
    are read once, each group of weights decoded once for every row, no dequantized weight is written), shaped
    ``[..., out_features]`` like ``F.linear``; ``None`` where there is none (more rows, other dtypes) and the caller
    dequantizes and multiplies. CPU: the Rust core's ``gemv_4bit``; CUDA: the CuPy kernel. Both decode each weight
    element as dequantization does and sum in float32, so the result is dequantize-then-``F.linear`` up to the
    summation order (each row's result is the same whatever the other rows, the batch size or the thread count)."""
    codes = packed.codes
    shape = packed.shape
    if len(shape) != 2 or x.dim() == 0 or x.shape[-1] != shape[1]:
        return None
    rows = x.numel() // shape[1]
    if x.is_cpu:  # (is_cpu rather than comparing devices: this runs for every layer of every decoding step)
        if not codes.is_cpu or not 1 <= rows <= _core.GEMV_MAX_BATCH or x.dtype not in _CORE_DTYPES:
            return None
        if not _cpu_gemv_routed():
            return None
        return _gemv_cpu(packed, x, bias)
    if x.is_cuda and codes.device == x.device:
        cuda_ops = _cuda_ops()
        if rows != 1 or x.dtype not in cuda_ops.KERNEL_DTYPES:
            return None
        return cuda_ops.gemv_4bit(packed, x, bias).reshape(*x.shape[:-1], shape[0])
    return None


def _gemv_cpu(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T (+ bias)`` as ``[..., out_features]`` in ``x.dtype`` for ``x`` holding 1 to ``_core.GEMV_MAX_BATCH``
    rows, by the Rust core (multithreaded for large weights, GIL released).

    Double-quantized scales go in as stored and are decoded inline, per block, by the kernel: no per-call
    allocation beyond the output, and the layer's memory stays at its packed size."""
    out_features, in_features = packed.shape
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    # The output in its final shape ([..., out_features], like F.linear's); the core writes it as rows x out.
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    # Every tensor a view is taken of is held by a local until the call returns (address_view's contract): the
    # weight's own tensors by `packed`, temporaries by `held`.
    weight, held = _weight_args(packed)
    share_torch_threads()
    codes_view, absmax_view, nested_view, offset = weight
    _core.gemv_4bit(
        codes_view,
        absmax_view,
        packed.quant_type,
        packed.blocksize,
        out_features,
        in_features,
        address_view(x, "x"),
        element_dtype_name(x, "x"),
        address_view(out, "out"),
        address_view(bias, "bias") if bias is not None else None,
        nested_view,
        offset,
    )
    return out


#: Per CPU 4-bit weight, the core's arguments that name its buffers (views, offset), keyed by the buffers' memory
#: regions (address, bytes) and kept with the layout they were built for: an entry is used only for contiguous
#: tensors covering exactly those regions, with that same layout object; the views are address-based (as
#: address_view's: they read what lies there now).
_WEIGHT_ARGS: dict[tuple[int, ...], tuple[object, tuple]] = {}
_MAX_WEIGHT_ARGS = 4096


def _weight_args(packed: PackedWeight) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """``((codes view, absmax view, nested view or None, offset), temporaries)`` for ``_core.gemv_4bit``. Where the
    weight's tensors go in as stored (contiguous; float32 scales, or uint8 codes with float32 nested scales) the
    views are cached (building them costs more than a small layer's kernel); otherwise the scales are converted
    into temporaries, which the caller holds until the call returns."""
    codes, absmax, nested = packed.codes, packed.absmax, packed.nested_absmax
    layout = packed.layout
    as_stored = codes.is_contiguous() and absmax.is_contiguous()
    if nested is None:
        as_stored = as_stored and absmax.dtype == torch.float32
    else:
        as_stored = as_stored and packed.nested_dtype == torch.float32
        as_stored = as_stored and nested.dtype == torch.float32 and nested.is_contiguous()
    if as_stored:
        nested_region = memory_region(nested) if nested is not None else (0, 0)
        key = (*memory_region(codes), *memory_region(absmax), *nested_region)
        entry = _WEIGHT_ARGS.get(key)
        if entry is not None and entry[0] is layout:
            return entry[1], ()
    held: tuple[torch.Tensor, ...]
    codes = codes.contiguous()
    if nested is not None and packed.nested_dtype == torch.float32:
        absmax, nested = absmax.contiguous(), nested.float().contiguous()
        nested_view, offset = address_view(nested, "nested scales"), float(packed.offset)  # type: ignore[arg-type]
        held = (codes, absmax, nested)
    else:
        absmax = decode_absmax(packed)
        nested_view, offset = None, 0.0
        held = (codes, absmax)
    weight = (address_view(codes, "packed"), address_view(absmax, "absmax"), nested_view, offset)
    if as_stored:
        if len(_WEIGHT_ARGS) >= _MAX_WEIGHT_ARGS:
            _WEIGHT_ARGS.clear()
        _WEIGHT_ARGS[key] = (layout, weight)
        return weight, ()
    return weight, held
