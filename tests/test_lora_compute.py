"""The adapter computation of both LoRA layers (qlorakit.lora.compute, issue 14): a power-of-two scaling applied to
the rank-r hidden and the in-place sum into a 4-bit base's output give, bit for bit, the outputs and gradients of
``base(x) + (lora_B(lora_A(x)) * scaling).to(dtype)`` as PEFT writes it; a base with forward hooks keeps its
output untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.lora import LoraLinear
from qlorakit.lora.compute import add_update, adds_in_place, exact_scale, low_rank_update
from qlorakit.nn import Linear4bit

IN, OUT, R = 128, 96, 4


def base_layer(bias: bool = False) -> Linear4bit:
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(IN, OUT, bias=bias), compute_dtype=torch.bfloat16)


def random_adapter(layer: LoraLinear) -> LoraLinear:
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    return layer


def spelled_out(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """PEFT's formula for a 4-bit base, written out."""
    result = layer.base_layer(x)
    update = layer.lora_B(layer.lora_A(x.to(layer.adapter_dtype))) * layer.scaling
    return result + update.to(result.dtype)


def outputs_and_grads(fn, layer: LoraLinear, x: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    x = x.detach().clone().requires_grad_(True)
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        p.grad = None
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype))
    return [out.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]


def test_exact_scale() -> None:
    assert all(exact_scale(s) for s in (1.0, 2.0, 0.5, 4.0, 2.0**-10))
    assert not any(exact_scale(s) for s in (3.0, 1.5, 16 / 8**0.5, 0.0, -2.0, float("inf"), float("nan")))


@pytest.mark.parametrize("alpha", [8, 4, 16, 6, 3])  # scaling 2, 1, 4 (exact); 1.5, 0.75 (after lora_B)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_bit_identical_to_formula(alpha: int, bias: bool) -> None:
    layer = random_adapter(LoraLinear(base_layer(bias), r=R, lora_alpha=alpha))
    x = torch.randn(2, 5, IN).to(torch.bfloat16)
    expected = outputs_and_grads(lambda t: spelled_out(layer, t), layer, x)
    got = outputs_and_grads(layer, layer, x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not torch.equal(expected[0], layer.base_layer(x))  # the adapter does change the output


def test_low_rank_update_keeps_lora_b_bias_after_scaling() -> None:
    torch.manual_seed(0)
    lora_A, lora_B = nn.Linear(IN, R, bias=False), nn.Linear(R, OUT, bias=True)
    x = torch.randn(3, IN)
    assert torch.equal(low_rank_update(lora_A, lora_B, x, 2.0), lora_B(lora_A(x)) * 2.0)


def test_in_place_only_into_a_fresh_hookless_output() -> None:
    base = base_layer()
    assert adds_in_place(base)
    assert not adds_in_place(nn.Linear(IN, OUT))  # its output could be anything a subclass returns
    kept: list[torch.Tensor] = []
    handle = base.register_forward_hook(lambda module, args, out: kept.append(out))
    assert not adds_in_place(base)
    layer = random_adapter(LoraLinear(base, r=R, lora_alpha=8))
    x = torch.randn(4, IN).to(torch.bfloat16)
    out = layer(x)
    assert torch.equal(kept[0], base(x)) and not torch.equal(out, kept[0])  # the hook's tensor is untouched
    handle.remove()
    assert adds_in_place(base)
    result = torch.ones(2, 3)
    assert add_update(result, torch.ones(2, 3), in_place=True) is result
    assert add_update(result, torch.ones(2, 3, dtype=torch.float64), in_place=True) is not result
    assert add_update(result, torch.ones(3), in_place=True) is not result  # a broadcast sum is a new shape's job


def test_peft_layer_bit_identical_to_formula() -> None:
    peft = pytest.importorskip("peft")
    from qlorakit.peft_lora import LoraLinear4bit

    model = nn.Sequential()
    model.add_module("proj", base_layer())
    config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    layer = wrapped.base_model.model.proj
    assert isinstance(layer, LoraLinear4bit)
    x = torch.randn(2, 5, IN).to(torch.bfloat16)

    def formula(t: torch.Tensor) -> torch.Tensor:
        result = layer.base_layer(t)
        lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
        return result + (lora_B(lora_A(t.to(lora_A.weight.dtype))) * layer.scaling["default"]).to(result.dtype)

    def grads(fn) -> list[torch.Tensor]:  # noqa: ANN001
        t = x.clone().requires_grad_(True)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        for p in params:
            p.grad = None
        out = fn(t)
        out.float().square().sum().backward()
        return [out.detach(), t.grad, *(p.grad for p in params)]

    assert all(torch.equal(a, b) for a, b in zip(grads(layer), grads(formula), strict=True))
