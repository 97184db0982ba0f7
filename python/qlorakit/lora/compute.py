"""The adapter computation both LoRA layers share (qlorakit's :class:`~qlorakit.lora.layer.LoraLinear` and the PEFT
layer :class:`qlorakit.peft_lora.LoraLinear4bit`): ``lora_B(lora_A(x)) * scaling`` and its sum with the base output,
done with less work than spelled that way and bit-identical to it.

- A scaling that is a power of two (``lora_alpha = 2 r``, ``= r``, ...: the common configurations) is exact in
  floating point, so it is applied to the rank-``r`` hidden ``lora_A(x)`` instead of the ``[..., out_features]``
  product (and skipped when it is 1): every element of the result, and of every gradient, is the same number, and
  the forward and the backward each save one multiplication over the layer's whole output. Other scalings are
  applied after ``lora_B``, as PEFT does.
- The update is added to the base output in place where that output is a fresh tensor nothing else holds (a
  qlorakit ``Linear4bit`` without forward hooks) and both have one dtype: one allocation less per call.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _module

#: The attribute a base layer class sets (True) when its forward always returns a new tensor that it keeps no
#: reference to, so an adapter may add into it in place (``qlorakit.nn.Linear4bit``).
FRESH_OUTPUT = "qlorakit_fresh_output"


def exact_scale(scaling: float) -> bool:
    """Whether multiplying by ``scaling`` is exact in binary floating point (a positive power of two)."""
    return scaling > 0 and math.isfinite(scaling) and math.frexp(scaling)[0] == 0.5


def low_rank_update(lora_A: nn.Module, lora_B: nn.Module, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """``lora_B(lora_A(x)) * scaling``, bit-identical; the scaling goes on the rank-``r`` side where that is exact
    (a power of two, and ``lora_B`` without bias)."""
    hidden = lora_A(x)
    if getattr(lora_B, "bias", None) is None and exact_scale(scaling):
        return lora_B(hidden if scaling == 1 else hidden * scaling)
    return lora_B(hidden) * scaling


def adds_in_place(base_layer: nn.Module) -> bool:
    """Whether an update may be added in place into ``base_layer``'s output (see :data:`FRESH_OUTPUT`): a hook
    could hold the output, so a base with forward hooks (its own or global) is added to out of place."""
    return (
        getattr(type(base_layer), FRESH_OUTPUT, False)
        and not base_layer._forward_hooks
        and not _module._global_forward_hooks
    )


def add_update(result: torch.Tensor, update: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``result + update``; in place in ``result`` when ``in_place`` and the dtypes and shapes match (the same sum,
    bit for bit)."""
    if in_place and update.dtype == result.dtype and update.shape == result.shape:
        return result.add_(update)
    return result + update
