"""``qlorakit.nn.Linear4bit`` and ``qlorakit.load_packed`` against dense layers,
bitsandbytes' ``Linear4bit`` and transformers + bitsandbytes loading the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qlorakit
from helpers.checkpoints import minilm_dir, save_tiny_llama
from helpers.processes import run_cli
from qlorakit import _core
from qlorakit.nn import Linear4bit
from qlorakit.nn.cpu_matmul import CPU_MATMUL_ENV


def make_layer(out_features: int, in_features: int, bias: bool, compute_dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    return Linear4bit.from_linear(dense, compute_dtype=compute_dtype)


def assert_same_forward_and_backward(layer: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> None:
    """``layer(x)`` equals ``reference`` on a copy of ``x``, and so do the input gradients for one random
    output gradient."""
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), reference(x_ref)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_backward_equal_a_dense_layer_with_the_dequantized_weight(bias: bool) -> None:
    layer = make_layer(96, 160, bias, torch.float32)
    dense = torch.nn.Linear(160, 96, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight(torch.float32))
        if bias:
            dense.bias.copy_(layer.bias)
    assert_same_forward_and_backward(layer, dense, torch.randn(3, 7, 160, requires_grad=True))
    assert all(not p.requires_grad for p in layer.parameters())


def test_gradcheck_float64() -> None:
    layer = make_layer(12, 64, True, torch.float64)
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_the_full_weight_is_not_kept_for_backward() -> None:
    layer = make_layer(256, 512, False, torch.float32)
    saved_sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        out = layer(torch.randn(2, 512, requires_grad=True))
    assert all(size < 256 * 512 for size in saved_sizes), saved_sizes
    out.sum().backward()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_equals_bitsandbytes_linear4bit_on_the_same_packed_data(compute_dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    layer = make_layer(128, 192, True, compute_dtype, seed=3)
    tensors = layer.packed_weight().state_dict("weight")
    stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
    weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False, device="cpu")
    reference = bnb.nn.Linear4bit(192, 128, bias=True, compute_dtype=compute_dtype, quant_type="nf4")
    reference.weight = weight
    reference.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    reference.train()  # bitsandbytes' dequantize + matmul path (eval on some CPUs repacks the weight)
    # More rows than the fused small-batch kernel takes (it sums in another order): the dequantize + matmul path.
    rows = _core.GEMV_MAX_BATCH + 1
    assert_same_forward_and_backward(layer, reference, torch.randn(rows, 192, dtype=compute_dtype, requires_grad=True))


def test_cuda_weights_get_a_clear_error() -> None:
    from qlorakit.nn.dispatch import dequantize_weight

    packed = make_layer(8, 64, False, torch.float32).packed_weight()
    packed.codes = torch.empty(packed.codes.shape, dtype=torch.uint8, device="meta")
    with pytest.raises(qlorakit.QlorakitError, match="no 4-bit dequantization for device meta"):
        dequantize_weight(packed, torch.float32)


# Unit roundoff (2^-p) and largest absolute rounding error in the subnormal range of each compute dtype.
ROUNDING = {
    torch.float32: (2.0**-24, 2.0**-150),
    torch.bfloat16: (2.0**-8, 2.0**-134),
    torch.float16: (2.0**-11, 2.0**-25),
}


def float32_dot_bound(
    weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, roundings: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 value of ``weight @ x (+ bias)`` and how far from it a float32 evaluation rounded to ``dtype``
    may land: a float32 dot product of n terms, summed in any order, is within ``gamma_n * sum |w x|`` of the
    exact value (gamma_n = n u / (1 - n u), u = 2^-24; the bias is one more term); each rounding to ``dtype``
    then adds at most ``u_T |value| + eta_T`` (``roundings``: 2 where the matmul is rounded before the bias is
    added, as F.linear may do)."""
    terms = weight.double() * x.double()
    exact = terms.sum(-1)
    magnitude = terms.abs().sum(-1)
    n = weight.shape[-1]
    if bias is not None:
        exact = exact + bias.double()
        magnitude = magnitude + bias.double().abs()
        n += 1
    u = 2.0**-24
    gamma = n * u / (1 - n * u)
    # The float64 sums err by about n 2^-53 of the magnitude, a 2^-29 fraction of the float32 allowance.
    summation = gamma * magnitude * (1 + 1e-6)
    unit, eta = ROUNDING[dtype]
    bound = summation + roundings * ((1 + unit) * unit * (exact.abs() + summation) + eta)
    return exact, bound


