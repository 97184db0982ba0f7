"""Importance vectors for scale search (llama.cpp's "imatrix" idea).

A linear layer's output error from a weight error ``dW`` is ``dW @ x``; averaged over
real inputs its expected square is ``sum_j E[x_j^2] * dW_ij^2`` when the input features
are uncorrelated. So the mean squared activation of each input column is the weight the
reconstruction error of that column should get. ``collect_importance`` measures it with
forward hooks over a few batches; ``save_importance`` writes the vectors as a safetensors
file (one float32 ``[in_features]`` tensor per weight name) that
``qlorakit quantize --scale-search --importance FILE`` reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The low-rank factors inside a LoRA wrapper: not layers of the model being quantized.
_ADAPTER_FACTORS = (".lora_A", ".lora_B")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module with a 2-D ``weight`` used as ``x @ W.T`` (nn.Linear and qlorakit's
    Linear4bit), by module name, without LoRA adapters' own factors."""
    from qlorakit.nn.linear4bit import Linear4bit

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | Linear4bit) and not name.endswith(_ADAPTER_FACTORS)
    }


def run_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    on_output: Callable[[Mapping[str, torch.Tensor] | torch.Tensor, Any], None] | None = None,
) -> None:
    """Runs ``model`` in eval mode over ``batches`` (dicts of keyword arguments, or input-id
    tensors), handing each batch and its output to ``on_output``; restores the training mode."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            output = model(batch) if isinstance(batch, torch.Tensor) else model(**batch)
            if on_output is not None:
                on_output(batch, output)
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_importance(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input column of every linear layer, keyed by the
    layer's weight name (``"<module>.weight"``), over all tokens of ``batches`` (each a
    dict of model keyword arguments, e.g. a tokenizer's output, or a tensor of input ids).
    Padding positions count too unless the caller leaves them out of the batches."""
    layers = linear_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {f"{name}.weight": (sums[name] / counts[name]).float() for name in sums}


def save_importance(vectors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Writes importance vectors as a safetensors file (float32, contiguous)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({name: v.detach().float().contiguous() for name, v in vectors.items()}, str(path))
    return path


def importance_from_text(
    model_dir: str | os.PathLike, texts: Iterable[str], max_length: int = 512
) -> dict[str, torch.Tensor]:
    """Loads the float model at ``model_dir`` (its own architecture class, so module names
    match the checkpoint's weight names) with its tokenizer, and collects importance
    vectors over ``texts``, one text per forward pass (no padding to dilute the means)."""
    model, tokenizer = load_float_model(model_dir)
    batches = (tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length) for text in texts)
    return collect_importance(model, batches)


def float_model(model_dir: str | os.PathLike) -> nn.Module:
    """The float32 model at ``model_dir``, as its own architecture class (so module names match
    the checkpoint's weight names)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    return (model_class or transformers.AutoModel).from_pretrained(model_dir, dtype=torch.float32)


def load_float_model(model_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The float32 model at ``model_dir`` (:func:`float_model`) and its tokenizer."""
    import transformers

    return float_model(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
