"""``load_packed``: a packed 4-bit checkpoint directory -> a transformers model whose quantized
linears are ``qlorakit.nn.Linear4bit``, without materializing any quantized weight in full
precision.

Loading runs through transformers' own ``from_pretrained`` with qlorakit registered as its
quantization method (:mod:`qlorakit.hf_quantizer`): the same key renames and fusions, weight
tying, buffer initialization and file handling (an ``adapter_model.safetensors`` or optimizer
state beside the weights is not read) as transformers + bitsandbytes, so every directory they
load — qlorakit's output or one transformers + bitsandbytes saved — loads here too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qlorakit.errors import CheckpointError

_NO_ADAPTER_SUBFOLDER = ".qlorakit-base-only"


def load_packed(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Loads a packed checkpoint directory into a transformers model with ``Linear4bit``
    layers, on ``device``, in eval mode, all parameters frozen. ``compute_dtype`` defaults to
    the ``bnb_4bit_compute_dtype`` the checkpoint records (bfloat16 if none).

    Raises :class:`~qlorakit.errors.CheckpointError` for a directory that is not a packed
    checkpoint, a model class transformers does not know, or a tensor missing, unexpected or
    misshapen for the model.
    """
    from qlorakit import hf_rules
    from qlorakit.hf_quantizer import QuantizationConfig

    directory = Path(path)
    config = _packed_config(directory)
    bnb_config = config.quantization_config
    config.quantization_config = QuantizationConfig.from_bnb(bnb_config, compute_dtype).to_dict()
    model_class = hf_rules.model_class(config, directory)
    model, info = model_class.from_pretrained(
        str(directory),
        config=config,
        device_map={"": str(torch.device(device))},
        output_loading_info=True,
        # transformers (with PEFT installed) loads an adapter it finds beside the weights; this loads
        # the base alone (adapters go on with load_adapter), so its adapter lookup is pointed at a
        # subfolder that does not exist.
        adapter_kwargs={"subfolder": _NO_ADAPTER_SUBFOLDER},
    )
    problems = [
        *(f"missing tensor '{k}'" for k in sorted(info["missing_keys"])),
        *(f"tensor '{k}' matches no parameter of {model_class.__name__}" for k in sorted(info["unexpected_keys"])),
        *(f"tensor '{k}' has shape {list(a)}, the model expects {list(b)}" for k, a, b in info["mismatched_keys"]),
        *info.get("error_msgs", []),
    ]
    if problems:
        more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
        raise CheckpointError(f"{directory}: {problems[0]}{more}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _packed_config(directory: Path):  # noqa: ANN202 (a transformers PretrainedConfig)
    import transformers

    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json (not a model directory)")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    bnb_config = getattr(config, "quantization_config", None)
    if bnb_config is not None and not isinstance(bnb_config, dict):
        bnb_config = bnb_config.to_dict()
    if not bnb_config or not (bnb_config.get("load_in_4bit") or bnb_config.get("_load_in_4bit")):
        raise CheckpointError(
            f"{directory}: no 4-bit quantized weights: config.json has no bitsandbytes 4-bit quantization_config "
            "(not a packed checkpoint; quantize it first with `qlorakit quantize`)"
        )
    config.quantization_config = bnb_config
    return config
