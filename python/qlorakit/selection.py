"""Which tensors of a checkpoint get quantized.

Default, the name rule: 2-D float ``*.weight`` tensors that are not embeddings, norms or
``lm_head``, minus ``--skip`` patterns. It needs neither torch nor transformers, so the
tool starts in a fraction of a second, and on the usual decoder and encoder models it
picks exactly the linear layers transformers would (tested on Llama and BERT).

The transformers rule (opt-in) is transformers' own: every ``nn.Linear`` (or GPT-2
``Conv1D``) module of the model class named in ``config.json``, except those transformers
keeps in full precision by default (tied weights, output embeddings such as ``lm_head``,
the last module, the class's fp32 modules) and ``--skip`` matches. It builds the model on
the meta device, which costs a few seconds of imports.

Either way the output's ``llm_int8_skip_modules`` lists every module left unquantized,
so a bitsandbytes loader converts exactly the modules that were quantized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FLOAT_DTYPES = ("F32", "BF16", "F16")
#: Name fragments of 2-D weights the name-based rule never quantizes.
DEFAULT_SKIP_FRAGMENTS = ("embed", "wte", "wpe", "lm_head", "norm", "ln_", "layernorm")


@dataclass
class Selection:
    """Tensors to quantize, modules a loader must leave unconverted, and how this was decided."""

    quantize: list[str]
    skip_modules: list[str]
    method: str


def matches_module(name: str, pattern: str) -> bool:
    """transformers' module-pattern rule: a prefix ending at a module boundary, a regex
    with the same boundary, or a suffix ("fc1" matches "model.decoder.layers.23.fc1")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        return bool(re.match(rf"(?:{pattern}){boundary}", name)) or name.endswith(pattern)
    except re.error:
        return name.startswith(pattern) or name.endswith(pattern)


def select_tensors(
    source_dir: Path | None,
    tensors: Sequence[tuple[str, str, list[int]]],
    skip: Sequence[str],
    transformers_rule: bool = False,
) -> Selection:
    """``tensors``: (name, safetensors dtype, shape) of every tensor in the checkpoint.
    The transformers rule falls back to the name rule (and says so in ``method``) when the
    model class cannot be built."""
    by_name = {name: (dtype, shape) for name, dtype, shape in tensors}
    if transformers_rule and source_dir is not None:
        selection = _select_with_transformers(source_dir, by_name, skip)
        if selection is not None:
            return selection
        fallback = _select_by_name(by_name, skip)
        fallback.method += "; the transformers rule was asked for but the model class could not be built"
        return fallback
    return _select_by_name(by_name, skip)


def _quantizable(entry: tuple[str, list[int]] | None) -> bool:
    return entry is not None and entry[0] in FLOAT_DTYPES and len(entry[1]) == 2 and 0 not in entry[1]


def _select_by_name(by_name: dict[str, tuple[str, list[int]]], skip: Sequence[str]) -> Selection:
    quantize, skipped = [], []
    for name, entry in by_name.items():
        if not name.endswith(".weight") or not _quantizable(entry):
            continue
        module = name.removesuffix(".weight")
        lowered = module.lower()
        if any(f in lowered for f in DEFAULT_SKIP_FRAGMENTS) or any(matches_module(module, p) for p in skip):
            skipped.append(module)
        else:
            quantize.append(name)
    return Selection(quantize, sorted(skipped), "name rule: 2-D weights except embeddings, norms, lm_head")


def _select_with_transformers(
    source_dir: Path, by_name: dict[str, tuple[str, list[int]]], skip: Sequence[str]
) -> Selection | None:
    config_path = source_dir / "config.json"
    if not config_path.is_file():
        return None
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        return None
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(str(source_dir))
        with torch.device("meta"):
            model = model_class(config)
    except Exception:  # an unbuildable config falls back to the name-based rule
        return None
    not_converted = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    patterns = not_converted + list(skip)
    prefix = getattr(model, "base_model_prefix", "")
    quantize, skipped = [], set(not_converted) | set(skip)
    for module_name, module in model.named_modules():
        if not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)):
            continue
        if any(matches_module(module_name, p) for p in patterns):
            continue
        key = _checkpoint_key(f"{module_name}.weight", by_name, prefix)
        if key is not None and _quantizable(by_name[key]):
            quantize.append(key)
        else:
            skipped.add(module_name)  # not in the file as a float matrix: keep and tell the loader
    return Selection(quantize, sorted(skipped), f"transformers {architectures[0]} linear layers")


def _checkpoint_key(key: str, by_name: dict, prefix: str) -> str | None:
    """The checkpoint's name for a model parameter (with or without the base-model prefix)."""
    candidates = [key]
    if prefix:
        candidates += [f"{prefix}.{key}", key.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in by_name), None)
