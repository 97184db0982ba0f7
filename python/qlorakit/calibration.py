"""Calibration for error-compensating (GPTQ) quantization.

A linear layer ``y = W x`` quantized to ``Q`` errs on its output by ``(W - Q) x``; over
calibration inputs the total squared error is ``tr((W - Q) H (W - Q)^T)`` with
``H = sum_t x_t x_t^T`` the inputs' second moment. :func:`collect_hessians` measures ``H``
for every linear layer with forward hooks (the importance collector's, extended from the
diagonal to the full matrix), streamed: each batch is added into one ``[in, in]``
accumulator per distinct layer input, so memory is ``in_features^2`` floats per input
whatever the amount of text, and layers that read the same tensor (a transformer's q/k/v
projections, its gate/up projections) share one accumulator. The Rust core's GPTQ
(``qlorakit quantize --calibration-text``, ``save_merged(..., calibration=...)``)
reads them from a safetensors file written by :meth:`Hessians.save`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit import _core
from qlorakit._native import ArrayLike, as_tensor, byte_view, element_dtype_name
from qlorakit.formats import DEFAULT_BLOCKSIZE
from qlorakit.importance import linear_layers, run_batches
from qlorakit.packed import PackedWeight

#: GPTQ's relative damping (``lambda = damp * mean(diag(H))``), the core's default.
DEFAULT_DAMP = 0.01
#: The LoRA wrapper's attribute for the layer it adapts: hooks on ``X.base_layer`` name ``X.weight``.
_BASE_SUFFIX = ".base_layer"


@dataclass
class Hessians:
    """Mean ``x x^T`` of the inputs of linear layers, by weight name (``"<module>.weight"``).

    ``matrices`` holds one ``[in, in]`` float32 matrix per distinct input; ``aliases`` maps
    the weight name of every other layer reading that input to the name it is stored under."""

    matrices: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    tokens: int = 0

    def __getitem__(self, weight_name: str) -> torch.Tensor:
        return self.matrices[self.aliases.get(weight_name, weight_name)]

    def __contains__(self, weight_name: object) -> bool:
        return weight_name in self.matrices or weight_name in self.aliases

    def names(self) -> list[str]:
        """Every weight name covered (stored and aliased)."""
        return sorted({*self.matrices, *self.aliases})

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the file the core reads: one tensor per stored matrix, the aliases as metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: m.detach().to(torch.float32).contiguous() for name, m in self.matrices.items()}
        save_file(tensors, str(path), metadata=dict(self.aliases))
        return path


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    dtype: torch.dtype = torch.float32,
    on_output: Callable[[Mapping[str, torch.Tensor] | torch.Tensor, Any], None] | None = None,
) -> Hessians:
    """``H`` (mean over all tokens of ``x x^T``) of every linear layer's input while ``model``
    runs ``batches`` (each a dict of model keyword arguments, e.g. a tokenizer's output, or a
    tensor of input ids), accumulated in ``dtype``. A layer wrapped by a LoRA adapter is
    measured on the input the adapted model gives it (so a merge is calibrated on the adapter
    model's own activations), and named by the wrapper (``X.weight`` for ``X.base_layer``).
    ``on_output(batch, output)`` sees each batch's model output (e.g. to keep reference logits)."""
    layers = {name.removesuffix(_BASE_SUFFIX): m for name, m in linear_layers(model).items()}
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    aliases: dict[str, str] = {}
    # Inputs seen in the current forward pass (kept alive so their identity stays unique).
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}

    def reset(_module: nn.Module, _args: tuple, _kwargs: dict) -> None:
        seen.clear()

    def hook_for(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            identity = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)
            if name in aliases:
                return
            first = seen.get(identity)
            if first is not None and first[0] != name:
                if name not in sums:  # decided on the first pass, where no accumulator exists yet
                    aliases[name] = first[0]
                    return
            seen[identity] = (name, x)
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            if name not in sums:
                sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=dtype)
                tokens[name] = 0
            sums[name].addmm_(rows.T, rows)
            tokens[name] += rows.shape[0]

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    handles.append(model.register_forward_pre_hook(reset, with_kwargs=True))
    try:
        run_batches(model, batches, on_output)
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    matrices = {f"{name}.weight": (s / max(tokens[name], 1)).float() for name, s in sums.items()}
    return Hessians(
        matrices,
        {f"{name}.weight": f"{first}.weight" for name, first in aliases.items()},
        max(tokens.values(), default=0),
    )


