"""``Linear4bit``'s forward reuses the weight it assembled (a decoding step's per-layer cost) only while the layer
holds the same parameters over the same memory: every way of changing a layer's weight makes the next forward
use the new one."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch

from qlorakit.nn import Linear4bit
from qlorakit.packed import PackedWeight

IN, OUT = 128, 64


def layer_of(seed: int, double_quant: bool = True) -> Linear4bit:
    torch.manual_seed(seed)
    dense = torch.nn.Linear(IN, OUT, bias=False)
    return Linear4bit.from_linear(dense, double_quant=double_quant, compute_dtype=torch.bfloat16)


def variant_of(layer: Linear4bit) -> Linear4bit:
    """Another weight with ``layer``'s layout (the same offset): its codes reversed, its block scales rotated
    and its nested scales scaled, so that changing only the parameters changes every part of the weight."""
    packed = layer.packed_weight()
    nested = packed.nested_absmax
    packed = PackedWeight(
        packed.codes.flip(0).clone(),
        packed.absmax.roll(1).clone(),
        None if nested is None else nested * 1.5,
        packed.layout,
    )
    return Linear4bit(packed, None, layer.compute_dtype)


def inputs() -> list[torch.Tensor]:
    """One row (the fused decoding kernel), a few rows (its batched form) and a prefill (dequantize + matmul)."""
    torch.manual_seed(7)
    return [
        torch.randn(1, 1, IN, dtype=torch.bfloat16),
        torch.randn(3, IN, dtype=torch.bfloat16),
        torch.randn(2, 20, IN, dtype=torch.bfloat16),
    ]


def assert_computes_like(layer: Linear4bit, reference: Linear4bit) -> None:
    with torch.no_grad():
        for x in inputs():
            assert torch.equal(layer(x), reference(x)), tuple(x.shape)


def test_the_assembled_weight_is_reused_while_nothing_changes() -> None:
    layer = layer_of(0)
    first = layer._forward_weight()
    assert layer._forward_weight() is first
    with torch.no_grad():
        layer(inputs()[0])
    assert layer._forward_weight() is first


def _assign_data(layer: Linear4bit, other: Linear4bit) -> None:
    for name in ("weight", "absmax", "nested_absmax"):
        if getattr(layer, name) is not None:
            getattr(layer, name).data = getattr(other, name).data.clone()


def _copy_in_place(layer: Linear4bit, other: Linear4bit) -> None:
    layer.load_state_dict(other.state_dict())


def _load_assigning(layer: Linear4bit, other: Linear4bit) -> None:
    layer.load_state_dict(other.state_dict(), assign=True)


def _set_parameters(layer: Linear4bit, other: Linear4bit) -> None:
    for name in ("weight", "absmax", "nested_absmax"):
        if getattr(layer, name) is not None:
            setattr(layer, name, torch.nn.Parameter(getattr(other, name).detach().clone(), requires_grad=False))


def _reallocate_storage(layer: Linear4bit, other: Linear4bit) -> None:
    """FSDP2's way: the parameter objects stay, their storage is freed and allocated again, then filled."""
    for name in ("weight", "absmax", "nested_absmax"):
        parameter, source = getattr(layer, name), getattr(other, name)
        if parameter is None:
            continue
        storage = parameter.untyped_storage()
        size = storage.size()
        storage.resize_(0)
        storage.resize_(size)
        with torch.no_grad():
            parameter.copy_(source)


#: The changes that keep the layer's layout (``load_state_dict`` sets the loaded one): the parameters alone change.
SAME_LAYOUT = {"assign .data", "set new parameters", "re-allocated storage"}

CHANGES: dict[str, Callable[[Linear4bit, Linear4bit], None]] = {
    "assign .data": _assign_data,
    "load_state_dict in place": _copy_in_place,
    "load_state_dict(assign=True)": _load_assigning,
    "set new parameters": _set_parameters,
    "re-allocated storage": _reallocate_storage,
}


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_weight_is_used_by_the_next_forward(change: str, double_quant: bool) -> None:
    layer = layer_of(0, double_quant)
    other = variant_of(layer) if change in SAME_LAYOUT else layer_of(1, double_quant)
    with torch.no_grad():
        before = layer(inputs()[0])  # the layer has assembled (and kept) its weight
    CHANGES[change](layer, other)
    assert_computes_like(layer, other)
    with torch.no_grad():
        assert not torch.equal(layer(inputs()[0]), before)


def test_moving_the_layer_drops_the_assembled_weight() -> None:
    """``.to()`` may reassign the parameters' ``.data``: the layer must not keep the old storage alive."""
    layer = layer_of(0)
    old = layer._forward_weight()
    layer.to(torch.device("cpu"), dtype=torch.float16)  # a no-op for the integer parameters, but an _apply
    assert "_forward_cache" not in layer.__dict__
    assert layer._forward_weight() is not old
    assert_computes_like(layer, layer_of(0))


def test_copies_leave_the_assembled_weight_out() -> None:
    layer = layer_of(0)
    with torch.no_grad():
        layer(inputs()[0])
    for duplicate in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_forward_cache" not in duplicate.__dict__
        assert_computes_like(duplicate, layer)
