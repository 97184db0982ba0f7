"""PyTorch modules: ``Linear4bit``."""

from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.peft_hook import install as _install_peft_dispatch

# PEFT's LoRA wraps these layers with qlorakit.peft_lora.LoraLinear4bit (see qlorakit.peft_hook).
_install_peft_dispatch()

__all__ = ["Linear4bit"]
