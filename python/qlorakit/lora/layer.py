"""``LoraLinear``: the adapter layer around a frozen linear-like base layer."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qlorakit.lora.compute import add_update, adds_in_place, low_rank_update
from qlorakit.lora.config import scaling_factor


def is_linear_like(module: nn.Module) -> bool:
    """True for modules that behave like ``nn.Linear``: instances of ``torch.nn.Linear``, or modules with
    integer ``in_features`` and ``out_features`` attributes and a ``weight`` or ``packed`` attribute
    (a quantized linear such as ``qlorakit.nn.Linear4bit``)."""
    if isinstance(module, nn.Linear):
        return True
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    return (
        isinstance(in_features, int)
        and not isinstance(in_features, bool)
        and isinstance(out_features, int)
        and not isinstance(out_features, bool)
        and (hasattr(module, "weight") or hasattr(module, "packed"))
    )


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class LoraLinear(nn.Module):
    """A frozen linear-like ``base_layer`` plus a trainable low-rank update (PEFT's ``lora.Linear``).

    ``forward(x) = base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling`` for ``x`` of shape
    ``[..., in_features]``, giving ``[..., out_features]``. The adapter runs in its own dtype
    (``adapter_dtype``; ``x`` is cast to it), and the sum is cast back to the base output's dtype, as PEFT does.

    ``lora_A`` is ``nn.Linear(in_features, r, bias=False)`` (weight ``[r, in_features]``), initialized with
    ``kaiming_uniform_(a=sqrt(5))``; ``lora_B`` is ``nn.Linear(r, out_features, bias=False)`` (weight
    ``[out_features, r]``), initialized to zeros, so at initialization the output equals the base output exactly.
    The adapter is created on the base layer's device.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"LoraLinear needs a linear-like base layer, got {type(base_layer).__name__}")
        if not adapter_dtype.is_floating_point:
            raise ValueError(f"adapter_dtype must be a floating-point dtype, got {adapter_dtype}")
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = scaling_factor(lora_alpha, self.r, self.use_rslora)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        device = _module_device(base_layer)
        # Created in float32 and then cast, so the random stream and values do not depend on adapter_dtype.
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device)
        self.reset_lora_parameters()
        self.lora_A.to(adapter_dtype)
        self.lora_B.to(adapter_dtype)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init (``init_lora_weights=True``): A kaiming-uniform with ``a=sqrt(5)``, B zeros."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's ``weight`` (for code that reads ``module.weight``, as PEFT's layers allow)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (frozen), or None."""
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of ``lora_A``/``lora_B`` and of the adapter computation."""
        return self.lora_A.weight.dtype

    def delta_weight(self) -> torch.Tensor:
        """``scaling * lora_B.weight @ lora_A.weight`` in float32, shape ``[out_features, in_features]``:
        what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x``: ``[..., in_features]`` in the base layer's input dtype; returns ``[..., out_features]`` in
        the base output's dtype. Extra arguments go to the base layer."""
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        lora_x = x if x.dtype == self.lora_A.weight.dtype else x.to(self.lora_A.weight.dtype)
        update = low_rank_update(self.lora_A, self.lora_B, self.lora_dropout(lora_x), self.scaling)
        if is_dense_linear(self.base_layer):
            return (result + update).to(result_dtype)
        # PEFT's 4-bit layers round the update to the output dtype before adding it;
        # doing the same keeps outputs bit-identical to PEFT on a quantized base.
        return add_update(result, update.to(result_dtype), adds_in_place(self.base_layer))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, adapter_dtype={self.adapter_dtype}"
        )


def is_dense_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) with a floating-point weight; 4-bit layers subclass ``nn.Linear`` too
    (qlorakit's and bitsandbytes') but hold packed integer codes."""
    return isinstance(module, nn.Linear) and module.weight.is_floating_point()
