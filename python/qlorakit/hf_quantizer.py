"""qlorakit as a transformers quantization method: ``from_pretrained`` builds the model with
``qlorakit.nn.Linear4bit`` layers, from a bitsandbytes-format 4-bit checkpoint or from a
full-precision one quantized while it loads::

    AutoModelForCausalLM.from_pretrained(full_precision_dir, quantization_config=qlorakit.QuantizationConfig(
        quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16))

Registered through transformers' public extension points (``register_quantization_config``,
``register_quantizer``), so transformers does all the loading it does for bitsandbytes: it
builds the model on the meta device, renames and fuses checkpoint keys (GPT-NeoX's
``embed_out``, MoE experts), ties weights, initializes the buffers no file holds, and reports
missing or unexpected keys. The quantizer decides which modules become 4-bit (the rule of
:mod:`qlorakit.hf_rules`, which ``qlorakit quantize`` follows too) and builds each
``Linear4bit``: from the module's serialized tensors (``weight``, ``weight.absmax``, ...,
``weight.quant_state.bitsandbytes__nf4``) for a packed checkpoint, or by quantizing the
stored weight with qlorakit's core (:func:`qlorakit.quantize`, the bytes ``qlorakit quantize``
writes; ``Conv1D`` weights transposed) for a full-precision one.

Saving: ``Linear4bit``'s state dict is bitsandbytes' serialization and :class:`QuantizationConfig`
serializes as bitsandbytes' 4-bit ``quantization_config``, so ``save_pretrained`` writes a
directory transformers + bitsandbytes (and qlorakit) load.

transformers refuses a ``quantization_config`` of another class than the one a checkpoint's
``config.json`` names (``AutoHfQuantizer.merge_quantization_configs``). For a packed
(bitsandbytes) checkpoint given a :class:`QuantizationConfig`, qlorakit wraps that function so
the checkpoint loads with qlorakit's layers (its recorded options stand, as transformers does
for bitsandbytes); every other combination goes to transformers unchanged.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AutoHfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qlorakit import _core, hf_rules
from qlorakit.errors import CheckpointError, QlorakitError
from qlorakit.formats import DEFAULT_BLOCKSIZE, SAFETENSORS_FLOAT_DTYPES
from qlorakit.hf_files import COMPUTE_DTYPES, is_bnb_4bit
from qlorakit.hf_files import quantization_config as bnb_quantization_config
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.packed import SERIALIZED_SUFFIXES, PackedWeight
from qlorakit.quantization import quantize
from qlorakit.tables import ELEMENT_DTYPES, dtype_from_name, dtype_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The ``quant_method`` name qlorakit registers with transformers.
QUANT_METHOD = "qlorakit"
#: The tensors bitsandbytes serializes per 4-bit weight (suffixes of the module's ``weight``).
SERIALIZED_NAMES = [f"weight{suffix}" for suffix in SERIALIZED_SUFFIXES]


@register_quantization_config(QUANT_METHOD)
class QuantizationConfig(QuantizationConfigMixin):
    """qlorakit's 4-bit layers in transformers' ``from_pretrained``.

    For a full-precision checkpoint, the options of ``qlorakit quantize``: ``quant_type`` ("nf4" or
    "fp4"), ``blocksize``, ``double_quant``, ``skip`` (module patterns kept in full precision on top of
    transformers' defaults, like ``--skip``), ``scale_search``. ``compute_dtype``: the dtype the 4-bit
    layers compute in. ``llm_int8_skip_modules``: the full list of modules left unconverted, with
    bitsandbytes' meaning (``None``: transformers' defaults plus ``skip``). ``bnb_config``: the
    ``quantization_config`` of the packed checkpoint loaded, kept as it was.

    Serialized (``to_dict``, hence ``config.json`` of ``save_pretrained``) as bitsandbytes' 4-bit
    ``quantization_config``: the checkpoint's own, or the one ``qlorakit quantize`` writes for these
    options. ``quant_method`` stays ``"qlorakit"`` on the object (it picks qlorakit's quantizer).
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = True,
        compute_dtype: str | torch.dtype = "bfloat16",
        skip: Sequence[str] = (),
        scale_search: bool = False,
        llm_int8_skip_modules: list[str] | None = None,
        bnb_config: dict | None = None,
        **kwargs: Any,
    ) -> None:
        # The core is the one validator of the format (a ValueError naming the option).
        _core.QuantizeOptions(
            quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, max_shard_bytes=1 << 30
        )
        self.quant_method = QUANT_METHOD
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.compute_dtype = _compute_dtype_name(compute_dtype)
        self.skip = list(skip)
        self.scale_search = bool(scale_search)
        self.llm_int8_skip_modules = list(llm_int8_skip_modules) if llm_int8_skip_modules is not None else None
        self.bnb_config = dict(bnb_config) if bnb_config is not None else None

    @classmethod
    def from_bnb(cls, bnb_config: dict, compute_dtype: torch.dtype | None = None) -> QuantizationConfig:
        """For a checkpoint whose ``config.json`` holds bitsandbytes' 4-bit ``bnb_config``."""
        recorded = str(bnb_config.get("bnb_4bit_compute_dtype") or "bfloat16").removeprefix("torch.")
        return cls(
            quant_type=bnb_config.get("bnb_4bit_quant_type") or "nf4",
            double_quant=bool(bnb_config.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=compute_dtype if compute_dtype is not None else recorded,
            llm_int8_skip_modules=bnb_config.get("llm_int8_skip_modules"),
            bnb_config=bnb_config,
        )

    def loader_dict(self) -> dict[str, Any]:
        """This config as a ``config.json``-style dict that transformers dispatches to qlorakit's quantizer
        (``to_dict`` gives bitsandbytes' instead)."""
        return copy.deepcopy({**self.__dict__, "quant_method": QUANT_METHOD})

    def to_dict(self) -> dict[str, Any]:
        """bitsandbytes' 4-bit ``quantization_config`` (what ``config.json`` records)."""
        if self.bnb_config is not None:
            return copy.deepcopy(self.bnb_config)
        return bnb_quantization_config(
            self.quant_type, self.double_quant, self.compute_dtype, self.llm_int8_skip_modules or []
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.loader_dict(), indent=2, sort_keys=True)}"


