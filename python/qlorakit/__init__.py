"""qlorakit: QLoRA on little hardware — fast CPU NF4/FP4 quantization, bit-exact with
bitsandbytes, in files the Hugging Face ecosystem loads."""

from qlorakit._core import __version__
from qlorakit.errors import NonFiniteError, QlorakitError, QuantizationError
from qlorakit.packed import PackedWeight
from qlorakit.quantization import decode_absmax, dequantize, quantize

__all__ = [
    "NonFiniteError",
    "PackedWeight",
    "QlorakitError",
    "QuantizationError",
    "__version__",
    "decode_absmax",
    "dequantize",
    "quantize",
]
