"""Quantize on load: ``qlorakit.from_pretrained`` on a full-precision directory, and transformers'
``from_pretrained(..., quantization_config=qlorakit.QuantizationConfig(...))``, give the model that
loading ``qlorakit quantize``'s output gives: the same modules, bytes and logits."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlorakit
from helpers.architectures import BY_NAME, Architecture, logits
from qlorakit import in_memory, scratch
from qlorakit.errors import CheckpointError
from qlorakit.nn import Linear4bit

pytestmark = pytest.mark.filterwarnings("ignore")

NAMES = ["llama", "gpt2", "opt"]
NATIVE_OPTIONS = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": torch.bfloat16}


@pytest.fixture(scope="module", params=NAMES)
def case(request, tmp_path_factory) -> dict:
    """A full-precision checkpoint and what ``quantize_checkpoint`` writes for it."""
    architecture: Architecture = BY_NAME[request.param]
    root = tmp_path_factory.mktemp(architecture.name)
    architecture.save(root / "src")
    qlorakit.quantize_checkpoint(root / "src", root / "packed")
    return {"arch": architecture, "src": root / "src", "packed": root / "packed", "root": root}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache directory of this test's own, so its scratch directories can be inspected."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QLORAKIT_CACHE", str(cache))
    return cache


def layer_names(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, Linear4bit))


def assert_same_state(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    different = [
        key for key in theirs if ours[key].dtype != theirs[key].dtype or not torch.equal(ours[key], theirs[key])
    ]
    assert not different, different[:5]


def scratch_leftovers(cache: Path) -> list[Path]:
    return list((cache / "loading").glob("qlorakit-load-*")) if (cache / "loading").is_dir() else []


def without_dtype(source: Path, destination: Path) -> Path:
    """A copy of ``source`` whose ``config.json`` records no dtype (transformers then takes the first float
    tensor's of the first file, which a state dict does not have: loaded through a scratch directory)."""
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_a_full_precision_directory_loads_as_its_packed_checkpoint(case, own_cache: Path, monkeypatch) -> None:
    architecture = case["arch"]
    reference = qlorakit.from_pretrained(case["packed"])
    written = []
    monkeypatch.setattr(qlorakit.loading, "quantize_checkpoint", lambda *a, **k: written.append(a))
    model = qlorakit.from_pretrained(case["src"])
    assert layer_names(model) == layer_names(reference) and layer_names(model)
    assert_same_state(model, reference)
    # Quantized in memory: no packed checkpoint was written, not even to a scratch directory.
    assert not written and not (own_cache / "loading").exists()
    assert model.config.name_or_path == str(case["src"])
    assert {**model.config.to_dict(), "_name_or_path": None} == {**reference.config.to_dict(), "_name_or_path": None}
    if reference.can_generate():
        assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert torch.equal(logits(model, architecture), logits(reference, architecture))
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


def test_in_memory_takes_quantize_checkpoints_options() -> None:
    """from_pretrained checks its options against quantize_checkpoint's; the in-memory route takes them all."""
    ours = inspect.signature(in_memory.quantize_in_memory).parameters
    theirs = inspect.signature(qlorakit.quantize_checkpoint).parameters
    own = ("dst", "force", "durable")
    assert {k: (p.kind, p.default) for k, p in ours.items()} == {
        k: (p.kind, p.default) for k, p in theirs.items() if k not in own
    }


def test_a_config_without_dtype_loads_through_a_scratch_directory(case, own_cache: Path, tmp_path: Path) -> None:
    source = without_dtype(case["src"], tmp_path / "src")
    qlorakit.quantize_checkpoint(source, tmp_path / "packed")
    reference = qlorakit.from_pretrained(tmp_path / "packed")
    model = qlorakit.from_pretrained(source)
    assert layer_names(model) == layer_names(reference)
    assert_same_state(model, reference)
    # The scratch checkpoint is gone; the model (memory-mapped from it) still computes.
    assert (own_cache / "loading").is_dir() and not scratch_leftovers(own_cache)
    assert torch.equal(logits(model, case["arch"]), logits(reference, case["arch"]))


def test_transformers_native_quantization_config_gives_the_same_bytes(case) -> None:
    architecture = case["arch"]
    reference = qlorakit.from_pretrained(case["packed"])
    config = qlorakit.QuantizationConfig(**NATIVE_OPTIONS)
    model = architecture.model_class.from_pretrained(str(case["src"]), quantization_config=config)
    assert type(model.hf_quantizer).__name__ == "QlorakitHfQuantizer" and not model.hf_quantizer.pre_quantized
    assert model.is_quantized and model.is_loaded_in_4bit
    assert layer_names(model) == layer_names(reference)
    assert_same_state(model, reference)
    assert torch.equal(logits(model, architecture), logits(reference, architecture))


def test_native_route_quantizes_the_stored_values_when_transformers_casts(case) -> None:
    """Loaded in float32, the bfloat16 source is cast by transformers; the 4-bit weights are still
    quantized from the stored values, as the pipeline does."""
    packed = qlorakit.from_pretrained(case["packed"])
    model = case["arch"].model_class.from_pretrained(
        str(case["src"]), quantization_config=qlorakit.QuantizationConfig(), dtype=torch.float32
    )
    assert model.get_input_embeddings().weight.dtype == torch.float32
    reference, state = packed.state_dict(), model.state_dict()
    quantized = [key for name in layer_names(packed) for key in reference if key.startswith(f"{name}.weight")]
    assert quantized and layer_names(model) == layer_names(packed)
    assert all(torch.equal(state[key], reference[key]) for key in quantized)


@pytest.mark.parametrize(
    "options",
    [
        {"quant_type": "fp4", "blocksize": 128, "double_quant": False},
        {"quant_type": "nf4", "blocksize": 256, "skip": ["mlp.down_proj"]},
        {"scale_search": True},
    ],
    ids=["fp4-128-no-dq", "skip", "scale-search"],
)
def test_quantize_options_reach_both_routes(options: dict, tmp_path: Path) -> None:
    architecture = BY_NAME["llama"]
    architecture.save(tmp_path / "src")
    qlorakit.quantize_checkpoint(tmp_path / "src", tmp_path / "packed", **options)
    reference = qlorakit.from_pretrained(tmp_path / "packed")
    assert_same_state(qlorakit.from_pretrained(tmp_path / "src", **options), reference)
    native = architecture.model_class.from_pretrained(
        str(tmp_path / "src"), quantization_config=qlorakit.QuantizationConfig(**options)
    )
    assert_same_state(native, reference)
    if "skip" in options:
        assert not any("down_proj" in name for name in layer_names(native))


def test_calibrated_options_reach_the_in_memory_route(tmp_path: Path) -> None:
    """GPTQ (in-memory Hessians, or their file) and importance-weighted scale search quantize in memory
    into the bytes quantize_checkpoint writes with them."""
    from qlorakit.calibration import collect_hessians
    from qlorakit.importance import collect_importance, save_importance

    architecture = BY_NAME["llama"]
    architecture.save(tmp_path / "src")
    model = architecture.model_class.from_pretrained(str(tmp_path / "src"), dtype=torch.float32)
    batches = [torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))]
    hessians = collect_hessians(model, batches)
    importance = save_importance(collect_importance(model, batches), tmp_path / "importance.safetensors")
    for name, options in {
        "gptq": {"hessians": hessians},
        "gptq-file": {"hessians": hessians.save(tmp_path / "hessians.safetensors"), "scale_search": True},
        "importance": {"importance": importance, "scale_search": True},
    }.items():
        qlorakit.quantize_checkpoint(tmp_path / "src", tmp_path / name, **options)
        reference = qlorakit.from_pretrained(tmp_path / name)
        assert_same_state(qlorakit.from_pretrained(tmp_path / "src", **options), reference)


