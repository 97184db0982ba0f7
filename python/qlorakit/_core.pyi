"""Native core of qlorakit (Rust, PyO3). Buffers are numpy arrays or memoryviews of raw
bytes; the functions release the GIL while they work. Use the wrappers in
``qlorakit.quantization`` rather than calling these directly."""

from typing import Any

__version__: str
NF4_CODE: list[float]
FP4_CODE: list[float]
DYNAMIC_MAP: list[float]
BLOCKSIZES: list[int]
DEFAULT_BLOCKSIZE: int
NESTED_BLOCKSIZE: int
ELEMENT_DTYPES: list[str]

class QlorakitError(Exception): ...
class QuantizationError(QlorakitError): ...
class NonFiniteError(QuantizationError): ...

def quantize_4bit(input: Any, dtype: str, quant_type: str, blocksize: int, packed: Any, absmax: Any) -> None:
    """Quantize ``input`` (bytes of ``dtype`` elements) into ``packed`` (uint8, ceil(n/2))
    and ``absmax`` (float32, ceil(n/blocksize))."""

def dequantize_4bit(packed: Any, absmax: Any, quant_type: str, blocksize: int, out: Any, dtype: str) -> None:
    """Dequantize ``packed`` with float32 ``absmax`` into ``out`` (bytes of ``dtype`` elements)."""

def double_quantize(absmax: Any, codes: Any, scales: Any) -> float:
    """Compress float32 ``absmax`` to uint8 ``codes`` and float32 ``scales`` (one per 256); return the offset."""

def dequantize_absmax(codes: Any, scales: Any, offset: float, out: Any) -> None:
    """Rebuild float32 absmax: ``map[code] * scale`` then ``+ offset``, each rounded to float32."""

def torch_order_mean(values: Any) -> float:
    """Float32 mean of ``values`` in torch's single-thread CPU summation order."""
