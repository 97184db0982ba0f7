"""The CUDA kernels' exact source, compiled by the host C++ compiler and run over its whole grid on the CPU
(tests/helpers/kernel_emulation.py), against the Rust core: dequantization bit for bit, the batch-1 matvec within a
stated float tolerance. Launch configurations come from ``qlorakit.kernels.launches``, the same code that
builds the GPU launches."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import qlorakit
from helpers.kernel_emulation import GuardedBuffers, assert_gemv_close, build, build_text, compiler_available
from qlorakit import _core
from qlorakit.kernels import kernel_files, kernel_names, kernel_source, kernel_variants
from qlorakit.kernels.launches import dequantize_4bit_launch, gemv_4bit_launch

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no host C++ compiler (g++) for the kernel emulation")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BITS = {"float32": (np.uint32, torch.int32), "float16": (np.uint16, torch.int16), "bfloat16": (np.uint16, torch.int16)}
CANARY = 0xA5


def rust_bits(packed: qlorakit.PackedWeight, dtype: str) -> np.ndarray:
    """The Rust core's dequantization of ``packed`` as raw bits."""
    bits, view = BITS[dtype]
    return qlorakit.dequantize(packed, DTYPES[dtype]).reshape(-1).view(view).numpy().view(bits)


def emulated_dequantize(packed: qlorakit.PackedWeight, dtype: str, guard: GuardedBuffers | None = None) -> np.ndarray:
    """The dequantize kernel's output bits for ``packed``. Inputs and output end at a guard page when ``guard``
    is given; the output has 16 canary bytes past its end, checked afterwards."""
    n = packed.numel
    bits, _ = BITS[dtype]
    canary_elements = 16 // np.dtype(bits).itemsize
    place = (lambda a, alignment=16: guard.array(a, alignment)) if guard else (lambda a, alignment=16: a.copy())
    codes = place(packed.codes.reshape(-1).numpy(), 4)
    absmax = place(packed.absmax.numpy(), 4)
    nested = place(packed.nested_absmax.numpy(), 4) if packed.nested_absmax is not None else None
    out = place(np.full((n + canary_elements) * np.dtype(bits).itemsize, CANARY, np.uint8)).view(bits)
    spec = dequantize_4bit_launch(
        packed=codes,
        absmax=absmax,
        nested_absmax=nested,
        offset=packed.offset,
        quant_type=packed.quant_type,
        blocksize=packed.blocksize,
        numel=n,
        out=out,
        dtype=dtype,
    )
    build(spec.file).launch(spec.name, spec.grid, spec.block, spec.args)
    assert (out[n:].view(np.uint8) == CANARY).all(), "the kernel wrote past the last element"
    return out[:n]


# ---- the sources as compiled


def test_every_kernel_file_is_found_and_names_its_kernels():
    files = kernel_files()
    assert {"dequantize_4bit.cu", "gemv_4bit.cu"} <= set(files)
    assert kernel_names("dequantize_4bit.cu") == ["dequantize_4bit_f32", "dequantize_4bit_f16", "dequantize_4bit_bf16"]
    assert kernel_names("gemv_4bit.cu") == ["gemv_4bit_f32", "gemv_4bit_f16", "gemv_4bit_bf16"]
    for file in files:
        assert kernel_names(file), f'{file} defines no extern "C" __global__ kernel'
        assert kernel_variants(file)


def test_prelude_tables_are_the_rust_tables_to_the_bit():
    source = kernel_source("dequantize_4bit.cu")
    for name, values in (
        ("QLORAKIT_NF4_CODE", _core.NF4_CODE),
        ("QLORAKIT_FP4_CODE", _core.FP4_CODE),
        ("QLORAKIT_DYNAMIC_MAP", _core.DYNAMIC_MAP),
    ):
        body = re.search(rf"#define {name} \{{(.*)\}}", source).group(1)
        literals = [item.strip() for item in body.split(",")]
        assert all(re.fullmatch(r"-?0x[0-9a-f.]+p[+-]\d+f", lit) for lit in literals), literals[:3]
        parsed = np.array([float.fromhex(lit[:-1]) for lit in literals], dtype=np.float32)
        assert np.array_equal(parsed.view(np.uint32), np.array(values, dtype=np.float32).view(np.uint32))
    # No table is retyped in a kernel file: the only numbers of that precision come from the prelude.
    for file in kernel_files():
        text = (qlorakit.kernels.CUDA_DIR / file).read_text()
        assert "0.6961928" not in text and "0.0052083" not in text


