"""qlorakit as a transformers quantization method: ``from_pretrained`` builds the model with
``qlorakit.nn.Linear4bit`` layers from a bitsandbytes-format 4-bit checkpoint.

Registered through transformers' public extension points (``register_quantization_config``,
``register_quantizer``), so transformers does all the loading it does for bitsandbytes: it
builds the model on the meta device, renames and fuses checkpoint keys (GPT-NeoX's
``embed_out``, MoE experts), ties weights, initializes the buffers no file holds, and reports
missing or unexpected keys. The quantizer only decides which modules become 4-bit (the same
rule bitsandbytes' quantizer applies, from :mod:`qlorakit.hf_rules`) and turns each module's
serialized tensors (``weight``, ``weight.absmax``, ..., ``weight.quant_state.bitsandbytes__nf4``)
into a ``Linear4bit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qlorakit import hf_rules
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.packed import PackedWeight
from qlorakit.tables import dtype_from_name, dtype_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The ``quant_method`` name qlorakit registers with transformers.
QUANT_METHOD = "qlorakit"
#: The tensors bitsandbytes serializes per 4-bit weight (suffixes of the module's ``weight``).
SERIALIZED_NAMES = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
]


@register_quantization_config(QUANT_METHOD)
class QuantizationConfig(QuantizationConfigMixin):
    """Loads a bitsandbytes-format 4-bit checkpoint with qlorakit's layers.

    ``compute_dtype``: the dtype the 4-bit layers compute in. ``llm_int8_skip_modules``: the
    module patterns left unconverted, with bitsandbytes' meaning (``None``: transformers'
    defaults). ``bnb_config``: the checkpoint's own ``quantization_config``, kept as it was.
    """

    def __init__(
        self,
        compute_dtype: str | torch.dtype = "bfloat16",
        llm_int8_skip_modules: list[str] | None = None,
        bnb_config: dict | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.compute_dtype = compute_dtype if isinstance(compute_dtype, str) else dtype_name(compute_dtype)
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.bnb_config = bnb_config

    @classmethod
    def from_bnb(cls, bnb_config: dict, compute_dtype: torch.dtype | None = None) -> QuantizationConfig:
        """For a checkpoint whose ``config.json`` holds bitsandbytes' 4-bit ``bnb_config``."""
        recorded = str(bnb_config.get("bnb_4bit_compute_dtype") or "bfloat16").removeprefix("torch.")
        return cls(
            compute_dtype=dtype_name(compute_dtype) if compute_dtype is not None else recorded,
            llm_int8_skip_modules=bnb_config.get("llm_int8_skip_modules"),
            bnb_config=dict(bnb_config),
        )


class _Linear4bitSlot(nn.Module):
    """Stands, on the meta device, where a ``Linear4bit`` will be: its ``weight`` and ``bias``
    are the names transformers loads the serialized tensors for."""

    def __init__(self, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


class _Deserialize(ConversionOps):
    """One module's serialized 4-bit tensors -> a ``Linear4bit`` in place of its slot."""

    def __init__(self, hf_quantizer: QlorakitHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if len(input_dict) == 1:  # an ordinary "weight" (a norm's, an embedding's): not ours
            return input_dict
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        module_name = full_layer_name.rpartition(".")[0]
        slot = model.get_submodule(module_name)
        layer = Linear4bit(PackedWeight.from_state_dict(tensors, "weight"), None, self.hf_quantizer.compute_dtype)
        layer.bias = slot.bias  # still on meta if the bias loads after the weight; transformers then fills it
        layer.source_cls = getattr(slot, "source_cls", nn.Linear)
        for tensor in layer.buffers():
            tensor._is_hf_initialized = True
        layer._is_hf_initialized = True
        model.set_submodule(module_name, layer)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


@register_quantizer(QUANT_METHOD)
class QlorakitHfQuantizer(HfQuantizer):
    """transformers' loader for :class:`QuantizationConfig` (pre-quantized checkpoints)."""

    requires_calibration = False
    serialized_names = {"weight": SERIALIZED_NAMES}
    quantization_config: QuantizationConfig

    @property
    def compute_dtype(self) -> torch.dtype:
        return dtype_from_name(self.quantization_config.compute_dtype)

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError(
                "qlorakit's transformers quantizer loads packed 4-bit checkpoints; quantize a full-precision "
                "directory first with `qlorakit quantize SRC DST`"
            )

    def update_device_map(self, device_map: dict | None) -> dict:
        return device_map if device_map is not None else {"": "cpu"}

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        module_name, _, name = param_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        return isinstance(module, (_Linear4bitSlot, Linear4bit)) and name != "bias"

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        self.modules_to_not_convert = hf_rules.modules_to_not_convert(
            model, self.quantization_config.llm_int8_skip_modules, add_default_skips=False
        )
        for name, module in hf_rules.converted_modules(model, self.modules_to_not_convert).items():
            out_features, in_features = hf_rules.linear_shape(module)
            with torch.device("meta"):
                slot = _Linear4bitSlot(out_features, in_features, module.bias is not None)
            slot.source_cls = type(module)
            model.set_submodule(name, slot)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        model.is_loaded_in_4bit = True
        return model

    def get_load_operations(self) -> dict:
        return {"deserialize": _Deserialize}

    def is_serializable(self) -> bool:
        # Linear4bit's state dict is not bitsandbytes' serialization yet: refuse to save a file
        # that would load with random weights rather than write it.
        return False

    @property
    def is_trainable(self) -> bool:
        return True
