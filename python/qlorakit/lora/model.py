"""Adapters on a model: ``add_lora`` (wrap, freeze), the adapter parameters, ``merge_lora``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from qlorakit import trainer_support
from qlorakit.lora.config import LoraConfig
from qlorakit.lora.layer import LoraLinear, is_dense_linear
from qlorakit.lora.targets import find_targets, lora_modules

#: The attribute :func:`add_lora` leaves on the model: the config its adapters were built with.
CONFIG_ATTRIBUTE = "qlorakit_lora_config"


def add_lora(model: nn.Module, config: LoraConfig, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wraps every module ``config.target_modules`` selects in a :class:`LoraLinear`, in place, and freezes
    every parameter of ``model`` except the adapters' ``lora_A``/``lora_B`` weights.

    ``adapter_dtype`` is the dtype of the adapter weights and computation (float32 by default, as PEFT does).
    Returns ``model``. Raises ``ValueError`` when nothing matches (naming the patterns), when a pattern names
    a module that is not linear-like, or when ``model`` already has LoRA adapters (one adapter per model)."""
    if config.modules_to_save:
        raise NotImplementedError(f"modules_to_save={config.modules_to_save!r} is not supported yet")
    existing = lora_modules(model)
    if existing:
        raise ValueError(
            f"model already has LoRA adapters (e.g. at {existing[0][0]!r}); qlorakit supports one adapter per model"
        )
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(f"no module of the model matches target_modules={config.target_modules!r}")
    for name, module in targets:
        model.set_submodule(
            name,
            LoraLinear(
                module,
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                adapter_dtype=adapter_dtype,
            ),
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for param in lora_parameters(model):
        param.requires_grad_(True)
    setattr(model, CONFIG_ATTRIBUTE, config)
    trainer_support.attach(model)
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    """The names (in ``model.named_parameters()``) of the adapters' ``lora_A``/``lora_B`` weights."""
    return [f"{name}.{part}.weight" for name, _ in lora_modules(model) for part in ("lora_A", "lora_B")]


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The ``lora_A`` and ``lora_B`` weights of every :class:`LoraLinear` in ``model`` (what training updates)."""
    for _, module in lora_modules(model):
        yield module.lora_A.weight
        yield module.lora_B.weight


def trainable_parameter_count(model: nn.Module) -> int:
    """The number of elements in parameters with ``requires_grad`` (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base layer, in place: each :class:`LoraLinear` is replaced by its base layer
    with weight ``W + scaling * B @ A`` (computed in float32) and the same bias. An ``nn.Linear`` base (or subclass)
    keeps its class, dtype and device; a 4-bit ``qlorakit.nn.Linear4bit`` base is dequantized into the layer it stands
    for (``nn.Linear``, or GPT-2's ``Conv1D``), holding the full precision weight in the dtype the checkpoint was
    quantized from (requantize it with ``qlorakit.quantize`` if a 4-bit result is wanted). Returns ``model``.

    Other bases raise ``NotImplementedError`` before anything is changed."""
    wrapped = lora_modules(model)
    for name, module in wrapped:
        base = module.base_layer
        if not is_dense_linear(base) and not hasattr(base, "to_dense"):
            raise NotImplementedError(
                f"merge_lora: {name!r} has a {type(base).__name__} base layer; only torch.nn.Linear and "
                "qlorakit.nn.Linear4bit bases are merged."
            )
    for name, module in wrapped:
        base = module.base_layer
        with torch.no_grad():
            if is_dense_linear(base):
                weight, dtype = base.weight.float(), base.weight.dtype
            else:  # a 4-bit base: dequantization is exact in float32
                weight, dtype = base.dequantized_weight(torch.float32), base.layout.dtype
            merged = (weight + module.delta_weight().to(weight.device)).to(dtype)
        if is_dense_linear(base):  # keeps its class (e.g. Falcon's FalconLinear)
            base.weight = nn.Parameter(merged, requires_grad=False)
            new = base
        else:
            new = base.to_dense(merged)
        model.set_submodule(name, new)
    trainer_support.detach(model)
    return model