def test_local_headers_are_inlined_once_with_line_markers():
    source = kernel_source("gemv_4bit.cu")
    assert '#include "' not in source
    assert source.count("__device__ const float qk_dynamic_map[256]") == 1
    assert '#line 1 "blockwise_4bit.cuh"' in source and '#line 1 "gemv_4bit.cu"' in source


def test_variant_lines_parse(tmp_path, monkeypatch):
    from qlorakit.kernels import sources

    (tmp_path / sources.DEVICE_HEADER).write_text((sources.CUDA_DIR / sources.DEVICE_HEADER).read_text())
    (tmp_path / "probe.cu").write_text("// qlorakit: variant A=1,B=float\n// qlorakit: variant A=2, B=__half\n")
    monkeypatch.setattr(sources, "CUDA_DIR", tmp_path)
    assert sources.kernel_variants("probe.cu") == [{"A": "1", "B": "float"}, {"A": "2", "B": "__half"}]
    assert "#define A 2\n#define B __half\n" in sources.kernel_source("probe.cu", {"A": "2", "B": "__half"})


# ---- the shim itself: conversions, barriers, shuffles


SHIM_PROBE = r"""
extern "C" __global__ void convert(const float* x, unsigned short* bf16, unsigned short* f16, unsigned int* pairs,
                                   long long n) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    bf16[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
    f16[i] = __half_as_ushort(__float2half_rn(x[i]));
    pairs[i] = qk_pack_bf16x2(x[i], -x[i]) ^ qk_pack_f16x2(-x[i], x[i]);
}

extern "C" __global__ void widen(const unsigned short* h, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __half2float(__ushort_as_half(h[i]));
}

// Reverses each block's slice through shared memory, then sums it with a shuffle butterfly per warp.
extern "C" __global__ void reverse_and_sum(const float* x, float* reversed, float* warp_sums) {
    __shared__ float tile[128];
    const unsigned int t = threadIdx.x;
    tile[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    const float mine = tile[blockDim.x - 1 - t];
    reversed[blockIdx.x * blockDim.x + t] = mine;
    float sum = mine;
    for (int delta = 16; delta > 0; delta >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, delta);
    const float down = __shfl_down_sync(0xffffffffu, mine, 1);
    if ((t & 31) == 0) warp_sums[(blockIdx.x * blockDim.x + t) / 32] = sum + 0.0f * down;
}

// Undefined on a GPU: half of each warp at a block barrier, the other half at a warp barrier.
extern "C" __global__ void divergent_barrier(int* out) {
    if (threadIdx.x & 1) {
        __syncthreads();
    } else {
        __syncwarp();
    }
    out[threadIdx.x] = 1;
}

// Undefined on a GPU: a full-mask shuffle after lane 0 has exited.
extern "C" __global__ void shuffle_with_exited_lane(int* out) {
    if (threadIdx.x == 0) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}
"""


@pytest.fixture(scope="module")
def shim_probe():
    return build_text(
        SHIM_PROBE,
        ["convert", "widen", "reverse_and_sum", "divergent_barrier", "shuffle_with_exited_lane"],
        "shim_probe.cu",
    )


