"""Format constants, taken from the Rust core (their one definition) — never retyped.

No torch here: the checkpoint tool imports this without paying for torch's import."""

from __future__ import annotations

from qlorakit import _core

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
BLOCKSIZES: tuple[int, ...] = tuple(_core.BLOCKSIZES)
DEFAULT_BLOCKSIZE: int = _core.DEFAULT_BLOCKSIZE
NESTED_BLOCKSIZE: int = _core.NESTED_BLOCKSIZE
