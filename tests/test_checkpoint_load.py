"""`qlorakit quantize` output loads in transformers + bitsandbytes (a client qlorakit did
not write) and equals what transformers writes when bitsandbytes quantizes the same source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers.bnb_reference import compare_nested
from helpers.checkpoints import minilm_dir, save_tiny_llama
from helpers.processes import run_cli

BNB_OPTIONS = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


CLI_TIMEOUT_S = 600


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def transformers_route(source: Path, destination: Path, auto_class, dtype: torch.dtype) -> torch.nn.Module:
    """What users do today: bitsandbytes quantizes while transformers loads, then saves.
    ``dtype`` is the checkpoint's own, so both routes quantize the same values (qlorakit
    quantizes the stored values; transformers first casts to the ``dtype`` it is given)."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **BNB_OPTIONS)
    model = auto_class.from_pretrained(str(source), quantization_config=config, device_map="cpu", dtype=dtype)
    model.save_pretrained(str(destination))
    return model


def assert_same_tensors_up_to_nested_codes(ours: Path, reference: Path, source: dict[str, torch.Tensor]) -> int:
    """Every tensor equal, except nested absmax codes where ours is the nearer code
    (checked by re-quantizing that weight against bitsandbytes); returns how many differ."""
    mine, theirs = load_all(ours), load_all(reference)
    assert set(theirs) <= set(mine)
    # transformers drops non-persistent buffers it does not save (BERT's position_ids);
    # we copy every source tensor we do not quantize, unchanged.
    for extra in set(mine) - set(theirs):
        assert torch.equal(mine[extra], source[extra]), extra
    differing_codes = 0
    for name, tensor in theirs.items():
        if torch.equal(mine[name], tensor):
            continue
        assert name.endswith(".absmax") and tensor.dtype == torch.uint8, f"{name} differs"
        weight_name = name.removesuffix(".absmax")
        result = compare_nested(source[weight_name], "nf4", 64)
        assert result.offset_equal and result.ours_worse == 0, weight_name
        differing_codes += int((mine[name] != tensor).sum())
    return differing_codes


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("llama") / "src"
    save_tiny_llama(source, max_position_embeddings=256)
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return source


def test_llama_loads_in_transformers_like_bitsandbytes_output(tiny_llama: Path, tmp_path: Path, torch_one_thread):
    from transformers import AutoModelForCausalLM

    before = tree_digest(tiny_llama)
    result = run_cli("quantize", str(tiny_llama), str(tmp_path / "ours"), timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert "bits/parameter" in result.stdout and "mean relative reconstruction error" in result.stdout
    assert tree_digest(tiny_llama) == before, "the source was modified"
    assert (tmp_path / "ours" / "tokenizer_config.json").read_text() == (
        tiny_llama / "tokenizer_config.json"
    ).read_text()

    route_model = transformers_route(tiny_llama, tmp_path / "reference", AutoModelForCausalLM, torch.bfloat16)
    source = load_all(tiny_llama)
    differing = assert_same_tensors_up_to_nested_codes(tmp_path / "ours", tmp_path / "reference", source)

    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    reference_config = json.loads((tmp_path / "reference" / "config.json").read_text())["quantization_config"]
    for key in set(reference_config) - {"llm_int8_skip_modules"}:
        assert ours_config[key] == reference_config[key], key

    ours_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), device_map="cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "reference"), device_map="cpu")
    assert type(ours_model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours_model(ids).logits
        expected = reloaded(ids).logits
        on_load = route_model(ids).logits
    assert torch.equal(expected, on_load)
    if differing == 0:
        assert torch.equal(logits, expected)
    else:
        # Only nested codes differ, each one ours-nearer: the logits move by rounding only.
        assert torch.allclose(logits.float(), expected.float(), atol=0.05, rtol=0.02)
    print(f"\nLlama: {differing} nested codes differ; logits equal: {torch.equal(logits, expected)}")


def test_sharded_output_with_index(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    sharded = tmp_path / "sharded"
    assert run_cli("quantize", str(tiny_llama), str(single), "--quiet", timeout=CLI_TIMEOUT_S).returncode == 0
    result = run_cli(
        "quantize", str(tiny_llama), str(sharded), "--quiet", "--max-shard-size", "60kB", timeout=CLI_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum((sharded / s).stat().st_size for s in shards)
    tensors_single, tensors_sharded = load_all(single), load_all(sharded)
    assert set(tensors_single) == set(tensors_sharded) == set(index["weight_map"])
    assert all(torch.equal(tensors_single[k], tensors_sharded[k]) for k in tensors_single)
    model = AutoModelForCausalLM.from_pretrained(str(sharded), device_map="cpu")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_minilm_hidden_states_like_bitsandbytes(tmp_path: Path, torch_one_thread) -> None:
    from transformers import AutoModel

    source_dir = minilm_dir()
    result = run_cli("quantize", str(source_dir), str(tmp_path / "ours"), timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    route_model = transformers_route(source_dir, tmp_path / "reference", AutoModel, torch.float32)
    differing = assert_same_tensors_up_to_nested_codes(tmp_path / "ours", tmp_path / "reference", load_all(source_dir))
    ours_model = AutoModel.from_pretrained(str(tmp_path / "ours"), device_map="cpu")
    reference_model = AutoModel.from_pretrained(str(tmp_path / "reference"), device_map="cpu")
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = ours_model(ids).last_hidden_state
        expected = reference_model(ids).last_hidden_state
        on_load = route_model(ids).last_hidden_state
    assert torch.equal(expected, on_load)
    if differing == 0:
        assert torch.equal(hidden, expected)
    else:
        assert torch.allclose(hidden.float(), expected.float(), atol=0.05, rtol=0.02)
    print(f"\nMiniLM: {differing} nested codes differ; hidden states equal: {torch.equal(hidden, expected)}")
    # The header carries qlorakit's metadata: format, options, a checksum per tensor.
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        assert metadata["format"] == "pt" and metadata["qlorakit.format_version"] == "1"
        assert set(json.loads(metadata["qlorakit.checksums"])) == set(handle.keys())
