"""Makes PEFT's LoRA build :class:`qlorakit.peft_lora.LoraLinear4bit` for qlorakit's ``Linear4bit`` layers.

PEFT's documented extension point for layer types it does not know is the custom-module mapping
(``LoraConfig._register_custom_module({Linear4bit: LoraLinear4bit})``, "Custom models" in PEFT's developer
guide). It lives on the ``LoraConfig``, which users build themselves, so qlorakit applies it for them: when PEFT
creates a LoRA layer around a qlorakit ``Linear4bit`` (``get_peft_model``, ``PeftModel.from_pretrained``,
``add_adapter``, TRL's ``peft_config``), the mapping is registered on that config first and PEFT's own
dispatch picks qlorakit's layer. Nothing changes for other layer types.

The hook is installed without importing PEFT (its import costs seconds): if PEFT is already imported the
patch is applied at once, otherwise when ``peft.tuners.lora.model`` is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_LORA_MODEL_MODULE = "peft.tuners.lora.model"
_MARK = "_qlorakit_dispatch"


def install() -> None:
    """Installs the dispatch (idempotent; a no-op cost when PEFT is never imported)."""
    module = sys.modules.get(_LORA_MODEL_MODULE)
    if module is not None:
        _patch(module)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def _patch(module: ModuleType) -> None:
    lora_model = module.LoraModel
    original = lora_model._create_new_module
    if getattr(original, _MARK, False):
        return

    def create_new_module(lora_config: Any, adapter_name: str, target: Any, **kwargs: Any) -> Any:
        from peft.tuners.tuners_utils import BaseTunerLayer

        from qlorakit.nn.linear4bit import Linear4bit

        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Linear4bit):
            from qlorakit.peft_lora import LoraLinear4bit

            custom = lora_config._custom_modules or {}
            if Linear4bit not in custom:
                lora_config._register_custom_module({Linear4bit: LoraLinear4bit})
        return original(lora_config, adapter_name, target, **kwargs)

    setattr(create_new_module, _MARK, True)
    lora_model._create_new_module = staticmethod(create_new_module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``peft.tuners.lora.model`` through the other finders and patches it once it has executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _LORA_MODEL_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)
