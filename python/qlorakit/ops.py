"""qlorakit's 4-bit operations as PyTorch ops, registered once with ``torch.library``: a schema, a
kernel per device and a fake kernel (output shapes only) that tracing uses, so ``torch.compile``,
``torch.export`` and functionalization see each op as one node instead of a graph break at an
opaque Rust or CuPy call (bitsandbytes registers its ops the same way).

- ``qlorakit::dequantize_4bit``: the weight in a float dtype.
- ``qlorakit::linear_4bit``: ``x W^T + b``, differentiable in ``x`` and ``b``. One row takes the fused
  dequantize-and-multiply kernel where there is one; more rows dequantize into a per-thread scratch
  buffer and multiply. Its backward is ``qlorakit::linear_4bit_grad_input`` (``grad W``, the weight
  dequantized again, never kept from the forward) and a sum for the bias.

The kernels: on the CPU the Rust core, on CUDA qlorakit's CuPy kernels (:mod:`qlorakit.nn.dispatch`
holds both backends). A 4-bit weight enters every op as the same arguments, taken from a
:class:`~qlorakit.packed.PackedWeight` by :func:`weight_args`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qlorakit.packed import PackedWeight

#: The devices with a kernel for every op.
DEVICES = ("cpu", "cuda")


def weight_args(packed: PackedWeight) -> tuple:
    """``packed`` as the ops' weight arguments: ``(codes, absmax, nested_absmax, offset, nested_dtype,
    quant_type, blocksize, out_features, in_features)``."""
    out_features, in_features = packed.shape
    offset = float(packed.offset) if packed.offset is not None else 0.0
    return (
        packed.packed,
        packed.absmax,
        packed.nested_absmax,
        offset,
        packed.nested_dtype,
        packed.quant_type,
        packed.blocksize,
        out_features,
        in_features,
    )


def _packed(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: float,
    nested_dtype: torch.dtype,
    quant_type: str,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> PackedWeight:
    return PackedWeight(
        packed=codes,
        absmax=absmax,
        quant_type=quant_type,
        blocksize=blocksize,
        shape=tuple(shape),
        dtype=dtype,
        nested_absmax=nested_absmax,
        offset=offset if nested_absmax is not None else None,
        nested_dtype=nested_dtype,
    )


@torch.library.custom_op("qlorakit::dequantize_4bit", mutates_args=(), device_types=DEVICES)
def dequantize_4bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: float,
    nested_dtype: torch.dtype,
    quant_type: str,
    blocksize: int,
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight ``[out_features, in_features]`` in ``dtype`` (a fresh tensor)."""
    from qlorakit.nn.dispatch import dequantize_weight

    args = (codes, absmax, nested_absmax, offset, nested_dtype, quant_type, blocksize)
    return dequantize_weight(_packed(*args, (out_features, in_features), dtype), dtype)


@dequantize_4bit.register_fake
def _dequantize_4bit_fake(codes: torch.Tensor, *args: object) -> torch.Tensor:
    *_, out_features, in_features, dtype = args
    return codes.new_empty((out_features, in_features), dtype=dtype)


@torch.library.custom_op("qlorakit::linear_4bit", mutates_args=(), device_types=DEVICES)
def linear_4bit(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: float,
    nested_dtype: torch.dtype,
    quant_type: str,
    blocksize: int,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x W^T + b`` for ``x`` ``[..., in_features]`` in a float dtype; ``b`` in ``x``'s dtype."""
    from qlorakit.nn.dispatch import dequantize_weight, matvec_weight

    args = (codes, absmax, nested_absmax, offset, nested_dtype, quant_type, blocksize)
    packed = _packed(*args, (out_features, in_features), x.dtype)
    out = matvec_weight(packed, x, bias)
    if out is not None:
        return out
    return torch.nn.functional.linear(x, dequantize_weight(packed, x.dtype, reuse=True), bias)


@linear_4bit.register_fake
def _linear_4bit_fake(x: torch.Tensor, *args: object) -> torch.Tensor:
    *_, out_features, _in_features, _bias = args
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("qlorakit::linear_4bit_grad_input", mutates_args=(), device_types=DEVICES)
def linear_4bit_grad_input(
    grad_output: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: float,
    nested_dtype: torch.dtype,
    quant_type: str,
    blocksize: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``grad_output W`` (``[..., in_features]``): the gradient of ``x W^T`` with respect to ``x``."""
    from qlorakit.nn.dispatch import dequantize_weight

    args = (codes, absmax, nested_absmax, offset, nested_dtype, quant_type, blocksize)
    packed = _packed(*args, (out_features, in_features), grad_output.dtype)
    return grad_output @ dequantize_weight(packed, grad_output.dtype, reuse=True)


@linear_4bit_grad_input.register_fake
def _linear_4bit_grad_input_fake(grad_output: torch.Tensor, *args: object) -> torch.Tensor:
    in_features = args[-1]
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


def _setup_linear_context(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
    x, codes, absmax, nested_absmax, *scalars, bias = inputs
    ctx.save_for_backward(codes, absmax, nested_absmax)
    ctx.scalars = scalars
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_output: torch.Tensor) -> tuple:  # noqa: ANN001
    codes, absmax, nested_absmax = ctx.saved_tensors
    grad_input = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = linear_4bit_grad_input(grad_output, codes, absmax, nested_absmax, *ctx.scalars)
    if ctx.has_bias and ctx.needs_input_grad[-1]:
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
    return (grad_input, *([None] * (len(ctx.needs_input_grad) - 2)), grad_bias)


linear_4bit.register_autograd(_linear_backward, setup_context=_setup_linear_context)
