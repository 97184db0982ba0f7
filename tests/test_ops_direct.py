"""``qlorakit.ops.linear_4bit`` calls its kernel without the dispatcher only where nothing can tell (issue 14:
batch-1 decoding's per-layer overhead): eager, no gradient to record, plain tensors, no mode. The result equals
the op's bit for bit; with a gradient, a dispatch mode or under ``torch.compile`` the op itself runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlorakit import ops
from qlorakit._core import QuantizationError
from qlorakit.nn import Linear4bit


class OpNames(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def layer(bias: bool) -> Linear4bit:
    torch.manual_seed(0)
    return Linear4bit.from_linear(torch.nn.Linear(128, 64, bias=bias), compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("bias", [False, True])
def test_direct_call_equals_the_op(rows: int, bias: bool) -> None:
    module = layer(bias)
    packed, b = module.packed_weight(), module.bias
    x = torch.randn(rows, 128).to(torch.bfloat16)
    b16 = b.to(torch.bfloat16) if b is not None else None
    with torch.no_grad():
        assert ops._runs_directly(x, packed.codes, b16)
        expected = torch.ops.qlorakit.linear_4bit(x, *ops.weight_args(packed), b16)
        assert torch.equal(ops.linear_4bit(x, packed, b16), expected)
        assert torch.equal(module(x), expected)
    assert not ops._runs_directly(x.requires_grad_(True), packed.codes, b16)  # autograd records the op


def test_op_runs_where_something_could_tell() -> None:
    module = layer(False)
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad(), OpNames() as mode:
        module(x)
    assert "qlorakit.linear_4bit.default" in mode.names
    out = module(x.requires_grad_(True))
    assert out.grad_fn is not None and "linear_4bit" in type(out.grad_fn).__name__
    with torch.no_grad(), torch.profiler.profile() as prof:
        module(x.detach())
    assert any(e.key == "qlorakit::linear_4bit" for e in prof.key_averages())


def test_address_views_are_reused_per_region_and_always_cover_the_live_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qlorakit import _native

    monkeypatch.setattr(_native, "_ADDRESS_VIEWS", {})
    a = torch.arange(64, dtype=torch.uint8)
    view = _native.address_view(a, "a")
    assert _native.address_view(a, "a") is view  # built once per region
    assert bytes(view) == bytes(range(64))
    a[3] = 200  # the view is the memory, not a copy
    assert view[3] == 200
    # Another size at the same address, or another region: another view, over exactly that memory.
    head = a[:16]
    assert _native.address_view(head, "head") is not view and len(_native.address_view(head, "head")) == 16
    b = torch.full((64,), 7, dtype=torch.uint8)
    assert bytes(_native.address_view(b, "b")) == bytes([7] * 64)
    # The table is bounded: it starts over when full.
    monkeypatch.setattr(_native, "_MAX_ADDRESS_VIEWS", 3)
    kept = [torch.zeros(8 + i, dtype=torch.uint8) for i in range(4)]
    for t in kept:
        _native.address_view(t, "t")
    assert len(_native._ADDRESS_VIEWS) <= 3
    with pytest.raises(QuantizationError, match="contiguous"):
        _native.address_view(torch.zeros(4, 4, dtype=torch.uint8).T, "t")
