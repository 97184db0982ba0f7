"""Format constants, taken from the Rust core (their one definition) — never retyped.

No torch here: the checkpoint tool imports this without paying for torch's import."""

from __future__ import annotations

from qlorakit import _core

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
BLOCKSIZES: tuple[int, ...] = tuple(_core.BLOCKSIZES)
DEFAULT_BLOCKSIZE: int = _core.DEFAULT_BLOCKSIZE
NESTED_BLOCKSIZE: int = _core.NESTED_BLOCKSIZE

#: What a weight's key is followed by in the key of its quant_state JSON tensor (then ``nf4``/``fp4``).
QUANT_STATE_MARKER = ".quant_state.bitsandbytes__"