def text_batches(tokenizer: Any, text: str, max_length: int = 512, max_sequences: int = 64) -> list[torch.Tensor]:
    """``text`` tokenized once and cut into up to ``max_sequences`` windows of ``max_length``
    tokens (``[1, length]`` int64 tensors of input ids; the last may be shorter)."""
    if max_length < 1 or max_sequences < 1:
        raise ValueError("max_length and max_sequences must be positive")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError("calibration text: no tokens")
    return [ids[i : i + max_length].unsqueeze(0) for i in range(0, ids.numel(), max_length)][:max_sequences]


def read_calibration_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a calibration file (``ValueError`` when it holds none)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: no calibration text")
    return text


@dataclass
class GptqResult:
    """Output errors ``tr((W - Q) H (W - Q)^T)`` on the calibration inputs of one weight."""

    chosen: str
    output_error: float
    gptq_output_error: float
    absmax_output_error: float
    searched_output_error: float

    @property
    def reduction(self) -> float:
        """Fractional output-error reduction against absmax (bitsandbytes' result)."""
        return 1.0 - self.output_error / self.absmax_output_error if self.absmax_output_error else 0.0


def quantize_gptq(
    weight: ArrayLike,
    hessian: ArrayLike,
    quant_type: str = "nf4",
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    *,
    scale_search: bool = True,
    damp: float = DEFAULT_DAMP,
) -> tuple[PackedWeight, GptqResult]:
    """Quantizes the 2-D ``weight [out, in]`` with GPTQ against ``hessian [in, in]``
    (float32 or float64), in bitsandbytes' format (see the README). The result is the best
    on the calibration output error of GPTQ, absmax and the scale search alone."""
    from qlorakit.quantization import _empty_packed

    _core.check_format(quant_type, blocksize)  # before the buffers are sized by it
    tensor = as_tensor(weight)
    if tensor.dim() != 2:
        raise _core.QuantizationError(f"weight: expected a 2-D [out, in] matrix, got shape {tuple(tensor.shape)}")
    dtype = element_dtype_name(tensor, "weight")
    h = as_tensor(hessian)
    if h.dtype not in (torch.float32, torch.float64):
        h = h.to(torch.float32)
    h = h.contiguous()
    if tuple(h.shape) != (tensor.shape[1], tensor.shape[1]):
        raise _core.QuantizationError(
            f"hessian: expected shape {(tensor.shape[1], tensor.shape[1])} for a weight of shape "
            f"{tuple(tensor.shape)}, got {tuple(h.shape)}"
        )
    out = _empty_packed(tuple(tensor.shape), tensor.dtype, quant_type, blocksize, double_quant)
    nested = out.nested_absmax
    report = _core.quantize_4bit_gptq(
        byte_view(tensor, "weight"),
        dtype,
        tensor.shape[0],
        byte_view(h, "hessian"),
        str(h.dtype).removeprefix("torch."),
        quant_type,
        blocksize,
        byte_view(out.codes, "packed"),
        byte_view(out.absmax, "nested codes" if nested is not None else "absmax"),
        byte_view(nested, "nested scales") if nested is not None else None,
        scale_search,
        damp,
    )
    out.layout = replace(out.layout, offset=report.offset)
    return out, GptqResult(
        chosen=report.chosen,
        output_error=report.output_error,
        gptq_output_error=report.gptq_output_error,
        absmax_output_error=report.absmax_output_error,
        searched_output_error=report.searched_output_error,
    )


def hessians_from_text(
    model_dir: str | os.PathLike, text: str, max_length: int = 512, max_sequences: int = 64
) -> Hessians:
    """Loads the float model at ``model_dir`` with its tokenizer (as
    :func:`qlorakit.importance.importance_from_text` does) and collects ``H`` over ``text``."""
    from qlorakit.importance import load_float_model

    model, tokenizer = load_float_model(model_dir)
    return collect_hessians(model, text_batches(tokenizer, text, max_length, max_sequences))
