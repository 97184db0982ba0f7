"""The CUDA path: the CuPy kernels on a GPU against the Rust core (bit-exact dequantization), ``Linear4bit``
on CUDA against the CPU, the batch-1 kernel against the float reference and the CPU emulation, and a short
QLoRA training run on CUDA. Tests marked ``gpu`` skip (conftest says why) without a CUDA GPU and CuPy; the
few unmarked ones check the CUDA path's CPU-side behaviour and run everywhere."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qlorakit
from helpers.kernel_emulation import assert_gemv_close, build, compiler_available
from helpers.processes import load_script
from qlorakit import _core
from qlorakit.errors import QlorakitError
from qlorakit.nn import Linear4bit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BIT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "train_lora.py"


def to_cuda(packed: qlorakit.PackedWeight) -> qlorakit.PackedWeight:
    return packed.to("cuda")


def gpu_dequantize(packed: qlorakit.PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    from qlorakit.nn.dispatch import dequantize_weight

    return dequantize_weight(to_cuda(packed), dtype)


def assert_bits_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    view = BIT_VIEWS[expected.dtype]
    assert torch.equal(got.cpu().view(view), expected.view(view))


# ---- everywhere: the CPU side of the CUDA path


def test_without_cupy_a_cuda_weight_names_the_extras(monkeypatch):
    from qlorakit.kernels.cupy_loader import require_cupy

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(QlorakitError, match=r"qlorakit\[cuda12\].*qlorakit\[cuda13\]"):
        require_cupy()


def test_launch_refuses_python_scalars_and_cpu_tensors(monkeypatch):
    from qlorakit.kernels import cupy_loader

    monkeypatch.setattr(cupy_loader, "require_cupy", lambda: None)
    with pytest.raises(TypeError, match="numpy scalar"):
        cupy_loader.launch(object(), (1,), (1,), [3])
    with pytest.raises(ValueError, match="not on a CUDA device"):
        cupy_loader.launch(object(), (1,), (1,), [torch.zeros(1)])


@pytest.mark.parametrize("nested_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_nested_scales_decode_like_the_cpu_path(nested_dtype: torch.dtype):
    """Files bitsandbytes wrote with a non-float32 nested_dtype: one decode serves the CPU and the CUDA path,
    its steps spelled out so no device's type promotion changes the rounding; on the CPU it equals torch's
    implicit mixed-dtype arithmetic (what bitsandbytes runs; tests/test_double_quant.py checks bitsandbytes)."""
    from qlorakit.formats import NESTED_BLOCKSIZE
    from qlorakit.tables import dynamic_map

    packed = qlorakit.quantize(torch.randn(64 * 700, generator=torch.Generator().manual_seed(3)), "nf4", 64, True)
    packed = packed.with_layout(nested_dtype=nested_dtype)
    scales = packed.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: packed.absmax.numel()]
    implicit = (dynamic_map()[packed.absmax.long()] * scales).to(nested_dtype) + torch.tensor(packed.offset)
    assert torch.equal(qlorakit.decode_absmax(packed), implicit.float())


# ---- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", list(_core.BLOCKSIZES))
def test_gpu_dequantize_is_bit_exact_with_rust(blocksize: int):
    g = torch.Generator().manual_seed(blocksize)
    for numel in (1, 7, 9, 3 * blocksize + 37, 4 * blocksize, 4 * blocksize + 1, 40_000 * 3 + 5):
        x = torch.randn(numel, generator=g)
        if numel > 2 * blocksize:
            x[blocksize : 2 * blocksize] = 0.0  # an all-zero block
        for quant_type in ("nf4", "fp4"):
            for double_quant in (True, False):
                packed = qlorakit.quantize(x, quant_type, blocksize, double_quant)
                for dtype in DTYPES:
                    assert_bits_equal(gpu_dequantize(packed, dtype), qlorakit.dequantize(packed, dtype))


@pytest.mark.gpu
def test_gpu_dequantize_is_bit_exact_on_real_weights(minilm_weights):
    for name, weight in sorted(minilm_weights.items()):
        if not weight.is_floating_point():
            continue
        assert weight.dim() == 2, name
        packed = qlorakit.quantize(weight.contiguous(), "nf4", 64, True)
        for dtype in DTYPES:
            assert_bits_equal(gpu_dequantize(packed, dtype), qlorakit.dequantize(packed, dtype))


@pytest.mark.gpu
def test_gpu_dequantize_handles_misaligned_and_low_precision_inputs():
    x = torch.randn(64 * 301, generator=torch.Generator().manual_seed(9))
    packed = to_cuda(qlorakit.quantize(x, "fp4", 64, True))
    # Codes that start 1 byte into a buffer (a view): the loader copies them to an aligned buffer.
    shifted = torch.empty(packed.codes.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted[1:] = packed.codes.reshape(-1)
    view = dataclasses.replace(packed, codes=shifted[1:].unsqueeze(1))
    from qlorakit.nn.dispatch import dequantize_weight

    cpu = qlorakit.quantize(x, "fp4", 64, True)
    assert_bits_equal(dequantize_weight(view, torch.bfloat16), qlorakit.dequantize(cpu, torch.bfloat16))
    cpu, packed = cpu.with_layout(nested_dtype=torch.bfloat16), packed.with_layout(nested_dtype=torch.bfloat16)
    assert_bits_equal(dequantize_weight(packed, torch.float16), qlorakit.dequantize(cpu, torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_gemv_matches_the_float_reference_and_the_emulation(dtype: torch.dtype):
    """Within the summation-order tolerance of the float reference; and, since the kernel's arithmetic is all
    explicit (exact rounding helpers, fmaf, a fixed shuffle tree), equal bit for bit to the CPU emulation of
    the same launch — which checks that the emulation models the GPU."""
    from qlorakit.kernels import cuda_ops
    from qlorakit.kernels.launches import gemv_4bit_launch

    g = torch.Generator().manual_seed(5)
    for rows, cols, blocksize in ((4096, 4096, 64), (37, 96, 64), (11, 33, 32), (384, 1536, 128)):
        for quant_type, double_quant in (("nf4", True), ("fp4", False)):
            packed = qlorakit.quantize(torch.randn(rows, cols, generator=g), quant_type, blocksize, double_quant)
            x = torch.randn(cols, generator=g).to(dtype)
            bias = torch.randn(rows, generator=g).to(dtype)
            got = cuda_ops.gemv_4bit(to_cuda(packed), x.cuda(), bias.cuda())
            assert_gemv_close(packed, x, bias, got)
            if not compiler_available() or rows * cols > 1_000_000:
                continue
            bits = np.uint32 if dtype == torch.float32 else np.uint16
            out = np.zeros(rows, bits)
            spec = gemv_4bit_launch(
                packed=packed.codes.reshape(-1).numpy().copy(),
                absmax=packed.absmax.numpy(),
                nested_absmax=packed.nested_absmax.numpy() if double_quant else None,
                offset=packed.offset,
                quant_type=quant_type,
                blocksize=blocksize,
                rows=rows,
                cols=cols,
                x=x.view(BIT_VIEWS[dtype]).numpy().view(bits).copy(),
                bias=bias.view(BIT_VIEWS[dtype]).numpy().view(bits).copy(),
                out=out,
                dtype={torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype],
                vectorized=cols % 32 == 0,
            )
            build(spec.file).launch(spec.name, spec.grid, spec.block, spec.args)
            assert np.array_equal(got.cpu().view(BIT_VIEWS[dtype]).numpy().view(bits), out)


@pytest.mark.gpu
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear4bit_on_cuda_matches_the_cpu(compute_dtype: torch.dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    dense = torch.nn.Linear(320, 192, bias=True)
    cpu = Linear4bit.from_linear(dense, compute_dtype=compute_dtype)
    gpu = Linear4bit.from_linear(dense, compute_dtype=compute_dtype).cuda()
    assert_bits_equal(gpu.dequantized_weight(), cpu.dequantized_weight())

    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[compute_dtype]
    x = torch.randn(4, 9, 320, requires_grad=True)
    x_gpu = x.detach().cuda().requires_grad_(True)
    out, out_gpu = cpu(x), gpu(x_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_gpu.backward(grad.cuda())
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, rtol=tol, atol=tol)

    # One row (batch-1 decoding) takes the fused kernel, forward and backward.
    row = torch.randn(1, 1, 320, dtype=compute_dtype, requires_grad=True)
    row_gpu = row.detach().cuda().requires_grad_(True)
    out_row = gpu(row_gpu)
    assert out_row.shape == (1, 1, 192)
    assert_gemv_close(gpu.packed_weight(), row.detach().reshape(-1), gpu.bias.detach().to(compute_dtype), out_row)
    out_row.sum().backward()
    expected_grad = torch.ones(192, dtype=compute_dtype) @ cpu.dequantized_weight()
    torch.testing.assert_close(row_gpu.grad.reshape(-1).cpu(), expected_grad, rtol=tol, atol=tol)


def qlora_losses(tool, packed_dir: Path, corpus, device: str, steps: int) -> list[float]:
    """Adapters (seeded) on the packed checkpoint, trained with AdamW on the same batches on ``device``."""
    sizes = tool.QUICK
    model = qlorakit.load_packed(packed_dir, device=device, compute_dtype=torch.float32)
    torch.manual_seed(0)
    config = qlorakit.LoraConfig(r=sizes.lora_r, lora_alpha=sizes.lora_alpha, target_modules="all-linear")
    qlorakit.add_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sizes.finetune_lr, betas=(0.9, 0.95), weight_decay=0.0)
    starts = tool.batch_starts(len(corpus.finetune), sizes.seq_len, sizes.batch, steps, seed=0)
    model.train()
    losses = []
    for step in range(steps):
        ids = tool.windows(corpus.finetune, starts[step], sizes.seq_len).to(device)
        loss = tool.lm_loss(model, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
def test_short_qlora_training_run_on_cuda(tmp_path, monkeypatch):
    """tools/train_lora.py's quick model (random init, saved in bf16, NF4 double-quantized by
    quantize_checkpoint) fine-tuned with LoRA on CUDA: the base layers run through the CUDA kernels, the
    loss falls, and the run tracks the same run on the CPU."""
    import sysconfig

    from transformers import LlamaForCausalLM

    from qlorakit.kernels import cuda_ops

    tool = load_script(TRAIN_SCRIPT, "qlorakit_tools_train_lora_gpu")
    corpus = tool.load_corpus(Path(sysconfig.get_paths()["stdlib"]))
    torch.manual_seed(0)
    LlamaForCausalLM(tool.llama_config(tool.QUICK)).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    qlorakit.quantize_checkpoint(tmp_path / "base", tmp_path / "nf4", compute_dtype="fp32", force=True)

    calls = {"dequantize": 0}
    original = cuda_ops.dequantize_4bit

    def counting(*args, **kwargs):
        calls["dequantize"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(cuda_ops, "dequantize_4bit", counting)
    steps = 40
    gpu = qlora_losses(tool, tmp_path / "nf4", corpus, "cuda", steps)
    assert calls["dequantize"] >= steps * 2 * 7  # 2 layers x 7 projections, forward (and most backward)
    cpu = qlora_losses(tool, tmp_path / "nf4", corpus, "cpu", steps)
    assert all(np.isfinite(gpu))
    assert abs(gpu[0] - cpu[0]) <= 1e-4 * cpu[0], (gpu[0], cpu[0])
    # A random base on byte-level text: the adapters mostly learn byte statistics. Measured on the CPU with
    # this code: the mean of the last 10 losses is 0.91 of the first. The CUDA run must fall as well and track
    # the CPU run (same init, same batches; only float32 summation order differs between the devices).
    assert np.mean(gpu[-10:]) < 0.95 * gpu[0], (gpu[0], gpu[-10:])
    assert abs(np.mean(gpu[-10:]) - np.mean(cpu[-10:])) < 0.01 * np.mean(cpu[-10:]), (gpu[-10:], cpu[-10:])


@pytest.mark.gpu
def test_public_dequantize_and_compile_on_cuda(monkeypatch):
    """``qlorakit.dequantize`` takes CUDA weights (through the op registry) and ``torch.compile`` traces
    ``Linear4bit`` on CUDA without a graph break, equal to eager."""
    torch.manual_seed(0)
    packed = qlorakit.quantize(torch.randn(3, 64, 96).to(torch.bfloat16))
    assert_bits_equal(qlorakit.dequantize(to_cuda(packed), torch.bfloat16), qlorakit.dequantize(packed, torch.bfloat16))
    layer = Linear4bit.from_linear(torch.nn.Linear(256, 128), compute_dtype=torch.float32).cuda()
    x = torch.randn(8, 256, device="cuda", requires_grad=True)
    expected = layer(x)
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # conftest disables dynamo for the rest of the suite
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=False):
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(layer)(x.detach())
    torch._dynamo.reset()
    assert torch.equal(compiled, expected)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 with NCCL needs 2 or more CUDA GPUs")
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_fsdp2_with_nccl_shards_the_base_and_trains_as_one_gpu(tmp_path, launcher):
    """tests/test_distributed.py's check on GPUs: 2 ranks, NCCL, the 4-bit base sharded by plain fully_shard
    (torchrun) or by accelerate's FSDP2 ``Accelerator.prepare`` (accelerate launch with tools/accelerate_fsdp2.yaml);
    the adapters after 3 steps equal one GPU's with gradient accumulation over the same micro-batches (within
    float32 reduction-order noise: NCCL and one GPU sum in different orders)."""
    from safetensors.torch import load_file

    from helpers.checkpoints import save_tiny_llama
    from helpers.processes import ACCELERATE_FSDP2_CONFIG, run_train_fsdp

    save_tiny_llama(tmp_path / "src")
    qlorakit.quantize_checkpoint(tmp_path / "src", tmp_path / "packed")
    if launcher == "accelerate":
        accelerate = ("--config_file", str(ACCELERATE_FSDP2_CONFIG), "--num_processes", "2", "--mixed_precision", "no")
        sharded = run_train_fsdp(tmp_path / "packed", tmp_path / "fsdp", accelerate=accelerate)
        assert sharded["parallel"] == "accelerate"
    else:
        sharded = run_train_fsdp(tmp_path / "packed", tmp_path / "fsdp", ranks=2)
    single = run_train_fsdp(tmp_path / "packed", tmp_path / "single", "--accumulate", "2")
    assert all(r["held_4bit_bytes"] <= 0.6 * sharded["total_4bit_bytes"] for r in sharded["ranks"])
    ours = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.allclose(ours[key], tensor, rtol=0, atol=1e-5), key
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-4)
