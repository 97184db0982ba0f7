"""Getting a loaded 4-bit model ready to train adapters, and writing the result back out."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlorakit.nn.linear4bit import Linear4bit

if TYPE_CHECKING:
    from qlorakit.checkpoint import QuantizeReport


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    upcast_norms: bool = True,
    upcast_embeddings: bool = False,
) -> nn.Module:
    """Like PEFT's ``prepare_model_for_kbit_training``, without its memory spike.

    Freezes every parameter. With ``upcast_norms``, casts to float32 the small parameters that
    decide numerical stability: every 1-D float parameter (norm weights, biases) and the
    position tables (every ``nn.Embedding`` other than the input and output embeddings, such as
    T5's relative attention bias). The large 16-bit matrices stay as stored: the input and
    output embeddings (unless ``upcast_embeddings``; PEFT upcasts every non-quantized parameter,
    which for a 7B model adds gigabytes: 32000 x 4096 x 4 bytes per embedding matrix) and any
    weight bitsandbytes does not quantize (MoE experts and routers, Falcon's linears, T5's
    ``wo``); those modules get their float inputs cast to their weight's dtype and their output
    cast back, so float32 activations meet them without a dtype error. With
    ``gradient_checkpointing``, turns it on (non-reentrant) and makes the input embeddings
    require grad so checkpointed blocks still produce gradients for the adapters.
    Call before :func:`qlorakit.add_lora`. Returns ``model``.
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_embeddings = _input_embeddings(model)
    embeddings = {id(m) for m in (output_embeddings, input_embeddings) if m is not None}
    embedding_weights = {id(getattr(m, "weight", None)) for m in (output_embeddings, input_embeddings) if m is not None}
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.requires_grad_(False)
            continue
        is_embedding = id(module) in embeddings
        kept_16bit = False
        for name, parameter in module.named_parameters(recurse=False):
            parameter.requires_grad_(False)
            if not parameter.is_floating_point() or parameter.dtype == torch.float32:
                continue
            if is_embedding or id(parameter) in embedding_weights:
                should_upcast = upcast_embeddings
            else:
                should_upcast = upcast_norms and (parameter.dim() == 1 or isinstance(module, nn.Embedding))
            if should_upcast:
                setattr(module, name, nn.Parameter(parameter.data.float(), requires_grad=False))
            elif parameter.dim() > 1 and not is_embedding:
                kept_16bit = True
        if kept_16bit and upcast_norms:
            module.register_forward_pre_hook(_cast_inputs_to_weight_dtype, with_kwargs=True)
            module.register_forward_hook(_cast_output_to_input_dtype, with_kwargs=True)
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


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters(recurse=False) if p.is_floating_point() and p.dim() > 1)


