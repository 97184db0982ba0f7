"""Tiny random-init models of the architectures the 4-bit path must handle, built from
transformers configs: tied and untied heads, Conv1D (GPT-2), FalconLinear, encoder-decoder
(T5), masked LM (BERT), renamed keys (GPT-NeoX), fused MoE experts (Mixtral, Qwen2-MoE),
qkv biases, fp16 and fp32 sources, and a sharded source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Sizes that suit bitsandbytes' CPU kernels (its gemm needs multiples of its tile).
HIDDEN, INTERMEDIATE, VOCAB, POSITIONS = 128, 384, 512, 256
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


LLAMA_LIKE = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": POSITIONS,
    **TOKENS,
}


@dataclass(frozen=True)
class Architecture:
    """One case of the matrix: a transformers config and model class, and the checkpoint's form."""

    name: str
    config_class: str
    model_class_name: str
    config: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16
    shard_size: str | None = None
    encoder_decoder: bool = False
    #: True when transformers converts none of its layers (Falcon's FalconLinear).
    no_4bit_layers: bool = False

    @property
    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def build(self) -> torch.nn.Module:
        import transformers

        return self.model_class(getattr(transformers, self.config_class)(**self.config))

    def save(self, directory: Path) -> None:
        """Writes the seeded model (the same weights on every call) as a checkpoint in ``dtype``."""
        torch.manual_seed(0)
        model = self.build().to(self.dtype)
        extra = {"max_shard_size": self.shard_size} if self.shard_size else {}
        model.save_pretrained(str(directory), **extra)


ARCHITECTURES = [
    Architecture("llama", "LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    Architecture("llama-tied", "LlamaConfig", "LlamaForCausalLM", {**LLAMA_LIKE, "tie_word_embeddings": True}),
    Architecture("llama-sharded", "LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE, shard_size="200KB"),
    Architecture("mistral-fp16", "MistralConfig", "MistralForCausalLM", LLAMA_LIKE, dtype=torch.float16),
    Architecture("qwen2", "Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),
    Architecture("qwen3-fp32", "Qwen3Config", "Qwen3ForCausalLM", {**LLAMA_LIKE, "head_dim": 32}, dtype=torch.float32),
    Architecture("gemma", "GemmaConfig", "GemmaForCausalLM", {**LLAMA_LIKE, "head_dim": 32}),
    Architecture("gemma2", "Gemma2Config", "Gemma2ForCausalLM", {**LLAMA_LIKE, "head_dim": 32}),
    Architecture("gemma3-text", "Gemma3TextConfig", "Gemma3ForCausalLM", {**LLAMA_LIKE, "head_dim": 32}),
    Architecture("phi3", "Phi3Config", "Phi3ForCausalLM", LLAMA_LIKE),
    Architecture(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": HIDDEN, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": POSITIONS},
    ),
    Architecture(
        "gpt-neox",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "hidden_size": HIDDEN,
            "intermediate_size": 4 * HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": VOCAB,
            "max_position_embeddings": POSITIONS,
            **TOKENS,
        },
    ),
    Architecture(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": HIDDEN,
            "ffn_dim": 4 * HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": VOCAB,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": POSITIONS,
            **TOKENS,
        },
    ),
    Architecture(
        "falcon",
        "FalconConfig",
        "FalconForCausalLM",
        {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB, **TOKENS},
        no_4bit_layers=True,
    ),
    Architecture(
        "mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        {**LLAMA_LIKE, "intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    Architecture(
        "qwen2-moe",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **LLAMA_LIKE,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 256,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    Architecture(
        "bert-mlm",
        "BertConfig",
        "BertForMaskedLM",
        {
            "hidden_size": HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 4 * HIDDEN,
            "vocab_size": VOCAB,
            "max_position_embeddings": POSITIONS,
            "pad_token_id": 0,
        },
        dtype=torch.float32,
    ),
    Architecture(
        "t5",
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "d_model": HIDDEN,
            "d_ff": 256,
            "d_kv": 32,
            "num_layers": 2,
            "num_heads": 4,
            "vocab_size": VOCAB,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
        encoder_decoder=True,
    ),
]
BY_NAME = {a.name: a for a in ARCHITECTURES}


def batch(architecture: Architecture, seed: int = 0, length: int = 12) -> dict[str, torch.Tensor]:
    """Model inputs with labels: next-token (or masked-LM) for encoders and decoders, a target
    sequence for encoder-decoders."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=generator)
    if architecture.encoder_decoder:
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (2, 6), generator=generator)}
    return {"input_ids": ids, "labels": ids.clone()}


def logits(model: torch.nn.Module, architecture: Architecture, seed: int = 1) -> torch.Tensor:
    """The model's logits on a fixed batch, without gradients. The RNG is seeded first, so in train
    mode two models of one architecture draw the same dropout masks."""
    inputs = batch(architecture, seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(**inputs).logits
