"""LoRA adapters in PEFT's on-disk format, for any linear-like base layer.

The habit followed is PEFT's ``tuners/lora``: a layer (:class:`LoraLinear`) wraps the frozen base
layer and holds the adapter state (``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``); a config
dataclass (:class:`LoraConfig`) serializes to the ``adapter_config.json`` saved next to the weights.

The base layer can be anything that behaves like ``nn.Linear`` (see :func:`is_linear_like`): a plain
``torch.nn.Linear``, bitsandbytes' ``Linear4bit``, or qlorakit's ``qlorakit.nn.Linear4bit``. Only its
``in_features``, ``out_features`` and ``forward`` are used.

On disk (verified against peft 0.21.2's ``PeftModel.save_pretrained`` for adapter ``"default"``):

- ``adapter_config.json``: PEFT's ``LoraConfig`` fields (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ...);
- ``adapter_model.safetensors``: for the wrapped module at path ``P`` of the model (e.g.
  ``model.layers.0.self_attn.q_proj`` in a ``LlamaForCausalLM``), ``base_model.model.{P}.lora_A.weight``
  (shape ``[r, in_features]``) and ``base_model.model.{P}.lora_B.weight`` (shape ``[out_features, r]``),
  metadata ``{"format": "pt"}``. PEFT strips the adapter name on save and re-inserts it on load.

So ``peft.PeftModel.from_pretrained(base, directory)`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` loads what ``PeftModel.save_pretrained`` writes (plain LoRA; DoRA, rank/alpha patterns,
``layers_to_transform``, ``modules_to_save`` and similar extensions are refused with a ``ValueError``).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit import trainer_support

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LoraConfig",
    "LoraLinear",
    "add_lora",
    "is_linear_like",
    "lora_parameters",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "trainable_parameter_count",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# PeftModel.base_model (LoraModel) .model (the wrapped transformers model): the prefix of every saved key.
_PEFT_KEY_PREFIX = "base_model.model."
_ALL_LINEAR = "all-linear"
# PEFT's TaskType values (peft/utils/peft_types.py).
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# init_lora_weights values whose adapters only make sense on a base model modified at init time.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


def is_linear_like(module: nn.Module) -> bool:
    """True for modules that behave like ``nn.Linear``: instances of ``torch.nn.Linear``, or modules with
    integer ``in_features`` and ``out_features`` attributes and a ``weight`` or ``packed`` attribute
    (a quantized linear such as ``qlorakit.nn.Linear4bit``)."""
    if isinstance(module, nn.Linear):
        return True
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    return (
        isinstance(in_features, int)
        and not isinstance(in_features, bool)
        and isinstance(out_features, int)
        and not isinstance(out_features, bool)
        and (hasattr(module, "weight") or hasattr(module, "packed"))
    )


@dataclass
class LoraConfig:
    """A LoRA adapter's hyperparameters (a subset of PEFT's ``LoraConfig``, same meanings).

    - ``r``: the adapter rank (``lora_A`` is ``[r, in_features]``, ``lora_B`` is ``[out_features, r]``).
    - ``lora_alpha``: the adapter output is multiplied by :attr:`scaling` = ``lora_alpha / r``, or
      ``lora_alpha / sqrt(r)`` with ``use_rslora`` (rsLoRA).
    - ``lora_dropout``: dropout probability on the adapter's input (0 means no dropout module).
    - ``target_modules``: which modules get an adapter, with PEFT's semantics: a list of names matches a
      module whose full name equals an entry or ends with ``"." + entry``; a string is a regular expression
      that must ``re.fullmatch`` the full module name; ``"all-linear"`` selects every linear-like module
      except the output layer (the model's ``get_output_embeddings()``, or modules named ``lm_head``).
    - ``bias``: only ``"none"`` (biases stay frozen) is supported.
    - ``modules_to_save``: serialized for PEFT; :func:`add_lora` refuses a non-empty value (not supported yet).
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = _ALL_LINEAR
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias={self.bias!r} is not supported: only bias='none' (PEFT's default)")
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == _ALL_LINEAR:
                self.target_modules = _ALL_LINEAR
            else:
                try:
                    re.compile(self.target_modules)
                except re.error as exc:
                    raise ValueError(
                        f"LoraConfig.target_modules={self.target_modules!r} is not a valid regex: {exc}"
                    ) from exc
        elif isinstance(self.target_modules, set | frozenset):
            self.target_modules = sorted(self.target_modules)
        else:
            self.target_modules = list(self.target_modules)
        if not isinstance(self.target_modules, str):
            if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
                raise ValueError(f"LoraConfig.target_modules must be non-empty names, got {self.target_modules!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def scaling(self) -> float:
        """The factor applied to ``lora_B(lora_A(x))``: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA)."""
        return _scaling(self.lora_alpha, self.r, self.use_rslora)

    def to_peft_dict(
        self,
        task_type: str | None = None,
        base_model_name_or_path: str | None = None,
        inference_mode: bool = True,
    ) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content for this config (JSON-serializable).

        Only fields that PEFT has had for many releases are written (older PEFT raises on unknown keys);
        every other PEFT field takes its default, which is plain LoRA. ``peft_version`` is left out: PEFT
        fills in its own on load. ``task_type`` is one of PEFT's ``TaskType`` values (e.g. ``"CAUSAL_LM"``) or
        None (then ``PeftModel.from_pretrained`` returns a plain ``PeftModel``)."""
        if task_type is not None and task_type not in _TASK_TYPES:
            raise ValueError(f"task_type must be None or one of {list(_TASK_TYPES)}, got {task_type!r}")
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
            "revision": None,
            "inference_mode": bool(inference_mode),
            "r": int(self.r),
            "lora_alpha": self.lora_alpha,
            "lora_dropout": float(self.lora_dropout),
            "target_modules": target,
            "use_rslora": bool(self.use_rslora),
            "bias": self.bias,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Reads PEFT's ``adapter_config.json`` content (ours or PEFT's).

        Raises ``ValueError`` for a non-LoRA adapter and for PEFT features that change what the adapter
        computes and that qlorakit does not implement (DoRA, ``rank_pattern``/``alpha_pattern``,
        ``layers_to_transform``, ``exclude_modules``, ``fan_in_fan_out``, ``lora_bias``, ...). Fields that do
        not affect the adapter's function (``task_type``, ``inference_mode``, ``peft_version``, ...) are ignored."""
        peft_type = d.get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"not a LoRA adapter config: peft_type={peft_type!r} (expected 'LORA')")
        unsupported = {
            "use_dora": lambda v: bool(v),
            "rank_pattern": lambda v: bool(v),
            "alpha_pattern": lambda v: bool(v),
            "layers_to_transform": lambda v: v is not None and v != [],
            "layers_pattern": lambda v: v is not None and v != [] and v != "",
            "exclude_modules": lambda v: bool(v),
            "fan_in_fan_out": lambda v: bool(v),
            "lora_bias": lambda v: bool(v),
            "target_parameters": lambda v: bool(v),
            "layer_replication": lambda v: bool(v),
            "trainable_token_indices": lambda v: bool(v),
            "use_qalora": lambda v: bool(v),
            "use_bdlora": lambda v: bool(v),
            "alora_invocation_tokens": lambda v: bool(v),
            "megatron_config": lambda v: bool(v),
        }
        found = [f"{k}={d[k]!r}" for k, is_set in unsupported.items() if k in d and is_set(d[k])]
        if found:
            raise ValueError(f"adapter config uses PEFT features qlorakit does not support: {', '.join(found)}")
        target = d.get("target_modules")
        if target is None:
            raise ValueError("adapter config has no target_modules")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
            warnings.warn(
                f"adapter was initialized with init_lora_weights={init!r}, which modifies the base weights; "
                "it computes the intended function only on the base model it was trained with",
                stacklevel=2,
            )
        return cls(
            r=d.get("r", 8),
            lora_alpha=d.get("lora_alpha", 8),
            lora_dropout=d.get("lora_dropout", 0.0),
            target_modules=target,
            use_rslora=bool(d.get("use_rslora", False)),
            bias=d.get("bias", "none"),
            modules_to_save=d.get("modules_to_save"),
        )


def _scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class LoraLinear(nn.Module):
    """A frozen linear-like ``base_layer`` plus a trainable low-rank update (PEFT's ``lora.Linear``).

    ``forward(x) = base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling`` for ``x`` of shape
    ``[..., in_features]``, giving ``[..., out_features]``. The adapter runs in its own dtype
    (``adapter_dtype``; ``x`` is cast to it), and the sum is cast back to the base output's dtype, as PEFT does.

    ``lora_A`` is ``nn.Linear(in_features, r, bias=False)`` (weight ``[r, in_features]``), initialized with
    ``kaiming_uniform_(a=sqrt(5))``; ``lora_B`` is ``nn.Linear(r, out_features, bias=False)`` (weight
    ``[out_features, r]``), initialized to zeros, so at initialization the output equals the base output exactly.
    The adapter is created on the base layer's device.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"LoraLinear needs a linear-like base layer, got {type(base_layer).__name__}")
        if not adapter_dtype.is_floating_point:
            raise ValueError(f"adapter_dtype must be a floating-point dtype, got {adapter_dtype}")
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = _scaling(lora_alpha, self.r, self.use_rslora)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        device = _module_device(base_layer)
        # Created in float32 and then cast, so the random stream and values do not depend on adapter_dtype.
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device)
        self.reset_lora_parameters()
        self.lora_A.to(adapter_dtype)
        self.lora_B.to(adapter_dtype)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init (``init_lora_weights=True``): A kaiming-uniform with ``a=sqrt(5)``, B zeros."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's ``weight`` (for code that reads ``module.weight``, as PEFT's layers allow)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (frozen), or None."""
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of ``lora_A``/``lora_B`` and of the adapter computation."""
        return self.lora_A.weight.dtype

    def delta_weight(self) -> torch.Tensor:
        """``scaling * lora_B.weight @ lora_A.weight`` in float32, shape ``[out_features, in_features]``:
        what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x``: ``[..., in_features]`` in the base layer's input dtype; returns ``[..., out_features]`` in
        the base output's dtype. Extra arguments go to the base layer."""
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        lora_x = x if x.dtype == self.lora_A.weight.dtype else x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(lora_x))) * self.scaling
        if not _is_dense_linear(self.base_layer):
            # PEFT's 4-bit layers round the update to the output dtype before adding it;
            # doing the same keeps outputs bit-identical to PEFT on a quantized base.
            update = update.to(result_dtype)
        return (result + update).to(result_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, adapter_dtype={self.adapter_dtype}"
        )


def _is_dense_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) with a floating-point weight; 4-bit layers subclass ``nn.Linear`` too
    (qlorakit's and bitsandbytes') but hold packed integer codes."""
    return isinstance(module, nn.Linear) and module.weight.is_floating_point()


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        out = get()
    except (NotImplementedError, AttributeError):
        return None
    return out if isinstance(out, nn.Module) else None


def _matches(target_modules: list[str] | str, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a list (exact or ``.suffix``) or a regex (``re.fullmatch``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def _find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` targets in ``model``, in ``named_modules`` order.

    An existing :class:`LoraLinear` counts as a linear-like module at its own path; nothing inside it (its
    base layer, ``lora_A``, ``lora_B``) and nothing inside another target is a candidate. A module named by
    an explicit pattern that is not linear-like is an error (as in PEFT)."""
    all_linear = config.target_modules == _ALL_LINEAR
    output_layer = _output_layer(model) if all_linear else None
    targets: list[tuple[str, nn.Module]] = []
    skip_inside: list[str] = []  # targets and existing adapters: nothing inside them is a candidate
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skip_inside):
            continue
        linear_like = isinstance(module, LoraLinear) or is_linear_like(module)
        if isinstance(module, LoraLinear):
            skip_inside.append(name)
        if all_linear:
            if not linear_like:
                continue
            if output_layer is not None:
                if module is output_layer:
                    continue
            elif name == "lm_head" or name.endswith(".lm_head"):
                continue
        elif not _matches(config.target_modules, name):
            continue
        elif not linear_like:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches {name!r} ({type(module).__name__}), which is not "
                "linear-like; LoRA is supported on torch.nn.Linear and linear-like modules (integer in_features and "
                "out_features and a weight or packed attribute)"
            )
        targets.append((name, module))
        skip_inside.append(name)
    return targets


def _lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


#: The attribute :func:`add_lora` leaves on the model: the config its adapters were built with.
CONFIG_ATTRIBUTE = "qlorakit_lora_config"


def add_lora(model: nn.Module, config: LoraConfig, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wraps every module ``config.target_modules`` selects in a :class:`LoraLinear`, in place, and freezes
    every parameter of ``model`` except the adapters' ``lora_A``/``lora_B`` weights.

    ``adapter_dtype`` is the dtype of the adapter weights and computation (float32 by default, as PEFT does).
    Returns ``model``. Raises ``ValueError`` when nothing matches (naming the patterns), when a pattern names
    a module that is not linear-like, or when ``model`` already has LoRA adapters (one adapter per model)."""
    if config.modules_to_save:
        raise NotImplementedError(f"modules_to_save={config.modules_to_save!r} is not supported yet")
    existing = _lora_modules(model)
    if existing:
        raise ValueError(
            f"model already has LoRA adapters (e.g. at {existing[0][0]!r}); qlorakit supports one adapter per model"
        )
    targets = _find_targets(model, config)
    if not targets:
        raise ValueError(f"no module of the model matches target_modules={config.target_modules!r}")
    for name, module in targets:
        _set_submodule(
            model,
            name,
            LoraLinear(
                module,
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                adapter_dtype=adapter_dtype,
            ),
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for param in lora_parameters(model):
        param.requires_grad_(True)
    setattr(model, CONFIG_ATTRIBUTE, config)
    trainer_support.attach(model)
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    """The names (in ``model.named_parameters()``) of the adapters' ``lora_A``/``lora_B`` weights."""
    return [f"{name}.{part}.weight" for name, _ in _lora_modules(model) for part in ("lora_A", "lora_B")]


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The ``lora_A`` and ``lora_B`` weights of every :class:`LoraLinear` in ``model`` (what training updates)."""
    for _, module in _lora_modules(model):
        yield module.lora_A.weight
        yield module.lora_B.weight


def trainable_parameter_count(model: nn.Module) -> int:
    """The number of elements in parameters with ``requires_grad`` (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in _lora_modules(model):
        for part in ("lora_A", "lora_B"):
            weight = getattr(module, part).weight
            tensors[f"{_PEFT_KEY_PREFIX}{name}.{part}.weight"] = weight.detach().to("cpu").contiguous()
    return tensors


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    config: LoraConfig | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format into ``directory``
    (created if needed) and returns its path.

    Tensors keep the adapter's dtype; keys are ``base_model.model.{P}.lora_A.weight`` / ``.lora_B.weight``
    for the :class:`LoraLinear` at module path ``P``. ``config`` defaults to the one :func:`add_lora` (or
    :func:`load_adapter`) built the adapters with; a given one must describe the model's adapters: the modules
    it targets must be exactly the wrapped ones, with the same rank and scaling (else ``ValueError``), so that
    PEFT and :func:`load_adapter` rebuild the same function. ``base_model_name_or_path`` defaults to the model's
    ``name_or_path`` (as PEFT does)."""
    from safetensors.torch import save_file

    wrapped = _lora_modules(model)
    if not wrapped:
        raise ValueError("model has no LoRA adapters to save (call add_lora first)")
    config = config if config is not None else getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("the model does not record the LoraConfig of its adapters: pass config=")
    targeted = [name for name, _ in _find_targets(model, config)]
    names = [name for name, _ in wrapped]
    if sorted(targeted) != sorted(names):
        raise ValueError(
            f"config.target_modules={config.target_modules!r} does not describe the model's adapters: "
            f"adapters not targeted {sorted(set(names) - set(targeted))}, "
            f"targeted modules without adapter {sorted(set(targeted) - set(names))}"
        )
    for name, module in wrapped:
        if module.r != config.r or not math.isclose(module.scaling, config.scaling, rel_tol=1e-12):
            raise ValueError(
                f"adapter {name!r} has r={module.r}, scaling={module.scaling}; config has r={config.r}, "
                f"scaling={config.scaling}"
            )
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    peft_dict = config.to_peft_dict(task_type=task_type, base_model_name_or_path=base_model_name_or_path)
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_dict, indent=2, sort_keys=True) + "\n")
    save_file(_adapter_state_dict(model), str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path = directory / ADAPTER_WEIGHTS_NAME
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_path))
    legacy = directory / _LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: neither {ADAPTER_WEIGHTS_NAME} nor {_LEGACY_WEIGHTS_NAME}")


def load_adapter(
    model: nn.Module, directory: str | os.PathLike[str], adapter_dtype: torch.dtype = torch.float32
) -> LoraConfig:
    """Loads a PEFT-format LoRA adapter (written by :func:`save_adapter` or by PEFT's ``save_pretrained``)
    into ``model``: :func:`add_lora` with the saved config, then the saved weights, cast to ``adapter_dtype``.

    Strict: every expected key must be present, no other key may be, and shapes must match (``lora_A``
    ``[r, in_features]``, ``lora_B`` ``[out_features, r]``); otherwise a ``ValueError`` naming the keys is
    raised before ``model`` is modified. Returns the adapter's :class:`LoraConfig`."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist")
    config = LoraConfig.from_peft_dict(json.loads(config_path.read_text()))
    if config.modules_to_save:
        raise NotImplementedError(f"adapter has modules_to_save={config.modules_to_save!r}, not supported yet")
    if _lora_modules(model):
        raise ValueError("model already has LoRA adapters; qlorakit supports one adapter per model")
    tensors = _read_adapter_weights(directory)

    targets = _find_targets(model, config)
    if not targets:
        raise ValueError(f"no module of the model matches the adapter's target_modules={config.target_modules!r}")
    expected: dict[str, tuple[int, int]] = {}
    for name, module in targets:
        in_features, out_features = int(module.in_features), int(module.out_features)
        expected[f"{_PEFT_KEY_PREFIX}{name}.lora_A.weight"] = (config.r, in_features)
        expected[f"{_PEFT_KEY_PREFIX}{name}.lora_B.weight"] = (out_features, config.r)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory}: adapter weights do not fit the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    wrong = [f"{k}: {tuple(t.shape)} != {expected[k]}" for k, t in tensors.items() if tuple(t.shape) != expected[k]]
    if wrong:
        raise ValueError(f"{directory}: adapter weights have the wrong shapes: {'; '.join(wrong)}")
    add_lora(model, config, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        for name, module in _lora_modules(model):
            module.lora_A.weight.copy_(tensors[f"{_PEFT_KEY_PREFIX}{name}.lora_A.weight"])
            module.lora_B.weight.copy_(tensors[f"{_PEFT_KEY_PREFIX}{name}.lora_B.weight"])
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base layer, in place: each :class:`LoraLinear` is replaced by its base layer
    with weight ``W + scaling * B @ A`` (computed in float32) and the same bias. An ``nn.Linear`` base (or subclass)
    keeps its class, dtype and device; a 4-bit ``qlorakit.nn.Linear4bit`` base is dequantized into the layer it stands
    for (``nn.Linear``, or GPT-2's ``Conv1D``), holding the full precision weight in the dtype the checkpoint was
    quantized from (requantize it with ``qlorakit.quantize`` if a 4-bit result is wanted). Returns ``model``.

    Other bases raise ``NotImplementedError`` before anything is changed."""
    wrapped = _lora_modules(model)
    for name, module in wrapped:
        base = module.base_layer
        if not _is_dense_linear(base) and not hasattr(base, "to_dense"):
            raise NotImplementedError(
                f"merge_lora: {name!r} has a {type(base).__name__} base layer; only torch.nn.Linear and "
                "qlorakit.nn.Linear4bit bases are merged."
            )
    for name, module in wrapped:
        base = module.base_layer
        with torch.no_grad():
            if _is_dense_linear(base):
                weight, dtype = base.weight.float(), base.weight.dtype
            else:  # a 4-bit base: dequantization is exact in float32
                weight, dtype = base.dequantized_weight(torch.float32), base.weight_dtype
            merged = (weight + module.delta_weight().to(weight.device)).to(dtype)
        if _is_dense_linear(base):  # keeps its class (e.g. Falcon's FalconLinear)
            base.weight = nn.Parameter(merged, requires_grad=False)
            new = base
        else:
            new = base.to_dense(merged)
        _set_submodule(model, name, new)
    trainer_support.detach(model)
    return model
