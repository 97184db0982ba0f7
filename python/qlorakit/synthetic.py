"""Deterministic synthetic checkpoints: TinyLlama-1.1B's architecture with seeded weights.

Used by ``qlorakit demo`` (the embedded default workload) and by
``tools/make_test_checkpoint.py`` (the 1.1B benchmark checkpoint). The model is built on
the meta device (no default initialization runs), given uninitialized bf16 storage, and
each tensor is filled from its own generator seeded from the tensor's name, so the bytes
depend neither on fill order nor thread count, and ``layers=N`` gives the first N layers
of the full model.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlorakit.formats import DEFAULT_MAX_SHARD_SIZE

INIT_STD = 0.02
TINYLLAMA_LAYERS = 22


def tinyllama_config(layers: int) -> LlamaConfig:
    """TinyLlama-1.1B's configuration with ``layers`` decoder layers, in bf16."""
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=INIT_STD,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=1,
        eos_token_id=2,
        dtype=torch.bfloat16,
    )


def empty_model(config: LlamaConfig) -> LlamaForCausalLM:
    """The model with uninitialized bf16 CPU storage; built on meta, so no default init runs."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).to_empty(device="cpu")


def tensor_seed(base_seed: int, name: str) -> int:
    """A per-tensor seed, stable across runs, layer counts and fill orders."""
    return (base_seed << 32) | zlib.crc32(name.encode())


@torch.no_grad()
def fill_weights(model: LlamaForCausalLM, base_seed: int) -> int:
    """Fills every parameter in place: ones for norms, normal(0, INIT_STD) otherwise. Returns the count."""
    count = 0
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            generator = torch.Generator().manual_seed(tensor_seed(base_seed, name))
            param.normal_(0.0, INIT_STD, generator=generator)
        count += param.numel()
    return count


def write_synthetic_llama(
    out: Path, layers: int = TINYLLAMA_LAYERS, seed: int = 0, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
) -> int:
    """Writes the checkpoint as a Hugging Face directory; returns the parameter count."""
    model = empty_model(tinyllama_config(layers))
    params = fill_weights(model, seed)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return params
