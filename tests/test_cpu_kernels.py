"""The CPU fused small-batch kernels through the Python dispatch, each forced by ``QLORAKIT_CPU_KERNEL`` (read once
per process, so every kernel runs in its own subprocess): 1 to ``GEMV_MAX_BATCH`` rows within the float32 summation
bound of dequantize-then-``F.linear``, each row of a batch bit for bit equal to that row alone, plain and
double-quantized scales alike; unknown or unsupported kernel names fail loudly; ``dequantize`` with the nested
scales decoded inline equals decoding them first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qlorakit
from qlorakit import _core
from qlorakit._core import QuantizationError

PYTHON_DIR = Path(qlorakit.__file__).resolve().parents[1]

#: Runs in a subprocess with QLORAKIT_CPU_KERNEL set; prints "ok <kernel>" when every check holds.
CHECK_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import qlorakit
    from qlorakit import _core
    from qlorakit.nn.dispatch import matvec_weight

    def bound(weight, x, bias, dtype):
        # Exact value and the float32 bound of any summation order (gamma_n sum |t|), then one rounding to dtype.
        w, xd = weight.double(), x.double()
        exact = xd @ w.T
        magnitude = xd.abs() @ w.abs().T
        n = weight.shape[1]
        if bias is not None:
            exact = exact + bias.double()
            magnitude = magnitude + bias.double().abs()
            n += 1
        u = 2.0**-24
        summation = n * u / (1 - n * u) * magnitude * (1 + 1e-6)
        unit, eta = {torch.float32: (2.0**-24, 2.0**-150), torch.bfloat16: (2.0**-8, 2.0**-134),
                     torch.float16: (2.0**-11, 2.0**-25)}[dtype]
        return exact, summation + (1 + unit) * unit * (exact.abs() + summation) + eta

    kernel = _core.cpu_kernel()
    assert kernel == sys.argv[1], (kernel, sys.argv[1])
    torch.manual_seed(0)
    shapes = [(96, 128, 64), (33, 77, 64), (40, 256, 128), (17, 4096, 4096), (64, 1023, 256), (8, 64, 32)]
    for out_features, in_features, blocksize in shapes:
        for double_quant in (False, True):
            packed = qlorakit.quantize(torch.randn(out_features, in_features) * 0.05, "nf4", blocksize, double_quant)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                weight = qlorakit.dequantize(packed, dtype)
                bias = torch.randn(out_features).to(dtype)
                x = torch.randn(_core.GEMV_MAX_BATCH, in_features).to(dtype)
                singles = [matvec_weight(packed, x[r], bias) for r in range(len(x))]
                for rows in range(1, _core.GEMV_MAX_BATCH + 1):
                    got = matvec_weight(packed, x[:rows], bias)
                    assert got is not None and got.shape == (rows, out_features) and got.dtype == dtype
                    exact, limit = bound(weight, x[:rows], bias, dtype)
                    error = (got.double() - exact).abs()
                    worst = float((error / limit).max())
                    assert (error <= limit).all(), (out_features, in_features, dtype, rows, worst)
                    for r in range(rows):
                        assert torch.equal(got[r], singles[r]), (out_features, in_features, dtype, rows, r)
                # [..., in_features] inputs keep their leading shape.
                assert matvec_weight(packed, x[:4].reshape(2, 2, in_features), bias).shape == (2, 2, out_features)
    print("ok", kernel)
    """
)


def run_forced(kernel: str, script: str = CHECK_SCRIPT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, _core.CPU_KERNEL_ENV: kernel, "PYTHONPATH": str(PYTHON_DIR)}
    return subprocess.run(
        [sys.executable, "-c", script, kernel], env=env, capture_output=True, text=True, timeout=600, check=False
    )


#: Every CPU kernel, slowest first (as the core lists them).
KERNELS = ("portable", "avx2", "avx2bf16", "avx512", "avx512bf16")


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_cpu_kernel_through_the_dispatch(kernel: str) -> None:
    if kernel not in _core.CPU_KERNELS_SUPPORTED:
        pytest.skip(f"this CPU cannot run the {kernel} kernel")
    result = run_forced(kernel)
    assert result.returncode == 0 and f"ok {kernel}" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("value", ["sse2", "AVX512", "fast"])
def test_an_unknown_kernel_name_is_an_error(value: str) -> None:
    script = textwrap.dedent(
        """
        import torch, qlorakit
        from qlorakit._core import QuantizationError
        from qlorakit.nn.dispatch import matvec_weight
        packed = qlorakit.quantize(torch.randn(8, 64), "nf4", 64)
        for call in (qlorakit._core.cpu_kernel, lambda: matvec_weight(packed, torch.randn(64))):
            try:
                call()
            except QuantizationError as error:
                names = "portable, avx2, avx2bf16, avx512, avx512bf16"
                assert "QLORAKIT_CPU_KERNEL" in str(error) and names in str(error), error
            else:
                raise AssertionError("no error")
        print("ok")
        """
    )
    result = run_forced(value, script)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_kernel_the_cpu_lacks_is_an_error() -> None:
    missing = [k for k in KERNELS if k not in _core.CPU_KERNELS_SUPPORTED]
    if not missing:
        pytest.skip("this CPU runs every kernel")
    script = (
        "import qlorakit._core as c\ntry:\n    c.cpu_kernel()\nexcept c.QuantizationError as e:\n    print('ok', e)\n"
    )
    result = run_forced(missing[0], script)
    assert "ok" in result.stdout and "lacks" in result.stdout, result.stdout + result.stderr


