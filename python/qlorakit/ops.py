"""qlorakit's 4-bit operations as PyTorch ops, registered once with ``torch.library``: a schema, a
kernel per device and a fake kernel (output shapes only) that tracing uses, so ``torch.compile``,
``torch.export`` and functionalization see each op as one node instead of a graph break at an
opaque Rust or CuPy call (bitsandbytes registers its ops the same way).

- ``qlorakit::quantize_4bit``: a 2-D float tensor -> the 4-bit weight's tensors (codes, block scales, nested
  scales and the offset as a 0-d tensor). CPU only (the Rust core); a CUDA input is quantized on the CPU and the
  result moved back.
- ``qlorakit::dequantize_4bit``: the weight in a float dtype (a fresh tensor).
- ``qlorakit::gemv_4bit``: ``W x (+ b)`` for an input of one row, by the fused dequantize-and-multiply kernel where
  the device has one (CUDA; the CPU with AVX-512), else by dequantizing and multiplying.
- ``qlorakit::linear_4bit``: ``x W^T + b``, differentiable in ``x`` and ``b``. A few rows (CPU: up to
  ``_core.GEMV_MAX_BATCH``; CUDA: one) take the fused dequantize-and-multiply kernel where there is one; more
  rows dequantize into a per-thread scratch buffer and multiply (on a CPU without a fast 16-bit matmul, in float32:
  :mod:`qlorakit.nn.cpu_matmul`). Its backward is
  ``qlorakit::linear_4bit_grad_input`` (``grad W``, the weight dequantized again, never kept from the forward)
  and a sum for the bias.

Every op takes a 4-bit weight as the same arguments (:data:`WEIGHT_SCHEMA`, in the order
:func:`weight_args` gives them from a :class:`~qlorakit.packed.PackedWeight`); the Python functions
below take the ``PackedWeight`` itself. The kernels: on the CPU the Rust core, on CUDA qlorakit's CuPy
kernels (:mod:`qlorakit.nn.dispatch` holds both backends).
"""

from __future__ import annotations

import functools

import torch

from qlorakit.formats import NESTED_BLOCKSIZE
from qlorakit.packed import PackedWeight, QuantLayout

#: The devices with a kernel for every op.
DEVICES = ("cpu", "cuda")
#: A 4-bit weight in the ops' schemas.
WEIGHT_SCHEMA = (
    "Tensor codes, Tensor absmax, Tensor? nested_absmax, float offset, ScalarType nested_dtype, "
    "str quant_type, int blocksize, int out_features, int in_features"
)

torch.library.define(
    "qlorakit::quantize_4bit",
    "(Tensor x, str quant_type, int blocksize, bool double_quant) -> (Tensor, Tensor, Tensor?, Tensor)",
)
torch.library.define("qlorakit::dequantize_4bit", f"({WEIGHT_SCHEMA}, ScalarType dtype) -> Tensor")
torch.library.define("qlorakit::gemv_4bit", f"(Tensor x, {WEIGHT_SCHEMA}, Tensor? bias) -> Tensor")
torch.library.define("qlorakit::linear_4bit", f"(Tensor x, {WEIGHT_SCHEMA}, Tensor? bias) -> Tensor")
torch.library.define("qlorakit::linear_4bit_grad_input", f"(Tensor grad_output, {WEIGHT_SCHEMA}) -> Tensor")


def weight_args(packed: PackedWeight) -> tuple:
    """``packed`` as the ops' weight arguments (:data:`WEIGHT_SCHEMA`)."""
    return (packed.codes, packed.absmax, packed.nested_absmax, *layout_args(packed.layout))


@functools.lru_cache(maxsize=1024)
def layout_args(layout: QuantLayout) -> tuple:
    """The non-tensor weight arguments of :data:`WEIGHT_SCHEMA` (what follows the three tensors), computed once
    per layout (a model has a handful: every call of a layer passes the same ones)."""
    out_features, in_features = layout.shape
    offset = float(layout.offset) if layout.offset is not None else 0.0
    return (offset, layout.nested_dtype, layout.quant_type, layout.blocksize, out_features, in_features)


