"""Correct 4-bit checkpoints for every architecture, on default options, held against
transformers + bitsandbytes themselves (SPEC 10).

For each tiny model of ``architectures.ARCHITECTURES``:
(a) ``quantize_checkpoint`` succeeds; (b) transformers + bitsandbytes load the output with no
missing, unexpected or mismatched keys, build the same 4-bit modules as their own route
(``from_pretrained(SRC, quantization_config=BitsAndBytesConfig(...))``) with the same packed
codes, and give the same logits once the nested absmax codes (the documented difference) are
taken from our file; (c) ``load_packed`` gives those logits too; (d) LoRA training after
``prepare_for_kbit_training`` lowers the loss and ``generate`` runs; (e) PEFT's
``PeftModel.from_pretrained`` on (b) with our adapter gives our logits. Logits are compared in
train and eval mode. Then the same loader on directories transformers + bitsandbytes saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qlorakit
from helpers.architectures import ARCHITECTURES, Architecture, batch, logits
from qlorakit.nn import Linear4bit

pytestmark = pytest.mark.filterwarnings("ignore")

BNB_OPTIONS = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
IDS = [a.name for a in ARCHITECTURES]


def transformers_route(source: Path, architecture: Architecture) -> torch.nn.Module:
    """What users do today: bitsandbytes quantizes while transformers loads (the checkpoint's own
    dtype, so both routes quantize the same values)."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **BNB_OPTIONS)
    return architecture.model_class.from_pretrained(
        str(source), quantization_config=config, device_map="cpu", dtype=architecture.dtype
    )


def bnb_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def take_nested_codes(target: torch.nn.Module, source: torch.nn.Module) -> int:
    """Copies the double-quantization state (nested absmax codes, scales, offset) of every 4-bit
    layer of ``source`` into ``target``, after checking the packed codes and the float32 absmax
    they encode are identical; returns how many nested codes differed."""
    differing = 0
    source_layers = bnb_layers(source)
    for name, layer in bnb_layers(target).items():
        theirs, ours = layer.weight.quant_state, source_layers[name].weight.quant_state
        assert torch.equal(layer.weight.data, source_layers[name].weight.data), f"{name}: packed codes differ"
        assert list(theirs.shape) == list(ours.shape) and theirs.blocksize == ours.blocksize, name
        differing += int((theirs.absmax != ours.absmax).sum())
        theirs.absmax, theirs.offset = ours.absmax.clone(), ours.offset.clone()
        theirs.state2.absmax = ours.state2.absmax.clone()
    return differing


def both_modes(model: torch.nn.Module, architecture: Architecture) -> dict[str, torch.Tensor]:
    out = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        out[mode] = logits(model, architecture)
    model.eval()
    return out


def bnb_has_eval_kernel() -> bool:
    """bitsandbytes' Linear4bit in eval mode on an AVX512-BF16 CPU repacks its weight for a kernel
    of its own (other summation order); elsewhere eval runs the same path as train."""
    import bitsandbytes.functional as F

    return bool(F.has_avx512bf16())


def assert_same_logits(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str, against_bnb: bool = True
) -> None:
    """Bit-exact, except for eval mode against bitsandbytes' own eval kernel (where it has one):
    there within that kernel's rounding."""
    for mode in ours:
        if mode == "eval" and against_bnb and bnb_has_eval_kernel():
            assert torch.allclose(ours[mode].float(), theirs[mode].float(), rtol=2e-2, atol=2e-2), what
            continue
        assert torch.equal(ours[mode], theirs[mode]), (
            f"{what} ({mode} mode): max difference {float((ours[mode].float() - theirs[mode].float()).abs().max())}"
        )


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=IDS)
def case(request, tmp_path_factory) -> dict:
    """Source checkpoint, our quantized output, and transformers + bitsandbytes' own model."""
    architecture: Architecture = request.param
    root = tmp_path_factory.mktemp(architecture.name)
    source, destination = root / "src", root / "ours"
    architecture.save(source)
    report = qlorakit.quantize_checkpoint(source, destination)
    return {"arch": architecture, "src": source, "dst": destination, "report": report, "root": root}


def test_transformers_loads_our_output_like_its_own_route(case) -> None:
    architecture, destination = case["arch"], case["dst"]
    reference = transformers_route(case["src"], architecture)
    loaded, info = architecture.model_class.from_pretrained(
        str(destination), device_map="cpu", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert sorted(bnb_layers(loaded)) == sorted(bnb_layers(reference))
    assert case["report"].tensors_quantized == len(bnb_layers(reference))
    if architecture.no_4bit_layers:
        assert not bnb_layers(reference)
    else:
        assert bnb_layers(reference), "the route converted no layer: the case tests nothing"
    differing = take_nested_codes(reference, loaded)
    total = sum(layer.weight.quant_state.absmax.numel() for layer in bnb_layers(reference).values())
    assert differing <= max(2, total // 100), f"{differing} of {total} nested codes differ"
    # both sides are bitsandbytes' layers: bit-exact in either mode
    assert_same_logits(
        both_modes(loaded, architecture), both_modes(reference, architecture), "DST vs route", against_bnb=False
    )


def test_load_packed_matches_transformers_on_our_output(case) -> None:
    architecture = case["arch"]
    ours = qlorakit.load_packed(case["dst"])
    loaded = architecture.model_class.from_pretrained(str(case["dst"]), device_map="cpu")
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, Linear4bit)) == sorted(bnb_layers(loaded))
    assert all(not p.requires_grad for p in ours.parameters())
    assert_same_logits(both_modes(ours, architecture), both_modes(loaded, architecture), "load_packed vs bnb")


