"""The CPU dense matmul of ``Linear4bit`` (dequantize, then multiply; :mod:`qlorakit.nn.cpu_matmul`): in the compute
dtype where torch multiplies it with oneDNN, else in float32, each route forced by ``QLORAKIT_CPU_MATMUL``."""

from __future__ import annotations

import pytest
import torch

from qlorakit import _core
from qlorakit.errors import QlorakitError
from qlorakit.nn import Linear4bit
from qlorakit.nn.cpu_matmul import CPU_MATMUL_ENV, matmul_dtype

HALF_DTYPES = (torch.bfloat16, torch.float16)
#: Unit roundoff of each compute dtype (half its machine epsilon).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: torch's probe of oneDNN's support, per dtype.
ONEDNN_PROBES = {
    torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
    torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
}
#: More rows than the fused small-batch kernel takes, so the layer dequantizes and multiplies.
ROWS = 3 * _core.GEMV_MAX_BATCH


def make_layer(dtype: torch.dtype, bias: bool, out_features: int = 96, in_features: int = 160) -> Linear4bit:
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    if bias:
        with torch.no_grad():
            dense.bias.mul_(10)  # a bias large enough to matter in the rounding
    return Linear4bit.from_linear(dense, compute_dtype=dtype)


def forward_and_backward(layer: Linear4bit, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    assert x.grad is not None
    return out.detach(), x.grad


def test_auto_follows_torchs_onednn_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_MATMUL_ENV, raising=False)
    for dtype, probe in ONEDNN_PROBES.items():
        assert matmul_dtype(dtype) == (dtype if probe() else torch.float32), dtype
    for dtype in (torch.float32, torch.float64):
        assert matmul_dtype(dtype) == dtype


@pytest.mark.parametrize(("setting", "bf16", "fp16"), [("native", "bf16", "fp16"), ("float32", "f32", "f32")])
def test_forced_settings(monkeypatch: pytest.MonkeyPatch, setting: str, bf16: str, fp16: str) -> None:
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "f32": torch.float32}
    monkeypatch.setenv(CPU_MATMUL_ENV, f" {setting} ")
    assert matmul_dtype(torch.bfloat16) == names[bf16]
    assert matmul_dtype(torch.float16) == names[fp16]
    assert matmul_dtype(torch.float32) == torch.float32  # float32 layers are never changed


def test_an_unknown_setting_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_MATMUL_ENV, "fp32")
    with pytest.raises(QlorakitError, match=rf"{CPU_MATMUL_ENV}='fp32'.*auto, native, float32"):
        matmul_dtype(torch.bfloat16)
    layer = make_layer(torch.bfloat16, bias=False)
    with pytest.raises(QlorakitError, match=CPU_MATMUL_ENV):
        layer(torch.randn(ROWS, 160, dtype=torch.bfloat16))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_the_float32_route_is_the_widened_matmul_rounded_once(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, bias: bool
) -> None:
    """Forced to float32: the output is ``F.linear`` of the exactly widened input, weight (its values in the compute
    dtype) and bias, rounded once; the input gradient likewise ``grad W``."""
    monkeypatch.setenv(CPU_MATMUL_ENV, "float32")
    layer = make_layer(dtype, bias)
    x = torch.randn(3, ROWS, 160).to(dtype)
    grad = torch.randn(3, ROWS, 96).to(dtype)
    out, grad_x = forward_and_backward(layer, x, grad)
    weight = layer.dequantized_weight(dtype).float()
    wide_bias = layer.bias.to(dtype).float() if bias else None
    assert out.dtype == dtype and grad_x.dtype == dtype
    assert torch.equal(out, torch.nn.functional.linear(x.float(), weight, wide_bias).to(dtype))
    assert torch.equal(grad_x, (grad.float() @ weight).to(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_both_routes_are_within_one_rounding_of_the_exact_product(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Native and float32 routes each round a float32 sum once: within ``u |exact| + gamma_n sum |x w|`` of the
    float64 product of the same values (u the compute dtype's unit roundoff, gamma_n float32's bound for n terms);
    where they differ, it is by their summation order only."""
    layer = make_layer(dtype, bias=True)
    x = torch.randn(ROWS, 160).to(dtype)
    grad = torch.randn(ROWS, 96).to(dtype)
    weight = layer.dequantized_weight(dtype).double()
    bias = layer.bias.to(dtype).double()
    exact = torch.nn.functional.linear(x.double(), weight, bias)
    exact_grad = grad.double() @ weight

    def bound(exact: torch.Tensor, magnitudes: torch.Tensor, terms: int) -> torch.Tensor:
        gamma = terms * 2.0**-24 / (1 - terms * 2.0**-24)
        # The dtype's smallest subnormal covers results that underflow (none expected at these magnitudes).
        return UNIT_ROUNDOFF[dtype] * exact.abs() + (1 + UNIT_ROUNDOFF[dtype]) * gamma * magnitudes + 2.0**-133

    out_bound = bound(exact, x.double().abs() @ weight.abs().T + bias.abs(), 161)
    grad_bound = bound(exact_grad, grad.double().abs() @ weight.abs(), 96)
    results = {}
    for setting in ("native", "float32"):
        monkeypatch.setenv(CPU_MATMUL_ENV, setting)
        out, grad_x = forward_and_backward(layer, x, grad)
        assert ((out.double() - exact).abs() <= out_bound).all(), setting
        assert ((grad_x.double() - exact_grad).abs() <= grad_bound).all(), setting
        results[setting] = out
    # Same values in, one rounding each: most outputs agree exactly.
    agree = (results["native"] == results["float32"]).double().mean().item()
    assert agree > 0.9, agree


def test_small_batches_keep_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The setting concerns the dequantize-and-multiply route only: a row the fused kernel takes is unchanged."""
    layer = make_layer(torch.bfloat16, bias=True)
    x = torch.randn(1, 160).to(torch.bfloat16)
    outs = []
    for setting in ("native", "float32"):
        monkeypatch.setenv(CPU_MATMUL_ENV, setting)
        with torch.no_grad():
            outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