def test_the_default_kernel_is_the_best_supported() -> None:
    if os.environ.get(_core.CPU_KERNEL_ENV, "").strip():
        pytest.skip("QLORAKIT_CPU_KERNEL is set for this run")
    assert _core.cpu_kernel() == _core.CPU_KERNELS_SUPPORTED[-1]


@pytest.mark.parametrize("shape", [(64, 128), (4096, 1024 + 64), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_decodes_nested_scales_inline_bit_identically(shape: tuple[int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    packed = qlorakit.quantize(torch.randn(shape), "fp4", 64, double_quant=True)
    fresh = qlorakit.dequantize(packed, dtype)
    out = torch.empty(shape, dtype=dtype)
    from qlorakit._native import byte_view
    from qlorakit.quantization import decode_absmax

    _core.dequantize_4bit(  # the float32 absmax decoded first
        byte_view(packed.codes, "packed"),
        byte_view(decode_absmax(packed), "absmax"),
        "fp4",
        64,
        byte_view(out, "out"),
        str(dtype).removeprefix("torch."),
    )
    assert torch.equal(fresh, out)


def test_nested_scale_buffers_are_validated() -> None:
    from qlorakit._native import byte_view

    packed = qlorakit.quantize(torch.randn(8, 512), "nf4", 64, double_quant=True)
    out = torch.empty(8, 512)
    with pytest.raises(QuantizationError, match="nested scales input"):
        _core.dequantize_4bit(
            byte_view(packed.codes, "packed"),
            byte_view(packed.absmax, "codes"),
            "nf4",
            64,
            byte_view(out, "out"),
            "float32",
            byte_view(torch.zeros(3), "nested"),
            0.0,
        )


def test_cached_weight_views_follow_the_tensors() -> None:
    """The CPU dispatch caches the views of a weight's buffers per memory region and layout: in-place updates of
    the tensors are seen, another layout over the same memory is not served the old entry, and scales that need
    converting (non-float32 nested scales, non-contiguous codes) take temporaries, all equal to
    dequantize-then-``F.linear`` within the float32 bound (here: against the uncached reference call)."""
    from qlorakit.nn import dispatch
    from qlorakit.packed import PackedWeight

    if dispatch.matvec_weight(qlorakit.quantize(torch.randn(8, 64)), torch.randn(64)) is None:
        pytest.skip("no fused CPU kernel is routed on this CPU")
    torch.manual_seed(3)

    def reference(packed: PackedWeight, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), qlorakit.dequantize(packed, torch.float32))

    def check(packed: PackedWeight, x: torch.Tensor) -> torch.Tensor:
        got = dispatch.matvec_weight(packed, x)
        assert got is not None
        want = reference(packed, x)
        assert torch.allclose(got.float(), want, rtol=1e-5, atol=1e-5), float((got.float() - want).abs().max())
        return got

    a = qlorakit.quantize(torch.randn(48, 128), "nf4", 64, True)
    b = qlorakit.quantize(torch.randn(48, 128) * 3, "nf4", 64, True)
    x = torch.randn(2, 128)
    first = check(a, x)
    assert torch.equal(check(a, x), first)  # served from the cache
    # In place: the same memory now holds b's codes and scales.
    a.codes.copy_(b.codes)
    a.absmax.copy_(b.absmax)
    a.nested_absmax.copy_(b.nested_absmax)  # type: ignore[union-attr]
    assert not torch.equal(check(a, x), first)  # the cached views read the new contents
    same_memory_b = PackedWeight(a.codes, a.absmax, a.nested_absmax, b.layout)  # b's offset, over a's memory
    assert torch.equal(check(same_memory_b, x), check(b, x))
    # Plain scales, and scales that need converting first.
    plain = qlorakit.quantize(torch.randn(48, 128), "fp4", 128, False)
    check(plain, x)
    bf16_nested = PackedWeight(b.codes, b.absmax, b.nested_absmax.to(torch.bfloat16), b.layout)  # type: ignore[union-attr]
    check(bf16_nested, x)
    strided = torch.empty(b.codes.shape[0], 2, dtype=b.codes.dtype)[:, :1]
    strided.copy_(b.codes)
    assert torch.equal(check(PackedWeight(strided, b.absmax, b.nested_absmax, b.layout), x), check(b, x))
