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
GEMV_MAX_BATCH: int
CPU_KERNEL_ENV: str
CPU_KERNELS_SUPPORTED: list[str]
NESTED_BLOCKSIZE: int
ELEMENT_DTYPES: list[str]

class QlorakitError(Exception): ...
class QuantizationError(QlorakitError): ...
class NonFiniteError(QuantizationError): ...

def check_format(quant_type: str, blocksize: int) -> None:
    """Raise :class:`QuantizationError` unless ``quant_type`` and ``blocksize`` are a 4-bit
    format the core knows (the wrappers ask before sizing buffers by them)."""

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
) -> SearchReport:
    """Quantize with error-optimal block scales. Without ``nested``: float32 scales into
    ``absmax``; with it: uint8 nested codes into ``absmax``, float32 nested scales into
    ``nested`` (the report's ``offset`` is theirs). ``importance``: float32 weights per
    input column."""

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
) -> GptqReport:
    """GPTQ of the row-major weight ``input [rows, cols]`` against ``hessian [cols, cols]``
    (``hessian_dtype`` float32 or float64); outputs as for ``quantize_4bit_searched`` (the
    report's ``offset`` is that of the nested scales)."""

def dequantize_4bit(
    packed: Any,
    absmax: Any,
    quant_type: str,
    blocksize: int,
    out: Any,
    dtype: str,
    nested: Any = None,
    offset: float = 0.0,
) -> None:
    """Dequantize ``packed`` into ``out`` (bytes of ``dtype`` elements). Scales: float32 ``absmax``, or with
    ``nested`` the uint8 nested codes in ``absmax``, their float32 scales in ``nested`` and ``offset``, decoded
    inline (bit-identical to ``dequantize_absmax`` first, no allocation)."""

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
    nested: Any = None,
    offset: float = 0.0,
) -> None:
    """``out = x W^T (+ bias)`` for the 4-bit weight ``[rows, cols]`` (``packed`` uint8; scales as for
    ``dequantize_4bit``) and ``x`` holding 1 to ``GEMV_MAX_BATCH`` rows of ``cols``, without materializing W. ``x``,
    ``bias`` (``rows``, or None) and ``out`` (``batch * rows``) hold ``dtype`` elements; each weight element is
    decoded as ``dequantize_4bit`` decodes it, sums accumulate in float32 in the order of the kernel
    :func:`cpu_kernel` names."""

def cpu_kernel() -> str:
    """The CPU kernel ``gemv_4bit`` runs: ``QLORAKIT_CPU_KERNEL`` if set (``portable``, ``avx2``, ``avx2bf16``,
    ``avx512``, ``avx512bf16``), else the CPU's best; raises :class:`QuantizationError` for an unknown name or a
    kernel the CPU lacks."""

def share_openmp_runtime(path: str) -> None:
    """Runs the CPU kernels' parallel tasks (gemv, dequantize) on the OpenMP runtime at ``path``, already loaded in
    this process (torch's libgomp); raises ``OSError`` if it is not loaded, not a GNU-ABI OpenMP runtime, or another
    one was shared first. Sharing the same one again is a no-op."""

def shared_openmp_runtime() -> str | None:
    """The path of the OpenMP runtime the CPU kernels share, or ``None`` (rayon's pool)."""

def double_quantize(absmax: Any, codes: Any, scales: Any) -> float:
    """Compress float32 ``absmax`` to uint8 ``codes`` and float32 ``scales`` (one per 256); return the offset."""

def dequantize_absmax(codes: Any, scales: Any, offset: float, out: Any) -> None:
    """Rebuild float32 absmax: ``map[code] * scale`` then ``+ offset``, each rounded to float32."""

def torch_order_mean(values: Any) -> float:
    """Float32 mean of ``values`` in torch's single-thread CPU summation order."""

class CheckpointError(QlorakitError): ...

CHECKSUMS_KEY: str
ERROR_SAMPLE_STRIDE: int

class TensorEntry:
    """One tensor of a safetensors file, as its header describes it; frozen."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str:
        """safetensors' dtype name (``F32``, ``BF16``, ``U8``, ...)."""
    @property
    def shape(self) -> list[int]: ...
    @property
    def file(self) -> str:
        """The safetensors file holding it."""
    @property
    def begin(self) -> int:
        """Start of its bytes in the file's data section (which follows the header)."""
    @property
    def end(self) -> int:
        """End (exclusive) of its bytes in the file's data section."""

class SafetensorsHeader:
    """One safetensors file's header (validated); frozen."""

    @property
    def file(self) -> str: ...
    @property
    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (empty without one)."""
    @property
    def tensors(self) -> list[TensorEntry]:
        """Its tensors, in file order."""

def list_tensors(source: str) -> list[TensorEntry]:
    """Every tensor of a checkpoint directory or file, file by file in file order."""

def read_header(path: str) -> SafetensorsHeader:
    """The metadata and tensors of one safetensors file (validated)."""

def tensor_checksums(path: str) -> dict[str, str]:
    """CRC-32 (hex) of every tensor's bytes in one safetensors file."""

class QuantizeOptions:
    """How :func:`quantize_checkpoint` quantizes; frozen. The constructor validates (``ValueError``
    naming the option: an unknown ``quant_type`` or ``blocksize``, ``importance`` without
    ``scale_search``, a negative or non-finite ``gptq_damp``)."""

    def __init__(
        self,
        *,
        quant_type: str,
        blocksize: int,
        double_quant: bool,
        max_shard_bytes: int,
        threads: int | None = None,
        scale_search: bool = False,
        importance: str | None = None,
        durable: bool = True,
        hessians: str | None = None,
        gptq_damp: float = 0.01,
    ) -> None: ...
    @property
    def quant_type(self) -> str: ...
    @property
    def blocksize(self) -> int: ...
    @property
    def double_quant(self) -> bool: ...
    @property
    def max_shard_bytes(self) -> int:
        """Largest output shard in bytes (a bigger single tensor gets a shard of its own)."""
    @property
    def threads(self) -> int | None:
        """Worker threads (None: all cores)."""
    @property
    def scale_search(self) -> bool: ...
    @property
    def importance(self) -> str | None:
        """The importance file (safetensors) weighting the scale search, if any."""
    @property
    def durable(self) -> bool:
        """Whether every shard is synced to disk before it counts as written."""
    @property
    def hessians(self) -> str | None:
        """The calibration Hessian file (safetensors) of GPTQ, if any."""
    @property
    def gptq_damp(self) -> float:
        """GPTQ's relative damping of each Hessian (``damp * mean(diag(H))`` on its diagonal)."""

class SearchReport:
    """Scale search's outcome on one tensor: exact (importance-weighted) squared errors over all
    its elements, of what was written and of plain absmax quantization (bitsandbytes' bytes)."""

    @property
    def offset(self) -> float | None:
        """Double quantization's offset of the written scales (None with float32 scales)."""
    @property
    def squared_error(self) -> float: ...
    @property
    def absmax_squared_error(self) -> float: ...
    @property
    def squared_norm(self) -> float: ...
    @property
    def kept_absmax(self) -> bool:
        """The search lost on this tensor after double quantization; absmax's result was written."""
    @property
    def weighted(self) -> bool:
        """An importance vector weighted the errors."""

class GptqReport:
    """GPTQ's outcome on one tensor: output errors ``tr((W - Q) H (W - Q)^T)`` on the calibration
    inputs (undamped ``H``) of the error-compensating rounding, of plain absmax quantization
    (bitsandbytes' bytes) and of the scale search alone, and which of them was written."""

    @property
    def offset(self) -> float | None:
        """Double quantization's offset of the written scales (None with float32 scales)."""
    @property
    def chosen(self) -> str:
        """``"gptq"``, or the baseline written instead (``"absmax"``, ``"searched"``)."""
    @property
    def output_error(self) -> float:
        """Error of what was written (the smallest of the three)."""
    @property
    def gptq_output_error(self) -> float: ...
    @property
    def absmax_output_error(self) -> float: ...
    @property
    def searched_output_error(self) -> float: ...

class TensorReport:
    """What happened to one source tensor of a checkpoint run."""

    @property
    def name(self) -> str: ...
    @property
    def quantized(self) -> bool:
        """Quantized (else copied unchanged)."""
    @property
    def params(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def squared_error(self) -> float:
        """Squared reconstruction error over the sampled blocks (0 for a kept tensor)."""
    @property
    def squared_norm(self) -> float:
        """Squared norm over the sampled blocks (0 for a kept tensor)."""
    @property
    def nested_offset(self) -> float | None:
        """Double quantization's offset (None when kept or with float32 scales)."""
    @property
    def search(self) -> SearchReport | None:
        """With scale search: its outcome on this tensor."""
    @property
    def gptq(self) -> GptqReport | None:
        """With a calibration Hessian for this tensor: GPTQ's outcome on it."""

class CheckpointReport:
    """The outcome of :func:`quantize_checkpoint`."""

    @property
    def tensors(self) -> list[TensorReport]:
        """One row per source tensor, in file order."""
    @property
    def shards(self) -> list[tuple[str, int]]:
        """(file name, size in bytes) of each output shard."""
    @property
    def seconds(self) -> float:
        """Wall time of the pipeline."""

def quantize_checkpoint(
    source: str,
    out_dir: str,
    selected: list[str],
    options: QuantizeOptions,
    metadata: dict[str, str],
    progress: Any = None,
    transposed: list[str] = ...,
) -> CheckpointReport:
    """Quantize the ``selected`` tensors of ``source`` (``transposed``: those stored ``[in, out]``)
    into the empty directory ``out_dir``; ``progress(tensors_done, tensors_total, bytes_done,
    bytes_total, name)`` is called after each tensor."""

def quantize_in_memory(
    source: str,
    selected: list[str],
    options: QuantizeOptions,
    outputs: list[tuple[str, Any, Any, Any]],
    progress: Any = None,
    transposed: list[str] = ...,
) -> tuple[CheckpointReport, list[tuple[str, str]]]:
    """Quantize the ``selected`` tensors of ``source`` (``transposed``: those stored ``[in, out]``)
    into ``outputs``: per selected tensor (name, codes, absmax, nested), fresh writable memory
    sized for it (``absmax`` float32, or with ``nested`` float32 scales the uint8 nested codes),
    with the bytes ``quantize_checkpoint`` writes; nothing is written to disk and the tensors left as
    stored are not read. Returns the report (no shards; the reconstruction error not measured) and
    each quantized tensor's quant_state JSON by its key."""

def quant_state_json(
    quant_type: str,
    blocksize: int,
    dtype: str,
    shape: list[int],
    nested_offset: float | None = None,
    nested_dtype: str = "float32",
) -> str:
    """The quant_state JSON bitsandbytes stores beside a weight, byte-for-byte as it writes it."""
