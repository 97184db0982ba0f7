"""The format's tables and dtype names as torch objects (from the Rust core's constants)."""

from __future__ import annotations

import torch

from qlorakit import _core

#: torch dtypes the core reads and writes, by the name the core uses.
ELEMENT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 code table of ``quant_type`` (index = nibble)."""
    if quant_type == "nf4":
        return torch.tensor(_core.NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(_core.FP4_CODE, dtype=torch.float32)
    raise _core.QuantizationError(f"unsupported quant_type {quant_type!r}; expected 'nf4' or 'fp4'")


def dynamic_map() -> torch.Tensor:
    """The 256-entry signed dynamic 8-bit map used for double quantization."""
    return torch.tensor(_core.DYNAMIC_MAP, dtype=torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """The name bitsandbytes writes for a dtype (``"bfloat16"``, ``"uint8"``, ...)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`, as bitsandbytes resolves it (``getattr(torch, name)``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise _core.QuantizationError(f"unknown dtype name {name!r}")
    return dtype
