"""What ``transformers.Trainer`` needs of a transformers model carrying qlorakit's own adapters
(:func:`qlorakit.add_lora`): to see the adapters, to write checkpoints holding the adapter rather than the
model, and to resume from them.

Trainer treats a quantized model as trainable only if it carries adapters, which it detects by PEFT's
``PeftModel`` or transformers' ``_hf_peft_config_loaded`` flag; :func:`attach` sets the flag (transformers'
meaning: "adapters are attached to this PreTrainedModel", which also makes gradient checkpointing keep input
gradients). ``save_pretrained`` (what Trainer calls for each checkpoint) then writes, instead of the model:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter in PEFT's format (what
  ``PeftModel.from_pretrained`` and :func:`qlorakit.load_adapter` read);
- ``model.safetensors``: the same adapter tensors under the training model's own parameter names. Trainer
  resumes a model that is not a ``PeftModel`` only from this file (``Trainer._load_from_checkpoint`` loads it
  with ``load_state_dict(strict=False)``); it holds nothing else, so resuming restores the adapter exactly
  and Trainer's warning lists the base's keys as missing (they were never saved: the base is unchanged).

No ``config.json`` is written, so no loader can mistake the directory for a full model and fill the base
with random weights. :func:`detach` (called by :func:`qlorakit.merge_lora`) restores the model's own
``save_pretrained``.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Trainer reads this file name when it resumes a model that is not a PeftModel (transformers' SAFE_WEIGHTS_NAME).
TRAINER_WEIGHTS_NAME = "model.safetensors"
#: safetensors metadata marking a TRAINER_WEIGHTS_NAME that holds only an adapter.
ADAPTER_ONLY_METADATA = {"format": "pt", "qlorakit": "lora adapter only (the base model is not in this file)"}


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.") for cls in type(model).__mro__
    )


def attach(model: nn.Module) -> None:
    """Marks a transformers model as carrying adapters and gives it the adapter ``save_pretrained``."""
    if not is_transformers_model(model):
        return
    model._hf_peft_config_loaded = True
    model.save_pretrained = types.MethodType(save_adapter_checkpoint, model)


def detach(model: nn.Module) -> None:
    """Undoes :func:`attach` (the adapters are gone)."""
    if "save_pretrained" in model.__dict__:
        del model.__dict__["save_pretrained"]
    if is_transformers_model(model):
        model._hf_peft_config_loaded = False


def save_adapter_checkpoint(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a model with qlorakit adapters: the adapter, as the module docstring says.
    ``state_dict``, when given (Trainer passes one under DeepSpeed/FSDP), supplies the tensors; other keyword
    arguments of ``PreTrainedModel.save_pretrained`` (sharding, ``push_to_hub``, ...) do not apply to an
    adapter and are ignored."""
    from safetensors.torch import save_file

    from qlorakit.lora import lora_parameter_names, save_adapter

    if not is_main_process:
        return
    directory = Path(save_directory)
    save_adapter(model, directory)
    names = lora_parameter_names(model)
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    tensors = {name: source[name].detach().to("cpu").contiguous() for name in names}
    save_file(tensors, str(directory / TRAINER_WEIGHTS_NAME), metadata=ADAPTER_ONLY_METADATA)
