"""tools/train_lora.py --quick: QLoRA (NF4 base via quantize_checkpoint + load_packed) fine-tunes and lands
next to LoRA on the unquantized base, on real text (the stdlib's sources, byte-level).

The quick run pretrains a 0.1 M-parameter Llama for 300 steps, then fine-tunes r=16 adapters for 150 steps
twice; about 13 s on 2 quiet CPU cores (no timing is asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers.processes import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "train_lora.py"


@pytest.fixture(scope="module")
def tool():
    return load_script(SCRIPT, "qlorakit_tools_train_lora")


@pytest.fixture(scope="module")
def result(tool, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train-lora")
    return tool.run(["--quick", "--seed", "0", "--threads", "2", "--workdir", str(workdir)]), workdir


def test_splits_are_disjoint_and_deterministic(tool):
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    a, b = tool.load_corpus(root), tool.load_corpus(root)
    assert a.pretrain_files == b.pretrain_files and a.eval_files == b.eval_files
    assert bool((a.eval == b.eval).all())
    pretrain, finetune, evaluation = set(a.pretrain_files), set(a.finetune_files), set(a.eval_files)
    assert not pretrain & finetune and not pretrain & evaluation and not finetune & evaluation
    assert all(f.split("/")[0] in tool.HELD_OUT_PACKAGES for f in finetune | evaluation)
    assert not any(f.split("/")[0] in ("site-packages", "test") for f in pretrain)


def test_qlora_learns_and_matches_lora(result):
    out, workdir = result
    qlora, lora = out["qlora"], out["lora"]
    for run in (qlora, lora):
        assert all(math.isfinite(loss) for _, loss in run["curve"] + run["eval_curve"])
    # Same adapters, same init (same seed, same module order) and the same batches in the same order.
    assert qlora["trainable_params"] == lora["trainable_params"] > 0
    assert qlora["adapter_init_checksum"] == lora["adapter_init_checksum"]
    assert [s for s, _ in qlora["curve"]] == [s for s, _ in lora["curve"]]
    # Fine-tuning the adapters on the 4-bit base lowers the held-out eval loss well below its start. Measured
    # (CPython 3.11.7 stdlib, 2 threads, seeds 0/1/2/3): final/start = 0.883, 0.889, 0.888, 0.899 (-10 to -12%; part is
    # domain adaptation, part further learning of a briefly pretrained base). 0.93 leaves room for other
    # stdlib versions and thread counts while still failing if the adapters barely train.
    assert qlora["eval_final"] < 0.93 * qlora["eval_start"], (qlora["eval_start"], qlora["eval_final"])
    assert lora["eval_final"] < 0.93 * lora["eval_start"]
    # QLoRA lands next to LoRA, as in the QLoRA paper. Measured (same runs): before fine-tuning NF4 costs +0.04%
    # to +0.22% eval loss; after it the gap is -0.17% to +0.26%. 2% is ~8x the worst measured. The base gap is
    # the sensitive check, since the adapters partly repair a bad base: dequantized weights with their rows
    # rolled by one measured +114% before / +6.5% after fine-tuning, weights scaled by 0.8 +4.0% / +0.2%.
    assert abs(out["base_relative_gap"]) < 0.02, out["base_relative_gap"]
    assert abs(out["relative_gap"]) < 0.02, out["relative_gap"]
    # The artifacts: the bf16 base, its NF4 packing, and the QLoRA adapter in PEFT's format.
    assert (workdir / "base-bf16" / "config.json").is_file()
    assert (workdir / "base-nf4" / "model.safetensors").is_file()
    assert (workdir / "qlora-adapter" / "adapter_model.safetensors").is_file()


def test_rejects_zero_steps(tool, tmp_path):
    with pytest.raises(ValueError, match="must be positive"):
        tool.run(["--quick", "--finetune-steps", "0", "--workdir", str(tmp_path)])
