"""PEFT's on-disk adapter format: ``save_adapter`` writes it, ``load_adapter`` reads it (also what PEFT wrote)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qlorakit.lora.config import LoraConfig
from qlorakit.lora.model import CONFIG_ATTRIBUTE, add_lora
from qlorakit.lora.targets import find_targets, lora_modules

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# PeftModel.base_model (LoraModel) .model (the wrapped transformers model): the prefix of every saved key.
_PEFT_KEY_PREFIX = "base_model.model."


def _adapter_state_dict(model: nn.Module, source: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            weight = source[key] if source is not None else getattr(module, part).weight
            tensors[f"{_PEFT_KEY_PREFIX}{key}"] = weight.detach().to("cpu").contiguous()
    return tensors


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    config: LoraConfig | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format into ``directory``
    (created if needed) and returns its path.

    Tensors keep the adapter's dtype; keys are ``base_model.model.{P}.lora_A.weight`` / ``.lora_B.weight``
    for the :class:`LoraLinear` at module path ``P``. ``config`` defaults to the one :func:`add_lora` (or
    :func:`load_adapter`) built the adapters with; a given one must describe the model's adapters: the modules
    it targets must be exactly the wrapped ones, with the same rank and scaling (else ``ValueError``), so that
    PEFT and :func:`load_adapter` rebuild the same function. ``base_model_name_or_path`` defaults to the model's
    ``name_or_path`` (as PEFT does). ``tensors``: the adapter weights to write, by parameter name (default the
    model's own; :func:`qlorakit.distributed.save_adapter` passes them gathered from a sharded model)."""
    from safetensors.torch import save_file

    wrapped = lora_modules(model)
    if not wrapped:
        raise ValueError("model has no LoRA adapters to save (call add_lora first)")
    config = config if config is not None else getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("the model does not record the LoraConfig of its adapters: pass config=")
    targeted = [name for name, _ in find_targets(model, config)]
    names = [name for name, _ in wrapped]
    if sorted(targeted) != sorted(names):
        raise ValueError(
            f"config.target_modules={config.target_modules!r} does not describe the model's adapters: "
            f"adapters not targeted {sorted(set(names) - set(targeted))}, "
            f"targeted modules without adapter {sorted(set(targeted) - set(names))}"
        )
    for name, module in wrapped:
        if module.r != config.r or not math.isclose(module.scaling, config.scaling, rel_tol=1e-12):
            raise ValueError(
                f"adapter {name!r} has r={module.r}, scaling={module.scaling}; config has r={config.r}, "
                f"scaling={config.scaling}"
            )
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    peft_dict = config.to_peft_dict(task_type=task_type, base_model_name_or_path=base_model_name_or_path)
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_dict, indent=2, sort_keys=True) + "\n")
    save_file(_adapter_state_dict(model, tensors), str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path = directory / ADAPTER_WEIGHTS_NAME
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_path))
    legacy = directory / _LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: neither {ADAPTER_WEIGHTS_NAME} nor {_LEGACY_WEIGHTS_NAME}")


def load_adapter(
    model: nn.Module, directory: str | os.PathLike[str], adapter_dtype: torch.dtype = torch.float32
) -> LoraConfig:
    """Loads a PEFT-format LoRA adapter (written by :func:`save_adapter` or by PEFT's ``save_pretrained``)
    into ``model``: :func:`add_lora` with the saved config, then the saved weights, cast to ``adapter_dtype``.

    Strict: every expected key must be present, no other key may be, and shapes must match (``lora_A``
    ``[r, in_features]``, ``lora_B`` ``[out_features, r]``); otherwise a ``ValueError`` naming the keys is
    raised before ``model`` is modified. Returns the adapter's :class:`LoraConfig`."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist")
    config = LoraConfig.from_peft_dict(json.loads(config_path.read_text()))
    if config.modules_to_save:
        raise NotImplementedError(f"adapter has modules_to_save={config.modules_to_save!r}, not supported yet")
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters; qlorakit supports one adapter per model")
    tensors = _read_adapter_weights(directory)

    targets = find_targets(model, config)
    if not targets:
        raise ValueError(f"no module of the model matches the adapter's target_modules={config.target_modules!r}")
    expected: dict[str, tuple[int, int]] = {}
    for name, module in targets:
        in_features, out_features = int(module.in_features), int(module.out_features)
        expected[f"{_PEFT_KEY_PREFIX}{name}.lora_A.weight"] = (config.r, in_features)
        expected[f"{_PEFT_KEY_PREFIX}{name}.lora_B.weight"] = (out_features, config.r)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory}: adapter weights do not fit the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    wrong = [f"{k}: {tuple(t.shape)} != {expected[k]}" for k, t in tensors.items() if tuple(t.shape) != expected[k]]
    if wrong:
        raise ValueError(f"{directory}: adapter weights have the wrong shapes: {'; '.join(wrong)}")
    add_lora(model, config, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        for name, module in lora_modules(model):
            module.lora_A.weight.copy_(tensors[f"{_PEFT_KEY_PREFIX}{name}.lora_A.weight"])
            module.lora_B.weight.copy_(tensors[f"{_PEFT_KEY_PREFIX}{name}.lora_B.weight"])
    return config
