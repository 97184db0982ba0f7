"""The QLoRA tutorial flow on qlorakit (issue 11): PEFT + ``transformers.Trainer`` written as every tutorial
writes it, with only the loading line changed; qlorakit's own adapters (``add_lora``) under ``Trainer``; TRL's
``SFTTrainer`` with ``peft_config``. Checkpoints hold the adapter (never the model), and resuming from one
ends on exactly the weights of an uninterrupted run.

Tiny models: OPT (tied head) and Llama. Training data: bytes of the standard library's ``os.py`` as token ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qlorakit
from helpers.architectures import BY_NAME, VOCAB, logits

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

STEPS, SAVE_EVERY, LENGTH = 4, 2, 32


@pytest.fixture(scope="module")
def packed_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer")
    dirs = {}
    for name in ("opt", "llama"):
        BY_NAME[name].save(root / f"{name}-src")
        qlorakit.quantize_checkpoint(root / f"{name}-src", root / f"{name}-nf4")
        dirs[name] = root / f"{name}-nf4"
    return dirs


def text_dataset(rows: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.tensor(list(Path(os.__file__).read_bytes()[: rows * LENGTH])) % (VOCAB - 3) + 3
    chunks = ids.reshape(rows, LENGTH)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in chunks]


def training_args(output_dir: Path):  # noqa: ANN201 (transformers.TrainingArguments)
    from transformers import TrainingArguments

    return TrainingArguments(
        str(output_dir),
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def assert_adapter_checkpoint(directory: Path, expect_trainer_weights: bool) -> None:
    files = set(os.listdir(directory))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= files, files
    assert "config.json" not in files, files  # never a directory a loader mistakes for the model
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys), keys[:4]
    assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert ("model.safetensors" in files) == expect_trainer_weights, files


def tutorial_run(packed: Path, output_dir: Path, resume: Path | None = None) -> torch.nn.Module:
    """The tutorial, verbatim but for the loading line."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, default_data_collator

    model = qlorakit.from_pretrained(packed)  # tutorials: from_pretrained(..., quantization_config=bnb_config)
    model = prepare_model_for_kbit_training(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainer = Trainer(
        model=model, args=training_args(output_dir), train_dataset=text_dataset(), data_collator=default_data_collator
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_tutorial_flow_with_peft_and_trainer(name: str, packed_dirs: dict[str, Path], tmp_path) -> None:
    from peft import PeftModel, prepare_model_for_kbit_training

    from qlorakit.peft_lora import LoraLinear4bit

    packed = packed_dirs[name]
    trained = tutorial_run(packed, tmp_path / "run")
    assert any(isinstance(m, LoraLinear4bit) for m in trained.modules())
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        assert_adapter_checkpoint(tmp_path / "run" / f"checkpoint-{step}", expect_trainer_weights=False)
    final = adapter_weights(trained)
    start = adapter_weights(peft.get_peft_model(qlorakit.from_pretrained(packed), trained.peft_config["default"]))
    assert any(not torch.equal(final[k], start[k]) for k in final)  # training moved the adapter

    resumed = tutorial_run(packed, tmp_path / "resumed", resume=tmp_path / "run" / f"checkpoint-{SAVE_EVERY}")
    again = adapter_weights(resumed)
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)

    base = prepare_model_for_kbit_training(qlorakit.from_pretrained(packed))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / f"checkpoint-{STEPS}"))
    architecture = BY_NAME[name]
    assert torch.equal(logits(reloaded.eval(), architecture), logits(trained.eval(), architecture))


def native_run(packed: Path, output_dir: Path, resume: Path | None = None) -> torch.nn.Module:
    from transformers import Trainer, default_data_collator

    model = qlorakit.from_pretrained(packed)
    qlorakit.prepare_for_kbit_training(model)
    qlorakit.add_lora(model, qlorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    trainer = Trainer(
        model=model, args=training_args(output_dir), train_dataset=text_dataset(), data_collator=default_data_collator
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model


def test_add_lora_route_with_trainer(packed_dirs: dict[str, Path], tmp_path) -> None:
    packed, architecture = packed_dirs["llama"], BY_NAME["llama"]
    trained = native_run(packed, tmp_path / "run")
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"
    assert_adapter_checkpoint(checkpoint, expect_trainer_weights=True)
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:  # the adapter alone, for Trainer's resume
        assert all(".lora_" in k for k in f.keys()) and f.metadata()["qlorakit"].startswith("lora adapter only")

    resumed = native_run(packed, tmp_path / "resumed", resume=checkpoint)
    final, again = adapter_weights(trained), adapter_weights(resumed)
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)

    base = qlorakit.from_pretrained(packed)
    qlorakit.prepare_for_kbit_training(base)
    qlorakit.load_adapter(base, tmp_path / "run" / f"checkpoint-{STEPS}")
    assert torch.equal(logits(base.eval(), architecture), logits(trained.eval(), architecture))

    qlorakit.merge_lora(trained)  # without adapters, save_pretrained is the model's own again
    assert "save_pretrained" not in trained.__dict__ and not trained._hf_peft_config_loaded


def byte_tokenizer():  # noqa: ANN201 (a transformers PreTrainedTokenizerFast)
    """A character-level tokenizer over the first ids of the tiny models' vocabulary (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = Path(os.__file__).read_text()
    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab = {**specials, **{c: i + len(specials) for i, c in enumerate(sorted(set(text))[: VOCAB - len(specials)])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sft_trainer_with_peft_config(packed_dirs: dict[str, Path], tmp_path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from qlorakit.peft_lora import LoraLinear4bit

    lines = [line for line in Path(os.__file__).read_text().splitlines() if len(line) > 20][:16]
    args = SFTConfig(
        str(tmp_path / "sft"),
        max_steps=3,
        save_steps=3,
        per_device_train_batch_size=2,
        max_length=48,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=qlorakit.from_pretrained(packed_dirs["llama"]),
        args=args,
        train_dataset=Dataset.from_dict({"text": lines}),
        processing_class=byte_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    before = adapter_weights(trainer.model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(isinstance(m, LoraLinear4bit) for m in trainer.model.modules())
    after = adapter_weights(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert_adapter_checkpoint(tmp_path / "sft" / "checkpoint-3", expect_trainer_weights=False)