def _cast_inputs_to_weight_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Casts the floating tensors a module with 16-bit weights gets to their dtype, remembering
    the first one's dtype so the output can be cast back."""
    dtype = _weight_dtype(module)
    floats = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()]
    module._qlorakit_input_dtype = floats[0].dtype if floats else None

    def cast(value: object) -> object:
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _cast_output_to_input_dtype(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    dtype = getattr(module, "_qlorakit_input_dtype", None)
    if dtype is None:
        return output
    if torch.is_tensor(output) and output.is_floating_point():
        return output.to(dtype)
    if isinstance(output, tuple):
        return tuple(o.to(dtype) if torch.is_tensor(o) and o.is_floating_point() else o for o in output)
    return output


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every remaining ``Linear4bit`` by the full-precision layer it stands for
    (``nn.Linear``, or GPT-2's ``Conv1D``) holding its dequantized weight in ``dtype`` (default:
    the dtype it was quantized from). Returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            weight = module.dequantized_weight(torch.float32).to(dtype) if dtype is not None else None
            model.set_submodule(name, module.to_dense(weight))
    return model


#: Tokens of calibration text whose reference log-probabilities are kept for the merge's KL figure.
KL_TOKENS = 4096


@dataclass
class MergeReport:
    """What :func:`save_merged` wrote (``os.PathLike``: the directory)."""

    directory: Path
    #: The re-quantization's report (``None`` in full precision); with calibration its ``gptq``
    #: holds the output-error reduction against plain (absmax) re-quantization.
    quantize: QuantizeReport | None = None
    #: Mean per-token KL(adapter model || merged model) on the calibration text (first
    #: ``KL_TOKENS`` tokens), in nats; with calibration only.
    kl: float | None = None

    def __fspath__(self) -> str:
        return str(self.directory)

    def summary(self) -> str:
        lines = [self.quantize.summary()] if self.quantize is not None else []
        if self.kl is not None:
            lines.append(f"KL(adapter model || merged model) on the calibration text: {self.kl:.5f} nats/token")
        return "\n".join([*lines, f"merged model -> {self.directory}"])


def save_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    requantize: bool = False,
    calibration: Iterable[Mapping[str, torch.Tensor] | torch.Tensor] | None = None,
    force: bool = False,
    tokenizer: Any = None,
    **quantize_options: Any,
) -> MergeReport:
    """Merges the adapters into the base (:func:`qlorakit.merge_lora`), dequantizes what is
    still 4-bit, and saves a full-precision transformers checkpoint to ``directory``; with
    ``requantize``, quantizes that checkpoint again through the Rust core
    (``quantize_options`` go to :func:`qlorakit.quantize_checkpoint`).

    ``calibration`` (with ``requantize``): batches (input-id tensors or dicts of model keyword
    arguments) of representative text. The adapter model's own layer inputs on them give each
    layer's ``H = X^T X`` (:func:`qlorakit.collect_hessians`), and the merged weights are
    re-quantized with GPTQ to reproduce the adapter model's layer outputs, instead of being
    rounded to nearest (which gives back much of a fine-tune's effect). The report then holds
    the output-error reduction and the KL of the merged model to the unmerged one on the
    calibration text.

    Written atomically (a hidden sibling directory renamed into place); an existing
    ``directory`` is replaced only with ``force`` (else ``FileExistsError``, before anything is
    changed). ``tokenizer`` (anything with ``save_pretrained``) is saved beside the model.
    The model is changed in place (its adapters are merged). Returns a
    :class:`MergeReport`, which is ``os.PathLike`` (the directory)."""
    from qlorakit.checkpoint import quantize_checkpoint
    from qlorakit.directories import replace_directory, staging_beside
    from qlorakit.lora import merge_lora

    destination = Path(directory).resolve()
    if destination.exists() and not force:
        raise FileExistsError(f"{destination} exists; replace it with --force (force=True in Python)")
    if calibration is not None and not requantize:
        raise ValueError("calibration only applies with requantize=True (--requantize)")
    hessians, reference = None, None
    if calibration is not None:
        from qlorakit.calibration import collect_hessians

        batches = list(calibration)
        reference = _ReferenceLogProbs(KL_TOKENS)
        hessians = collect_hessians(model, batches, on_output=reference.add)
    merge_lora(model)
    dequantize_model(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # no longer a 4-bit model: transformers saves it as a plain one
        quantizer.remove_quantization_config(model)
        model.is_loaded_in_4bit = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    with staging_beside(destination, "merged") as staging:
        model.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if not requantize:
            replace_directory(staging, destination)
            return MergeReport(destination)
        options = {"force": True, **quantize_options}
        report = quantize_checkpoint(staging, destination, hessians=hessians, **options)
    result = MergeReport(destination, report)
    if reference is not None and reference.batches:
        result.kl = reference.kl_of(destination)
    return result


class _ReferenceLogProbs:
    """Log-probabilities of the adapter model on the first ``limit`` calibration tokens, to
    measure the merged model against (a model without ``logits`` gives none)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.batches: list[tuple[Mapping[str, torch.Tensor] | torch.Tensor, torch.Tensor]] = []
        self.tokens = 0

    def add(self, batch: Mapping[str, torch.Tensor] | torch.Tensor, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is None or self.tokens >= self.limit:
            return
        self.batches.append((batch, torch.log_softmax(logits.float(), dim=-1)))
        self.tokens += logits.shape[:-1].numel()

    @torch.no_grad()
    def kl_of(self, directory: Path) -> float:
        """Mean per-token KL(reference || the packed model at ``directory``)."""
        from qlorakit.loading import load_packed

        merged = load_packed(directory, compute_dtype=torch.float32).to(torch.float32)
        total, tokens = 0.0, 0
        for batch, expected in self.batches:
            output = merged(batch) if isinstance(batch, torch.Tensor) else merged(**batch)
            actual = torch.log_softmax(output.logits.float(), dim=-1)
            total += float((expected.exp() * (expected - actual)).sum())
            tokens += expected.shape[:-1].numel()
        return total / tokens
