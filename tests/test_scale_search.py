"""Scale search on real data: the real MiniLM checkpoint, real sentences, real loaders.

The searched checkpoint must load in transformers + bitsandbytes and in qlorakit, and move
the model's sentence embeddings closer to the float model's than absmax NF4 does;
importance vectors collected from real text must lower the activation-weighted error.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlorakit
from helpers.checkpoints import minilm_dir
from helpers.processes import run_cli

# Standard-library modules whose docstrings supply the sentences (text every machine has).
DOC_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "csv",
    "datetime",
    "decimal",
    "email.message",
    "functools",
    "http.client",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "threading",
    "unittest",
    "urllib.parse",
    "zipfile",
)
SENTENCES = 300


def stdlib_sentences(count: int = SENTENCES) -> list[str]:
    """Distinct English sentences (6 to 40 words) from standard-library docstrings, in a
    fixed order."""
    seen: dict[str, None] = {}
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(module)] + [
            inspect.getdoc(obj) for name, obj in sorted(vars(module).items()) if not name.startswith("_")
        ]
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                if 6 <= len(sentence.split()) <= 40 and sentence[0].isupper() and sentence.endswith("."):
                    seen.setdefault(sentence)
                if len(seen) >= count:
                    return list(seen)
    raise AssertionError(f"only {len(seen)} sentences found")


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling over tokens, L2-normalized."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def quantized_minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("minilm")
    out = {}
    for name, flags in (("absmax", ()), ("search", ("--scale-search",))):
        out[name] = root / name
        result = run_cli("quantize", str(minilm_dir()), str(out[name]), *flags)
        assert result.returncode == 0, result.stderr
        if name == "search":
            # The summary states the error with and without the search.
            line = next(ln for ln in result.stdout.splitlines() if ln.startswith("scale search:"))
            reduction = float(re.search(r"squared error ([0-9.]+)% lower", line).group(1))
            print(f"\n{line}")
            assert reduction >= 10.0, line
    return out


def test_searched_checkpoint_verifies_and_no_tensor_is_worse(quantized_minilm: dict[str, Path]) -> None:
    source = minilm_dir()
    absmax = qlorakit.verify_checkpoint(quantized_minilm["absmax"], against=source)
    search = qlorakit.verify_checkpoint(quantized_minilm["search"], against=source)
    assert absmax.ok and search.ok
    assert search.per_tensor_error.keys() == absmax.per_tensor_error.keys()
    worse = [k for k in absmax.per_tensor_error if search.per_tensor_error[k] > absmax.per_tensor_error[k]]
    assert not worse


def test_sentence_embeddings_move_closer_to_the_float_model(quantized_minilm: dict[str, Path]) -> None:
    from transformers import AutoModel, AutoTokenizer

    sentences = stdlib_sentences()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    reference = embed(AutoModel.from_pretrained(str(minilm_dir())).eval(), batch)
    cosine: dict[str, float] = {}
    for name, path in quantized_minilm.items():
        # transformers + bitsandbytes, as any consumer of the checkpoint loads it ...
        bnb_model = AutoModel.from_pretrained(str(path), device_map="cpu", dtype=torch.float32).eval()
        cosine[f"transformers {name}"] = float((embed(bnb_model, batch) * reference).sum(-1).mean())
        # ... and qlorakit's own loader.
        ours = qlorakit.load_packed(path, device="cpu", compute_dtype=torch.float32).eval()
        cosine[f"qlorakit {name}"] = float((embed(ours, batch) * reference).sum(-1).mean())
    print(f"\nmean cosine to the float model's embeddings over {len(sentences)} sentences: {cosine}")
    for loader in ("transformers", "qlorakit"):
        assert cosine[f"{loader} search"] > cosine[f"{loader} absmax"], cosine
        assert cosine[f"{loader} absmax"] > 0.95, cosine  # both are still the same model


def test_importance_from_real_text_lowers_the_activation_weighted_error(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(minilm_dir())).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    sentences = stdlib_sentences()
    calibration = [tokenizer(s, return_tensors="pt") for s in sentences[:100]]
    vectors = qlorakit.collect_importance(model, calibration)
    weights = {k: v for k, v in load_file(str(minilm_dir() / "model.safetensors")).items() if k in vectors}
    assert len(weights) >= 30 and all(vectors[k].shape == (w.shape[1],) for k, w in weights.items())

    plain_total = weighted_total = 0.0
    for name, weight in weights.items():
        importance = vectors[name]
        plain = qlorakit.dequantize(qlorakit.quantize(weight, scale_search=True), torch.float32)
        weighted = qlorakit.dequantize(
            qlorakit.quantize(weight, scale_search=True, importance=importance), torch.float32
        )
        # The error that reaches the layer's output: each column weighted by E[x_j^2].
        plain_total += float(((plain - weight).pow(2) * importance).sum())
        weighted_total += float(((weighted - weight).pow(2) * importance).sum())
    print(f"\nactivation-weighted squared error: plain search {plain_total:.4f}, with importance {weighted_total:.4f}")
    assert weighted_total < 0.97 * plain_total

    # The same vectors through the CLI: saved, then read by the checkpoint pipeline.
    path = qlorakit.save_importance(vectors, tmp_path / "imatrix.safetensors")
    result = run_cli("quantize", str(minilm_dir()), str(tmp_path / "out"), "--scale-search", "--importance", str(path))
    assert result.returncode == 0, result.stderr
    assert "importance-weighted on" in result.stdout


def test_bad_importance_files_are_refused_with_the_tensor_named(tmp_path: Path) -> None:
    name = "encoder.layer.0.attention.self.query.weight"
    assert name in load_file(str(minilm_dir() / "model.safetensors"))
    bad = tmp_path / "bad.safetensors"
    save_file({name: torch.ones(7)}, str(bad))
    result = run_cli("quantize", str(minilm_dir()), str(tmp_path / "a"), "--scale-search", "--importance", str(bad))
    assert result.returncode == 1
    assert str(bad) in result.stderr and name in result.stderr and "shape [384]" in result.stderr
    assert not (tmp_path / "a").exists()

    negative = tmp_path / "negative.safetensors"
    save_file({name: -torch.ones(384)}, str(negative))
    args = ("--scale-search", "--importance", str(negative))
    result = run_cli("quantize", str(minilm_dir()), str(tmp_path / "b"), *args)
    assert result.returncode == 1 and name in result.stderr and ">= 0" in result.stderr

    result = run_cli("quantize", str(minilm_dir()), str(tmp_path / "c"), "--importance", str(bad))
    assert result.returncode == 1 and "--scale-search" in result.stderr


def test_searched_metadata_records_the_options(quantized_minilm: dict[str, Path]) -> None:
    info = qlorakit.inspect_checkpoint(quantized_minilm["search"])
    assert info["options"]["scale_search"] is True
    assert json.dumps(info["options"])
