"""``save_pretrained`` of a qlorakit model writes bitsandbytes' format: ``Linear4bit``'s state dict is
bitsandbytes' serialization and the config's ``quantization_config`` is bitsandbytes' 4-bit one, so
the saved directory loads in plain transformers + bitsandbytes and in qlorakit, with the tensors of
the checkpoint the model came from — for every architecture of the matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlorakit
from helpers.architectures import ARCHITECTURES, BY_NAME, Architecture, logits
from qlorakit.nn import Linear4bit

pytestmark = pytest.mark.filterwarnings("ignore")

BNB_MARKER = "weight.quant_state.bitsandbytes__"


ON_LOAD = ["llama", "gpt2", "opt", "gpt-neox", "mixtral", "t5"]
_CASES: dict[str, dict] = {}


def make_case(architecture: Architecture, tmp_path_factory) -> dict:
    """A full-precision checkpoint and its packed checkpoint (made once per architecture)."""
    if architecture.name not in _CASES:
        root = tmp_path_factory.mktemp(architecture.name)
        architecture.save(root / "src")
        qlorakit.quantize_checkpoint(root / "src", root / "packed")
        _CASES[architecture.name] = {"arch": architecture, "src": root / "src", "packed": root / "packed"}
    return _CASES[architecture.name]


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=[a.name for a in ARCHITECTURES])
def case(request, tmp_path_factory) -> dict:
    return make_case(request.param, tmp_path_factory)


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def quantization_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def four_bit_layers(model: torch.nn.Module) -> list[str]:
    """Names of the 4-bit layers, qlorakit's or bitsandbytes'."""
    return sorted(name for name, m in model.named_modules() if type(m).__name__ == "Linear4bit")


def compute_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Float32 compute in every 4-bit layer, qlorakit's or bitsandbytes' (which conftest keeps on bitsandbytes'
    exact path: both sides multiply by the same dequantized float32 weights)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype = torch.float32
    return model


def assert_saved_dir_is_the_packed_checkpoint(
    model: torch.nn.Module, case: dict, saved: Path, same_skip_list: bool = True
) -> None:
    """Same tensors (bytes, dtypes) and quantization_config as the packed checkpoint; plain transformers +
    bitsandbytes load it completely with the same 4-bit layers and logits; qlorakit loads it identically.
    ``same_skip_list=False``: ``llm_int8_skip_modules`` may list other modules that are no linear layers."""
    architecture = case["arch"]
    written, expected = load_all(saved), load_all(case["packed"])
    assert set(written) == set(expected)
    different = [
        k for k in expected if written[k].dtype != expected[k].dtype or not torch.equal(written[k], expected[k])
    ]
    assert not different, different[:5]
    ours, packed = quantization_config(saved), quantization_config(case["packed"])
    if not same_skip_list:
        ours, packed = ({k: v for k, v in c.items() if k != "llm_int8_skip_modules"} for c in (ours, packed))
    assert ours == packed

    bnb_model, info = architecture.model_class.from_pretrained(str(saved), device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(bnb_model.hf_quantizer).__name__ == "Bnb4BitHfQuantizer"
    assert four_bit_layers(bnb_model) == four_bit_layers(model)
    if not architecture.no_4bit_layers:
        assert four_bit_layers(model), "no 4-bit layer: the case tests nothing"
    ours = logits(compute_in_float32(qlorakit.from_pretrained(case["packed"])), architecture)
    theirs = logits(compute_in_float32(bnb_model), architecture)
    # The same float32 weights on both sides: only the order of float32 sums may differ.
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), float((ours - theirs).abs().max())

    reloaded = qlorakit.from_pretrained(saved)
    assert four_bit_layers(reloaded) == four_bit_layers(model)
    state, reference = reloaded.state_dict(), model.state_dict()
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    assert torch.equal(logits(reloaded, architecture), logits(model, architecture))


def test_saved_from_a_packed_checkpoint(case, tmp_path: Path) -> None:
    model = qlorakit.from_pretrained(case["packed"])
    model.save_pretrained(str(tmp_path / "saved"))
    assert_saved_dir_is_the_packed_checkpoint(model, case, tmp_path / "saved")


@pytest.mark.parametrize("route", ["from_pretrained", "quantization_config"])
@pytest.mark.parametrize("name", ON_LOAD)
def test_saved_after_quantizing_on_load(name: str, route: str, tmp_path: Path, tmp_path_factory) -> None:
    case = make_case(BY_NAME[name], tmp_path_factory)
    if route == "from_pretrained":
        model = qlorakit.from_pretrained(case["src"])
    else:
        config = qlorakit.QuantizationConfig(quant_type="nf4", blocksize=64, double_quant=True)
        model = case["arch"].model_class.from_pretrained(str(case["src"]), quantization_config=config)
    model.save_pretrained(str(tmp_path / "saved"))
    saved_config = quantization_config(tmp_path / "saved")
    assert saved_config["quant_method"] == "bitsandbytes" and saved_config["load_in_4bit"]
    # transformers' own not-to-convert list at load time may name modules the planner's meta model does not
    # (a final norm's bias: no linear layer); the layers converted are the same, which the helper checks.
    assert_saved_dir_is_the_packed_checkpoint(
        model, case, tmp_path / "saved", same_skip_list=route == "from_pretrained"
    )


def test_state_dict_is_the_packed_checkpoint_and_round_trips(tmp_path: Path) -> None:
    architecture = BY_NAME["llama"]
    architecture.save(tmp_path / "src")
    qlorakit.quantize_checkpoint(tmp_path / "src", tmp_path / "packed")
    qlorakit.quantize_checkpoint(tmp_path / "src", tmp_path / "fp4", quant_type="fp4")
    model = qlorakit.from_pretrained(tmp_path / "packed")
    state, stored = model.state_dict(), load_all(tmp_path / "packed")
    tied = set(state) - set(stored)
    assert set(stored) <= set(state) and tied <= {"lm_head.weight"}
    assert all(torch.equal(state[k], stored[k]) and state[k].dtype == stored[k].dtype for k in stored)
    # Another model's state dict (other weights, other codes) loads into this one and gives its logits.
    other = qlorakit.from_pretrained(tmp_path / "fp4")
    result = model.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(logits(model, architecture), logits(other, architecture))
    layer = model.model.layers[0].mlp.up_proj
    assert layer.quant_type == "fp4" and layer.packed_weight().quant_type == "fp4"


class TestLinear4bitStateDict:
    def layer(self, seed: int = 0, bias: bool = True, **options) -> Linear4bit:
        torch.manual_seed(seed)
        return Linear4bit.from_linear(torch.nn.Linear(128, 64, bias=bias), **options)

    def test_keys_and_bytes_are_bitsandbytes_serialization(self, torch_one_thread) -> None:
        import bitsandbytes as bnb

        torch.manual_seed(0)
        dense = torch.nn.Linear(128, 64)
        theirs = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
        theirs.load_state_dict(dense.state_dict())
        theirs = theirs.to("cpu")  # bitsandbytes quantizes here
        ours = Linear4bit.from_linear(dense, compute_dtype=torch.float32)
        state, expected = ours.state_dict(), theirs.state_dict()
        assert (
            set(state)
            == set(expected)
            == {
                "weight",
                "weight.absmax",
                "weight.quant_map",
                "weight.nested_absmax",
                "weight.nested_quant_map",
                "weight.quant_state.bitsandbytes__nf4",
                "bias",
            }
        )
        assert all(torch.equal(state[k], expected[k].cpu()) and state[k].dtype == expected[k].dtype for k in expected)
        fresh = self.layer(seed=1, compute_dtype=torch.float32)
        fresh.load_state_dict(expected)  # what bitsandbytes writes loads into ours
        # More rows than qlorakit's fused small-batch kernel takes: its dequantize + matmul path, bitsandbytes' order.
        x = torch.randn(9, 128)
        assert torch.equal(fresh(x), ours(x)) and torch.equal(fresh(x), theirs(x))

    def test_strict_loading_reports_missing_and_unexpected_keys(self) -> None:
        layer = self.layer()
        state = layer.state_dict()
        del state["weight.absmax"]
        with pytest.raises(RuntimeError, match="weight.absmax"):
            layer.load_state_dict(state)
        result = self.layer().load_state_dict({**layer.state_dict(), "weight.extra": torch.zeros(1)}, strict=False)
        assert result.unexpected_keys == ["weight.extra"]
        result = self.layer().load_state_dict({"bias": layer.bias}, strict=False)
        assert "weight" in result.missing_keys and "weight.quant_state.bitsandbytes__nf4" in result.missing_keys

    def test_a_weight_of_another_layout_is_refused(self) -> None:
        with pytest.raises(RuntimeError, match="size mismatch for weight"):
            self.layer().load_state_dict(self.layer(blocksize=128).state_dict())
        with pytest.raises(RuntimeError, match="size mismatch for weight"):
            self.layer().load_state_dict(self.layer(double_quant=False).state_dict())
        wide = Linear4bit.from_linear(torch.nn.Linear(256, 64))
        with pytest.raises(RuntimeError, match=r"size mismatch for weight: the 4-bit weight has shape \[64, 256\]"):
            self.layer().load_state_dict(wide.state_dict())

    def test_assign_replaces_the_buffers(self) -> None:
        layer, other = self.layer(), self.layer(seed=2, blocksize=64)
        layer.load_state_dict(other.state_dict(), assign=True)
        assert torch.equal(layer.weight, other.weight)
        x = torch.randn(2, 128)
        assert torch.equal(layer(x), other(x))
