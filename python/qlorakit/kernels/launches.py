"""Launch configurations of the 4-bit kernels: which kernel, grid, block and argument list.

Torch-free and backend-free: the buffers are passed through as given (torch CUDA tensors for CuPy, numpy
arrays for the CPU emulation), scalars become the numpy types of the kernel's C parameters. The GPU path
(:mod:`qlorakit.kernels.cuda_ops`) and the emulation tests build their launches here, so the tests check the
argument lists and grids the GPU runs with, not a copy of them.

Thread block sizes come from the ``#define`` s in the ``.cu`` files (one definition); the 4-bit format
(quant_type, blocksize) is checked by the Rust core (:func:`qlorakit._core.check_format`, one validator) and
encoded from its constants (:mod:`qlorakit.formats`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from qlorakit import _core
from qlorakit.formats import BLOCKSIZES, QUANT_TYPES
from qlorakit.kernels.sources import CUDA_DIR

DEQUANTIZE_FILE = "dequantize_4bit.cu"
GEMV_FILE = "gemv_4bit.cu"

#: Kernel name suffix per output dtype (the names the Rust core uses for element types).
DTYPE_SUFFIXES: dict[str, str] = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

#: Alignment in bytes each buffer needs (the kernels use 32-bit and 16-byte vector accesses).
DEQUANTIZE_ALIGNMENT = {"packed": 4, "out": 16}
GEMV_VECTOR_ALIGNMENT = 16  # packed and x, for the vectorized path (else the kernel reads bytes)
GEMV_VECTOR_COLS = 32  # cols must be a multiple of this for the vectorized path


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: ``file``'s kernel ``name`` over ``grid`` x ``block`` with ``args``."""

    file: str
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[object, ...]


@functools.cache
def source_constant(file: str, name: str) -> int:
    """The integer value of ``#define NAME VALUE`` in ``kernels/cuda/FILE``."""
    text = (CUDA_DIR / file).read_text(encoding="utf-8")
    match = re.search(rf"^\s*#define\s+{re.escape(name)}\s+(\d+)\s*$", text, re.M)
    if match is None:
        raise LookupError(f"{file} defines no integer {name}")
    return int(match.group(1))


#: The kernels' ``quant_type`` argument: the row of ``qk_quant_codes`` (blockwise_4bit.cuh) of each quant type.
QUANT_TYPE_INDEX: dict[str, int] = {name: index for index, name in enumerate(QUANT_TYPES)}

#: The kernels' ``blocksize_log2`` argument of each blocksize (all powers of two).
BLOCKSIZE_LOG2: dict[int, int] = {size: size.bit_length() - 1 for size in BLOCKSIZES}


def _format_args(quant_type: str, blocksize: int) -> tuple[np.int32, np.int32]:
    """``(quant_type index, blocksize log2)`` as the kernels take them. Raises
    :class:`~qlorakit.errors.QuantizationError` (the Rust core's check) unless the core knows the format."""
    _core.check_format(quant_type, blocksize)
    return np.int32(QUANT_TYPE_INDEX[quant_type]), np.int32(BLOCKSIZE_LOG2[blocksize])


def _scale_args(
    packed: object, absmax: object, nested_absmax: object | None, offset: float | None, quant_index: np.int32
) -> tuple[object, ...]:
    double_quant = nested_absmax is not None
    return (
        packed,
        absmax,
        nested_absmax,
        np.float32(offset if double_quant else 0.0),
        np.int32(double_quant),
        quant_index,
    )


def dequantize_4bit_launch(
    *,
    packed: object,
    absmax: object,
    nested_absmax: object | None,
    offset: float | None,
    quant_type: str,
    blocksize: int,
    numel: int,
    out: object,
    dtype: str,
) -> KernelLaunch:
    """Decode ``numel`` elements into ``out`` (``dtype``: float32, float16 or bfloat16; 16-bit outputs are
    written as their bit patterns). ``absmax``: uint8 nested codes when ``nested_absmax`` is given (double
    quantization, with ``offset``), else float32 scales. Alignment: :data:`DEQUANTIZE_ALIGNMENT`."""
    if numel <= 0:
        raise ValueError("nothing to dequantize")
    quant_index, blocksize_log2 = _format_args(quant_type, blocksize)
    threads = source_constant(DEQUANTIZE_FILE, "DEQUANT_THREADS")
    per_thread = source_constant(DEQUANTIZE_FILE, "GROUPS_PER_THREAD")
    groups = -(-numel // 8)
    blocks = -(-groups // (threads * per_thread))
    return KernelLaunch(
        DEQUANTIZE_FILE,
        f"dequantize_4bit_{DTYPE_SUFFIXES[dtype]}",
        (blocks, 1, 1),
        (threads, 1, 1),
        (
            *_scale_args(packed, absmax, nested_absmax, offset, quant_index),
            out,
            np.int64(numel),
            blocksize_log2,
        ),
    )


def gemv_4bit_launch(
    *,
    packed: object,
    absmax: object,
    nested_absmax: object | None,
    offset: float | None,
    quant_type: str,
    blocksize: int,
    rows: int,
    cols: int,
    x: object,
    bias: object | None,
    out: object,
    dtype: str,
    vectorized: bool,
) -> KernelLaunch:
    """``out[rows] = W[rows, cols] @ x[cols] (+ bias[rows])``, all of ``dtype``. ``vectorized`` only when
    ``cols`` is a multiple of :data:`GEMV_VECTOR_COLS` and ``packed`` and ``x`` are
    :data:`GEMV_VECTOR_ALIGNMENT`-byte aligned."""
    if rows <= 0 or cols <= 0 or rows >= 2**31 or cols >= 2**31:
        raise ValueError(f"unsupported matrix shape [{rows}, {cols}]")
    if vectorized and cols % GEMV_VECTOR_COLS:
        raise ValueError(f"the vectorized path needs cols % {GEMV_VECTOR_COLS} == 0, got {cols}")
    quant_index, blocksize_log2 = _format_args(quant_type, blocksize)
    warps = source_constant(GEMV_FILE, "GEMV_WARPS")
    return KernelLaunch(
        GEMV_FILE,
        f"gemv_4bit_{DTYPE_SUFFIXES[dtype]}",
        (-(-rows // warps), 1, 1),
        (32 * warps, 1, 1),
        (
            *_scale_args(packed, absmax, nested_absmax, offset, quant_index),
            x,
            bias,
            out,
            np.int32(rows),
            np.int32(cols),
            blocksize_log2,
            np.int32(vectorized),
        ),
    )