def test_quantize_on_load_gives_the_model_of_our_output(case) -> None:
    """``from_pretrained`` of the source quantizes in memory, with no checkpoint written, into the model
    ``load_packed`` gives for our output: the same modules, tensors, config, generation config and logits."""
    architecture = case["arch"]
    reference = qlorakit.load_packed(case["dst"])
    model = qlorakit.from_pretrained(case["src"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit)) == sorted(
        n for n, m in reference.named_modules() if isinstance(m, Linear4bit)
    )
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    assert {**model.config.to_dict(), "_name_or_path": None} == {**reference.config.to_dict(), "_name_or_path": None}
    if reference.can_generate():
        assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert_same_logits(
        both_modes(model, architecture), both_modes(reference, architecture), "in memory vs packed", against_bnb=False
    )


def test_lora_training_generation_and_peft_reload(case, tmp_path) -> None:
    from peft import PeftModel

    architecture = case["arch"]
    model = qlorakit.load_packed(case["dst"])
    qlorakit.prepare_for_kbit_training(model)
    config = qlorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    qlorakit.add_lora(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    inputs = batch(architecture, seed=3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    model.eval()
    if model.can_generate():
        generated = model.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
        assert generated.shape[-1] >= 3
    else:
        assert architecture.name == "bert-mlm"  # the one case without a generation head
    adapter_dir = tmp_path / "adapter"
    qlorakit.save_adapter(model, adapter_dir)  # the model remembers its LoraConfig
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # Our adapter on a freshly loaded base (prepare_for_kbit_training upcasts norms, so the
    # trained model itself is not the comparison) against PEFT on transformers + bitsandbytes.
    ours = qlorakit.load_packed(case["dst"])
    qlorakit.load_adapter(ours, adapter_dir)
    base = architecture.model_class.from_pretrained(str(case["dst"]), device_map="cpu")
    theirs = PeftModel.from_pretrained(base, str(adapter_dir))
    assert_same_logits(both_modes(ours, architecture), both_modes(theirs, architecture), "our LoRA vs PEFT")


def test_load_packed_reads_what_transformers_saved(case) -> None:
    """transformers + bitsandbytes quantize on load and save; load_packed reads that directory,
    with stray files (an adapter, optimizer state) beside it, to the same logits."""
    architecture = case["arch"]
    reference = transformers_route(case["src"], architecture)
    saved = case["root"] / "saved-by-transformers"
    reference.save_pretrained(str(saved))
    torch.save({"state": {}}, saved / "optimizer.pt")
    from safetensors.torch import save_file

    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, str(saved / "adapter_model.safetensors"))
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["x"]}))
    ours = qlorakit.load_packed(saved)
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, Linear4bit)) == sorted(bnb_layers(reference))
    assert_same_logits(both_modes(ours, architecture), both_modes(reference, architecture), "load_packed vs route")


def test_summary_states_what_stays_16_bit(case) -> None:
    report = case["report"]
    summary = report.summary()
    assert "transformers" in report.selection_method
    if case["arch"].name in ("mixtral", "qwen2-moe"):
        fused = [line for line in report.kept if "fused by transformers" in line]
        assert fused, summary
        assert "M params" in fused[0]
    if case["arch"].no_4bit_layers:
        assert report.tensors_quantized == 0 and any("FalconLinear" in line for line in report.kept), summary


@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "falcon", "qwen2-moe"])
def test_save_merged_loads_in_transformers(name: str, tmp_path) -> None:
    """Merging an adapter and saving, in full precision or re-quantized, writes what transformers
    (+ bitsandbytes) loads without a missing or unexpected key, close to the adapter model:
    tied heads, Conv1D layers (saved back [in, out]), FalconLinear and MoE experts included."""
    from helpers.architectures import BY_NAME

    architecture = BY_NAME[name]
    architecture.save(tmp_path / "src")
    qlorakit.quantize_checkpoint(tmp_path / "src", tmp_path / "packed")

    def adapted() -> torch.nn.Module:
        model = qlorakit.load_packed(tmp_path / "packed", compute_dtype=torch.float32)
        torch.manual_seed(5)  # the same lora_A on every call
        qlorakit.add_lora(model, qlorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(7))
        return model.eval()

    expected = logits(adapted(), architecture).float()
    scale = float(expected.abs().mean())
    for requantize in (False, True):
        directory = tmp_path / ("requantized" if requantize else "merged")
        qlorakit.save_merged(adapted(), directory, requantize=requantize)
        merged, info = architecture.model_class.from_pretrained(
            str(directory), device_map="cpu", output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert bool(bnb_layers(merged)) == (requantize and not architecture.no_4bit_layers)
        error = float((logits(merged.eval(), architecture).float() - expected).abs().mean())
        # measured: 0.007-0.008 of the mean |logit| in full precision (bf16 rounding), 0.15-0.17
        # re-quantized (NF4's error on random weights)
        assert error < (0.3 if requantize else 0.02) * scale, (requantize, error, scale)