def test_shim_float_conversions_round_like_the_gpu(shim_probe):
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [
            0.0,
            -0.0,
            1.0,
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            1e30,
            2.0**-14,
            2.0**-24,
            2.0**-25,
            1.5 * 2.0**-25,
            3.0 * 2.0**-26,
            2.0**-26,
            1e-45,
            3.4e38,
            2.0**-14 - 2.0**-25,
            1.0 + 2.0**-11,
            1.0 + 3 * 2.0**-11,
        ],
        dtype=np.float32,
    )
    tiny = (rng.standard_normal(50_000) * 1e-5).astype(np.float32)
    x = np.concatenate([random_bits.view(np.float32), special, -special, tiny])
    x = x[np.isfinite(x)]
    n = x.size
    bf16, f16, pairs = np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(n, np.uint32)
    shim_probe.launch("convert", (-(-n // 256),), (256,), [x, bf16, f16, pairs, np.int64(n)])
    expected_bf16 = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):
        expected_f16 = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(bf16, expected_bf16)
    assert np.array_equal(f16, expected_f16)
    neg_bf16 = torch.from_numpy(-x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    with np.errstate(over="ignore"):
        neg_f16 = (-x).astype(np.float16).view(np.uint16).astype(np.uint32)
    expected_pairs = (expected_bf16.astype(np.uint32) | (neg_bf16 << 16)) ^ (
        neg_f16 | (expected_f16.astype(np.uint32) << 16)
    )
    assert np.array_equal(pairs, expected_pairs)

    every_half = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    widened = np.zeros(2**16, np.float32)
    shim_probe.launch("widen", (256,), (256,), [every_half, widened, np.int32(2**16)])
    expected = every_half.view(np.float16).astype(np.float32)
    finite = np.isfinite(expected) | np.isinf(expected)
    assert np.array_equal(widened[finite].view(np.uint32), expected[finite].view(np.uint32))
    assert np.isnan(widened[~finite]).all()


def test_shim_honours_syncthreads_and_warp_shuffles(shim_probe):
    x = np.arange(3 * 128, dtype=np.float32)
    reversed_, sums = np.zeros_like(x), np.zeros(3 * 4, np.float32)
    shim_probe.launch("reverse_and_sum", (3,), (128,), [x, reversed_, sums])
    expected = x.reshape(3, 128)[:, ::-1].reshape(-1)
    assert np.array_equal(reversed_, expected)
    assert np.array_equal(sums, expected.reshape(-1, 32).sum(axis=1))


def test_shim_reports_divergent_barriers_and_shuffles(shim_probe):
    out = np.zeros(64, np.int32)
    with pytest.raises(RuntimeError, match="deadlock"):
        shim_probe.launch("divergent_barrier", (1,), (64,), [out])
    with pytest.raises(RuntimeError, match="lane 0 .* has exited"):
        shim_probe.launch("shuffle_with_exited_lane", (1,), (64,), [out])


def test_emulated_launch_checks_argument_types():
    module = build("dequantize_4bit.cu")
    packed = qlorakit.quantize(torch.randn(64), "nf4", 64, True)
    spec = dequantize_4bit_launch(
        packed=packed.codes.reshape(-1).numpy(),
        absmax=packed.absmax.numpy(),
        nested_absmax=packed.nested_absmax.numpy(),
        offset=packed.offset,
        quant_type="nf4",
        blocksize=64,
        numel=64,
        out=np.zeros(64, np.uint16),
        dtype="bfloat16",
    )
    args = list(spec.args)
    args[-2] = np.int32(64)  # the kernel takes a 64-bit element count
    with pytest.raises(TypeError, match="8-byte signed integer"):
        module.launch(spec.name, spec.grid, spec.block, args)
    args[-2] = 64
    with pytest.raises(TypeError, match="takes a scalar"):
        module.launch(spec.name, spec.grid, spec.block, args)


# ---- dequantization: bit-exact with the Rust core


def edge_case_input(numel: int, blocksize: int, seed: int) -> torch.Tensor:
    """Normal values with an all-zero block, a block of tiny values (float16 subnormal outputs) and one of
    huge values (float16 overflow to infinity), as far as ``numel`` has room for them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    blocks = [slice(b * blocksize, min(numel, (b + 1) * blocksize)) for b in range(math.ceil(numel / blocksize))]
    if len(blocks) > 1:
        x[blocks[1]] = 0.0
    if len(blocks) > 2:
        x[blocks[2]] *= 1e-6
    if len(blocks) > 3:
        x[blocks[3]] *= 1e5
    return x


@pytest.mark.parametrize("blocksize", list(_core.BLOCKSIZES))
def test_dequantize_equals_rust_on_edge_cases(blocksize: int):
    guard = GuardedBuffers()
    # Odd counts, a trailing partial block, fewer elements than one group or one block, exact multiples.
    counts = [1, 7, 9, 4 * blocksize, 4 * blocksize + 1, 3 * blocksize + 37, blocksize - 3]
    checked = 0
    for numel in counts:
        for quant_type in ("nf4", "fp4"):
            for double_quant in (True, False):
                x = edge_case_input(numel, blocksize, seed=numel)
                packed = qlorakit.quantize(x, quant_type, blocksize, double_quant)
                for dtype in DTYPES:
                    got = emulated_dequantize(packed, dtype, guard)
                    expected = rust_bits(packed, dtype)
                    assert np.array_equal(got, expected), (numel, quant_type, double_quant, dtype)
                    checked += 1
    assert checked == len(counts) * 12


def test_edge_cases_reach_float16_subnormals_and_infinity():
    """The edge-case input does exercise the conversions' edges (else the test above would prove less); with
    plain float32 scales, since double quantization's shared offset blurs the tiny block's scale."""
    packed = qlorakit.quantize(edge_case_input(4 * 64, 64, seed=1), "nf4", 64, False)
    halves = qlorakit.dequantize(packed, torch.float16).float()
    assert torch.isinf(halves).any()
    assert ((halves != 0) & (halves.abs() < 2.0**-14)).any()
    assert (halves[64:128] == 0).all()


def test_dequantize_equals_rust_on_more_than_one_grid_block():
    # 3 CUDA blocks of 8192 elements plus a partial one: the grid arithmetic of the launch, not just one block.
    x = torch.randn(3 * 8192 + 1001, generator=torch.Generator().manual_seed(5))
    for double_quant in (True, False):
        packed = qlorakit.quantize(x, "nf4", 64, double_quant)
        for dtype in DTYPES:
            assert np.array_equal(emulated_dequantize(packed, dtype), rust_bits(packed, dtype))


def test_dequantize_equals_rust_on_real_weights(minilm_weights):
    """Every 2-D weight of the real MiniLM checkpoint except the 11.7 M-element token embedding (the runtime
    budget), NF4 double-quantized to its stored bfloat16; then every other format and dtype on two layers."""
    names = [
        name
        for name, tensor in sorted(minilm_weights.items())
        if tensor.is_floating_point() and "word_embeddings" not in name
    ]
    assert len(names) >= 30
    for name in names:
        packed = qlorakit.quantize(minilm_weights[name].contiguous(), "nf4", 64, True)
        assert np.array_equal(emulated_dequantize(packed, "bfloat16"), rust_bits(packed, "bfloat16")), name
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight"):
        weight = next(minilm_weights[k] for k in minilm_weights if k.endswith(name))
        for quant_type, blocksize, double_quant in (("fp4", 128, True), ("nf4", 256, False), ("fp4", 64, False)):
            packed = qlorakit.quantize(weight.contiguous(), quant_type, blocksize, double_quant)
            for dtype in DTYPES:
                got = emulated_dequantize(packed, dtype)
                assert np.array_equal(got, rust_bits(packed, dtype)), (name, quant_type, double_quant, dtype)


# ---- batch-1 matvec: within the float tolerance of its summation order


def emulated_gemv(packed, x: torch.Tensor, bias: torch.Tensor | None, vectorized: bool) -> torch.Tensor:
    rows, cols = packed.shape
    dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]
    bits, view = BITS[dtype]
    as_bits = lambda t: t.contiguous().view(view).numpy().view(bits).copy()  # noqa: E731
    out = np.zeros(rows, bits)
    spec = gemv_4bit_launch(
        packed=packed.codes.reshape(-1).numpy().copy(),
        absmax=packed.absmax.numpy(),
        nested_absmax=packed.nested_absmax.numpy() if packed.nested_absmax is not None else None,
        offset=packed.offset,
        quant_type=packed.quant_type,
        blocksize=packed.blocksize,
        rows=rows,
        cols=cols,
        x=as_bits(x),
        bias=as_bits(bias) if bias is not None else None,
        out=out,
        dtype=dtype,
        vectorized=vectorized,
    )
    build(spec.file).launch(spec.name, spec.grid, spec.block, spec.args)
    return torch.from_numpy(out.view(np.int32 if bits is np.uint32 else np.int16)).view(x.dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gemv_matches_the_float_reference(dtype: str):
    g = torch.Generator().manual_seed(7)
    # (rows, cols, blocksize): vectorizable rows; rows shorter than a block (blocks straddle rows); odd widths
    # where rows start mid-byte; more rows than one CUDA block of warps.
    shapes = [(1, 32, 32), (13, 96, 64), (9, 256, 4096), (37, 64, 128), (5, 33, 32), (6, 7, 64), (3, 100, 256)]
    for rows, cols, blocksize in shapes:
        for quant_type, double_quant in (("nf4", True), ("fp4", False)):
            weight = torch.randn(rows, cols, generator=g)
            packed = qlorakit.quantize(weight, quant_type, blocksize, double_quant)
            x = torch.randn(cols, generator=g).to(DTYPES[dtype])
            bias = torch.randn(rows, generator=g).to(DTYPES[dtype]) if rows % 2 else None
            for vectorized in (True, False) if cols % 32 == 0 else (False,):
                got = emulated_gemv(packed, x, bias, vectorized)
                assert_gemv_close(packed, x, bias, got)


def test_gemv_on_real_weights(minilm_weights):
    g = torch.Generator().manual_seed(11)
    for suffix in ("attention.self.key.weight", "intermediate.dense.weight", "output.dense.weight"):
        name = next(k for k in sorted(minilm_weights) if k.endswith(suffix) and "layer.2." in k)
        packed = qlorakit.quantize(minilm_weights[name].contiguous(), "nf4", 64, True)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(packed.shape[1], generator=g).to(dtype)
            assert_gemv_close(packed, x, None, emulated_gemv(packed, x, None, vectorized=True))
