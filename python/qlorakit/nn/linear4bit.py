"""``Linear4bit``: a frozen linear layer whose weight stays 4-bit in memory.

Forward: the weight is dequantized to the compute dtype (on the CPU into a scratch buffer shared
by all layers of that shape; on CUDA by the CuPy kernels) and multiplied; nothing of it is kept.
An input of a single row (batch-1 decoding) skips the dequantized weight altogether where a fused
dequantize-and-multiply kernel exists (CUDA; the CPU with AVX-512): it reads the 4-bit codes once.
Backward: the gradient with respect to the input is computed by dequantizing again (the full
weight is not kept from the forward); the frozen weight gets no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from qlorakit.nn.dispatch import dequantize_weight, matvec_weight
from qlorakit.packed import PackedWeight
from qlorakit.quantization import quantize


class _Linear4bitFunction(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from the packed layer on each pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.layer = layer
        ctx.has_bias = bias is not None
        packed = layer.packed_weight()
        out = matvec_weight(packed, x, bias)
        if out is not None:
            return out
        weight = dequantize_weight(packed, x.dtype, reuse=True)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001, ANN205
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_weight(ctx.layer.packed_weight(), grad_output.dtype, reuse=True)
            grad_input = grad_output @ weight
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, None, grad_bias


class Linear4bit(nn.Linear):
    """A linear layer ``y = x W^T + b`` with W stored blockwise 4-bit (NF4/FP4).

    A subclass of ``nn.Linear``, as bitsandbytes' ``Linear4bit`` is: code that finds a model's linear
    layers by type (PEFT's ``target_modules="all-linear"``, transformers' module walks) finds these.
    Its ``weight`` is the packed uint8 codes, never a floating-point matrix.

    Buffers: ``packed`` uint8 ``[(out*in+1)//2, 1]``, ``absmax`` (uint8 nested codes, or
    float32), ``nested_absmax`` float32 (double quantization only). The input is cast to
    ``compute_dtype`` (bf16 by default, fp16, fp32 or fp64) and the output back to the
    input's dtype. The bias, if any, is a frozen parameter in its stored dtype.
    """

    def __init__(
        self, packed: PackedWeight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16
    ):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        if len(packed.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {packed.shape}")
        self.out_features, self.in_features = packed.shape
        self.compute_dtype = compute_dtype
        self.quant_type = packed.quant_type
        self.blocksize = packed.blocksize
        self.weight_dtype = packed.dtype
        self.offset = packed.offset
        self.nested_dtype = packed.nested_dtype
        self.register_buffer("packed", packed.packed)
        self.register_buffer("absmax", packed.absmax)
        self.register_buffer("nested_absmax", packed.nested_absmax)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        #: The class of the full-precision layer this one stands for (GPT-2's ``Conv1D`` stores
        #: its weight ``[in, out]``); :meth:`to_dense` rebuilds it.
        self.source_cls: type[nn.Module] = nn.Linear

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> Linear4bit:
        """Quantizes an ``nn.Linear`` (its weight as stored; the bias is kept)."""
        packed = quantize(linear.weight.detach().contiguous(), quant_type, blocksize, double_quant)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(packed, bias, compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The packed 4-bit codes (uint8), as bitsandbytes' ``Linear4bit.weight`` holds them: code that
        walks a model's ``.weight`` tensors (transformers' weight initialization) finds them here."""
        return self.packed

    def packed_weight(self) -> PackedWeight:
        """The weight as a ``PackedWeight`` sharing this layer's buffers."""
        return PackedWeight(
            packed=self.packed,
            absmax=self.absmax,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            nested_absmax=self.nested_absmax,
            offset=self.offset,
            nested_dtype=self.nested_dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ``[out_features, in_features]`` in ``dtype`` (default: the compute dtype)."""
        return dequantize_weight(self.packed_weight(), dtype or self.compute_dtype)

    def to_dense(self, weight: torch.Tensor | None = None) -> nn.Module:
        """The full-precision layer of :attr:`source_cls` with ``weight`` (``[out, in]``; default: this
        layer's, dequantized to the dtype it was quantized from) and this layer's bias."""
        if weight is None:
            weight = self.dequantized_weight(torch.float32).to(self.weight_dtype)
        with torch.device("meta"):
            if issubclass(self.source_cls, nn.Linear):
                dense = self.source_cls(self.in_features, self.out_features, bias=self.bias is not None)
            else:  # Conv1D(nf=out, nx=in), weight stored [in, out]
                dense = self.source_cls(self.out_features, self.in_features)
                weight = weight.T
        dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        dense.bias = self.bias
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        out = _Linear4bitFunction.apply(x.to(self.compute_dtype), self, bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )
