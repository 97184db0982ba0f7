"""LoRA adapters (qlorakit.lora): targeting, training, merging, and PEFT's on-disk format both ways.

The base is a tiny transformers LlamaForCausalLM (plain nn.Linear layers, float32); PEFT 0.21 is the reference."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlorakit.lora import (
    LoraConfig,
    LoraLinear,
    add_lora,
    is_linear_like,
    load_adapter,
    lora_parameters,
    merge_lora,
    save_adapter,
    trainable_parameter_count,
)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYERS = 2


def proj_names(projs: tuple[str, ...] = ATTN + MLP) -> list[str]:
    return sorted(f"model.layers.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}" for i in range(LAYERS) for p in projs)


def make_base(seed: int = 0) -> nn.Module:
    """The same tiny Llama (same weights) on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def wrapped_names(model: nn.Module) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoraLinear))


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """Stands in for training: random lora_B (and a fresh lora_A), so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def peft():
    """PEFT itself, the reference (a test dependency: missing it is an error, not a skip)."""
    import peft as peft_module

    return peft_module


class PackedLinear(nn.Module):
    """A linear-like layer that is not nn.Linear and has no `weight` (a stand-in for qlorakit.nn.Linear4bit)."""

    def __init__(self, in_features: int, out_features: int, seed: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("packed", w.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.packed.to(x.dtype).t()


class PackedToy(nn.Module):
    """A plain nn.Module (no get_output_embeddings) with packed layers and an `lm_head`."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([PackedLinear(16, 32, 0), PackedLinear(32, 16, 1)])
        self.norm = nn.LayerNorm(16)
        torch.manual_seed(0)
        self.lm_head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# 1. all-linear ---------------------------------------------------------------------------------------------


def test_all_linear_wraps_every_projection_not_lm_head_and_starts_as_the_base():
    reference = logits(make_base())
    config = LoraConfig()
    model = add_lora(make_base(), config)

    assert wrapped_names(model) == proj_names()
    assert len(wrapped_names(model)) == 14
    assert type(model.lm_head) is nn.Linear

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in proj_names() for ab in "AB"}
    expected_count = sum(
        config.r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoraLinear)
    )
    assert trainable_parameter_count(model) == expected_count
    assert sum(p.numel() for p in lora_parameters(model)) == expected_count

    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.shape == (8, 64) and q.lora_B.weight.shape == (64, 8)
    assert q.lora_A.weight.dtype == torch.float32 and q.lora_A.weight.abs().sum() > 0
    assert not q.lora_B.weight.any()
    assert q.scaling == 2.0 and isinstance(q.lora_dropout, nn.Identity)
    assert torch.equal(logits(model), reference)


def test_is_linear_like():
    class Flagged(nn.Module):
        in_features, out_features, weight = True, 3, None

    assert is_linear_like(nn.Linear(2, 3))
    assert is_linear_like(PackedLinear(2, 3, 0))
    assert not is_linear_like(nn.Embedding(4, 2))
    assert not is_linear_like(nn.LayerNorm(4))
    assert not is_linear_like(Flagged())


def test_custom_linear_like_base_wraps_trains_saves_and_loads(tmp_path):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    reference = PackedToy()(x)
    model = add_lora(PackedToy(), LoraConfig(r=2, lora_alpha=4))
    assert wrapped_names(model) == ["layers.0", "layers.1"]  # lm_head left out by name (no get_output_embeddings)
    assert torch.equal(model(x), reference)

    randomize_adapters(model)
    out = model(x)
    assert not torch.allclose(out, reference)
    save_adapter(model, tmp_path, LoraConfig(r=2, lora_alpha=4))
    fresh = PackedToy()
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), out)

    with pytest.raises(NotImplementedError, match="Linear4bit bases are merged"):
        merge_lora(fresh)
    assert wrapped_names(fresh) == ["layers.0", "layers.1"]  # nothing changed


# 2. target_modules semantics -------------------------------------------------------------------------------


def test_suffix_and_exact_name_targets():
    model = add_lora(make_base(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert wrapped_names(model) == proj_names(("q_proj", "v_proj"))
    assert len(wrapped_names(model)) == 4

    model = add_lora(make_base(), LoraConfig(target_modules=["model.layers.1.self_attn.o_proj", "down_proj"]))
    assert wrapped_names(model) == sorted(["model.layers.1.self_attn.o_proj", *proj_names(("down_proj",))])

    # a suffix matches whole name components only ("proj" is not a suffix of "q_proj" in PEFT's sense)
    with pytest.raises(ValueError, match="'proj'"):
        add_lora(make_base(), LoraConfig(target_modules=["proj"]))


def test_regex_targets_fullmatch():
    model = add_lora(make_base(), LoraConfig(target_modules=r".*\.mlp\..*_proj"))
    assert wrapped_names(model) == proj_names(MLP)
    model = add_lora(make_base(), LoraConfig(target_modules=r"model\.layers\.0\.self_attn\.(q|k)_proj"))
    assert wrapped_names(model) == proj_names(("q_proj", "k_proj"))[:2]
    # fullmatch, not search: a pattern matching only part of the name selects nothing
    with pytest.raises(ValueError, match="no module"):
        add_lora(make_base(), LoraConfig(target_modules=r"q_proj"))
    # like PEFT, a pattern that selects a non-linear module (mlp.act_fn) is an error, not silently skipped
    with pytest.raises(ValueError, match="act_fn"):
        add_lora(make_base(), LoraConfig(target_modules=r".*\.mlp\..*"))


def test_all_linear_is_case_insensitive_and_lists_are_normalized():
    assert LoraConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    assert LoraConfig(target_modules=("v_proj", "q_proj")).target_modules == ["v_proj", "q_proj"]
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]


# 3. scaling ------------------------------------------------------------------------------------------------


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=16, lora_alpha=8).scaling == 0.5
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    model = add_lora(make_base(), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    assert q.scaling == 2.0

    randomize_adapters(model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        delta = q(x) - q.base_layer(x)
        expected = (x @ q.lora_A.weight.t() @ q.lora_B.weight.t()) * 2.0
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_dropout_and_dtypes():
    model = add_lora(make_base().to(torch.bfloat16), LoraConfig(lora_dropout=0.1, target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_dropout, nn.Dropout) and q.lora_dropout.p == 0.1
    assert q.adapter_dtype == torch.float32
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16

    model = add_lora(make_base(), LoraConfig(target_modules=["q_proj"]), adapter_dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.dtype == q.lora_B.weight.dtype == torch.bfloat16
    assert q(torch.randn(2, 64)).dtype == torch.float32


# 4. PEFT interop -------------------------------------------------------------------------------------------


def test_config_dict_round_trip_and_fields_known_to_peft(peft):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True)
    d = config.to_peft_dict(task_type="CAUSAL_LM", base_model_name_or_path="some/model")
    assert LoraConfig.from_peft_dict(json.loads(json.dumps(d))) == config
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["inference_mode"] is True
    # every field we write is a field of peft.LoraConfig (PEFT would warn about, or old PEFT reject, others)
    assert set(d) <= set(peft.LoraConfig().to_dict())
    for unsupported in ({"use_dora": True}, {"rank_pattern": {"q_proj": 2}}, {"peft_type": "IA3"}):
        with pytest.raises(ValueError):
            LoraConfig.from_peft_dict({**d, **unsupported})


def test_peft_loads_our_adapter(peft, tmp_path):
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True)  # all-linear
    model = add_lora(make_base(), config)
    randomize_adapters(model)
    ours = logits(model)
    assert not torch.allclose(ours, logits(make_base()))
    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny-llama")

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in proj_names() for ab in "AB"}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    peft_config = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(peft_config, peft.LoraConfig)
    assert (peft_config.r, peft_config.lora_alpha, peft_config.use_rslora) == (8, 16, True)
    assert peft_config.target_modules == "all-linear"
    assert peft_config.base_model_name_or_path == "tiny-llama"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(make_base(), str(tmp_path))
    assert not [w for w in caught if "nexpected" in str(w.message) or "issing" in str(w.message)]
    prefix, suffix = "base_model.model.", ".lora_A"
    peft_wrapped = sorted(n[len(prefix) : -len(suffix)] for n, _ in peft_model.named_modules() if n.endswith(suffix))
    assert peft_wrapped == proj_names()
    assert torch.equal(logits(peft_model), ours)  # bitwise: the same ops in the same order


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside get_peft_model
@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj", "down_proj"], "all-linear"])
def test_we_load_peft_adapter(peft, tmp_path, target_modules):
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(make_base(), peft_config)
    randomize_adapters(peft_model)
    expected = logits(peft_model)
    assert not torch.allclose(expected, logits(make_base()))
    peft_model.save_pretrained(str(tmp_path))

    model = make_base()
    config = load_adapter(model, tmp_path)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 8, 0.0, False)
    expected_names = proj_names(("q_proj", "v_proj", "down_proj")) if isinstance(target_modules, list) else proj_names()
    assert wrapped_names(model) == expected_names
    assert torch.equal(logits(model), expected)


# 5. training -----------------------------------------------------------------------------------------------


def test_sgd_updates_only_lora_parameters_and_lowers_the_loss():
    model = add_lora(make_base(), LoraConfig(r=4, lora_alpha=8)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = [p.detach().clone() for p in lora_parameters(model)]
    optimizer = torch.optim.SGD(lora_parameters(model), lr=0.5)
    ids = input_ids()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params[name].grad is None, name
        assert torch.equal(params[name], before), name
    assert all(not torch.equal(p, b) for p, b in zip(lora_parameters(model), lora_before, strict=True))


# 6. merge --------------------------------------------------------------------------------------------------


def test_merge_matches_the_adapter_model():
    model = add_lora(make_base(), LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    randomize_adapters(model)
    expected = logits(model)
    q = model.model.layers[1].self_attn.q_proj
    expected_q = q.base_layer.weight + q.scaling * q.lora_B.weight @ q.lora_A.weight

    merge_lora(model)
    assert wrapped_names(model) == []
    assert all(type(model.get_submodule(n)) is nn.Linear for n in proj_names())
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, expected_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


# 7. errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_other_than_none_is_refused(bias):
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias=bias)


def test_invalid_regex_is_refused():
    with pytest.raises(ValueError, match="regex"):
        LoraConfig(target_modules=r".*(q_proj")


def test_no_match_names_the_patterns():
    with pytest.raises(ValueError, match=r"\['nonexistent_proj', 'other'\]"):
        add_lora(make_base(), LoraConfig(target_modules=["nonexistent_proj", "other"]))
    with pytest.raises(ValueError, match="nothing_here"):
        add_lora(make_base(), LoraConfig(target_modules=r"nothing_here.*"))


def test_adding_twice_and_saving_with_a_wrong_config_are_refused(tmp_path):
    model = add_lora(make_base(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="v_proj"):
        save_adapter(model, tmp_path, LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="r=8"):
        save_adapter(model, tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))


def test_load_adapter_missing_unexpected_and_misshapen_keys(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = add_lora(make_base(), config)
    save_adapter(model, tmp_path, config)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    save_file({k: v for k, v in tensors.items() if k != dropped}, path)
    fresh = make_base()
    with pytest.raises(ValueError, match=f"missing keys \\['{dropped}'\\]"):
        load_adapter(fresh, tmp_path)
    assert wrapped_names(fresh) == []  # refused before touching the model

    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, path)
    with pytest.raises(ValueError, match="unexpected keys \\['base_model.model.lm_head.lora_A.weight'\\]"):
        load_adapter(make_base(), tmp_path)

    save_file({**tensors, dropped: torch.zeros(32, 3)}, path)
    with pytest.raises(ValueError, match="wrong shapes.*v_proj.lora_B"):
        load_adapter(make_base(), tmp_path)
