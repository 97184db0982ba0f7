"""Format constants, taken from the Rust core (their one definition) — never retyped.

No torch here: the checkpoint tool imports this without paying for torch's import."""

from __future__ import annotations

from qlorakit import _core

#: The 4-bit data types, in the order of their codes in the kernels (``nf4`` = 0, ``fp4`` = 1).
QUANT_TYPES: tuple[str, ...] = tuple(_core.QUANT_TYPES)
BLOCKSIZES: tuple[int, ...] = tuple(_core.BLOCKSIZES)
DEFAULT_BLOCKSIZE: int = _core.DEFAULT_BLOCKSIZE
NESTED_BLOCKSIZE: int = _core.NESTED_BLOCKSIZE

#: What a weight's key is followed by in the key of its quant_state JSON tensor (then ``nf4``/``fp4``).
QUANT_STATE_MARKER: str = _core.QUANT_STATE_MARKER

#: safetensors' names of the float dtypes the core quantizes -> the core's (and torch's) dtype names.
SAFETENSORS_FLOAT_DTYPES: dict[str, str] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

#: Default largest output file of ``quantize_checkpoint`` / ``qlorakit quantize`` (transformers'
#: ``save_pretrained`` default too). A Python option default: the Rust pipeline takes bytes.
DEFAULT_MAX_SHARD_SIZE = "5GB"
