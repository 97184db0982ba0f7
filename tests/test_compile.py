"""qlorakit's ops under ``torch.compile`` (issue 12): registered with ``torch.library`` (schema, CPU and
CUDA kernels, fake kernels, autograd), so ``fullgraph=True`` traces ``Linear4bit`` and a whole LoRA
training step without a graph break, with results equal to eager. CPU here; the CUDA variant is in
tests/test_gpu.py's suite when a GPU is present."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import qlorakit
from helpers.architectures import BY_NAME, batch
from helpers.checkpoints import add_nonzero_lora
from qlorakit import ops
from qlorakit.nn import Linear4bit

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def dynamo_enabled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """conftest disables dynamo for the rest of the suite (TORCHDYNAMO_DISABLE); these tests need it."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=False):
        yield
    torch._dynamo.reset()


def counting(backend: str) -> CompileCounterWithBackend:
    """``backend``, counting the frames dynamo compiles (so a test cannot pass by running eagerly)."""
    return CompileCounterWithBackend(backend)


def layer(bias: bool = True, double_quant: bool = True) -> Linear4bit:
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 128, bias=bias)
    return Linear4bit.from_linear(dense, double_quant=double_quant, compute_dtype=torch.float32)


@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck(double_quant: bool) -> None:
    """torch.library's own checks: schema, fake kernel against the real one, autograd registration."""
    packed = layer(double_quant=double_quant).packed_weight()
    x = torch.randn(3, 5, 256, requires_grad=True)
    bias = torch.randn(128)
    weight = ops.weight_args(packed)
    torch.library.opcheck(torch.ops.qlorakit.linear_4bit.default, (x, *weight, bias))
    torch.library.opcheck(torch.ops.qlorakit.linear_4bit.default, (x[0, :1], *weight, None))
    torch.library.opcheck(torch.ops.qlorakit.dequantize_4bit.default, (*weight, torch.bfloat16))
    torch.library.opcheck(torch.ops.qlorakit.linear_4bit_grad_input.default, (torch.randn(4, 128), *weight))
    torch.library.opcheck(torch.ops.qlorakit.gemv_4bit.default, (torch.randn(256), *weight, bias))
    assert torch.equal(ops.dequantize_4bit(packed, torch.float32), qlorakit.dequantize(packed, torch.float32))
    row = torch.randn(1, 256)
    assert torch.allclose(ops.gemv_4bit(row, packed, bias), ops.linear_4bit(row, packed, bias), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one row"):
        ops.gemv_4bit(torch.randn(2, 256), packed)


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_op_equals_quantize(double_quant: bool) -> None:
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.qlorakit.quantize_4bit.default, (x, "nf4", 64, double_quant))
    ours, reference = ops.quantize_4bit(x, "nf4", 64, double_quant), qlorakit.quantize(x, "nf4", 64, double_quant)
    assert ours.layout == reference.layout
    assert torch.equal(ours.codes, reference.codes) and torch.equal(ours.absmax, reference.absmax)
    if double_quant:
        assert torch.equal(ours.nested_absmax, reference.nested_absmax)
    # Traced as one node (the offset stays a tensor inside the graph: a layout's offset is a Python float).
    counter = counting("aot_eager")
    compiled = torch.compile(
        lambda t: torch.ops.qlorakit.quantize_4bit(t, "nf4", 64, double_quant), fullgraph=True, backend=counter
    )
    codes, absmax, nested, offset = compiled(x)
    assert counter.frame_count == 1
    assert torch.equal(codes, reference.codes) and torch.equal(absmax, reference.absmax)
    assert float(offset) == (reference.offset or 0.0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("rows", [8, 1])
def test_linear4bit_compiles_fullgraph(backend: str, rows: int) -> None:
    module = layer()
    x = torch.randn(rows, 256, requires_grad=True)
    expected = module(x)
    expected.sum().backward()
    expected_grad, x.grad = x.grad, None
    counter = counting(backend)
    out = torch.compile(module, fullgraph=True, backend=counter)(x)
    out.sum().backward()
    assert counter.frame_count == 1
    assert torch.equal(out, expected)
    assert torch.equal(x.grad, expected_grad)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(torch.randn(rows, 256))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_lora_training_step_compiles_fullgraph(tmp_path: Path) -> None:
    """A tiny Llama from a packed checkpoint with qlorakit LoRA: loss and every adapter gradient of a
    compiled training step equal eager's. ``aot_eager`` traces exactly what inductor would (dynamo, fake
    kernels, the autograd graph); inductor itself takes over a minute on this model on 2 cores."""
    architecture = BY_NAME["llama"]
    architecture.save(tmp_path / "src")
    qlorakit.quantize_checkpoint(tmp_path / "src", tmp_path / "packed")
    inputs = batch(architecture)

    def build() -> torch.nn.Module:
        model = qlorakit.from_pretrained(tmp_path / "packed", compute_dtype=torch.float32)
        return add_nonzero_lora(model, seed=3, b_seed=1)

    def step(call: torch.nn.Module, model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = call(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    eager = build()
    expected_loss, expected_grads = step(eager, eager)
    model = build()
    counter = counting("aot_eager")
    loss, grads = step(torch.compile(model, fullgraph=True, backend=counter), model)
    assert counter.frame_count == 1
    assert len(expected_grads) == 28 and grads.keys() == expected_grads.keys()
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(grads[k], expected_grads[k]) for k in grads)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(build())(**inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