class TestCpuFusedMatvec:
    """A single-row input on the CPU takes the fused dequantize-and-multiply kernel (``matvec_weight``, where
    the CPU has AVX-512; the kernel itself is tested on every CPU): it equals dequantize-then-``F.linear`` up to
    float32 summation order, so the comparisons use the error bound of that order rather than equality."""

    @staticmethod
    def check(packed, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from qlorakit.nn.dispatch import _gemv_cpu

        fused = _gemv_cpu(packed, x, bias).reshape(*x.shape[:-1], packed.shape[0])
        assert fused.dtype == x.dtype and fused.shape == (*x.shape[:-1], packed.shape[0])
        weight = qlorakit.dequantize(packed, x.dtype)
        exact, bound = float32_dot_bound(weight, x.reshape(-1), bias, x.dtype)
        error = (fused.reshape(-1).double() - exact).abs()
        assert (error <= bound).all(), f"worst error/bound {(error / bound).max():.3g}"
        dense = torch.nn.functional.linear(x, weight, bias)
        _, dense_bound = float32_dot_bound(weight, x.reshape(-1), bias, x.dtype, roundings=2)
        difference = (fused.double() - dense.double()).reshape(-1).abs()
        assert (difference <= bound + dense_bound).all()
        return fused

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
    @pytest.mark.parametrize(
        ("out_features", "in_features", "blocksize"),
        [(96, 160, 64), (33, 77, 64), (5, 1, 32), (1, 300, 128), (17, 4096, 4096), (64, 1023, 256)],
    )
    @pytest.mark.parametrize("bias", [False, True])
    def test_equals_dequantize_then_linear(
        self, dtype: torch.dtype, out_features: int, in_features: int, blocksize: int, bias: bool
    ) -> None:
        torch.manual_seed(out_features * 7 + in_features)
        packed = qlorakit.quantize(torch.randn(out_features, in_features) * 0.05, "nf4", blocksize)
        b = torch.randn(out_features).to(dtype) if bias else None
        for shape in [(in_features,), (1, in_features), (1, 1, in_features)]:
            self.check(packed, torch.randn(shape).to(dtype), b)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
    def test_real_minilm_weights(self, minilm_weights, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        linear = {name: w for name, w in minilm_weights.items() if name.startswith("encoder.layer.")}
        assert len(linear) == 36
        for weight in linear.values():
            packed = qlorakit.quantize(weight.contiguous(), "nf4", 64)
            self.check(packed, torch.randn(weight.shape[1]).to(dtype), torch.randn(weight.shape[0]).to(dtype))

    def test_linear4bit_single_row_forward_is_fused_and_backward_unchanged(self) -> None:
        from qlorakit import _core
        from qlorakit.nn.dispatch import matvec_weight

        layer = make_layer(96, 160, True, torch.bfloat16)
        x = torch.randn(1, 1, 160, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        # Linear4bit casts the (float32) bias to the compute dtype before the product.
        expected = self.check(layer.packed_weight(), x.detach(), layer.bias.to(torch.bfloat16))
        routed = matvec_weight(layer.packed_weight(), x.detach(), layer.bias.to(torch.bfloat16))
        assert (routed is not None) == _core.GEMV_SIMD  # the portable kernel is not routed to
        if _core.GEMV_SIMD:
            assert torch.equal(out, expected)
        grad = torch.randn_like(out)
        out.backward(grad)
        # The backward still dequantizes: the input gradient is exactly grad @ W.
        assert torch.equal(x.grad, grad @ layer.dequantized_weight(torch.bfloat16))

    def test_other_inputs_are_not_fused(self) -> None:
        from qlorakit.nn.dispatch import matvec_weight

        packed = make_layer(8, 64, False, torch.float32).packed_weight()
        assert matvec_weight(packed, torch.randn(_core.GEMV_MAX_BATCH + 1, 64)) is None  # more rows than a batch
        assert matvec_weight(packed, torch.randn(1, 64, dtype=torch.float64)) is None  # no kernel for float64
        assert matvec_weight(packed, torch.randn(1, 32)) is None  # not one row of in_features


def quantize_quietly(source: Path, destination: Path) -> None:
    result = run_cli("quantize", str(source), str(destination), "--quiet")
    assert result.returncode == 0, result.stderr


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    model.train()  # bitsandbytes' training-mode path is its reference dequantize + matmul
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture(scope="module")
def packed_llama(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    save_tiny_llama(root / "src")
    quantize_quietly(root / "src", root / "packed")
    return root / "packed"


def test_load_packed_llama_equals_transformers_bitsandbytes(packed_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = qlorakit.load_packed(packed_llama)
    layers = [m for m in ours.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and not any(p.requires_grad for p in ours.parameters())
    reference = without_dropout(AutoModelForCausalLM.from_pretrained(str(packed_llama), device_map="cpu"))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("setting", ["auto", "float32"])
def test_the_cpu_matmul_routes_stay_close_to_transformers_bitsandbytes(
    packed_llama: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """The model on the default dense matmul route (``auto``: float32 where torch has no oneDNN bf16 matmul, as on
    AVX2-only CPUs; bf16 elsewhere) and forced to float32: logits and the training loss within bf16 rounding of
    bitsandbytes', and the input-embedding gradient too (the backward's route)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(CPU_MATMUL_ENV, setting)
    ours = without_dropout(qlorakit.load_packed(packed_llama))
    reference = without_dropout(AutoModelForCausalLM.from_pretrained(str(packed_llama), device_map="cpu"))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (ours, reference):
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeddings, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach().float(), out.loss.item(), embeddings.grad.float()))
    (logits, loss, grad), (ref_logits, ref_loss, ref_grad) = results
    # Two layers of bf16 activations: a last-place difference in a projection moves a logit by a few bf16 steps.
    assert (logits - ref_logits).abs().max() < 0.05, float((logits - ref_logits).abs().max())
    assert (logits - ref_logits).norm() < 1e-2 * ref_logits.norm()
    assert abs(loss - ref_loss) < 1e-3 * abs(ref_loss), (loss, ref_loss)
    assert (grad - ref_grad).norm() < 2e-2 * ref_grad.norm()


def test_load_packed_minilm_equals_transformers_bitsandbytes(tmp_path: Path) -> None:
    from transformers import AutoModel

    quantize_quietly(minilm_dir(), tmp_path / "packed")
    ours = qlorakit.load_packed(tmp_path / "packed", compute_dtype=torch.float32)
    reference = without_dropout(
        AutoModel.from_pretrained(str(tmp_path / "packed"), device_map="cpu", dtype=torch.float32)
    )
    for module in reference.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_load_packed_reads_a_transformers_bitsandbytes_checkpoint(packed_llama: Path, tmp_path: Path) -> None:
    """A directory saved by transformers + bitsandbytes (not by qlorakit) loads too."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    source = packed_llama.parent / "src"
    model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=config, device_map="cpu")
    model.save_pretrained(str(tmp_path / "bnb"))
    ours = qlorakit.load_packed(tmp_path / "bnb")
    reference = without_dropout(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb"), device_map="cpu"))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


class TestLoadErrors:
    def test_not_a_packed_checkpoint(self, packed_llama: Path) -> None:
        with pytest.raises(qlorakit.CheckpointError, match="no 4-bit quantized weights"):
            qlorakit.load_packed(packed_llama.parent / "src")

    def test_no_config(self, tmp_path: Path) -> None:
        with pytest.raises(qlorakit.CheckpointError, match="no config.json"):
            qlorakit.load_packed(tmp_path)

    def test_unknown_model_class(self, packed_llama: Path, tmp_path: Path) -> None:
        copy = tmp_path / "copy"
        shutil.copytree(packed_llama, copy)
        config = json.loads((copy / "config.json").read_text())
        config["architectures"] = ["NoSuchModelForCausalLM"]
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(qlorakit.CheckpointError, match="does not know the model class"):
            qlorakit.load_packed(copy)

    def test_missing_tensor(self, packed_llama: Path, tmp_path: Path) -> None:
        from safetensors.torch import load_file, save_file

        copy = tmp_path / "copy"
        shutil.copytree(packed_llama, copy)
        tensors = load_file(str(copy / "model.safetensors"))
        del tensors["model.norm.weight"]
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(qlorakit.CheckpointError, match="missing tensor 'model.norm.weight'"):
            qlorakit.load_packed(copy)


def test_qlora_on_a_packed_model_trains_saves_loads_in_peft_and_merges(packed_llama: Path, tmp_path: Path) -> None:
    """The whole CPU path: load_packed → add_lora → train a few steps (loss drops, base
    frozen) → save in PEFT's format → PEFT on transformers + bitsandbytes' model of the same
    files gives the same logits → merge_lora matches the adapter model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = qlorakit.load_packed(packed_llama, compute_dtype=torch.float32)
    config = qlorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    qlorakit.add_lora(model, config)
    packed_before = [m.weight.clone() for m in model.modules() if isinstance(m, Linear4bit)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(4))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9, losses
    packed_after = [m.weight for m in model.modules() if isinstance(m, Linear4bit)]
    assert all(torch.equal(a, b) for a, b in zip(packed_before, packed_after, strict=True))

    qlorakit.save_adapter(model, tmp_path / "adapter", config)
    model.eval()
    reference = without_dropout(AutoModelForCausalLM.from_pretrained(str(packed_llama), device_map="cpu"))
    for module in reference.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
    peft_model = without_dropout(PeftModel.from_pretrained(reference, str(tmp_path / "adapter")))
    probe = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(probe).logits
        assert torch.equal(ours, peft_model(probe).logits)
        merged = qlorakit.merge_lora(model)(probe).logits
    assert not any(isinstance(m, Linear4bit) for m in merged_modules(model))
    assert torch.allclose(merged.float(), ours.float(), atol=2e-2, rtol=1e-2)


def merged_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("_proj")]


def test_prepare_for_kbit_training_upcasts_norms_not_embeddings(packed_llama: Path) -> None:
    model = qlorakit.prepare_for_kbit_training(qlorakit.load_packed(packed_llama))
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    qlorakit.add_lora(model, qlorakit.LoraConfig(r=4, lora_alpha=8))
    model.train()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_save_merged_full_precision_and_requantized(packed_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    def adapted() -> torch.nn.Module:
        model = qlorakit.load_packed(packed_llama, compute_dtype=torch.float32)
        qlorakit.add_lora(model, qlorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(7))
        return model

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(8))
    model = adapted()
    with torch.no_grad():
        expected = model(ids).logits.float()
    qlorakit.save_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits.float(), expected, atol=5e-2, rtol=2e-2)
    qlorakit.save_merged(adapted(), tmp_path / "requantized", requantize=True)
    requantized = qlorakit.load_packed(tmp_path / "requantized")
    assert sum(isinstance(m, Linear4bit) for m in requantized.modules()) == 14
