"""``from_pretrained``: a model directory -> a transformers model whose quantized linears are
``qlorakit.nn.Linear4bit``. A packed 4-bit checkpoint loads as it is (``load_packed``), without
materializing any quantized weight in full precision; a full-precision one is quantized while it
loads by the Rust pipeline of ``qlorakit quantize`` (memory-mapped source, one tensor at a time,
source pages released), straight into the tensors the model holds (:mod:`qlorakit.in_memory`): the
same modules and bytes as ``qlorakit quantize`` writes, nothing written to disk, and a peak memory of
about the packed size. Where transformers would load a state dict differently from files (a
``config.json`` without a ``dtype``, a model class with extra weight files), the packed checkpoint
goes to a scratch directory instead, which is loaded and deleted.

Loading runs through transformers' own ``from_pretrained`` with qlorakit registered as its
quantization method (:mod:`qlorakit.hf_quantizer`): the same key renames and fusions, weight
tying, buffer initialization and file handling (an ``adapter_model.safetensors`` or optimizer
state beside the weights is not read) as transformers + bitsandbytes, so every directory they
load — qlorakit's output or one transformers + bitsandbytes saved — loads here too. Python's
cyclic garbage collector is paused while it runs (transformers' loading makes many objects and
little garbage; collecting would scan the whole heap over and over).
"""

from __future__ import annotations

import gc
import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    non-empty directory is replaced only with ``force=True``); otherwise nothing is written: the
    pipeline quantizes into the tensors the model holds (:func:`qlorakit.in_memory.quantize_in_memory`;
    for the few directories transformers would load differently from a state dict, into a scratch
    directory, :mod:`qlorakit.scratch`, deleted once loaded).

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
    config = _source_config(directory)
    if _loads_as_state_dict(config):
        return _load_in_memory(directory, config, device, compute_dtype, options)
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
    directory = Path(path)
    config = _packed_config(directory)
    return _load(
        directory,
        config,
        device,
        compute_dtype,
        str(directory),
        # transformers (with PEFT installed) loads an adapter it finds beside the weights; this loads
        # the base alone (adapters go on with load_adapter), so its adapter lookup is pointed at a
        # subfolder that does not exist.
        adapter_kwargs={"subfolder": _NO_ADAPTER_SUBFOLDER},
    )


def _load(
    directory: Path,
    config: Any,  # noqa: ANN401 (a transformers PretrainedConfig)
    device: str | torch.device,
    compute_dtype: torch.dtype | None,
    pretrained: str | None,
    **load_options: Any,
) -> nn.Module:
    """transformers' ``from_pretrained`` of the model ``config`` describes (its ``quantization_config``
    bitsandbytes' 4-bit dict) with qlorakit's quantizer: from the files of ``pretrained``, or, with
    ``state_dict=`` among ``load_options``, from that. ``directory`` names the checkpoint in errors."""
    from qlorakit import hf_rules
    from qlorakit.hf_quantizer import QuantizationConfig

    # transformers dispatches on the dict's quant_method (a config object there is not read); to_dict()
    # would give bitsandbytes' dict, which is what a saved model writes.
    config.quantization_config = QuantizationConfig.from_bnb(config.quantization_config, compute_dtype).loader_dict()
    model_class = hf_rules.model_class(config, directory)
    with _collection_paused():
        model, info = model_class.from_pretrained(
            pretrained,
            config=config,
            device_map={"": str(torch.device(device))},
            output_loading_info=True,
            **load_options,
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


def _source_config(directory: Path):  # noqa: ANN202 (a transformers PretrainedConfig)
    import transformers

    return transformers.AutoConfig.from_pretrained(str(directory))


def _loads_as_state_dict(config: Any) -> bool:  # noqa: ANN401 (a transformers PretrainedConfig)
    """Whether transformers loads this model from a state dict as it would from its files: not when
    ``config.json`` records no ``dtype`` (transformers then takes the first float tensor's dtype in the
    first file, which a state dict does not have) nor for a class with extra weight files
    (``extra_files``, looked up beside the checkpoint)."""
    return getattr(config, "dtype", None) is not None and not getattr(type(config), "extra_files", ())


def _load_in_memory(
    directory: Path,
    config: Any,  # noqa: ANN401 (a transformers PretrainedConfig)
    device: str | torch.device,
    compute_dtype: torch.dtype | None,
    options: dict[str, Any],
) -> nn.Module:
    """Quantizes ``directory`` into the tensors of the model it loads as: the model ``load_packed``
    gives for the directory ``qlorakit quantize`` would write, its ``name_or_path`` the source."""
    from qlorakit.in_memory import quantize_in_memory

    with _collection_paused():
        packed = quantize_in_memory(directory, **options)
    try:
        config.quantization_config = packed.quantization_config
        model = _load(directory, config, device, compute_dtype, None, state_dict=packed.state_dict)
    finally:
        packed.close()
    model.config.name_or_path = str(directory)
    if model.can_generate():
        # What loading from a directory reads (generation_config.json, else config.json); a state dict
        # has neither.
        model.generation_config = _generation_config(directory)
    return model


def _generation_config(directory: Path):  # noqa: ANN202 (a transformers GenerationConfig)
    """The generation config transformers' ``from_pretrained`` gives a model it loads from ``directory``."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(directory))
    except OSError:
        return GenerationConfig.from_pretrained(str(directory), config_file_name="config.json", _from_model_config=True)


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was, after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
