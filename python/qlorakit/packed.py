"""``PackedWeight``: a 4-bit quantized tensor and its bitsandbytes serialization.

The tensors a packed checkpoint stores for one weight ``X.weight`` (bitsandbytes'
``QuantState.as_dict(packed=True)`` layout)::

    X.weight                               uint8 [(n+1)//2, 1]  two codes per byte, first high
    X.weight.absmax                        uint8 [blocks]   nested codes (float32 without double quant)
    X.weight.quant_map                     float32 [16]     the NF4/FP4 table
    X.weight.nested_absmax                 float32 [ceil(blocks/256)]    (double quant only)
    X.weight.nested_quant_map              float32 [256]    dynamic map (double quant only)
    X.weight.quant_state.bitsandbytes__nf4 uint8 [k]        UTF-8 JSON of the options
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from qlorakit import _core
from qlorakit._core import QuantizationError
from qlorakit.formats import QUANT_STATE_MARKER, QUANT_TYPES
from qlorakit.tables import code_table, dtype_from_name, dtype_name, dynamic_map

#: What follows a weight's key in the keys of its serialized tensors (bitsandbytes' names).
SERIALIZED_SUFFIXES: tuple[str, ...] = (
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    *(f"{QUANT_STATE_MARKER}{quant_type}" for quant_type in QUANT_TYPES),
)


@dataclass(frozen=True)
class QuantLayout:
    """Everything about a 4-bit weight but its tensors: the fields of bitsandbytes' ``QuantState`` that
    are not tensors. ``dtype`` and ``shape`` are those of the original tensor; ``offset`` is the mean
    double quantization subtracted from the block scales (``None`` without double quantization);
    ``nested_dtype`` the dtype bitsandbytes records for the nested scales; ``quant_storage`` the dtype
    the codes are stored as in a checkpoint (uint8, or a float dtype FSDP1 setups use)."""

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: float | None = None
    nested_dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are double-quantized."""
        return self.offset is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        """Number of blocks (one scale each)."""
        return math.ceil(self.numel / self.blocksize)


