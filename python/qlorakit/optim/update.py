"""One Adam / AdamW update of one parameter, on either device.

The math is torch.optim.Adam's ``_single_tensor_adam`` (no amsgrad, not capturable): the
per-step scalars are computed once, in double precision exactly as torch computes them
(:class:`AdamStep`); the elementwise part runs either as the same sequence of torch ops on
the CPU (:func:`cpu_update`, bit-identical to torch.optim.AdamW there) or as one fused kernel
on CUDA (:func:`cuda_update`, ``kernels/cuda/paged_adamw.cu``, which repeats those ops with the same
roundings, except that its sqrt is correctly rounded and torch's MKL sqrt on x86 is not
always: a last-bit difference in some denominators). Moments are always float32; a bf16/fp16
parameter is computed in float32 and rounded back once per step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from qlorakit.optim.managed import prefetch_to_device

#: Parameter dtypes the optimizer updates, with the kernel's C type for each.
KERNEL_PARAM_TYPES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.bfloat16: "__nv_bfloat16",
    torch.float16: "__half",
}

KERNEL_FILE = "paged_adamw.cu"
KERNEL_NAME = "paged_adam_step"
_BLOCK = 256


@dataclass(frozen=True)
class AdamStep:
    """The scalars of one Adam(W) update at a given step count (all Python floats, double)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    step: float

    @property
    def grad_weight_decay(self) -> float:
        """Adam's L2 term, added to the gradient (0 for AdamW)."""
        return 0.0 if self.decoupled_weight_decay else self.weight_decay

    @property
    def param_scale(self) -> float:
        """AdamW's decoupled decay factor ``1 - lr * wd`` (1 for Adam or without decay)."""
        if self.decoupled_weight_decay and self.weight_decay != 0:
            return 1 - self.lr * self.weight_decay
        return 1.0

    @property
    def beta1_weight(self) -> float:
        return 1 - self.beta1

    @property
    def one_minus_beta2(self) -> float:
        return 1 - self.beta2

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1 - self.beta2**self.step) ** 0.5

    @property
    def neg_step_size(self) -> float:
        return -(self.lr / (1 - self.beta1**self.step))


def cpu_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, s: AdamStep
) -> None:
    """The update with torch ops, in the order (and with the Python-double scalars) of
    ``_single_tensor_adam``; for a float32 parameter this is torch.optim.Adam(W) exactly."""
    work = param if param.dtype == torch.float32 else param.float()
    grad = grad.float()  # a no-op for float32 gradients
    if s.weight_decay != 0:
        if s.decoupled_weight_decay:
            work.mul_(s.param_scale)
        else:
            grad = grad.add(work, alpha=s.weight_decay)
    exp_avg.lerp_(grad, s.beta1_weight)
    exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=s.one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
    work.addcdiv_(exp_avg, denom, value=s.neg_step_size)
    if work is not param:
        param.copy_(work)  # the one rounding of a bf16/fp16 parameter


def kernel_arguments(s: AdamStep) -> tuple[np.float32, ...]:
    """The kernel's scalar arguments after ``n``, in its parameter order (float32, rounded
    from the double values just as torch rounds a Python scalar for a float32 tensor op)."""
    return tuple(
        np.float32(value)
        for value in (
            s.grad_weight_decay,
            s.param_scale,
            s.beta1_weight,
            s.beta2,
            s.one_minus_beta2,
            s.bias_correction2_sqrt,
            s.eps,
            s.neg_step_size,
        )
    )


@functools.cache
def _max_blocks(device_index: int) -> int:
    # Eight resident blocks of 256 threads per SM is a full wave on sm_80/sm_90; the kernel's
    # grid-stride loop covers larger parameters.
    return torch.cuda.get_device_properties(device_index).multi_processor_count * 8


def cuda_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, s: AdamStep
) -> None:
    """The update as one fused kernel on torch's current stream, after prefetching the
    parameter's states (one managed allocation holds both moments) to its GPU."""
    from qlorakit.kernels.cupy_loader import get_kernel, launch

    n = param.numel()
    if n == 0:
        return
    prefetch_to_device(exp_avg)
    if exp_avg_sq.untyped_storage().data_ptr() != exp_avg.untyped_storage().data_ptr():
        prefetch_to_device(exp_avg_sq)  # states restored or assigned separately
    kernel = get_kernel(KERNEL_FILE, KERNEL_NAME, param.device, {"QK_PARAM_T": KERNEL_PARAM_TYPES[param.dtype]})
    work = param if param.is_contiguous() else param.contiguous()
    grad = grad.to(param.dtype).contiguous()  # no-ops for the usual dense gradient
    grid = min(math.ceil(n / _BLOCK), _max_blocks(param.device.index or 0))
    launch(kernel, (grid,), (_BLOCK,), (work, grad, exp_avg, exp_avg_sq, np.int64(n), *kernel_arguments(s)))
    if work is not param:
        param.copy_(work)
