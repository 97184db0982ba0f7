"""Calibrated, error-compensating quantization (GPTQ): the bitsandbytes layout, lower layer
output error than absmax and the scale search on held-out inputs, determinism, the fallback,
and the calibrated merge (Python API and CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qlorakit
from helpers.bnb_reference import bnb_state_of
from helpers.checkpoints import add_nonzero_lora, save_tiny_llama
from qlorakit import cli
from qlorakit.calibration import collect_hessians, quantize_gptq


@pytest.fixture(autouse=True)
def _one_torch_thread(torch_one_thread: None) -> None:
    """Tiny models: torch's thread pool costs more than it gives (and much more on a busy machine)."""


def correlated_inputs(tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Activations with a low-rank shared part and uneven column scales, like a layer's inputs."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, cols, generator=torch.Generator().manual_seed(99))
    gains = torch.linspace(0.2, 3.0, cols)[torch.randperm(cols, generator=torch.Generator().manual_seed(98))]
    return (torch.randn(tokens, 16, generator=generator) @ basis + 0.3 * torch.randn(tokens, cols)) * gains


def held_out_error(weight: torch.Tensor, packed: qlorakit.PackedWeight, inputs: torch.Tensor) -> float:
    return float(((weight - qlorakit.dequantize(packed, torch.float32)) @ inputs.T).pow(2).sum())


@pytest.mark.parametrize("double_quant", [False, True])
def test_gptq_lowers_held_out_output_error_and_decodes_in_bitsandbytes(bnb_functional, double_quant: bool) -> None:
    torch.manual_seed(0)
    weight = (torch.randn(96, 256) * 0.05).to(torch.bfloat16)
    inputs = correlated_inputs(4096, 256, seed=1)
    calibration, held_out = inputs[:2048], inputs[2048:]
    hessian = calibration.T.double() @ calibration.double() / len(calibration)
    packed, result = quantize_gptq(weight, hessian, double_quant=double_quant)
    assert result.chosen == "gptq"
    reference = weight.float()
    absmax = qlorakit.quantize(weight, double_quant=double_quant)
    searched = qlorakit.quantize(
        weight, double_quant=double_quant, scale_search=True, importance=hessian.diagonal().float()
    )
    gptq_error = held_out_error(reference, packed, held_out)
    assert gptq_error < 0.7 * held_out_error(reference, absmax, held_out)
    assert gptq_error < 0.7 * held_out_error(reference, searched, held_out)
    # Same format: stock bitsandbytes decodes the bytes to what qlorakit decodes.
    state = bnb_state_of(packed)
    state.dtype = torch.float32
    decoded = bnb_functional.dequantize_4bit(packed.codes, state)
    assert torch.equal(decoded, qlorakit.dequantize(packed, torch.float32))
    # The reported calibration error is the decoded weight's.
    error = reference - decoded
    exact = float(torch.einsum("ri,ij,rj->", error.double(), hessian, error.double()))
    assert result.output_error == pytest.approx(exact, rel=1e-3)


def test_fallback_writes_the_better_baseline() -> None:
    # Uncorrelated inputs: nothing to compensate, GPTQ is round-to-nearest against absmax, and
    # the scale search weighted by diag(H) minimizes exactly the output error: it must win and
    # be written byte for byte.
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    hessian = torch.diag(torch.linspace(0.1, 5.0, 128))
    packed, result = quantize_gptq(weight, hessian, scale_search=False)
    assert result.chosen == "searched", result
    assert result.output_error == result.searched_output_error
    assert result.output_error < min(result.gptq_output_error, result.absmax_output_error)
    expected = qlorakit.quantize(weight, scale_search=True, importance=hessian.diagonal())
    assert torch.equal(packed.codes, expected.codes) and torch.equal(packed.absmax, expected.absmax)


def test_bad_hessian_is_a_typed_error() -> None:
    weight = torch.randn(4, 64)
    with pytest.raises(qlorakit.QuantizationError, match="hessian"):
        quantize_gptq(weight, torch.full((64, 64), float("nan")))
    with pytest.raises(qlorakit.QuantizationError, match="shape"):
        quantize_gptq(weight, torch.eye(32))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gptq")
    save_tiny_llama(root / "src")
    return root


def calibration_ids(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 32), generator=generator) for _ in range(count)]


