"""``load_packed``: a packed 4-bit checkpoint directory → a transformers model whose
quantized linears are ``qlorakit.nn.Linear4bit``, built without materializing any
quantized weight in full precision.

The model is built on the meta device from ``config.json``; every weight the files hold in
bitsandbytes' 4-bit serialization becomes a ``Linear4bit`` holding the packed bytes; every
other tensor is assigned as stored. Reads qlorakit's output and checkpoints written by
transformers + bitsandbytes alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qlorakit.errors import CheckpointError
from qlorakit.formats import QUANT_STATE_MARKER
from qlorakit.lora import _set_submodule
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.packed import PackedWeight

_PACKED_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files (not a packed checkpoint)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _recorded_compute_dtype(directory: Path) -> torch.dtype:
    """``bnb_4bit_compute_dtype`` of ``config.json``, else bfloat16."""
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    name = (config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype") or "bfloat16"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def _build_on_meta(directory: Path) -> nn.Module:
    import transformers

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a model directory)")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise CheckpointError(f"{config_path}: transformers does not know the model class {architectures!r}")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we load the 4-bit weights ourselves
    with torch.device("meta"):
        return model_class(config)


def load_packed(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Loads a packed checkpoint directory into a transformers model with ``Linear4bit``
    layers, on ``device``, in eval mode, all parameters frozen. ``compute_dtype`` defaults to
    the ``bnb_4bit_compute_dtype`` the checkpoint records (bfloat16 if none).

    Raises :class:`~qlorakit.errors.CheckpointError` for a directory that is not a packed
    checkpoint, a model class transformers does not know, or a missing tensor.
    """
    directory = Path(path)
    model = _build_on_meta(directory)
    compute_dtype = compute_dtype or _recorded_compute_dtype(directory)
    tensors = _read_tensors(directory)
    prefixes = [name.split(QUANT_STATE_MARKER)[0] for name in tensors if QUANT_STATE_MARKER in name]
    if not prefixes:
        raise CheckpointError(f"{directory}: no 4-bit quantized weights (not a packed checkpoint)")
    consumed: set[str] = set()
    for prefix in prefixes:
        module_path = prefix.removesuffix(".weight")
        module = _find_module(model, module_path)
        if module is None:
            raise CheckpointError(f"{directory}: tensor '{prefix}' belongs to no module of {type(model).__name__}")
        packed = PackedWeight.from_state_dict(tensors, prefix)
        bias = tensors.get(f"{module_path}.bias")
        layer = Linear4bit(packed, bias, compute_dtype)
        _set_submodule(model, _module_name(model, module), layer)
        consumed.update(k for k in tensors if k == prefix or k.startswith(prefix + "."))
        if bias is not None:
            consumed.add(f"{module_path}.bias")
    rest = {name: t for name, t in tensors.items() if name not in consumed}
    missing, unexpected = _assign(model, rest)
    if unexpected:
        raise CheckpointError(f"{directory}: tensor '{unexpected[0]}' matches no parameter of {type(model).__name__}")
    if missing:
        raise CheckpointError(f"{directory}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _find_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, also trying with/without the base-model prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [path, f"{prefix}.{path}", path.removeprefix(f"{prefix}.")] if prefix else [path]
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Assigns stored tensors to the meta parameters/buffers; returns (missing, unexpected)
    after tying weights and ignoring buffers the model rebuilds itself."""
    prefix = getattr(model, "base_model_prefix", "")
    expected = dict(model.state_dict(keep_vars=True))
    renamed: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in tensors.items():
        candidates = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [name]
        target = next((c for c in candidates if c in expected), None)
        if target is None:
            if not name.endswith("position_ids"):  # a non-persistent buffer older files carry
                unexpected.append(name)
            continue
        renamed[target] = tensor
    model.load_state_dict(renamed, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [name for name, value in model.state_dict(keep_vars=True).items() if value is not None and value.is_meta]
    _materialize_meta_buffers(model)
    return missing, unexpected


def _materialize_meta_buffers(model: nn.Module) -> None:
    """Buffers the files do not hold (rotary inverse frequencies, position ids) are still
    on meta: give them real storage and let the model's own ``_init_weights`` compute
    them, as transformers does after loading. Every loaded tensor is first marked
    initialized, so ``_init_weights`` leaves it alone."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            tensor._is_hf_initialized = True
    for module in model.modules():
        meta_buffers = [(n, b) for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        for name, buffer in meta_buffers:
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, torch.empty_like(buffer, device="cpu"), persistent=persistent)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, name, torch.empty_like(value, device="cpu"))
        if meta_buffers and hasattr(model, "_init_weights"):
            model._init_weights(module)
