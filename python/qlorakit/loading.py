"""``from_pretrained``: a model directory -> a transformers model whose quantized linears are
``qlorakit.nn.Linear4bit``. A packed 4-bit checkpoint loads as it is (``load_packed``), without
materializing any quantized weight in full precision; a full-precision one is quantized while it
loads, streamed through the Rust pipeline of ``qlorakit quantize`` (memory-mapped source, one
tensor at a time, source pages released) into a scratch directory, loaded from there and deleted:
the same modules and bytes as ``qlorakit quantize`` writes, and a peak memory of about the packed
size.

Loading runs through transformers' own ``from_pretrained`` with qlorakit registered as its
quantization method (:mod:`qlorakit.hf_quantizer`): the same key renames and fusions, weight
tying, buffer initialization and file handling (an ``adapter_model.safetensors`` or optimizer
state beside the weights is not read) as transformers + bitsandbytes, so every directory they
load — qlorakit's output or one transformers + bitsandbytes saved — loads here too.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.checkpoint import quantize_checkpoint
from qlorakit.errors import CheckpointError
from qlorakit.hf_files import COMPUTE_DTYPES, is_bnb_4bit

_NO_ADAPTER_SUBFOLDER = ".qlorakit-base-only"
#: quantize_checkpoint's parameters that from_pretrained sets itself (``force`` and ``compute_dtype`` are its own).
_OWN_PARAMETERS = ("src", "dst", "durable")


def from_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
    *,
    packed_dir: str | os.PathLike | None = None,
    force: bool = False,
    **quantize_options: Any,
) -> nn.Module:
    """Loads a model directory into a transformers model with ``Linear4bit`` layers, on ``device``,
    in eval mode, all parameters frozen.

    A packed checkpoint (``config.json`` with bitsandbytes' 4-bit ``quantization_config``: what
    ``qlorakit quantize`` or transformers + bitsandbytes write) loads as :func:`load_packed` does.
    A full-precision one is quantized while loading, exactly as ``qlorakit quantize`` would
    (:func:`qlorakit.quantize_checkpoint`; ``quantize_options`` are its options: ``quant_type``,
    ``blocksize``, ``double_quant``, ``skip``, ``rule``, ``scale_search``, ``importance``,
    ``threads``, ``progress``, ...). ``packed_dir``: keep the packed checkpoint there (an existing
    non-empty directory is replaced only with ``force=True``); otherwise it is written to a scratch
    directory (:mod:`qlorakit.scratch`) and deleted once loaded.

    ``compute_dtype``: the dtype the 4-bit layers compute in; default the checkpoint's recorded
    ``bnb_4bit_compute_dtype`` (bfloat16 for one quantized here).

    Raises :class:`~qlorakit.errors.CheckpointError` naming the file (and tensor) for a directory
    that cannot be loaded, ``FileExistsError`` for an existing ``packed_dir`` without ``force``,
    ``ValueError``/``TypeError`` for bad or unknown options.
    """
    directory = Path(path)
    bnb_config = _recorded_quantization(directory)
    if bnb_config is not None:
        if quantize_options or packed_dir is not None:
            given = sorted(quantize_options) + (["packed_dir"] if packed_dir is not None else [])
            raise ValueError(f"{directory} is already a packed 4-bit checkpoint; {given} apply to full-precision ones")
        return load_packed(directory, device, compute_dtype)
    options = _quantize_options(quantize_options, compute_dtype)
    if packed_dir is not None:
        target = Path(packed_dir)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty directory holds nothing to lose
        quantize_checkpoint(directory, target, force=force, **options)
        return load_packed(target, device, compute_dtype)
    from qlorakit.scratch import scratch_directory

    with scratch_directory() as scratch:
        packed = scratch / directory.resolve().name
        try:
            # Read back at once and deleted: nothing to sync to disk.
            quantize_checkpoint(directory, packed, durable=False, **options)
            return load_packed(packed, device, compute_dtype)
        except CheckpointError as exc:  # name what the user gave, not the scratch copy
            raise CheckpointError(str(exc).replace(str(packed), f"{directory} (quantized while loading)")) from None


def _recorded_quantization(directory: Path) -> dict | None:
    """The bitsandbytes 4-bit ``quantization_config`` of ``directory``'s ``config.json``, None for a
    full-precision checkpoint; CheckpointError for anything else."""
    if not directory.is_dir():
        what = "not a directory" if directory.exists() else "no such directory"
        raise CheckpointError(f"{directory}: {what} (from_pretrained loads a model directory)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a model directory)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not a readable JSON config ({exc})") from None
    recorded = config.get("quantization_config") if isinstance(config, dict) else None
    if not recorded:
        return None
    if not is_bnb_4bit(recorded):
        method = recorded.get("quant_method", "?") if isinstance(recorded, dict) else "?"
        raise CheckpointError(
            f"{config_path}: quantized with {method!r}, not bitsandbytes 4-bit: qlorakit can neither load it "
            "nor quantize it again (start from the full-precision checkpoint)"
        )
    return recorded


def _quantize_options(options: dict[str, Any], compute_dtype: torch.dtype | None) -> dict[str, Any]:
    """``options`` checked against quantize_checkpoint's signature, with the compute dtype it records."""
    own = sorted(set(options) & set(_OWN_PARAMETERS))
    if own:
        raise TypeError(f"from_pretrained sets {own} itself (path, and packed_dir to keep the packed checkpoint)")
    try:
        inspect.signature(quantize_checkpoint).bind("src", "dst", **options)
    except TypeError as exc:
        raise TypeError(f"from_pretrained: {exc} (quantize options are quantize_checkpoint's)") from None
    names = {name: key for key, name in COMPUTE_DTYPES.items()}
    recorded = names.get(str(compute_dtype).removeprefix("torch.")) if compute_dtype is not None else None
    return {**options, **({"compute_dtype": recorded} if recorded is not None else {})}


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
    # transformers dispatches on the dict's quant_method (a config object there is not read); to_dict()
    # would give bitsandbytes' dict, which is what a saved model writes.
    config.quantization_config = QuantizationConfig.from_bnb(bnb_config, compute_dtype).loader_dict()
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
    if not is_bnb_4bit(bnb_config):
        raise CheckpointError(
            f"{directory}: no 4-bit quantized weights: config.json has no bitsandbytes 4-bit quantization_config "
            "(not a packed checkpoint; quantize it first with `qlorakit quantize`)"
        )
    config.quantization_config = bnb_config
    return config
