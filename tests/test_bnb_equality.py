"""Byte-for-byte equality with bitsandbytes 0.50's CPU quantize_4bit / dequantize_4bit."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from helpers.bnb_reference import assert_same_packing, bnb_quantize, bnb_state_of, compare_nested
from qlorakit.formats import BLOCKSIZES
from qlorakit.tables import code_table

QUANT_TYPES = ("nf4", "fp4")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Awkward shapes: single elements, odd counts, partial trailing blocks, rows that do not
# align with blocks, more blocks than one parallel task, and exact multiples.
SHAPES = [(1,), (3,), (7, 9), (33, 17), (300, 77), (4096 + 31,), (129, 1031), (64, 64), (2, 4096)]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand((), generator=generator) * 4 + 1e-3
    x = torch.randn(shape, generator=generator) * scale
    # Heavy tails like real weights: a few outliers.
    outliers = torch.rand(shape, generator=generator) < 0.002
    return torch.where(outliers, x * 20, x).to(dtype)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_tensors_pack_identically(quant_type: str, blocksize: int, dtype: torch.dtype) -> None:
    for seed, shape in enumerate(SHAPES):
        assert_same_packing(random_tensor(shape, dtype, seed), quant_type, blocksize)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_double_quant_on_random_tensors(quant_type: str, blocksize: int, dtype: torch.dtype, torch_one_thread) -> None:
    for seed, shape in enumerate(SHAPES):
        result = compare_nested(random_tensor(shape, dtype, seed), quant_type, blocksize)
        assert result.offset_equal, f"offset differs on {shape} (torch runs single-threaded here)"
        assert result.ours_worse == 0


class TestEdgeCases:
    """bitsandbytes 0.50's CPU choices, reproduced exactly."""

    @pytest.mark.parametrize("quant_type", QUANT_TYPES)
    def test_all_zero_blocks(self, quant_type: str) -> None:
        x = torch.zeros(64 * 3 + 10)
        x[64:128] = torch.linspace(-1, 1, 64)
        ours = assert_same_packing(x, quant_type, 64)
        zero_code = 0x7 if quant_type == "nf4" else 0x0
        assert ours.codes[:32].eq(zero_code * 0x11).all()  # NF4: 0x77
        assert ours.absmax[0] == 0.0  # a full zero block stores 0 ...
        assert ours.absmax[-1] == torch.tensor(1e-38, dtype=torch.float32)  # ... a partial one the floor

    @pytest.mark.parametrize("quant_type", QUANT_TYPES)
    def test_one_nonzero_element(self, quant_type: str) -> None:
        for position in (0, 1, 31, 62, 63):
            x = torch.zeros(128)
            x[position] = -0.37
            x[64 + position] = 5e-3
            assert_same_packing(x, quant_type, 64)

    @pytest.mark.parametrize("quant_type", QUANT_TYPES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_huge_and_subnormal_values(self, quant_type: str, dtype: torch.dtype) -> None:
        info = torch.finfo(dtype)
        tiny = info.smallest_normal
        values = [
            torch.full((64,), info.max) * torch.linspace(-1, 1, 64),
            torch.linspace(-1, 1, 64) * tiny / 4,  # subnormal block (absmax below the 1e-38 floor for f32)
            torch.linspace(0, 1, 64) * tiny * 3,
            torch.tensor([info.max, -info.max] + [1.0] * 62),
            torch.tensor([tiny / 2**3] * 63 + [0.0]),
            torch.linspace(-1, 1, 37) * tiny,  # partial trailing block of subnormals
        ]
        x = torch.cat(values).to(dtype)
        assert torch.isfinite(x).all()
        assert_same_packing(x, quant_type, 64)
        assert_same_packing(x, quant_type, 32)

    @pytest.mark.parametrize("quant_type", QUANT_TYPES)
    def test_exact_midpoints_go_to_the_lower_code(self, quant_type: str) -> None:
        table = code_table(quant_type).sort().values
        bounds = (table[:-1] + table[1:]) / 2  # float32 midpoints, as bitsandbytes computes them
        above = torch.nextafter(bounds, torch.tensor(2.0))
        below = torch.nextafter(bounds, torch.tensor(-2.0))
        # absmax 1.0 in every block → scaled values are the inputs themselves.
        block = torch.cat([torch.tensor([1.0]), bounds, above, below, torch.zeros(64 - 46)])
        ours = assert_same_packing(block, quant_type, 64)
        codes = torch.stack([ours.codes.flatten() >> 4, ours.codes.flatten() & 0xF], 1).flatten()
        decoded = code_table(quant_type)[codes.long()]
        on_bound = decoded[1:16]
        assert (on_bound <= bounds).all(), "a value exactly on a bound must take the lower code"

    @pytest.mark.parametrize("quant_type", QUANT_TYPES)
    def test_partial_block_divides_rather_than_multiplies(self, quant_type: str) -> None:
        # Find scaled values where x / absmax and x * (1 / absmax) fall on different sides
        # of a bound; bitsandbytes divides in the trailing partial block only.
        table = code_table(quant_type).sort().values
        bounds = (table[:-1] + table[1:]) / 2
        generator = torch.Generator().manual_seed(7)
        absmax = torch.rand(20000, generator=generator) * 3 + 0.5
        bound = bounds[torch.randint(0, 15, (20000,), generator=generator)]
        x = bound * absmax
        x = torch.stack([x, torch.nextafter(x, torch.tensor(9.0)), torch.nextafter(x, torch.tensor(-9.0))], 1).flatten()
        absmax = absmax.repeat_interleave(3)
        divided = torch.bucketize(x / absmax, bounds)
        multiplied = torch.bucketize(x * (1.0 / absmax), bounds)
        disagree = (divided != multiplied).nonzero().flatten()
        assert disagree.numel() > 0, "no distinguishing value found"
        for index in disagree[:20].tolist():
            # A partial block of 5 elements whose absmax is absmax[index].
            partial = torch.tensor([absmax[index], x[index], 0.0, 0.0, 0.0])
            # ... after one full block, so the division rule is the one that applies.
            assert_same_packing(torch.cat([torch.linspace(-1, 1, 64), partial]), quant_type, 64)

    def test_fp4_small_positive_values_take_code_8(self) -> None:
        x = torch.tensor([1.0, 0.002, 0.0, -0.002, 0.0026, 0.003] + [0.0] * 58)
        ours = assert_same_packing(x, "fp4", 64)
        assert ours.codes[0, 0] >> 4 == 3 and ours.codes[0, 0] & 0xF == 8


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_real_checkpoint_packs_identically(minilm_weights, quant_type: str, blocksize: int) -> None:
    for name, weight in minilm_weights.items():
        if not weight.is_floating_point():
            continue
        for dtype in (torch.float32, torch.bfloat16):
            try:
                assert_same_packing(weight.to(dtype), quant_type, blocksize)
            except AssertionError as exc:
                raise AssertionError(f"{name} {dtype}: {exc}") from exc


def bnb_dequantize_eager(packed: torch.Tensor, state, out_dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' default-backend (pure torch) ``dequantize_4bit``, the same math as
    its C++ CPU kernel, usable where that kernel mis-indexes blocks (see below)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_dequantize_absmax(state)
    return _dequantize_4bit_compute(
        packed.reshape(-1), absmax, state.code, state.blocksize, tuple(state.shape), out_dtype
    )


def bnb_dequantize_absmax(state) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_blockwise(state.absmax, state.state2) + state.offset


#: bitsandbytes picks its CPU kernels by torch's CPU capability ("AVX512", "AVX2", ...).
BNB_CPU_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def cpu_kernel_misindexes(shape: tuple[int, ...], blocksize: int) -> bool:
    """bitsandbytes 0.50.2's AVX-512 C++ ``dequantize_4bit`` (used for an even last
    dimension and blocksize < 2048) assumes each row holds whole blocks: when blocks
    straddle rows (shape[-1] not a multiple of blocksize) it reads wrong absmax values.
    ``test_bnb_cpu_kernel_block_indexing_bug`` shows it. Its AVX2/scalar kernel has no such bug."""
    straddles = len(shape) > 1 and shape[-1] % 2 == 0 and blocksize < 2048 and shape[-1] % blocksize != 0
    return BNB_CPU_AVX512 and straddles


def bits_with_unsigned_zero(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` with -0.0 read as +0.0. FP4's code 8 decodes to zero; its table
    entry (``quant_map``) is +0.0, which we, bitsandbytes' torch backend and its AVX-512 kernel
    write, while its AVX2/scalar C++ kernel writes -0.0. Every other bit must be equal."""
    return (t.reshape(-1) + 0.0).view(torch.uint8)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_bitsandbytes(bnb_functional, quant_type: str, out_dtype: torch.dtype, double_quant: bool):
    """Our decoder and bitsandbytes' ``dequantize_4bit``, given the same packed data
    (ours, read by bitsandbytes through ``QuantState.from_dict``), give identical tensors."""
    for seed, shape in enumerate(SHAPES):
        for blocksize in (32, 64, 1024, 2048):
            x = random_tensor(shape, torch.bfloat16, seed)
            ours = qlorakit.quantize(x, quant_type, blocksize, double_quant)
            state = bnb_state_of(ours)
            if cpu_kernel_misindexes(shape, blocksize):
                expected = bnb_dequantize_eager(ours.codes, state, out_dtype)
            else:
                state.dtype = out_dtype
                expected = bnb_functional.dequantize_4bit(ours.codes, state)
            got = qlorakit.dequantize(ours, out_dtype)
            assert got.dtype == expected.dtype == out_dtype
            assert got.shape == expected.shape
            assert torch.equal(bits_with_unsigned_zero(got), bits_with_unsigned_zero(expected)), (
                f"{quant_type} bs={blocksize} {shape} -> {out_dtype}"
            )


def test_bnb_cpu_kernel_block_indexing_bug(bnb_functional) -> None:
    """Documents why the test above uses bitsandbytes' torch backend when a block spans
    rows on an AVX-512 CPU: its AVX-512 C++ kernel then disagrees with its own torch backend
    (and with us). Its AVX2/scalar kernel (other CPUs) agrees."""
    x = random_tensor((64, 64), torch.bfloat16, 7)
    packed, state = bnb_quantize(x, "nf4", 512, double_quant=False)
    kernel = bnb_functional.dequantize_4bit(packed, state)
    eager = bnb_dequantize_eager(packed, state, torch.bfloat16)
    ours = qlorakit.dequantize(qlorakit.quantize(x, "nf4", 512, double_quant=False))
    assert torch.equal(ours, eager)
    assert torch.equal(kernel[:8], eager[:8])  # the first block (rows 0-7) is right ...
    if BNB_CPU_AVX512:
        assert not torch.equal(kernel[8:], eager[8:])  # ... every later block uses a wrong absmax
    else:
        assert torch.equal(kernel, eager)


def test_bitsandbytes_packing_decodes_with_qlorakit(bnb_functional) -> None:
    """Tensors written by bitsandbytes itself load through ``from_state_dict`` and decode
    to what bitsandbytes decodes."""
    for quant_type in QUANT_TYPES:
        for double_quant in (False, True):
            x = random_tensor((96, 80), torch.bfloat16, 3)
            packed, state = bnb_quantize(x, quant_type, 64, double_quant)
            tensors = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
            ours = qlorakit.PackedWeight.from_state_dict(tensors, prefix="w")
            assert ours.shape == (96, 80) and ours.dtype == torch.bfloat16
            expected = bnb_dequantize_eager(packed, state, torch.bfloat16)
            assert torch.equal(qlorakit.dequantize(ours), expected)
