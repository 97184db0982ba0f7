"""qlorakit: QLoRA on little hardware — fast CPU NF4/FP4 quantization, bit-exact with
bitsandbytes, in files the Hugging Face ecosystem loads.

The torch-facing API is imported on first use, so the checkpoint tool starts without
paying for torch's import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlorakit._core import __version__
from qlorakit.checkpoint import QuantizeReport, inspect_checkpoint, quantize_checkpoint, verify_checkpoint
from qlorakit.errors import CheckpointError, NonFiniteError, QlorakitError, QuantizationError

if TYPE_CHECKING:
    from qlorakit import nn, optim  # noqa: F401  (reached through __getattr__)
    from qlorakit.calibration import Hessians, collect_hessians, quantize_gptq
    from qlorakit.hf_quantizer import QuantizationConfig
    from qlorakit.importance import collect_importance, save_importance
    from qlorakit.loading import from_pretrained, load_packed
    from qlorakit.lora import LoraConfig, add_lora, load_adapter, merge_lora, save_adapter
    from qlorakit.optim import PagedAdam, PagedAdamW
    from qlorakit.packed import PackedWeight
    from qlorakit.quantization import decode_absmax, dequantize, quantize
    from qlorakit.training import prepare_for_kbit_training, save_merged

_LAZY = {
    "PackedWeight": "qlorakit.packed",
    "decode_absmax": "qlorakit.quantization",
    "dequantize": "qlorakit.quantization",
    "quantize": "qlorakit.quantization",
    "load_packed": "qlorakit.loading",
    "from_pretrained": "qlorakit.loading",
    "QuantizationConfig": "qlorakit.hf_quantizer",
    "collect_importance": "qlorakit.importance",
    "save_importance": "qlorakit.importance",
    "Hessians": "qlorakit.calibration",
    "collect_hessians": "qlorakit.calibration",
    "quantize_gptq": "qlorakit.calibration",
    "LoraConfig": "qlorakit.lora",
    "add_lora": "qlorakit.lora",
    "save_adapter": "qlorakit.lora",
    "load_adapter": "qlorakit.lora",
    "merge_lora": "qlorakit.lora",
    "PagedAdam": "qlorakit.optim",
    "PagedAdamW": "qlorakit.optim",
    "prepare_for_kbit_training": "qlorakit.training",
    "save_merged": "qlorakit.training",
}

#: Subpackages that import torch, reachable as attributes (``qlorakit.nn.Linear4bit``) on first use.
_LAZY_SUBPACKAGES = ("nn", "optim")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it in this module
    raise AttributeError(f"module 'qlorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_LAZY_SUBPACKAGES})


__all__ = [
    "LoraConfig",
    "add_lora",
    "collect_importance",
    "save_importance",
    "Hessians",
    "collect_hessians",
    "quantize_gptq",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "prepare_for_kbit_training",
    "save_merged",
    "CheckpointError",
    "NonFiniteError",
    "PackedWeight",
    "PagedAdam",
    "PagedAdamW",
    "QlorakitError",
    "QuantizationError",
    "QuantizeReport",
    "__version__",
    "decode_absmax",
    "dequantize",
    "inspect_checkpoint",
    "load_packed",
    "from_pretrained",
    "QuantizationConfig",
    "quantize",
    "quantize_checkpoint",
    "verify_checkpoint",
]
