"""transformers' own rules for 4-bit models, in one place: which modules its bitsandbytes
integration converts, and which checkpoint key feeds which model parameter.

Nothing here re-derives a rule from tensor names. The model class named in ``config.json`` is
built on the meta device and asked:

- the modules not to convert: ``HfQuantizer.get_modules_to_not_convert`` (tied weights, the
  output embeddings, the last module, ``_keep_in_fp32_modules``, the user's skips);
- the modules to convert: those ``replace_with_bnb_linear`` converts — exactly ``nn.Linear``
  (not subclasses such as Falcon's ``FalconLinear``) and GPT-2's ``Conv1D`` — matched against
  that list by ``should_convert_module``;
- the checkpoint key of each parameter: transformers 5's conversion mapping
  (``get_model_conversion_mapping``: renames such as GPT-NeoX's ``embed_out`` -> ``lm_head``,
  and converters such as the fusion of MoE experts into 3-D parameters), applied with its
  ``rename_source_key``.

The quantize tool (``qlorakit.selection``) and the loader (``qlorakit.hf_quantizer``) both call
these functions, so what is written and what is loaded follow one rule.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlorakit.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel


def load_config(directory: Path) -> PretrainedConfig:
    """``config.json`` of a model directory as transformers reads it, without any
    ``quantization_config`` (the caller decides how weights are quantized)."""
    import transformers

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a model directory)")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def model_class(config: PretrainedConfig, directory: Path) -> type[PreTrainedModel]:
    """The class named first in ``architectures`` (what ``from_pretrained`` of a task class builds)."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise CheckpointError(
            f"{directory / 'config.json'}: transformers {transformers.__version__} does not know the model class "
            f"{architectures!r}"
        )
    return cls


def build_on_meta(directory: Path) -> PreTrainedModel:
    """The model of ``directory``'s config, on the meta device (no memory, no initialization)."""
    import torch

    config = load_config(directory)
    cls = model_class(config, directory)
    with torch.device("meta"):
        return cls(config)


def modules_to_not_convert(
    model: PreTrainedModel, skip_modules: Sequence[str] | None, add_default_skips: bool
) -> list[str]:
    """transformers' list of module patterns bitsandbytes leaves in full precision. With
    ``add_default_skips=False`` it is what transformers computes when it loads a file whose
    ``llm_int8_skip_modules`` is ``skip_modules`` (a list there replaces the defaults)."""
    from transformers.quantizers.base import HfQuantizer

    return sorted(
        HfQuantizer.get_modules_to_not_convert(
            model,
            list(skip_modules) if skip_modules is not None else None,
            model._keep_in_fp32_modules,
            add_default_skips=add_default_skips,
        )
    )


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def converted_modules(model: PreTrainedModel, not_convert: Sequence[str]) -> dict[str, nn.Module]:
    """The modules ``replace_with_bnb_linear`` turns into 4-bit layers, by name."""
    from torch import nn
    from transformers.quantizers.quantizers_utils import should_convert_module

    return {
        name: module
        for name, module in model.named_modules()
        if (is_conv1d(module) or type(module) is nn.Linear) and should_convert_module(name, list(not_convert))
    }


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)``: the shape of the 4-bit layer transformers builds for ``module``."""
    rows, cols = module.weight.shape
    return (cols, rows) if is_conv1d(module) else (rows, cols)


@dataclass
class KeyMapping:
    """transformers' mapping from checkpoint keys to the parameters of one model."""

    renamings: list
    converters: list
    prefix: str
    parameters: dict

    @classmethod
    def of(cls, model: PreTrainedModel) -> KeyMapping:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = get_model_conversion_mapping(model)
        return cls(
            renamings=[m for m in mapping if isinstance(m, WeightRenaming)],
            converters=[m for m in mapping if isinstance(m, WeightConverter)],
            prefix=model.base_model_prefix,
            parameters=model.state_dict(),
        )

    def target(self, key: str) -> tuple[str, bool]:
        """``(parameter name, fused)`` for checkpoint ``key``, as ``convert_and_load_state_dict_in_model``
        resolves it; ``fused``: a converter builds the parameter from several tensors (MoE experts)."""
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.parameters)
        if renamed not in self.parameters and key in self.parameters:
            renamed, pattern = rename_source_key(key, [], [], self.prefix, self.parameters)
        return renamed, pattern is not None


def architecture_name(directory: Path) -> str:
    """The model class ``config.json`` names, or ``"?"``."""
    try:
        return (json.loads((directory / "config.json").read_text()).get("architectures") or ["?"])[0]
    except (OSError, ValueError):
        return "?"
