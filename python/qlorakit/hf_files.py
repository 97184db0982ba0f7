"""The non-weight files of a Hugging Face model directory: ``config.json`` with the
``quantization_config`` transformers writes for bitsandbytes 4-bit, and the tokenizer and
generation files, copied unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

#: Files that hold weights or their index; never copied (the output has its own).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf", ".ckpt")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: Sequence[str]) -> dict:
    """``quantization_config`` as transformers serializes a ``BitsAndBytesConfig`` (4-bit)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules) or None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def is_bnb_4bit(quant_config: object) -> bool:
    """Whether a ``config.json`` ``quantization_config`` (a dict) is bitsandbytes' 4-bit one (either
    spelling transformers has written of its ``load_in_4bit``)."""
    if not isinstance(quant_config, dict):
        return False
    return bool(quant_config.get("load_in_4bit") or quant_config.get("_load_in_4bit"))


def write_config(source_dir: Path | None, out_dir: Path, quant_config: dict) -> None:
    """Copies ``config.json`` (when there is one) with ``quantization_config`` added."""
    if source_dir is None or not (source_dir / "config.json").is_file():
        return
    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = quant_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_other_files(source_dir: Path | None, out_dir: Path) -> list[str]:
    """Copies tokenizer, generation and other non-weight files (and folders) unchanged."""
    if source_dir is None:
        return []
    copied = []
    for entry in sorted(source_dir.iterdir()):
        name = entry.name
        if name == "config.json" or name in WEIGHT_INDEX_NAMES or name.startswith("."):
            continue
        if entry.is_file() and not name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(entry, out_dir / name)
            copied.append(name)
        elif entry.is_dir():
            shutil.copytree(entry, out_dir / name, ignore=shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES)))
            copied.append(name + "/")
    return copied
