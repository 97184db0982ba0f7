"""The CUDA launches' argument lists and grids (``qlorakit.kernels.launches``), built on the CPU: no GPU and no
compiler needed. The format arguments are checked by the Rust core and encoded from its constants."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qlorakit import _core
from qlorakit.errors import QuantizationError
from qlorakit.formats import BLOCKSIZES, QUANT_TYPES
from qlorakit.kernels import CUDA_DIR
from qlorakit.kernels.launches import (
    BLOCKSIZE_LOG2,
    DEQUANTIZE_FILE,
    GEMV_FILE,
    QUANT_TYPE_INDEX,
    dequantize_4bit_launch,
    gemv_4bit_launch,
    source_constant,
)

PACKED, ABSMAX, NESTED, X, BIAS, OUT = (np.zeros(8, np.uint8) for _ in range(6))


def dequantize(**change: object):
    given = {
        "packed": PACKED,
        "absmax": ABSMAX,
        "nested_absmax": None,
        "offset": None,
        "quant_type": "nf4",
        "blocksize": 64,
        "numel": 1000,
        "out": OUT,
        "dtype": "float32",
    }
    return dequantize_4bit_launch(**{**given, **change})


def gemv(**change: object):
    given = {
        "packed": PACKED,
        "absmax": ABSMAX,
        "nested_absmax": None,
        "offset": None,
        "quant_type": "nf4",
        "blocksize": 64,
        "rows": 100,
        "cols": 96,
        "x": X,
        "bias": None,
        "out": OUT,
        "dtype": "bfloat16",
        "vectorized": True,
    }
    return gemv_4bit_launch(**{**given, **change})


def test_quant_type_index_is_the_row_of_the_kernels_code_table() -> None:
    header = (CUDA_DIR / "blockwise_4bit.cuh").read_text()
    rows = re.search(r"qk_quant_codes\[\d+\]\[16\] = \{(.*?)\};", header).group(1)
    assert [row.strip() for row in rows.split(",")] == [f"QLORAKIT_{name.upper()}_CODE" for name in QUANT_TYPES]
    assert QUANT_TYPE_INDEX == {name: QUANT_TYPES.index(name) for name in _core.QUANT_TYPES}


def test_blocksize_log2_covers_the_cores_blocksizes() -> None:
    assert sorted(BLOCKSIZE_LOG2) == sorted(_core.BLOCKSIZES)
    assert all(1 << log2 == size for size, log2 in BLOCKSIZE_LOG2.items())


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_arguments(quant_type: str, blocksize: int) -> None:
    spec = dequantize(quant_type=quant_type, blocksize=blocksize, numel=100_001)
    assert (spec.file, spec.name) == (DEQUANTIZE_FILE, "dequantize_4bit_f32")
    threads = source_constant(DEQUANTIZE_FILE, "DEQUANT_THREADS")
    per_block = 8 * threads * source_constant(DEQUANTIZE_FILE, "GROUPS_PER_THREAD")
    assert spec.block == (threads, 1, 1) and spec.grid == (-(-100_001 // per_block), 1, 1)
    packed, absmax, nested, offset, double_quant, index, out, numel, log2 = spec.args
    assert packed is PACKED and absmax is ABSMAX and nested is None and out is OUT
    scalars = (offset, double_quant, index, numel, log2)
    assert [type(a) for a in scalars] == [np.float32, np.int32, np.int32, np.int64, np.int32]
    assert (offset, double_quant, numel) == (0.0, 0, 100_001)
    assert index == QUANT_TYPES.index(quant_type) and 1 << int(log2) == blocksize


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_gemv_arguments(quant_type: str, blocksize: int) -> None:
    spec = gemv(quant_type=quant_type, blocksize=blocksize, nested_absmax=NESTED, offset=0.25, bias=BIAS)
    warps = source_constant(GEMV_FILE, "GEMV_WARPS")
    assert (spec.file, spec.name) == (GEMV_FILE, "gemv_4bit_bf16")
    assert spec.block == (32 * warps, 1, 1) and spec.grid == (-(-100 // warps), 1, 1)
    packed, absmax, nested, offset, double_quant, index, x, bias, out, rows, cols, log2, vectorized = spec.args
    buffers = (packed, absmax, nested, x, bias, out)
    assert all(a is b for a, b in zip(buffers, (PACKED, ABSMAX, NESTED, X, BIAS, OUT), strict=True))
    scalars = (offset, double_quant, index, rows, cols, log2, vectorized)
    assert [type(a) for a in scalars] == [np.float32, *[np.int32] * 6]
    assert (offset, double_quant, rows, cols, vectorized) == (0.25, 1, 100, 96, 1)
    assert index == QUANT_TYPES.index(quant_type) and 1 << int(log2) == blocksize


def test_a_numpy_integer_blocksize_is_taken() -> None:
    assert dequantize(blocksize=np.int64(128)).args[-1] == 7
    assert gemv(blocksize=np.int32(4096)).args[-2] == 12


@pytest.mark.parametrize("launch", [dequantize, gemv])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant_type": "int4"}, "unsupported quant_type 'int4'; expected 'nf4' or 'fp4'"),
        ({"quant_type": "NF4"}, "unsupported quant_type 'NF4'; expected 'nf4' or 'fp4'"),
        ({"blocksize": 100}, "unsupported blocksize 100; expected one of [32, 64, 128, 256, 512, 1024, 2048, 4096]"),
        ({"blocksize": -64}, "unsupported blocksize -64; expected one of [32,"),
        ({"quant_type": "fp8", "blocksize": 100}, "unsupported quant_type 'fp8'"),
    ],
)
def test_bad_formats_are_the_cores_errors(launch, change: dict, message: str) -> None:
    with pytest.raises(QuantizationError) as info:
        launch(**change)
    assert str(info.value).startswith(message)
    with pytest.raises(QuantizationError) as core:
        _core.check_format(change.get("quant_type", "nf4"), change.get("blocksize", 64))
    assert str(info.value) == str(core.value)


def test_shape_errors_come_before_the_format_check() -> None:
    with pytest.raises(ValueError, match="nothing to dequantize"):
        dequantize(numel=0, quant_type="int4")
    with pytest.raises(ValueError, match=r"unsupported matrix shape \[0, 96\]"):
        gemv(rows=0, blocksize=100)
    with pytest.raises(ValueError, match="the vectorized path needs cols % 32 == 0, got 33"):
        gemv(cols=33, quant_type="int4")
    assert gemv(cols=33, vectorized=False).args[-1] == 0
