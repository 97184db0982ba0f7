"""Getting a loaded 4-bit model ready to train adapters, and writing the result back out."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from qlorakit.lora import _set_submodule
from qlorakit.nn.linear4bit import Linear4bit


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    upcast_norms: bool = True,
    upcast_embeddings: bool = False,
) -> nn.Module:
    """Like PEFT's ``prepare_model_for_kbit_training``, without its memory spike.

    Freezes every parameter; casts the small 1-D float parameters (norm weights, biases)
    to float32 for stable training; leaves the embeddings and ``lm_head`` in their stored
    dtype unless ``upcast_embeddings`` (PEFT upcasts every non-quantized parameter, which
    for a 7B model adds gigabytes: 32000 x 4096 x 4 bytes per embedding matrix). With
    ``gradient_checkpointing``, turns it on (non-reentrant) and makes the input embeddings
    require grad so checkpointed blocks still produce gradients for the adapters.
    Call before :func:`qlorakit.add_lora`. Returns ``model``.
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = {id(m) for m in (output_embeddings, _input_embeddings(model)) if m is not None}
    for module in model.modules():
        is_embedding = id(module) in embeddings or isinstance(module, nn.Embedding)
        for name, parameter in module.named_parameters(recurse=False):
            parameter.requires_grad_(False)
            should_upcast = upcast_embeddings if is_embedding else (upcast_norms and parameter.dim() == 1)
            if should_upcast and parameter.is_floating_point() and parameter.dtype != torch.float32:
                setattr(module, name, nn.Parameter(parameter.data.float(), requires_grad=False))
    if output_embeddings is not None and not upcast_embeddings:
        # An upcast final norm hands float32 activations to a 16-bit lm_head: cast them to its dtype.
        output_embeddings.register_forward_pre_hook(_cast_input_to_weight_dtype)
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def _cast_input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    weight = getattr(module, "weight", None)
    if weight is None or not args or not torch.is_tensor(args[0]):
        return args
    return (args[0].to(weight.dtype), *args[1:])


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replaces every remaining ``Linear4bit`` by an ``nn.Linear`` holding its dequantized
    weight in the dtype it was quantized from. Returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            dense.weight = nn.Parameter(
                module.dequantized_weight(torch.float32).to(module.weight_dtype), requires_grad=False
            )
            dense.bias = module.bias
            _set_submodule(model, name, dense)
    return model


def save_merged(model: nn.Module, directory: str | os.PathLike, requantize: bool = False, **quantize_options) -> Path:
    """Merges the adapters into the base (:func:`qlorakit.merge_lora`), dequantizes what is
    still 4-bit, and saves a full-precision transformers checkpoint to ``directory``; with
    ``requantize``, quantizes that checkpoint again through the Rust core
    (``quantize_options`` go to :func:`qlorakit.quantize_checkpoint`). The model is
    changed in place (its adapters are merged). Returns the directory."""
    from qlorakit.checkpoint import quantize_checkpoint
    from qlorakit.lora import merge_lora

    destination = Path(directory)
    merge_lora(model)
    dequantize_model(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if not requantize:
        model.save_pretrained(str(destination))
        return destination
    staging = Path(tempfile.mkdtemp(prefix=".merged-", dir=destination.parent if destination.parent.exists() else None))
    try:
        model.save_pretrained(str(staging))
        quantize_checkpoint(staging, destination, **{"force": True, **quantize_options})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination
