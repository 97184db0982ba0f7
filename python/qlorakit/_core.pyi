"""Native core of qlorakit (Rust, PyO3). Buffers are numpy arrays or memoryviews of raw
bytes; the functions release the GIL while they work. Use the wrappers in
``qlorakit.quantization`` rather than calling these directly."""

from typing import Any

__version__: str
NF4_CODE: list[float]
FP4_CODE: list[float]
DYNAMIC_MAP: list[float]
QUANT_TYPES: list[str]
QUANT_STATE_MARKER: str
BLOCKSIZES: list[int]
DEFAULT_BLOCKSIZE: int
GEMV_SIMD: bool
NESTED_BLOCKSIZE: int
ELEMENT_DTYPES: list[str]

class QlorakitError(Exception): ...
class QuantizationError(QlorakitError): ...
class NonFiniteError(QuantizationError): ...

def quantize_4bit(input: Any, dtype: str, quant_type: str, blocksize: int, packed: Any, absmax: Any) -> None:
    """Quantize ``input`` (bytes of ``dtype`` elements) into ``packed`` (uint8, ceil(n/2))
    and ``absmax`` (float32, ceil(n/blocksize))."""

def quantize_4bit_searched(
    input: Any,
    dtype: str,
    quant_type: str,
    blocksize: int,
    packed: Any,
    absmax: Any,
    nested: Any = None,
    importance: Any = None,
) -> tuple[float | None, float, float, float, bool]:
    """Quantize with error-optimal block scales. Without ``nested``: float32 scales into
    ``absmax``; with it: uint8 nested codes into ``absmax``, float32 nested scales into
    ``nested``. ``importance``: float32 weights per input column. Returns ``(offset,
    squared_error, absmax_squared_error, squared_norm, kept_absmax)``."""

def quantize_4bit_gptq(
    input: Any,
    dtype: str,
    rows: int,
    hessian: Any,
    hessian_dtype: str,
    quant_type: str,
    blocksize: int,
    packed: Any,
    absmax: Any,
    nested: Any = None,
    scale_search: bool = True,
    damp: float = 0.01,
) -> tuple[float | None, str, float, float, float, float]:
    """GPTQ of the row-major weight ``input [rows, cols]`` against ``hessian [cols, cols]``
    (``hessian_dtype`` float32 or float64); outputs as for ``quantize_4bit_searched``. Returns
    ``(offset, chosen, output_error, gptq_output_error, absmax_output_error,
    searched_output_error)``, ``chosen`` one of "gptq", "absmax", "searched"."""

def dequantize_4bit(packed: Any, absmax: Any, quant_type: str, blocksize: int, out: Any, dtype: str) -> None:
    """Dequantize ``packed`` with float32 ``absmax`` into ``out`` (bytes of ``dtype`` elements)."""

def gemv_4bit(
    packed: Any,
    absmax: Any,
    quant_type: str,
    blocksize: int,
    rows: int,
    cols: int,
    x: Any,
    dtype: str,
    out: Any,
    bias: Any = None,
) -> None:
    """``out = W x (+ bias)`` for the 4-bit weight ``[rows, cols]`` (``packed`` uint8, float32
    ``absmax``) and one input row ``x`` (``cols`` elements), without materializing W. ``x``,
    ``bias`` (``rows``, or None) and ``out`` (``rows``) hold ``dtype`` elements; each weight
    element is decoded as ``dequantize_4bit`` decodes it, sums accumulate in float32."""

def double_quantize(absmax: Any, codes: Any, scales: Any) -> float:
    """Compress float32 ``absmax`` to uint8 ``codes`` and float32 ``scales`` (one per 256); return the offset."""

def dequantize_absmax(codes: Any, scales: Any, offset: float, out: Any) -> None:
    """Rebuild float32 absmax: ``map[code] * scale`` then ``+ offset``, each rounded to float32."""

def torch_order_mean(values: Any) -> float:
    """Float32 mean of ``values`` in torch's single-thread CPU summation order."""

class CheckpointError(QlorakitError): ...

CHECKSUMS_KEY: str
ERROR_SAMPLE_STRIDE: int

def list_tensors(source: str) -> list[tuple[str, str, list[int], str]]:
    """(name, safetensors dtype, shape, file) of every tensor of a checkpoint directory or file."""

def read_header(path: str) -> tuple[dict[str, str], list[tuple[str, str, list[int], int, int]]]:
    """Metadata and (name, dtype, shape, begin, end) entries of one safetensors file (validated)."""

def tensor_checksums(path: str) -> dict[str, str]:
    """CRC-32 (hex) of every tensor's bytes in one safetensors file."""

def quantize_checkpoint(
    source: str,
    out_dir: str,
    selected: list[str],
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    max_shard_bytes: int,
    metadata: dict[str, str],
    threads: int | None = None,
    progress: Any = None,
    scale_search: bool = False,
    importance: str | None = None,
    transposed: list[str] = ...,
    durable: bool = True,
    hessians: str | None = None,
    gptq_damp: float = 0.01,
) -> dict[str, Any]:
    """Quantize the ``selected`` tensors of ``source`` into the empty directory ``out_dir``
    (``durable=False``: leave the shards to the page cache, no fsync)."""

def quant_state_json(
    quant_type: str,
    blocksize: int,
    dtype: str,
    shape: list[int],
    nested_offset: float | None = None,
    nested_dtype: str = "float32",
) -> str:
    """The quant_state JSON bitsandbytes stores beside a weight, byte-for-byte as it writes it."""