@dataclass
class PackedWeight:
    """A blockwise 4-bit tensor: the one type every 4-bit operation takes (bitsandbytes' ``Params4bit`` data
    plus its ``QuantState``).

    ``codes`` holds the 4-bit codes as uint8 ``[(numel+1)//2, 1]``, two per byte, the first in the high
    nibble. Without double quantization ``absmax`` is float32 ``[blocks]``; with it, ``absmax`` holds
    uint8 codes of the dynamic map and ``nested_absmax`` float32 ``[ceil(blocks/256)]`` scales.
    ``layout`` holds the rest (quant type, block size, shape, dtype, offset, ...); its fields read
    through as attributes (``weight.quant_type``).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    layout: QuantLayout

    def __post_init__(self) -> None:
        if (self.nested_absmax is None) == self.layout.double_quant:
            raise QuantizationError("a double-quantized weight needs nested_absmax and an offset, a plain one neither")

    quant_type = property(lambda self: self.layout.quant_type, doc="``nf4`` or ``fp4``.")
    blocksize = property(lambda self: self.layout.blocksize, doc="Elements per block.")
    shape = property(lambda self: self.layout.shape, doc="Shape of the original tensor.")
    dtype = property(lambda self: self.layout.dtype, doc="Dtype of the original tensor.")
    offset = property(lambda self: self.layout.offset, doc="Double quantization's offset (or None).")
    nested_dtype = property(lambda self: self.layout.nested_dtype, doc="Recorded dtype of the nested scales.")
    quant_storage = property(lambda self: self.layout.quant_storage, doc="Stored dtype of the codes.")
    double_quant = property(lambda self: self.layout.double_quant, doc="Whether the scales are double-quantized.")
    numel = property(lambda self: self.layout.numel, doc="Number of elements of the original tensor.")

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes and scales (excluding the constant tables)."""
        total = self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.nested_absmax is not None:
            total += self.nested_absmax.numel() * 4 + 4
        return total

    def with_layout(self, **changes: object) -> PackedWeight:
        """The same tensors with some layout fields changed (e.g. ``dtype``)."""
        return PackedWeight(self.codes, self.absmax, self.nested_absmax, replace(self.layout, **changes))

    def to(self, device: torch.device | str) -> PackedWeight:
        """The weight with its tensors on ``device``."""
        nested = self.nested_absmax.to(device) if self.nested_absmax is not None else None
        return PackedWeight(self.codes.to(device), self.absmax.to(device), nested, self.layout)

    def quant_state_json(self) -> str:
        """The quant_state JSON bitsandbytes serializes (written by the core, the one
        definition the checkpoint tool uses too)."""
        return _core.quant_state_json(
            self.quant_type,
            self.blocksize,
            dtype_name(self.dtype),
            list(self.shape),
            float(self.offset) if self.double_quant else None,  # type: ignore[arg-type]
            dtype_name(self.nested_dtype),
        )

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors a packed checkpoint stores, under bitsandbytes' key names."""
        codes = self.codes
        if self.quant_storage != torch.uint8:
            codes = codes.reshape(-1).view(self.quant_storage).unsqueeze(1)
        return serialized(prefix, codes, self.absmax, self.nested_absmax, self.quant_type, self.quant_state_json())

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "weight") -> PackedWeight:
        """Reads the tensors of :meth:`state_dict` back — also ones bitsandbytes wrote."""
        state_keys = [k for k in tensors if k.startswith(f"{prefix}{QUANT_STATE_MARKER}")]
        if len(state_keys) != 1:
            raise QuantizationError(
                f"{prefix}: expected exactly one '{prefix}{QUANT_STATE_MARKER}nf4|fp4' tensor, found {len(state_keys)}"
            )
        raw = tensors[state_keys[0]]
        try:
            state = json.loads(bytes(raw.cpu().to(torch.uint8).numpy().tobytes()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QuantizationError(f"{state_keys[0]}: quant_state is not valid JSON: {exc}") from exc

        def need(key: str) -> torch.Tensor:
            if key not in tensors:
                raise QuantizationError(f"{prefix}: missing tensor {key!r}")
            return tensors[key]

        quant_type = state.get("quant_type")
        if quant_type not in QUANT_TYPES or not state_keys[0].endswith(quant_type):
            raise QuantizationError(f"{state_keys[0]}: unsupported quant_type {quant_type!r}")
        stored = need(prefix)
        quant_storage = stored.dtype
        codes = stored.reshape(-1).view(torch.uint8).unsqueeze(1)
        shape = tuple(int(d) for d in state["shape"])
        numel = math.prod(shape)
        if codes.shape[0] != (numel + 1) // 2:
            raise QuantizationError(
                f"{prefix}: packed data holds {codes.shape[0]} bytes, shape {list(shape)} needs {(numel + 1) // 2}"
            )
        nested = "nested_offset" in state
        layout = QuantLayout(
            quant_type=quant_type,
            blocksize=int(state["blocksize"]),
            shape=shape,
            dtype=dtype_from_name(state["dtype"]),
            offset=float(state["nested_offset"]) if nested else None,
            nested_dtype=dtype_from_name(state.get("nested_dtype", "float32")),
            quant_storage=quant_storage,
        )
        nested_absmax = need(f"{prefix}.nested_absmax").float() if nested else None
        weight = cls(codes, need(f"{prefix}.absmax"), nested_absmax, layout)
        weight._check_tables(tensors, prefix)
        return weight

    def _check_tables(self, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Refuses files whose code tables differ from ours (they would decode differently)."""
        expected = {f"{prefix}.quant_map": _reference_table(self.quant_type)}
        if self.double_quant:
            expected[f"{prefix}.nested_quant_map"] = _reference_table("dynamic")
        for key, table in expected.items():
            stored = tensors.get(key)
            if stored is None or not torch.equal(stored.float().cpu(), table):
                raise QuantizationError(f"{key}: missing or not the standard {key.rsplit('.', 1)[-1]} table")


@functools.cache
def _reference_table(name: str) -> torch.Tensor:
    """The table ``name`` (a quant type, or ``"dynamic"``) to compare stored ones with, built once
    (loading checks it for every weight). Never handed out: callers get fresh copies."""
    return dynamic_map() if name == "dynamic" else code_table(name)


def serialized(
    prefix: str,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    quant_type: str,
    quant_state_json: str,
) -> dict[str, torch.Tensor]:
    """A 4-bit weight's tensors under bitsandbytes' key names (``prefix`` is the weight's key): the codes, the
    scales, the code tables and the quant_state JSON as a uint8 tensor."""
    tensors = {prefix: codes, f"{prefix}.absmax": absmax, f"{prefix}.quant_map": code_table(quant_type)}
    if nested_absmax is not None:
        tensors[f"{prefix}.nested_absmax"] = nested_absmax
        tensors[f"{prefix}.nested_quant_map"] = dynamic_map()
    key = f"{prefix}{QUANT_STATE_MARKER}{quant_type}"
    tensors[key] = torch.frombuffer(bytearray(quant_state_json.encode("utf-8")), dtype=torch.uint8)
    return tensors