def test_packed_dir_keeps_the_checkpoint_and_refuses_an_existing_one(case, tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()  # an empty directory is fine
    model = qlorakit.from_pretrained(case["src"], packed_dir=keep)
    written, expected = load_file(str(keep / "model.safetensors")), load_file(str(case["packed"] / "model.safetensors"))
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    assert json.loads((keep / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    assert torch.equal(logits(model, case["arch"]), logits(qlorakit.from_pretrained(keep), case["arch"]))
    before = (keep / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="keep"):
        qlorakit.from_pretrained(case["src"], packed_dir=keep)
    assert (keep / "model.safetensors").stat().st_mtime_ns == before
    qlorakit.from_pretrained(case["src"], packed_dir=keep, force=True, quant_type="fp4")
    assert json.loads((keep / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "fp4"


def test_transformers_native_config_on_a_packed_directory_loads_qlorakit_layers(case) -> None:
    """transformers refuses a config of another class than the checkpoint's; for a bitsandbytes
    checkpoint given qlorakit's, qlorakit loads it (its recorded options stand)."""
    architecture = case["arch"]
    config = qlorakit.QuantizationConfig(compute_dtype=torch.float32)
    model = architecture.model_class.from_pretrained(str(case["packed"]), quantization_config=config)
    reference = qlorakit.from_pretrained(case["packed"], compute_dtype=torch.float32)
    assert model.hf_quantizer.pre_quantized and layer_names(model) == layer_names(reference)
    assert all(m.compute_dtype == torch.float32 for m in model.modules() if isinstance(m, Linear4bit))
    assert_same_state(model, reference)
    assert torch.equal(logits(model, architecture), logits(reference, architecture))


class TestScratchDirectory:
    def test_in_the_cache_and_stale_ones_removed(self, case, own_cache: Path, monkeypatch, tmp_path: Path) -> None:
        stale = own_cache / "loading" / "qlorakit-load-999999999-x"
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"left by a killed run")
        seen = []
        original = qlorakit.loading.quantize_checkpoint

        def spy(src, dst, **kwargs):
            seen.append((Path(dst), kwargs.get("durable")))
            return original(src, dst, **kwargs)

        monkeypatch.setattr(qlorakit.loading, "quantize_checkpoint", spy)
        qlorakit.from_pretrained(without_dtype(case["src"], tmp_path / "src"))
        ((destination, durable),) = seen
        assert destination.parent.parent == own_cache / "loading" and durable is False
        assert not stale.exists() and not destination.exists()

    def test_system_temp_when_the_cache_is_off(self, monkeypatch) -> None:
        monkeypatch.setenv("QLORAKIT_CACHE", "off")
        with scratch.scratch_directory() as path:
            assert path.parent == Path(tempfile.gettempdir()) and path.is_dir()
        assert not path.exists()

    def test_a_ram_backed_cache_is_avoided(self, own_cache: Path, monkeypatch) -> None:
        monkeypatch.setattr(scratch, "on_ram_filesystem", lambda path: str(own_cache) in str(path))
        with scratch.scratch_directory() as path:
            assert str(own_cache) not in str(path)

    def test_ram_filesystems_are_recognized(self) -> None:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        for _, point, fstype, *_ in mounts:
            if fstype in scratch.RAM_FILESYSTEMS and Path(point).is_dir() and os.access(point, os.R_OK):
                assert scratch.on_ram_filesystem(Path(point) / "some" / "file")
        assert not scratch.on_ram_filesystem(Path(__file__))  # the repository is on a disk


class TestErrors:
    def test_missing_path(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: no such directory"):
            qlorakit.from_pretrained(tmp_path / "nope")

    def test_a_file(self, case) -> None:
        with pytest.raises(CheckpointError, match="model.safetensors: not a directory"):
            qlorakit.from_pretrained(case["src"] / "model.safetensors")

    def test_no_config(self, case, tmp_path: Path) -> None:
        shutil.copy(case["src"] / "model.safetensors", tmp_path)
        with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
            qlorakit.from_pretrained(tmp_path)

    def test_another_quantization_method(self, case, tmp_path: Path) -> None:
        source = tmp_path / "int8"
        shutil.copytree(case["src"], source)
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
        (source / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match="config.json: quantized with 'bitsandbytes', not bitsandbytes 4-bit"):
            qlorakit.from_pretrained(source)

    def test_non_finite_weight_names_file_and_tensor(
        self, case, tmp_path: Path, own_cache: Path, capfd, caplog
    ) -> None:
        source = tmp_path / "nan"
        shutil.copytree(case["src"], source)
        import transformers

        tensors = load_file(str(source / "model.safetensors"))
        name = layer_names(qlorakit.from_pretrained(case["packed"]))[-1] + ".weight"
        tensors[name].view(-1)[7] = float("nan")
        save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=rf"{source / 'model.safetensors'}: tensor '{name}'.*NaN"):
            qlorakit.from_pretrained(source)
        assert not scratch_leftovers(own_cache)
        # The native route: transformers collects the error into its load report (a warning), then raises.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_warning()
        try:
            with pytest.raises(RuntimeError, match="conversion"):
                case["arch"].model_class.from_pretrained(str(source), quantization_config=qlorakit.QuantizationConfig())
        finally:
            transformers.logging.set_verbosity(verbosity)
        logged = caplog.text + capfd.readouterr().err  # where the report goes depends on logging's setup
        assert f"{source / 'model.safetensors'}: tensor '{name}'" in logged

    def test_truncated_shard_names_it(self, case, tmp_path: Path) -> None:
        source = tmp_path / "truncated"
        shutil.copytree(case["src"], source)
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=str(source / "model.safetensors")):
            qlorakit.from_pretrained(source)

    def test_bad_and_unknown_options(self, case) -> None:
        with pytest.raises(ValueError, match="blocksize"):
            qlorakit.from_pretrained(case["src"], blocksize=7)
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            qlorakit.from_pretrained(case["src"], bogus=1)
        with pytest.raises(TypeError, match="sets \\['dst'\\]"):
            qlorakit.from_pretrained(case["src"], dst="x")
        with pytest.raises(ValueError, match="already a packed 4-bit checkpoint"):
            qlorakit.from_pretrained(case["packed"], quant_type="fp4")
        with pytest.raises(ValueError, match="quant_type"):
            qlorakit.QuantizationConfig(quant_type="int4")
        with pytest.raises(ValueError, match="compute_dtype"):
            qlorakit.QuantizationConfig(compute_dtype="int8")
        assert qlorakit.QuantizationConfig(compute_dtype="fp16").compute_dtype == "float16"