def test_calibrated_checkpoint_is_thread_count_independent_and_loads(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama / "src"), dtype=torch.float32)
    hessians = collect_hessians(model, calibration_ids(4, seed=1))
    # q/k/v and gate/up read one input each: one matrix, the others aliased to it.
    assert hessians.aliases["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert hessians.aliases["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert hessians.tokens == 4 * 2 * 32
    hessian_file = hessians.save(tiny_llama / "hessians.safetensors")
    outputs = []
    for threads in (1, 2):
        out = tiny_llama / f"gptq-{threads}"
        report = qlorakit.quantize_checkpoint(
            tiny_llama / "src", out, hessians=hessian_file, threads=threads, force=True
        )
        assert report.gptq is not None and report.gptq.tensors == 14
        assert report.gptq.reduction > 0.3, report.gptq
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
    loaded = AutoModelForCausalLM.from_pretrained(str(tiny_llama / "gptq-1"), device_map="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    assert qlorakit.inspect_checkpoint(tiny_llama / "gptq-1")["options"]["gptq"] is True


def adapter_model(packed: Path) -> torch.nn.Module:
    model = qlorakit.load_packed(packed, compute_dtype=torch.float32).to(torch.float32)
    return add_nonzero_lora(model, seed=5, b_seed=7)


def test_calibrated_merge_is_closer_to_the_adapter_model_than_plain_requantization(tiny_llama: Path) -> None:
    packed = tiny_llama / "packed"
    qlorakit.quantize_checkpoint(tiny_llama / "src", packed, force=True)
    batches = calibration_ids(24, seed=2)
    plain = qlorakit.save_merged(adapter_model(packed), tiny_llama / "merged-plain", requantize=True)
    calibrated = qlorakit.save_merged(
        adapter_model(packed), tiny_llama / "merged-gptq", requantize=True, calibration=batches
    )
    assert calibrated.kl is not None and calibrated.quantize.gptq.reduction > 0.3
    # KL on held-out tokens, of each merged model to the adapter model.
    held_out = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.log_softmax(adapter_model(packed).eval()(held_out).logits, -1)

        def kl(directory: Path) -> float:
            merged = qlorakit.load_packed(directory, compute_dtype=torch.float32).to(torch.float32)
            actual = torch.log_softmax(merged(held_out).logits, -1)
            return float((expected.exp() * (expected - actual)).sum(-1).mean())

        assert kl(calibrated.directory) < 0.8 * kl(plain.directory)
    # An existing destination is not replaced without force.
    with pytest.raises(FileExistsError):
        qlorakit.save_merged(adapter_model(packed), tiny_llama / "merged-plain", requantize=True)


def char_tokenizer():  # noqa: ANN201
    """A character-level tokenizer over printable ASCII (ids below the tiny Llama's vocabulary)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): c for c in range(32, 127)} | {"[UNK]": 0, "\n": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_merge_cli(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    packed = tmp_path / "packed"
    qlorakit.quantize_checkpoint(tiny_llama / "src", packed)
    char_tokenizer().save_pretrained(str(packed))
    model = adapter_model(packed)
    qlorakit.save_adapter(model, tmp_path / "adapter", qlorakit.LoraConfig(r=4, lora_alpha=8))
    text = tmp_path / "calibration.txt"
    text.write_text("def merge(base, adapter):\n    return base + adapter\n" * 20, encoding="utf-8")
    out = tmp_path / "merged"
    argv = ["merge", str(packed), str(tmp_path / "adapter"), str(out), "--requantize"]
    argv += ["--calibration-text", str(text), "--calibration-length", "64"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "GPTQ on 14 calibrated tensors" in printed and "KL(adapter model || merged model)" in printed
    loaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    assert (out / "tokenizer.json").is_file()
    # Refused without --force (a failure, exit 1), replaced with it.
    assert cli.main(argv) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main([*argv, "--force"]) == 0
    # Base quantization calibrated on the text: the full-precision model's own activations.
    char_tokenizer().save_pretrained(str(tiny_llama / "src"))
    quantized = tmp_path / "quantized"
    assert cli.main(["quantize", str(tiny_llama / "src"), str(quantized), "--calibration-text", str(text)]) == 0
    assert "GPTQ on 14 calibrated tensors" in capsys.readouterr().out
    assert qlorakit.inspect_checkpoint(quantized)["options"]["gptq"] is True
    # Usage errors exit 2.
    with pytest.raises(SystemExit) as usage:
        cli.main(["merge", str(packed), str(tmp_path / "adapter"), str(out), "--calibration-text", str(text)])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as usage:
        cli.main(["quantize", str(packed), str(out), "--calibration-text", str(text), "--importance", str(text)])
    assert usage.value.code == 2
