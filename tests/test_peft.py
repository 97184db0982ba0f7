"""PEFT on qlorakit models, held against PEFT on transformers + bitsandbytes (issue 11).

The same packed checkpoint is loaded twice, by ``qlorakit.from_pretrained`` and by transformers +
bitsandbytes; PEFT wraps both. With one adapter on both, outputs must be equal, ``target_modules="all-linear"``
must pick the same modules, merging must give the same 4-bit codes, and adapters saved from one load on the
other. Tiny models: Llama, OPT (tied head), GPT-2 (Conv1D layers become [out, in] 4-bit linears).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlorakit
from helpers.architectures import BY_NAME, logits
from qlorakit.nn import Linear4bit

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

CASES = ["llama", "opt", "gpt2"]


@pytest.fixture(scope="module")
def packed_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    dirs = {}
    for name in CASES:
        BY_NAME[name].save(root / f"{name}-src")
        qlorakit.quantize_checkpoint(root / f"{name}-src", root / f"{name}-nf4")
        dirs[name] = root / f"{name}-nf4"
    return dirs


def bnb_model(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), device_map="cpu")


def lora_config(**overrides: object) -> peft.LoraConfig:
    # init_lora_weights=False: lora_B random too, so the adapter changes the output
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **overrides}
    return peft.LoraConfig(**options)


def lora_layer_names(model: torch.nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))


@pytest.mark.parametrize("name", CASES)
def test_peft_on_qlorakit_equals_peft_on_bitsandbytes(name: str, packed_dirs: dict[str, Path], tmp_path) -> None:
    from peft.tuners.lora import LoraLayer

    from qlorakit.peft_lora import LoraLinear4bit

    architecture, packed = BY_NAME[name], packed_dirs[name]
    torch.manual_seed(0)
    ours = peft.get_peft_model(qlorakit.from_pretrained(packed), lora_config())
    theirs_fresh = peft.get_peft_model(bnb_model(packed), lora_config())
    targeted = lora_layer_names(ours)
    assert targeted and targeted == lora_layer_names(theirs_fresh)  # "all-linear" picks the same modules
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    assert all(type(m) is LoraLinear4bit and isinstance(m.get_base_layer(), Linear4bit) for m in layers)
    assert all(p.requires_grad == ("lora_" in n) for n, p in ours.named_parameters())

    ours.save_pretrained(str(tmp_path / "adapter"))
    theirs = peft.PeftModel.from_pretrained(bnb_model(packed), str(tmp_path / "adapter"))
    expected = logits(ours.eval(), architecture)
    assert torch.equal(logits(theirs.eval(), architecture), expected)
    again = peft.PeftModel.from_pretrained(qlorakit.from_pretrained(packed), str(tmp_path / "adapter"))
    assert torch.equal(logits(again.eval(), architecture), expected)

    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not lora_layer_names(merged_ours)
    quantized = {n: m for n, m in merged_ours.named_modules() if isinstance(m, Linear4bit)}
    assert {n.removeprefix("base_model.model.") for n in targeted} <= set(quantized)
    for module_name, layer in quantized.items():
        reference = merged_theirs.get_submodule(module_name).weight
        assert torch.equal(layer.weight.reshape(-1), reference.data.reshape(-1)), module_name
    merged_logits = logits(merged_ours, architecture).float()
    error = float((merged_logits - logits(merged_theirs, architecture).float()).abs().mean())
    # same codes; bitsandbytes keeps the merged sum's float32 as the weight's dtype and computes with it
    # (its fused CPU gemm), we dequantize to bf16 as before merging: measured 0.7% of the mean |logit|,
    # about one bf16 rounding step
    assert error < 0.02 * float(merged_logits.abs().mean()), error


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_merge_unmerge_and_disable_adapter(packed_dirs: dict[str, Path]) -> None:
    architecture, packed = BY_NAME["llama"], packed_dirs["llama"]
    base_logits = logits(qlorakit.from_pretrained(packed), architecture)
    torch.manual_seed(0)
    model = peft.get_peft_model(qlorakit.from_pretrained(packed), lora_config()).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    original = layer.get_base_layer().dequantized_weight(torch.float32)
    delta = layer.get_delta_weight("default").float()
    assert not torch.equal(logits(model, architecture), base_logits)
    with model.disable_adapter():
        assert torch.equal(logits(model, architecture), base_logits)
    model.merge_adapter()
    assert layer.merged and isinstance(layer.get_base_layer(), Linear4bit)
    merged = layer.get_base_layer().dequantized_weight(torch.float32)
    # NF4 requantization: measured relative error 0.09-0.10 on these random weights
    assert relative_error(merged, original + delta) < 0.15
    assert relative_error(merged, original) > relative_error(merged, original + delta)
    model.unmerge_adapter()
    assert not layer.merged
    unmerged = layer.get_base_layer().dequantized_weight(torch.float32)
    # back near the base: two requantizations of weights the (large, random) adapter dominated
    assert relative_error(unmerged, original) < 0.5 * relative_error(merged, original)


def test_variants_that_need_a_dense_base_are_refused(packed_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unsupported variant"):
        peft.get_peft_model(qlorakit.from_pretrained(packed_dirs["llama"]), lora_config(use_dora=True))


def test_dispatch_is_installed_without_importing_peft() -> None:
    """Loading qlorakit's layers must not pay for PEFT's import; PEFT imported later still dispatches."""
    code = (
        "import sys, qlorakit.nn\n"
        "assert 'peft' not in sys.modules\n"
        "import torch, peft\n"
        "from qlorakit.nn import Linear4bit\n"
        "from qlorakit.peft_lora import LoraLinear4bit\n"
        "layer = Linear4bit.from_linear(torch.nn.Linear(64, 32))\n"
        "model = torch.nn.Sequential(layer)\n"
        "wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=['0']))\n"
        "assert type(wrapped.base_model.model[0]) is LoraLinear4bit\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
