"""``LoraConfig``: an adapter's hyperparameters, and their form in PEFT's ``adapter_config.json``."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

#: ``target_modules`` shorthand for every linear layer but the output head (PEFT's).
ALL_LINEAR = "all-linear"
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# init_lora_weights values whose adapters only make sense on a base model modified at init time.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


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
    target_modules: list[str] | str = ALL_LINEAR
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
            if self.target_modules.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR
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
        return scaling_factor(self.lora_alpha, self.r, self.use_rslora)

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


def scaling_factor(lora_alpha: float, r: int, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