def _compute_dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or the CLI's ``"bf16"`` -> ``"bfloat16"``."""
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype).removeprefix("torch.")
    name = COMPUTE_DTYPES.get(name, name)
    if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
        raise ValueError(f"compute_dtype must be a floating-point torch dtype, got {dtype!r}")
    return name


class _Linear4bitSlot(nn.Module):
    """Stands, on the meta device, where a ``Linear4bit`` will be: its ``weight`` and ``bias``
    are the names transformers loads the serialized (or full-precision) tensors for."""

    def __init__(self, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


def _install(model: nn.Module, weight_name: str, packed: PackedWeight, compute_dtype: torch.dtype) -> None:
    """Puts a ``Linear4bit`` holding ``packed`` where the slot of parameter ``weight_name`` is."""
    module_name = weight_name.rpartition(".")[0]
    slot = model.get_submodule(module_name)
    layer = Linear4bit(packed, None, compute_dtype)
    layer.bias = slot.bias  # still on meta if the bias loads after the weight; transformers then fills it
    layer.source_cls = getattr(slot, "source_cls", nn.Linear)
    for tensor in layer.quantized_parameters():
        tensor._is_hf_initialized = True
    layer._is_hf_initialized = True
    model.set_submodule(module_name, layer)


class _QuantizerOp(ConversionOps):
    """An op of qlorakit's quantizer. transformers deep-copies a converter (with its ops) for every
    checkpoint key; a copy shares the quantizer rather than copying it (and its config) each time."""

    def __init__(self, hf_quantizer: QlorakitHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict) -> _QuantizerOp:
        return type(self)(self.hf_quantizer)


class _Deserialize(_QuantizerOp):
    """One module's serialized 4-bit tensors -> a ``Linear4bit`` in place of its slot."""

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
        packed = PackedWeight.from_state_dict(tensors, "weight")
        _install(model, full_layer_name, packed, self.hf_quantizer.compute_dtype)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class _SerializedWeight(WeightConverter):
    """transformers' converter of one module's serialized tensors (``weight``, ``weight.absmax``, ...),
    copied fresh for every module: ``deepcopy`` of a converter (what transformers does per checkpoint
    key) costs more than the rest of loading a packed checkpoint."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> _SerializedWeight:
        return self.copy(self._original_source_patterns, self._original_target_patterns, operations=self.operations)


class _Quantize(_QuantizerOp):
    """One full-precision weight -> a ``Linear4bit`` in place of its slot, quantized by qlorakit's core."""

    def convert(
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        source_patterns: list[str] | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            # A renamed key arrives under its parameter name; source_patterns[0] is its checkpoint key.
            source = source_patterns[0] if source_patterns and len(input_dict) == 1 else name
            packed = self.hf_quantizer.quantize_weight(source, value, model.get_submodule(name.rpartition(".")[0]))
            _install(model, name, packed, self.hf_quantizer.compute_dtype)
            if missing_keys is not None:
                missing_keys.discard(name)
        return {}


@register_quantizer(QUANT_METHOD)
class QlorakitHfQuantizer(HfQuantizer):
    """transformers' loader for :class:`QuantizationConfig`: packed checkpoints, and full-precision
    ones quantized while they load."""

    requires_calibration = False
    serialized_names = {"weight": SERIALIZED_NAMES}
    quantization_config: QuantizationConfig

    def __init__(self, quantization_config: QuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        #: checkpoint key -> (file, stored dtype), for weights quantized on load.
        self._stored: dict[str, tuple[str, torch.dtype]] = {}

    @property
    def compute_dtype(self) -> torch.dtype:
        return dtype_from_name(self.quantization_config.compute_dtype)

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("qlorakit's 4-bit layers cannot be offloaded to disk; use a device_map without 'disk'")

    def update_device_map(self, device_map: dict | None) -> dict:
        return device_map if device_map is not None else {"": "cpu"}

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        module_name, _, name = param_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        return isinstance(module, (_Linear4bitSlot, Linear4bit)) and name != "bias"

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        config = self.quantization_config
        if self.pre_quantized or config.llm_int8_skip_modules is not None:
            not_convert = hf_rules.modules_to_not_convert(model, config.llm_int8_skip_modules, add_default_skips=False)
        else:  # what `qlorakit quantize --skip` leaves unconverted
            defaults = hf_rules.modules_to_not_convert(model, None, add_default_skips=True)
            not_convert = sorted(set(defaults) | set(config.skip))
        self.modules_to_not_convert = not_convert
        if not self.pre_quantized:
            self._stored = _stored_dtypes(checkpoint_files or [])
        for name, module in hf_rules.converted_modules(model, not_convert).items():
            out_features, in_features = hf_rules.linear_shape(module)
            with torch.device("meta"):
                slot = _Linear4bitSlot(out_features, in_features, module.bias is not None)
            slot.source_cls = type(module)
            model.set_submodule(name, slot)

    def quantize_weight(self, key: str, value: torch.Tensor, slot: nn.Module) -> PackedWeight:
        """The 4-bit form of checkpoint tensor ``key`` (``value``: as transformers loaded it), as
        ``qlorakit quantize`` writes it: from the stored values (re-read if transformers cast them to
        another dtype), ``Conv1D`` weights transposed."""
        config = self.quantization_config
        file, stored_dtype = self._stored.get(key, ("", value.dtype))
        try:
            if value.dtype != stored_dtype:
                value = _read_tensor(file, key)
            weight = value.detach().to("cpu")
            if issubclass(getattr(slot, "source_cls", nn.Linear), Conv1D):  # stored [in, out]
                weight = weight.T
            packed = quantize(
                weight.contiguous(),
                config.quant_type,
                config.blocksize,
                config.double_quant,
                scale_search=config.scale_search,
            )
        except QlorakitError as exc:
            # transformers collects it into its load report and raises a RuntimeError after the report.
            raise CheckpointError(f"{file or 'checkpoint'}: tensor '{key}': {exc}") from None
        return packed.to(value.device) if value.device.type != "cpu" else packed

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        model.is_loaded_in_4bit = True
        # Deserializing is a loading step only: a saved model writes the serialized tensors as they are
        # (Linear4bit's state dict), so it must not be reverted on save (transformers has no reverse op for it).
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                c for c in conversions if not any(isinstance(op, _Deserialize) for op in getattr(c, "operations", []))
            ]
        if not self.pre_quantized and self.quantization_config.llm_int8_skip_modules is None:
            # What a saved config.json must list: a list there replaces transformers' defaults.
            unconverted = {name for name, module in model.named_modules() if isinstance(module, _Linear4bitSlot)}
            self.quantization_config.llm_int8_skip_modules = sorted(set(self.modules_to_not_convert) | unconverted)
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return _Quantize(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": _Deserialize}

    def get_weight_conversions(self) -> list[WeightConverter]:
        if not self.pre_quantized:
            return []
        return [_SerializedWeight(names, param, [_Deserialize(self)]) for param, names in self.serialized_names.items()]

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """Every ``Linear4bit`` back to its full-precision layer (in ``dtype``, else the stored one)."""
        from qlorakit.training import dequantize_model

        return dequantize_model(model, dtype)


def _stored_dtypes(checkpoint_files: Sequence[str]) -> dict[str, tuple[str, torch.dtype]]:
    """checkpoint key -> (file, stored dtype) of every float tensor in the safetensors files (headers only)."""
    stored = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            continue
        for entry in _core.read_header(str(file)).tensors:
            if entry.dtype in SAFETENSORS_FLOAT_DTYPES:
                stored[entry.name] = (str(file), ELEMENT_DTYPES[SAFETENSORS_FLOAT_DTYPES[entry.dtype]])
    return stored


def _read_tensor(file: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        tensor = handle.get_tensor(key)
    if tensor.dtype not in ELEMENT_DTYPES.values():
        raise CheckpointError(f"{file}: tensor '{key}' has dtype {tensor.dtype}, not a float type qlorakit quantizes")
    return tensor


def _merge_quantization_configs(
    cls: type,
    quantization_config: dict | QuantizationConfigMixin,
    quantization_config_from_args: QuantizationConfigMixin | None,
) -> QuantizationConfigMixin:
    """transformers' ``merge_quantization_configs``, except that a :class:`QuantizationConfig` given for a
    bitsandbytes 4-bit checkpoint loads it with qlorakit's layers (in the config's compute dtype)."""
    if isinstance(quantization_config_from_args, QuantizationConfig) and isinstance(quantization_config, dict):
        if quantization_config.get("quant_method") == QUANT_METHOD:
            return QuantizationConfig.from_dict(quantization_config)
        if is_bnb_4bit(quantization_config):
            return QuantizationConfig.from_bnb(
                quantization_config, dtype_from_name(quantization_config_from_args.compute_dtype)
            )
    return _original_merge(quantization_config, quantization_config_from_args)


_original_merge = AutoHfQuantizer.merge_quantization_configs
AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_quantization_configs)  # type: ignore[method-assign]
