"""Which modules of a model get adapters (``target_modules``), and the adapters a model holds."""

from __future__ import annotations

import re

from torch import nn

from qlorakit.lora.config import ALL_LINEAR, LoraConfig
from qlorakit.lora.layer import LoraLinear, is_linear_like


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        out = get()
    except (NotImplementedError, AttributeError):
        return None
    return out if isinstance(out, nn.Module) else None


def _matches(target_modules: list[str] | str, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a list (exact or ``.suffix``) or a regex (``re.fullmatch``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` targets in ``model``, in ``named_modules`` order.

    An existing :class:`LoraLinear` counts as a linear-like module at its own path; nothing inside it (its
    base layer, ``lora_A``, ``lora_B``) and nothing inside another target is a candidate. A module named by
    an explicit pattern that is not linear-like is an error (as in PEFT)."""
    all_linear = config.target_modules == ALL_LINEAR
    output_layer = _output_layer(model) if all_linear else None
    targets: list[tuple[str, nn.Module]] = []
    skip_inside: list[str] = []  # targets and existing adapters: nothing inside them is a candidate
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skip_inside):
            continue
        linear_like = isinstance(module, LoraLinear) or is_linear_like(module)
        if isinstance(module, LoraLinear):
            skip_inside.append(name)
        if all_linear:
            if not linear_like:
                continue
            if output_layer is not None:
                if module is output_layer:
                    continue
            elif name == "lm_head" or name.endswith(".lm_head"):
                continue
        elif not _matches(config.target_modules, name):
            continue
        elif not linear_like:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches {name!r} ({type(module).__name__}), which is not "
                "linear-like; LoRA is supported on torch.nn.Linear and linear-like modules (integer in_features and "
                "out_features and a weight or packed attribute)"
            )
        targets.append((name, module))
        skip_inside.append(name)
    return targets


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