@functools.lru_cache(maxsize=1024)
def _layout(
    quant_type: str,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    offset: float | None,
    nested_dtype: torch.dtype,
) -> QuantLayout:
    return QuantLayout(quant_type, blocksize, shape, dtype, offset=offset, nested_dtype=nested_dtype)


def _from_args(weight: tuple, dtype: torch.dtype) -> PackedWeight:
    """The inverse of :func:`weight_args`; ``dtype``: the dtype the weight is used in."""
    codes, absmax, nested_absmax, offset, nested_dtype, quant_type, blocksize, out_features, in_features = weight
    offset = offset if nested_absmax is not None else None
    layout = _layout(quant_type, blocksize, (out_features, in_features), dtype, offset, nested_dtype)
    return PackedWeight(codes, absmax, nested_absmax, layout)


def quantize_4bit(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> PackedWeight:
    """``x`` (2-D, float32/bf16/fp16) as a 4-bit weight on ``x``'s device, through ``qlorakit::quantize_4bit``."""
    codes, absmax, nested_absmax, offset = torch.ops.qlorakit.quantize_4bit(x, quant_type, blocksize, double_quant)
    layout = QuantLayout(
        quant_type, blocksize, tuple(x.shape), x.dtype, offset=float(offset) if nested_absmax is not None else None
    )
    return PackedWeight(codes, absmax, nested_absmax, layout)


def dequantize_4bit(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D weight ``[out_features, in_features]`` in ``dtype``, on its device."""
    return torch.ops.qlorakit.dequantize_4bit(*weight_args(packed), dtype)


def gemv_4bit(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for ``x`` holding one row (``[in_features]`` or ``[1, ..., 1, in_features]``)."""
    return torch.ops.qlorakit.gemv_4bit(x, *weight_args(packed), bias)


def linear_4bit(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for ``x`` ``[..., in_features]`` in a float dtype; ``b`` in ``x``'s dtype.

    Where nothing could tell the difference, the kernel is called without the dispatcher (which costs more
    than a batch-1 decoding step's small kernels): in eager mode, no gradient to record, plain tensors on a
    device with a kernel, no torch function or dispatch mode, functorch transform or profiler active. Anywhere
    else (tracing, ``torch.compile``, FakeTensor, DTensor, autograd) the call goes through
    ``torch.ops.qlorakit.linear_4bit``; the result is the same."""
    if _runs_directly(x, packed.codes, bias):
        return _linear(x, packed, bias)  # the kernels take their dtype from x, as the op's do
    return torch.ops.qlorakit.linear_4bit(x, *weight_args(packed), bias)


#: Tensor types :func:`linear_4bit` calls its kernel directly for (no subclass overrides what an op does).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _mode_probes() -> tuple | None:
    """torch's (private) probes for what could observe an op call, or None on a torch without one of them: the
    direct call is then never taken (every call goes through the op, as it always may)."""
    try:
        torch.autograd.profiler._is_profiler_enabled  # noqa: B018 - read on each call below
        return (
            torch._C._is_torch_function_mode_enabled,
            torch._C._len_torch_dispatch_stack,
            torch._C._are_functorch_transforms_active,
            lambda: torch.autograd.profiler._is_profiler_enabled,
        )
    except AttributeError:
        return None


_PROBES = _mode_probes()


def _runs_directly(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear_4bit` may call its kernel directly (see there)."""
    if _PROBES is None or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if type(x) not in _PLAIN or type(codes) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False
    # is_cpu / is_cuda rather than device.type (DEVICES): this runs for every layer of every decoding step.
    if not (x.is_cpu and codes.is_cpu) and not (x.is_cuda and codes.device == x.device):
        return False
    function_mode, dispatch_stack, functorch, profiler = _PROBES
    return not (function_mode() or dispatch_stack() or functorch() or profiler())


# --- kernels: one function per op, registered for every device of DEVICES


@torch.library.register_kernel("qlorakit::quantize_4bit", DEVICES)
def _quantize_kernel(
    x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    from qlorakit.quantization import quantize

    packed = quantize(x.detach().to("cpu").contiguous(), quant_type, blocksize, double_quant).to(x.device)
    offset = torch.tensor(packed.offset if packed.offset is not None else 0.0, dtype=torch.float32, device=x.device)
    return packed.codes, packed.absmax, packed.nested_absmax, offset


@torch.library.register_kernel("qlorakit::dequantize_4bit", DEVICES)
def _dequantize_kernel(*args: object) -> torch.Tensor:
    from qlorakit.nn.dispatch import dequantize_weight

    *weight, dtype = args
    return dequantize_weight(_from_args(tuple(weight), dtype), dtype)


@functools.cache
def _dispatch():  # noqa: ANN202 - the module, imported on first use (it imports the ops' callers)
    from qlorakit.nn import dispatch

    return dispatch


def _linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    dispatch = _dispatch()
    out = dispatch.matvec_weight(packed, x, bias)
    if out is not None:
        return out
    return dispatch.dense_linear(x, packed, bias)


@torch.library.register_kernel("qlorakit::gemv_4bit", DEVICES)
def _gemv_kernel(x: torch.Tensor, *args: object) -> torch.Tensor:
    *weight, bias = args
    if x.numel() != weight[-1]:
        raise ValueError(f"gemv_4bit: x must hold one row of {weight[-1]} elements, got shape {tuple(x.shape)}")
    return _linear(x, _from_args(tuple(weight), x.dtype), bias)


@torch.library.register_kernel("qlorakit::linear_4bit", DEVICES)
def _linear_kernel(x: torch.Tensor, *args: object) -> torch.Tensor:
    *weight, bias = args
    return _linear(x, _from_args(tuple(weight), x.dtype), bias)


@torch.library.register_kernel("qlorakit::linear_4bit_grad_input", DEVICES)
def _linear_grad_input_kernel(grad_output: torch.Tensor, *weight: object) -> torch.Tensor:
    from qlorakit.nn.dispatch import dense_grad_input

    return dense_grad_input(grad_output, _from_args(weight, grad_output.dtype))


# --- fake kernels: output shapes for tracing


@torch.library.register_fake("qlorakit::dequantize_4bit")
def _dequantize_fake(codes: torch.Tensor, *args: object) -> torch.Tensor:
    *_, out_features, in_features, dtype = args
    return codes.new_empty((out_features, in_features), dtype=dtype)


@torch.library.register_fake("qlorakit::quantize_4bit")
def _quantize_fake(
    x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    numel = x.numel()
    blocks = -(-numel // blocksize)
    codes = x.new_empty(((numel + 1) // 2, 1), dtype=torch.uint8)
    absmax = x.new_empty((blocks,), dtype=torch.uint8 if double_quant else torch.float32)
    nested = x.new_empty((-(-blocks // NESTED_BLOCKSIZE),), dtype=torch.float32) if double_quant else None
    return codes, absmax, nested, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("qlorakit::gemv_4bit")
@torch.library.register_fake("qlorakit::linear_4bit")
def _linear_fake(x: torch.Tensor, *args: object) -> torch.Tensor:
    *_, out_features, _in_features, _bias = args
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("qlorakit::linear_4bit_grad_input")
def _linear_grad_input_fake(grad_output: torch.Tensor, *args: object) -> torch.Tensor:
    return grad_output.new_empty((*grad_output.shape[:-1], args[-1]))


# --- autograd of linear_4bit: the input's gradient by the grad_input op, the bias's by a sum


def _setup_linear_context(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
    _x, codes, absmax, nested_absmax, *scalars, bias = inputs
    ctx.save_for_backward(codes, absmax, nested_absmax)
    ctx.scalars = scalars
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_output: torch.Tensor) -> tuple:  # noqa: ANN001
    codes, absmax, nested_absmax = ctx.saved_tensors
    grad_input = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = (codes, absmax, nested_absmax, *ctx.scalars)
        grad_input = torch.ops.qlorakit.linear_4bit_grad_input(grad_output, *weight)
    if ctx.has_bias and ctx.needs_input_grad[-1]:
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
    return (grad_input, *([None] * (len(ctx.needs_input_grad) - 2)), grad_bias)


torch.library.register_autograd("qlorakit::linear_4bit", _linear_backward, setup_context=_setup_linear_context)
