"""How ``qlorakit quantize`` decides what to quantize: transformers' plan by default, decided
beside a speculative pipeline run on the name rule's guess, cached; the name rule only on request
or without a config; clear errors for models transformers cannot build or tensors that do not fit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

import qlorakit
from helpers.architectures import BY_NAME
from helpers.processes import run_cli
from qlorakit import selection
from qlorakit.errors import CheckpointError

CLI_TIMEOUT_S = 600


def tensors_of(directory: Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_same_files(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert set(ta) == set(tb)
    assert all(ta[k].dtype == tb[k].dtype and (ta[k] == tb[k]).all() for k in ta)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def copy_with_config(source: Path, copy: Path, **changes: object) -> Path:
    """A copy of the checkpoint directory ``source`` whose config.json has ``changes``."""
    copy.mkdir()
    for file in source.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name in ("llama", "gpt2"):
        BY_NAME[name].save(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def no_cache(monkeypatch) -> None:
    monkeypatch.setenv(selection.CACHE_ENV, "off")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("plan_arrives", ["after the first tensor", "after the last tensor"])
def test_speculative_run_gives_the_plans_output(sources, tmp_path, monkeypatch, no_cache, name, plan_arrives) -> None:
    """The plan is held back until the speculative run is part way or all the way through: the
    output equals a run that had the plan first. On GPT-2 the guess is wrong (Conv1D weights are
    quantized transposed) and the run is redone; on Llama it is right and stands."""
    reference = tmp_path / "reference"
    qlorakit.quantize_checkpoint(sources[name], reference, rule="transformers")
    release, events = threading.Event(), []
    decide = selection.Plan._decide

    def delayed(self, *args) -> None:
        release.wait(timeout=60)
        decide(self, *args)

    monkeypatch.setattr(selection.Plan, "_decide", delayed)

    def progress(done: int, total: int, *_: object) -> None:
        events.append((done, total))
        if done == (1 if plan_arrives == "after the first tensor" else total):
            release.set()

    out = tmp_path / "out"
    report = qlorakit.quantize_checkpoint(sources[name], out, progress=progress)
    release.set()
    assert_same_files(out, reference)
    restarted = sum(1 for done, _ in events if done == 1) > 1
    assert restarted == (name == "gpt2")
    assert report.tensors_quantized == len(
        [k for k in tensors_of(reference) if k.endswith(".quant_state.bitsandbytes__nf4")]
    )


def test_plan_cache_hit_skips_planning_and_gives_the_same_output(sources, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(selection.CACHE_ENV, str(tmp_path / "cache"))
    first = qlorakit.quantize_checkpoint(sources["gpt2"], tmp_path / "a")
    assert first.planning_seconds > 0 and len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 1
    calls = []
    monkeypatch.setattr(selection, "_select_with_transformers", lambda *a: calls.append(a))
    second = qlorakit.quantize_checkpoint(sources["gpt2"], tmp_path / "b")
    assert not calls and second.planning_seconds == 0
    assert_same_files(tmp_path / "a", tmp_path / "b")
    # Other skip patterns are another plan; a damaged entry is decided again.
    monkeypatch.undo()
    monkeypatch.setenv(selection.CACHE_ENV, str(tmp_path / "cache"))
    qlorakit.quantize_checkpoint(sources["gpt2"], tmp_path / "c", skip=["transformer.h.1"])
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 2
    for entry in (tmp_path / "cache" / "plans").glob("*.json"):
        entry.write_text("{not json")
    qlorakit.quantize_checkpoint(sources["gpt2"], tmp_path / "d")
    assert_same_files(tmp_path / "a", tmp_path / "d")


def test_skip_patterns_add_to_transformers_defaults(sources, tmp_path, no_cache) -> None:
    report = qlorakit.quantize_checkpoint(sources["llama"], tmp_path / "out", skip=["model.layers.1"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {"lm_head", "model.layers.1"} <= set(config["llm_int8_skip_modules"])
    assert report.tensors_quantized == 7
    assert any("--skip" in line for line in report.kept)


def test_unknown_model_class_is_an_error_that_names_the_way_out(sources, tmp_path, no_cache) -> None:
    source = copy_with_config(sources["llama"], tmp_path / "src", architectures=["NoSuchModelForCausalLM"])
    with pytest.raises(CheckpointError, match="does not know the model class"):
        qlorakit.quantize_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = run_cli("quantize", str(source), str(tmp_path / "out"), "--name-rule", "--quiet", timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert len([k for k in tensors_of(tmp_path / "out") if k.endswith("bitsandbytes__nf4")]) == 14


def test_a_tensor_that_does_not_fit_its_module_is_refused(sources, tmp_path, no_cache) -> None:
    # the file's MLP weights are 384 wide
    source = copy_with_config(sources["llama"], tmp_path / "src", intermediate_size=256)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight'.*expects"):
        qlorakit.quantize_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_written_shapes_are_checked_against_the_plan(sources, tmp_path) -> None:
    from qlorakit.checkpoint import _check_written_shapes

    qlorakit.quantize_checkpoint(sources["gpt2"], tmp_path / "out")
    plan = selection.select_tensors(
        sources["gpt2"], [(t.name, t.dtype, t.shape) for t in qlorakit._core.list_tensors(str(sources["gpt2"]))], []
    )
    _check_written_shapes(tmp_path / "out", plan)  # as written: [out, in]
    name = "transformer.h.0.mlp.c_fc.weight"
    plan.expected_shapes[name] = tuple(reversed(plan.expected_shapes[name]))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' was written with shape"):
        _check_written_shapes(tmp_path / "out", plan)


def test_bare_file_uses_the_name_rule(sources, tmp_path) -> None:
    report = qlorakit.quantize_checkpoint(sources["llama"] / "model.safetensors", tmp_path / "out")
    assert report.selection_method.startswith("name rule: no config.json")
    assert report.tensors_quantized == 14


def test_verify_against_the_source_reads_conv1d_weights_transposed(sources, tmp_path) -> None:
    qlorakit.quantize_checkpoint(sources["gpt2"], tmp_path / "out")
    report = qlorakit.verify_checkpoint(tmp_path / "out", against=sources["gpt2"])
    assert report.ok, report.problems
    assert len(report.per_tensor_error) == 8
    assert all(0.05 < error < 0.12 for error in report.per_tensor_error.values()), report.per_tensor_error
