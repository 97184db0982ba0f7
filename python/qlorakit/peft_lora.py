"""PEFT's LoRA on qlorakit's 4-bit layers: :class:`LoraLinear4bit`, the layer PEFT builds around a
``qlorakit.nn.Linear4bit`` (registered through PEFT's custom-module mapping, see :mod:`qlorakit.peft_hook`).

It follows PEFT's own LoRA layer for bitsandbytes' ``Linear4bit`` so results agree with PEFT on transformers +
bitsandbytes given the same adapter: the update ``lora_B(lora_A(dropout(x))) * scaling`` is computed in the
adapter's dtype and rounded to the base output's dtype before it is added; merging dequantizes the base
weight to the dtype it was quantized from, adds the delta and quantizes the sum again with the layer's own
options (NF4/FP4, blocksize, double quantization), as bitsandbytes' ``Params4bit`` does; unmerging subtracts
it the same way. Both round, as 4-bit merging does everywhere.

Importing this module imports PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from qlorakit.lora.compute import add_update, adds_in_place, low_rank_update
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.quantization import quantize


class LoraLinear4bit(PeftLoraLinear):
    """PEFT LoRA adapters (any number, PEFT's adapter API) on a qlorakit ``Linear4bit`` base layer.

    Plain LoRA: rsLoRA, rank/alpha patterns, dropout, several adapters, mixed-batch inference, ``lora_bias``
    (merged as PEFT's dense layer merges it). Variants that need the base weight in full precision during
    training (DoRA, ...) are refused with PEFT's error for an unsupported variant."""

    @property
    def lora_variants(self) -> dict[tuple[str, ...], Any]:
        return {(): None}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in ("alora_offsets",):
            kwargs.pop(key, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        in_place = adds_in_place(self.base_layer)
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            convert = not torch.is_autocast_enabled()
            lora_x = self._cast_input_dtype(x, lora_A.weight.dtype) if convert else x
            update = low_rank_update(
                lora_A, lora_B, self.lora_dropout[active_adapter](lora_x), self.scaling[active_adapter]
            )
            if convert:
                update = update.to(result.dtype)
            # In place only into the base's own fresh output: a second adapter adds to a sum already made here.
            result = add_update(result, update, in_place)
            in_place = True
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Folds the adapters into the 4-bit base (dequantize, add, quantize again)."""
        for active_adapter in check_adapters_to_merge(self, adapter_names):
            if active_adapter not in self.lora_A:
                continue
            base = self.get_base_layer()
            if self.lora_bias[active_adapter] and base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            merged = base.dequantized_weight(base.layout.dtype) + self.get_delta_weight(active_adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs in the weights merged with adapter {active_adapter!r}; it seems to be broken")
            self._requantize(merged)
            if self.lora_bias[active_adapter]:
                self._shift_bias(active_adapter, 1.0)
            self.merged_adapters.append(active_adapter)

    def unmerge(self) -> None:
        """Takes merged adapters out of the 4-bit base again (dequantize, subtract, quantize again)."""
        while self.merged_adapters:
            active_adapter = self.merged_adapters.pop()
            if active_adapter not in self.lora_A:
                continue
            base = self.get_base_layer()
            self._requantize(base.dequantized_weight(base.layout.dtype) - self.get_delta_weight(active_adapter))
            if self.lora_bias[active_adapter]:
                self._shift_bias(active_adapter, -1.0)

    def _shift_bias(self, adapter: str, sign: float) -> None:
        """Adds (``sign`` 1) or removes (-1) ``lora_B``'s bias, scaled as the forward scales it (PEFT's dense
        layer does the same; its bitsandbytes layer leaves the scaling out)."""
        bias = self.get_base_layer().bias
        update = self.lora_B[adapter].bias * self.scaling[adapter] * sign
        bias.data = (bias.data.float() + update.float()).to(bias.dtype)

    def _requantize(self, weight: torch.Tensor) -> None:
        """Replaces the base layer by a ``Linear4bit`` holding ``weight`` quantized with the base's options."""
        base = self.get_base_layer()
        old = base.packed_weight()
        packed = quantize(weight.detach().float().cpu().contiguous(), old.quant_type, old.blocksize, old.double_quant)
        packed = packed.with_layout(dtype=old.dtype)  # the dtype the layer stands for (to_dense, save) stays
        device = base.weight.device
        new = Linear4bit(packed, None, base.compute_dtype).to(device)
        new.bias = base.bias
        new.source_cls = base.source_cls
        new.requires_grad_(False)
        self.base_layer = new

    def __repr__(self) -> str:
        return "qlorakit." + super().__repr__()
