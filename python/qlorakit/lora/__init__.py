"""LoRA adapters in PEFT's on-disk format, for any linear-like base layer.

The habit followed is PEFT's ``tuners/lora``: a layer (:class:`LoraLinear`) wraps the frozen base
layer and holds the adapter state (``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``); a config
dataclass (:class:`LoraConfig`) serializes to the ``adapter_config.json`` saved next to the weights.

The base layer can be anything that behaves like ``nn.Linear`` (see :func:`is_linear_like`): a plain
``torch.nn.Linear``, bitsandbytes' ``Linear4bit``, or qlorakit's ``qlorakit.nn.Linear4bit``. Only its
``in_features``, ``out_features`` and ``forward`` are used.

On disk (verified against peft 0.21.2's ``PeftModel.save_pretrained`` for adapter ``"default"``):

- ``adapter_config.json``: PEFT's ``LoraConfig`` fields (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ...);
- ``adapter_model.safetensors``: for the wrapped module at path ``P`` of the model (e.g.
  ``model.layers.0.self_attn.q_proj`` in a ``LlamaForCausalLM``), ``base_model.model.{P}.lora_A.weight``
  (shape ``[r, in_features]``) and ``base_model.model.{P}.lora_B.weight`` (shape ``[out_features, r]``),
  metadata ``{"format": "pt"}``. PEFT strips the adapter name on save and re-inserts it on load.

So ``peft.PeftModel.from_pretrained(base, directory)`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` loads what ``PeftModel.save_pretrained`` writes (plain LoRA; DoRA, rank/alpha patterns,
``layers_to_transform``, ``modules_to_save`` and similar extensions are refused with a ``ValueError``).

The package, by role: :mod:`~qlorakit.lora.config` (``LoraConfig``), :mod:`~qlorakit.lora.layer`
(``LoraLinear``), :mod:`~qlorakit.lora.targets` (which modules get adapters), :mod:`~qlorakit.lora.model`
(``add_lora``, ``merge_lora``), :mod:`~qlorakit.lora.files` (PEFT's files).
"""

from __future__ import annotations

from qlorakit.lora.config import LoraConfig
from qlorakit.lora.files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, load_adapter, save_adapter
from qlorakit.lora.layer import LoraLinear
from qlorakit.lora.model import (
    CONFIG_ATTRIBUTE,
    add_lora,
    lora_parameter_names,
    lora_parameters,
    merge_lora,
    trainable_parameter_count,
)
from qlorakit.lora.targets import is_linear_like

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CONFIG_ATTRIBUTE",
    "LoraConfig",
    "LoraLinear",
    "add_lora",
    "is_linear_like",
    "load_adapter",
    "lora_parameter_names",
    "lora_parameters",
    "merge_lora",
    "save_adapter",
    "trainable_parameter_count",
]
