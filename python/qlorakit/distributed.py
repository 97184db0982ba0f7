"""Several processes: a qlorakit model under torch FSDP2 (``fully_shard``) or DDP.

Sharding needs nothing from qlorakit: a :class:`~qlorakit.nn.Linear4bit` holds its 4-bit weight as frozen
integer parameters (the uint8 codes, the block scales), so plain ``fully_shard(layer)`` / ``fully_shard(model)``
shards them over the mesh on dim 0 like any parameter and all-gathers them per layer for the forward and the
backward. They travel as bytes (FSDP2 gathers a group of mixed dtypes as uint8) and are never cast
(``MixedPrecisionPolicy`` casts floating-point parameters only), so the codes arrive bit for bit: bitsandbytes'
format, with no float ``quant_storage``. Only the adapters get gradients (the reduce-scatter carries only them).

Loading: every rank calls :func:`qlorakit.from_pretrained` on the packed checkpoint. Its tensors are views of
the memory-mapped files (nothing is read yet), and ``fully_shard`` copies out only this rank's slice of each, so
a rank reads its own shards from the file and holds about ``1/world`` of the base (plus one gathered layer while
it computes). On CUDA, ``fully_shard`` moves each module's full tensors to the device before it slices them:
shard layer by layer (``fully_shard`` per decoder layer, then the model), so at most one full layer is on a
device at a time.

The functions here are collective: every rank calls them, in the same order.

- :func:`quantized_bytes`: the 4-bit bytes this rank holds, and the whole base's.
- :func:`full_state_dict`: the model's state dict with every sharded tensor gathered, on rank 0.
- :func:`save_adapter`: the adapter in PEFT's format, written by rank 0.
- :func:`save_base_checkpoint`: the 4-bit base as a packed checkpoint in bitsandbytes' format (uint8 codes),
  written by rank 0: what transformers + bitsandbytes and qlorakit load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qlorakit.nn.linear4bit import Linear4bit

#: What a module name gets inside a LoRA wrapper (``q_proj`` -> ``q_proj.base_layer``), qlorakit's and PEFT's.
_BASE_LAYER = ".base_layer"


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """``(held, total)``: bytes of the 4-bit weights' tensors (codes and scales) this rank holds, and of the
    whole base. Not collective."""
    held = total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for param in module.quantized_parameters():
                held += _local(param).numel() * param.element_size()
                total += param.numel() * param.element_size()
    return held, total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded tensor gathered in full, on the CPU, on rank 0; other ranks
    take part in the gathers and get ``{}``. Collective. Rank 0 holds the whole state dict (the 4-bit base's
    packed size, not its full precision); the other ranks hold one gathered tensor at a time."""
    rank = _rank()
    gathered: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if _is_dtensor(tensor) else tensor
        if rank == 0:
            gathered[name] = full.detach().to("cpu")
    return gathered


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], **options: object) -> Path | None:
    """:func:`qlorakit.save_adapter` of a sharded model: the adapter gathered and written in PEFT's format by
    rank 0 (``options``: its ``config``, ``base_model_name_or_path``, ``task_type``). Collective. Returns the
    directory on rank 0, ``None`` elsewhere."""
    from qlorakit.lora import lora_parameter_names
    from qlorakit.lora import save_adapter as save_local

    params = dict(model.named_parameters())
    tensors = {}
    for name in lora_parameter_names(model):
        full = params[name].full_tensor() if _is_dtensor(params[name]) else params[name]
        tensors[name] = full.detach().to("cpu")
    if _rank() != 0:
        return None
    return save_local(model, directory, tensors=tensors, **options)


def base_state_dict(state_dict: dict[str, torch.Tensor], adapter_names: list[str]) -> dict[str, torch.Tensor]:
    """The base model's entries of a state dict of a model with LoRA adapters: without the adapters' tensors
    (``adapter_names``: the wrappers' module names), the wrapped layers' tensors under the names they had before
    wrapping (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    adapters = tuple(f"{name}.lora_" for name in adapter_names)
    wrapped = {f"{name}{_BASE_LAYER}.": f"{name}." for name in adapter_names}
    base: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(adapters):
            continue
        for inner, outer in wrapped.items():
            if key.startswith(inner):
                key = outer + key[len(inner) :]
                break
        base[key] = tensor
    return base


def save_base_checkpoint(model: nn.Module, directory: str | os.PathLike[str], force: bool = False) -> Path | None:
    """Writes the 4-bit base of a (sharded) transformers model, adapters left out, as a packed checkpoint in
    bitsandbytes' format by rank 0: uint8 codes, bitsandbytes' tensor names and quant_state, ``config.json``
    with its 4-bit ``quantization_config``, the same files ``save_pretrained`` writes for an unsharded model.
    Collective. The directory is written beside ``directory`` and renamed into place; an existing non-empty
    ``directory`` is replaced only with ``force`` (``FileExistsError`` otherwise, on every rank, before any
    gather). Returns the directory on rank 0, ``None`` elsewhere."""
    from transformers import PreTrainedModel

    from qlorakit.directories import replace_directory, staging_beside
    from qlorakit.lora.targets import lora_modules

    destination = Path(directory)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not force:
        raise FileExistsError(f"{destination} exists and is not empty; pass force=True to replace it")
    gathered = full_state_dict(model)
    if _rank() != 0:
        return None
    base = base_state_dict(gathered, [name for name, _ in lora_modules(model)])
    # The class's save_pretrained, as for a model without adapters: the instance's writes only the adapter, and
    # transformers saves only an adapter while the model is marked as carrying one (qlorakit.trainer_support).
    # It also ignores `state_dict=` while the model has an hf_quantizer (it asks the quantizer for one instead);
    # the quantization_config it writes comes from model.config either way.
    marked, quantizer = getattr(model, "_hf_peft_config_loaded", False), getattr(model, "hf_quantizer", None)
    try:
        model._hf_peft_config_loaded, model.hf_quantizer = False, None
        with staging_beside(destination, "partial") as staging:
            PreTrainedModel.save_pretrained(model, str(staging), state_dict=base)
            replace_directory(staging, destination)
    finally:
        model._hf_peft_config_loaded, model.hf_quantizer = marked, quantizer
    return destination
