"""Several processes: the 4-bit base sharded by FSDP2's plain ``fully_shard`` over 2 gloo ranks on the CPU, by
accelerate's FSDP2 path (``accelerate launch`` with tools/accelerate_fsdp2.yaml, ``Accelerator.prepare``), DDP,
and a full checkpoint written from the shards — launched with torchrun or accelerate through tools/train_fsdp.py,
as users launch it, and compared with one process running the same micro-batches (gradient accumulation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlorakit
import qlorakit.distributed as qdist
from helpers.checkpoints import save_tiny_llama
from helpers.processes import ACCELERATE_FSDP2_CONFIG, run_train_fsdp
from qlorakit._native import byte_view
from qlorakit.nn import Linear4bit

ADAPTER = "adapter/adapter_model.safetensors"


def _accelerate(mixed_precision: str) -> tuple[str, ...]:
    """``accelerate launch`` options: the example FSDP2 config on 2 processes."""
    return ("--config_file", str(ACCELERATE_FSDP2_CONFIG), "--num_processes", "2", "--mixed_precision", mixed_precision)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_llama(root / "src")
    qlorakit.quantize_checkpoint(root / "src", root / "packed")
    packed = root / "packed"
    return {
        "packed": packed,
        "root": root,
        "fsdp": run_train_fsdp(packed, root / "fsdp", "--save-base", ranks=2),
        "ddp": run_train_fsdp(packed, root / "ddp", "--parallel", "ddp", ranks=2),
        "accelerate": run_train_fsdp(packed, root / "accelerate", accelerate=_accelerate("no")),
        "accelerate-bf16": run_train_fsdp(
            packed, root / "accelerate-bf16", "--save-base", accelerate=_accelerate("bf16")
        ),
        "single": run_train_fsdp(packed, root / "single", "--accumulate", "2"),
    }


@pytest.mark.parametrize("parallel", ["fsdp", "accelerate", "accelerate-bf16"])
def test_fsdp2_shards_the_4bit_base(runs: dict, parallel: str) -> None:
    result = runs[parallel]
    assert result["world"] == 2 and result["parallel"] == parallel.removesuffix("-bf16")
    for rank in result["ranks"]:
        assert rank["held_4bit_bytes"] <= 0.6 * result["total_4bit_bytes"], rank
    assert sum(r["held_4bit_bytes"] for r in result["ranks"]) >= result["total_4bit_bytes"]  # nothing dropped
    # Each of the 2 decoder layers is its own group (accelerate's transformer wrap policy from
    # _no_split_modules, or train_fsdp's plain fully_shard), plus the root.
    assert result["fsdp_groups"] >= 3
    # DDP replicates the base on every rank.
    assert all(r["held_4bit_bytes"] == runs["ddp"]["total_4bit_bytes"] for r in runs["ddp"]["ranks"])


@pytest.mark.parametrize("parallel", ["fsdp", "ddp", "accelerate"])
def test_adapters_equal_one_process_over_the_same_micro_batches(runs: dict, parallel: str) -> None:
    reference = load_file(str(runs["root"] / "single" / ADAPTER))
    trained = load_file(str(runs["root"] / parallel / ADAPTER))
    assert sorted(trained) == sorted(reference) and len(reference) == 28  # 7 projections x 2 layers x (A, B)
    initial_b = [k for k in reference if "lora_B" in k]
    assert all(reference[k].abs().max() > 0 for k in initial_b)  # the steps moved B away from its zero init
    for key, tensor in reference.items():
        assert torch.allclose(trained[key], tensor, rtol=0, atol=1e-6), key
    assert runs[parallel]["losses"] == pytest.approx(runs["single"]["losses"], abs=1e-5)


def test_accelerate_bf16_mixed_precision_trains_close_to_float32(runs: dict) -> None:
    """accelerate's bf16 policy gathers the float parameters as bf16: the losses move by bf16 rounding only, and
    the adapters stay close to float32 training's (the base is checked byte for byte below). Close in norm, not
    per element: AdamW's first steps move every entry by about the learning rate whatever its gradient's size,
    so bf16 rounding can flip the sign of an entry whose gradient is near zero (3.8% relative norm measured;
    independent adapters of one size are ~141%, the square root of 2)."""
    assert runs["accelerate-bf16"]["losses"] == pytest.approx(runs["single"]["losses"], abs=5e-3)
    reference = load_file(str(runs["root"] / "single" / ADAPTER))
    trained = load_file(str(runs["root"] / "accelerate-bf16" / ADAPTER))
    assert sorted(trained) == sorted(reference)
    for key, tensor in reference.items():
        assert trained[key].dtype == torch.float32, key  # accelerate keeps float32 master adapters
        assert (trained[key] - tensor).norm() <= 0.1 * tensor.norm(), key


@pytest.mark.parametrize("parallel", ["fsdp", "accelerate-bf16"])
def test_full_checkpoint_from_the_shards_is_the_base_in_bitsandbytes_format(runs: dict, parallel: str) -> None:
    from transformers import AutoModelForCausalLM

    saved, source = runs["root"] / parallel / "base", runs["packed"]
    written, expected = load_file(str(saved / "model.safetensors")), load_file(str(source / "model.safetensors"))
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    assert written["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8  # codes as integers
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    logits = {}
    for name, directory in (("saved", saved), ("source", source)):
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert torch.equal(logits["saved"], logits["source"])


def test_saving_the_base_refuses_an_existing_directory(runs: dict, tmp_path: Path) -> None:
    model = qlorakit.from_pretrained(runs["packed"], compute_dtype=torch.float32)
    qlorakit.add_lora(model, qlorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    target = tmp_path / "base"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="force=True"):
        qdist.save_base_checkpoint(model, target)
    assert (target / "keep.txt").read_text() == "user data"
    qdist.save_base_checkpoint(model, target, force=True)
    assert not (target / "keep.txt").exists()
    written = load_file(str(target / "model.safetensors"))
    assert not any("lora" in key or "base_layer" in key for key in written)
    assert sorted(written) == sorted(load_file(str(runs["packed"] / "model.safetensors")))


def test_base_state_dict_unwraps_adapters() -> None:
    state = {
        "a.q.base_layer.weight": torch.zeros(1),
        "a.q.base_layer.weight.absmax": torch.zeros(1),
        "a.q.lora_A.weight": torch.zeros(1),
        "a.q.lora_B.weight": torch.zeros(1),
        "a.qq.weight": torch.zeros(1),
    }
    assert sorted(qdist.base_state_dict(state, ["a.q"])) == ["a.q.weight", "a.q.weight.absmax", "a.qq.weight"]


def test_4bit_parameters_are_integers_that_no_float_cast_changes() -> None:
    """FSDP2's MixedPrecisionPolicy and ``model.to(dtype)`` cast floating-point parameters only: the codes and
    scales must not be floating point, or a bf16 policy would round the scales."""
    for double_quant in (True, False):
        torch.manual_seed(0)
        layer = Linear4bit.from_linear(
            torch.nn.Linear(128, 64, bias=False), double_quant=double_quant, compute_dtype=torch.float32
        )
        assert all(not p.is_floating_point() and not p.requires_grad for p in layer.quantized_parameters())
        x = torch.randn(3, 128)
        before = layer(x)
        scales = [p.clone() for p in layer.quantized_parameters()]
        layer.to(torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip(scales, layer.quantized_parameters(), strict=True))
        assert torch.equal(layer(x), before)


def test_native_views_keep_storage_resizable() -> None:
    """FSDP2 frees a gathered parameter's storage (``resize_(0)``) after each pass; a numpy view would forbid it."""
    tensor = torch.zeros(64, dtype=torch.uint8)
    view = byte_view(tensor, "t")
    assert view.nbytes == 64 and not view.readonly
    assert tensor.untyped_storage().resizable()
    packed = qlorakit.quantize(torch.randn(32, 64))
    qlorakit.dequantize(packed, torch.float32)
    assert packed.codes.untyped_storage().resizable()
