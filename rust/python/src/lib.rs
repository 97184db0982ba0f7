//! Thin PyO3 bindings: type conversion, error mapping and GIL release around the core.
//!
//! Arrays cross as Python buffers (numpy arrays or memoryviews) of raw bytes plus a
//! dtype name; the Python package (`qlorakit/_native.py`) makes those zero-copy views
//! of numpy arrays and torch tensors. Every buffer is checked here for C-contiguity,
//! writability, length and alignment before Rust touches it.

mod checkpoint;
mod gptq;
mod loading;
mod options;
mod reports;

use half::{bf16, f16};
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use qlorakit_core::{self as core, Blocksize, Element, QuantError, QuantType};

use crate::reports::SearchReport;

create_exception!(
    _core,
    QlorakitError,
    PyException,
    "Base class of qlorakit's errors."
);
create_exception!(
    _core,
    QuantizationError,
    QlorakitError,
    "Invalid input to (de)quantization."
);
create_exception!(
    _core,
    CheckpointError,
    QlorakitError,
    "A checkpoint could not be read, quantized or written; the message names the file and tensor."
);
create_exception!(
    _core,
    NonFiniteError,
    QuantizationError,
    "The tensor holds NaN or Inf (bitsandbytes would silently encode it; qlorakit refuses)."
);

pub(crate) fn to_py_err(err: QuantError) -> PyErr {
    match err {
        QuantError::NonFinite { .. } => NonFiniteError::new_err(err.to_string()),
        other => QuantizationError::new_err(other.to_string()),
    }
}

pub(crate) fn parse_quant_type(name: &str) -> PyResult<QuantType> {
    name.parse().map_err(to_py_err)
}

pub(crate) fn parse_blocksize(size: i64) -> PyResult<Blocksize> {
    Blocksize::from_signed(size).map_err(to_py_err)
}

/// Checks a 4-bit format (the core's rules, `QuantizationError` if it has none such):
/// what the Python wrappers ask before they allocate buffers for it.
#[pyfunction]
fn check_format(quant_type: &Bound<'_, PyAny>, blocksize: i64) -> PyResult<()> {
    match quant_type.extract::<&str>() {
        Ok(name) => parse_quant_type(name)?,
        // Not a string: no such quant type either.
        Err(_) => {
            let given = quant_type.str()?.to_string();
            return Err(to_py_err(QuantError::UnsupportedQuantType(given)));
        }
    };
    parse_blocksize(blocksize)?;
    Ok(())
}

/// Checks that a buffer can be viewed as C-contiguous, aligned elements of `T`;
/// returns its start and element count.
fn checked_layout<T>(
    buffer: &PyBuffer<u8>,
    what: &str,
    writable: bool,
) -> PyResult<(*mut T, usize)> {
    if !buffer.is_c_contiguous() {
        return Err(QuantizationError::new_err(format!(
            "{what} must be C-contiguous"
        )));
    }
    if writable && buffer.readonly() {
        return Err(QuantizationError::new_err(format!(
            "{what} must be writable"
        )));
    }
    let bytes = buffer.len_bytes();
    let ptr = buffer.buf_ptr();
    let size = std::mem::size_of::<T>();
    if !bytes.is_multiple_of(size) || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(QuantizationError::new_err(format!(
            "{what} is not a whole, aligned array of {size}-byte elements"
        )));
    }
    Ok((ptr as *mut T, bytes / size))
}

/// A read-only view of a buffer as `&[T]`.
fn view<'a, T>(buffer: &'a PyBuffer<u8>, what: &str) -> PyResult<&'a [T]> {
    let (ptr, len) = checked_layout::<T>(buffer, what, false)?;
    // SAFETY: the buffer is C-contiguous, aligned for T, holds `len` elements and stays
    // alive (held by `buffer`) for 'a; T is a plain float or byte type valid for any
    // bits. Callers must not resize or mutate it from another thread during the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A writable view of a buffer as `&mut [T]`.
fn view_mut<'a, T>(buffer: &'a mut PyBuffer<u8>, what: &str) -> PyResult<&'a mut [T]> {
    let (ptr, len) = checked_layout::<T>(buffer, what, true)?;
    // SAFETY: as in `view`, and the buffer is writable; `ensure_disjoint` rules out
    // aliasing with the call's other buffers.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// Refuses calls whose output buffer overlaps another buffer of the same call.
fn ensure_disjoint(output: &PyBuffer<u8>, others: &[&PyBuffer<u8>]) -> PyResult<()> {
    let span = |b: &PyBuffer<u8>| {
        let start = b.buf_ptr() as usize;
        (start, start + b.len_bytes())
    };
    let (start, end) = span(output);
    for other in others {
        let (other_start, other_end) = span(other);
        if start < other_end && other_start < end {
            return Err(QuantizationError::new_err(
                "an output buffer overlaps another argument's memory",
            ));
        }
    }
    Ok(())
}

/// Runs `f` on the input and output views typed as `dtype`, without the GIL.
macro_rules! with_dtype {
    ($py:expr, $dtype:expr, $view:ident($buf:expr, $what:expr), |$slice:ident| $body:expr) => {
        match $dtype {
            "float32" => {
                let $slice = $view::<f32>($buf, $what)?;
                $py.detach(|| $body)
            }
            "bfloat16" => {
                let $slice = $view::<bf16>($buf, $what)?;
                $py.detach(|| $body)
            }
            "float16" => {
                let $slice = $view::<f16>($buf, $what)?;
                $py.detach(|| $body)
            }
            other => {
                return Err(QuantizationError::new_err(format!(
                    "unsupported dtype {other:?}; expected float32, bfloat16 or float16"
                )))
            }
        }
    };
}

/// Quantize `input` (bytes of `dtype` elements) into `packed` (uint8) and `absmax` (float32).
#[pyfunction]
#[pyo3(signature = (input, dtype, quant_type, blocksize, packed, absmax))]
fn quantize_4bit(
    py: Python<'_>,
    input: PyBuffer<u8>,
    dtype: &str,
    quant_type: &str,
    blocksize: i64,
    mut packed: PyBuffer<u8>,
    mut absmax: PyBuffer<u8>,
) -> PyResult<()> {
    let quant_type = parse_quant_type(quant_type)?;
    let blocksize = parse_blocksize(blocksize)?;
    ensure_disjoint(&packed, &[&input, &absmax])?;
    ensure_disjoint(&absmax, &[&input])?;
    let packed = view_mut::<u8>(&mut packed, "packed")?;
    let absmax = view_mut::<f32>(&mut absmax, "absmax")?;
    with_dtype!(py, dtype, view(&input, "input"), |values| {
        core::quantize_4bit(values, quant_type, blocksize, packed, absmax)
    })
    .map_err(to_py_err)
}

/// Quantize with error-optimal block scales instead of absmax (see the core's
/// `scale_search`). Without `nested`, `absmax` receives float32 scales; with it, `absmax`
/// receives the uint8 nested codes and `nested` the float32 nested scales.
/// `importance`: float32 weights per input column, or None. Returns the `SearchReport`
/// (with the offset of the nested scales).
#[pyfunction]
#[pyo3(signature = (input, dtype, quant_type, blocksize, packed, absmax, nested=None, importance=None))]
#[allow(clippy::too_many_arguments)]
fn quantize_4bit_searched(
    py: Python<'_>,
    input: PyBuffer<u8>,
    dtype: &str,
    quant_type: &str,
    blocksize: i64,
    mut packed: PyBuffer<u8>,
    mut absmax: PyBuffer<u8>,
    mut nested: Option<PyBuffer<u8>>,
    importance: Option<PyBuffer<u8>>,
) -> PyResult<SearchReport> {
    let quant_type = parse_quant_type(quant_type)?;
    let blocksize = parse_blocksize(blocksize)?;
    ensure_disjoint(&packed, &[&input, &absmax])?;
    ensure_disjoint(&absmax, &[&input])?;
    if let Some(nested) = &nested {
        ensure_disjoint(nested, &[&input, &packed, &absmax])?;
    }
    let packed = view_mut::<u8>(&mut packed, "packed")?;
    let weights = importance
        .as_ref()
        .map(|w| view::<f32>(w, "importance"))
        .transpose()?;
    let importance = weights
        .map(core::scale_search::Importance::new)
        .transpose()
        .map_err(to_py_err)?;
    let mut scales = match nested.as_mut() {
        Some(nested) => core::ScalesMut::Nested {
            codes: view_mut::<u8>(&mut absmax, "nested codes")?,
            scales: view_mut::<f32>(nested, "nested scales")?,
            offset: 0.0,
        },
        None => core::ScalesMut::Plain(view_mut::<f32>(&mut absmax, "absmax")?),
    };
    let report = with_dtype!(py, dtype, view(&input, "input"), |values| {
        core::scale_search::quantize_4bit_searched(
            values,
            quant_type,
            blocksize,
            importance,
            packed,
            &mut scales,
        )
    })
    .map_err(to_py_err)?;
    Ok(SearchReport::new(&report, scales.offset()))
}

/// Views the block scales of a call: `absmax` float32, or (with `nested`) uint8 nested
/// codes, `nested` their float32 scales and `offset` the offset of double quantization.
fn scales_view<'a>(
    absmax: &'a PyBuffer<u8>,
    nested: Option<&'a PyBuffer<u8>>,
    offset: f32,
) -> PyResult<core::Scales<'a>> {
    Ok(match nested {
        Some(nested) => core::Scales::Nested {
            codes: view::<u8>(absmax, "nested codes")?,
            scales: view::<f32>(nested, "nested scales")?,
            offset,
        },
        None => core::Scales::Plain(view::<f32>(absmax, "absmax")?),
    })
}

/// Dequantize `packed` into `out` (bytes of `dtype` elements). Scales: float32 `absmax`, or
/// with `nested` the uint8 nested codes in `absmax`, their float32 scales in `nested` and
/// the `offset`, decoded inline (bit-identical to `dequantize_absmax` first).
#[pyfunction]
#[pyo3(signature = (packed, absmax, quant_type, blocksize, out, dtype, nested=None, offset=0.0))]
#[allow(clippy::too_many_arguments)]
fn dequantize_4bit(
    py: Python<'_>,
    packed: PyBuffer<u8>,
    absmax: PyBuffer<u8>,
    quant_type: &str,
    blocksize: i64,
    mut out: PyBuffer<u8>,
    dtype: &str,
    nested: Option<PyBuffer<u8>>,
    offset: f32,
) -> PyResult<()> {
    let quant_type = parse_quant_type(quant_type)?;
    let blocksize = parse_blocksize(blocksize)?;
    let mut inputs = vec![&packed, &absmax];
    inputs.extend(nested.as_ref());
    ensure_disjoint(&out, &inputs)?;
    let packed = view::<u8>(&packed, "packed")?;
    let scales = scales_view(&absmax, nested.as_ref(), offset)?;
    with_dtype!(py, dtype, view_mut(&mut out, "out"), |values| {
        core::dequantize_4bit_scaled(packed, scales, quant_type, blocksize, values)
    })
    .map_err(to_py_err)
}

/// `out = x W^T (+ bias)` for the 4-bit weight `[rows, cols]` and `x` holding 1 to
/// `GEMV_MAX_BATCH` rows of `cols`, without materializing W; `x`, `bias` (`rows`) and `out`
/// (`batch * rows`) hold `dtype`. Scales as for `dequantize_4bit` (nested ones decoded
/// inline, no allocation).
#[pyfunction]
#[pyo3(signature = (packed, absmax, quant_type, blocksize, rows, cols, x, dtype, out, bias=None, nested=None, offset=0.0))]
#[allow(clippy::too_many_arguments)]
fn gemv_4bit(
    py: Python<'_>,
    packed: PyBuffer<u8>,
    absmax: PyBuffer<u8>,
    quant_type: &str,
    blocksize: i64,
    rows: usize,
    cols: usize,
    x: PyBuffer<u8>,
    dtype: &str,
    mut out: PyBuffer<u8>,
    bias: Option<PyBuffer<u8>>,
    nested: Option<PyBuffer<u8>>,
    offset: f32,
) -> PyResult<()> {
    let quant_type = parse_quant_type(quant_type)?;
    let blocksize = parse_blocksize(blocksize)?;
    let mut inputs = vec![&packed, &absmax, &x];
    inputs.extend(bias.as_ref());
    inputs.extend(nested.as_ref());
    ensure_disjoint(&out, &inputs)?;
    let packed = view::<u8>(&packed, "packed")?;
    let scales = scales_view(&absmax, nested.as_ref(), offset)?;
    // Three buffers share the element type, so the dispatch is a generic function rather
    // than `with_dtype!` (which types one).
    #[allow(clippy::too_many_arguments)]
    fn typed<T: Element>(
        py: Python<'_>,
        packed: &[u8],
        scales: core::Scales<'_>,
        quant_type: QuantType,
        blocksize: Blocksize,
        (rows, cols): (usize, usize),
        x: &PyBuffer<u8>,
        bias: Option<&PyBuffer<u8>>,
        out: &mut PyBuffer<u8>,
    ) -> PyResult<()> {
        let x = view::<T>(x, "x")?;
        let bias = bias.map(|b| view::<T>(b, "bias")).transpose()?;
        let out = view_mut::<T>(out, "out")?;
        let shape = [rows, cols];
        py.detach(|| {
            let weight = core::PackedView::new(packed, scales, quant_type, blocksize, &shape)?;
            core::gemv_4bit(&weight, x, bias, out)
        })
        .map_err(to_py_err)
    }
    let shape = (rows, cols);
    let bias = bias.as_ref();
    match dtype {
        "float32" => typed::<f32>(
            py, packed, scales, quant_type, blocksize, shape, &x, bias, &mut out,
        ),
        "bfloat16" => typed::<bf16>(
            py, packed, scales, quant_type, blocksize, shape, &x, bias, &mut out,
        ),
        "float16" => typed::<f16>(
            py, packed, scales, quant_type, blocksize, shape, &x, bias, &mut out,
        ),
        other => Err(QuantizationError::new_err(format!(
            "unsupported dtype {other:?}; expected float32, bfloat16 or float16"
        ))),
    }
}

/// The CPU kernel `gemv_4bit` runs (`portable`, `avx2`, `avx2bf16`, `avx512` or `avx512bf16`): the one
/// `QLORAKIT_CPU_KERNEL` forces, else the CPU's best. `QuantizationError` if the variable
/// names no kernel, or one this CPU lacks.
#[pyfunction]
fn cpu_kernel() -> PyResult<&'static str> {
    core::GemvKernel::selected()
        .map(core::GemvKernel::name)
        .map_err(to_py_err)
}

/// Runs the CPU kernels' parallel tasks (gemv, dequantize) on the OpenMP runtime at `path`,
/// which must already be loaded in this process (torch's libgomp), so that they share one
/// team of threads with the host's kernels. `OSError` if it is not loaded or not a GNU-ABI
/// OpenMP runtime, or if another one was shared first; sharing the same one again is a no-op.
#[pyfunction]
fn share_openmp_runtime(path: std::path::PathBuf) -> PyResult<()> {
    core::parallel::share_openmp_runtime(&path)
        .map_err(|err| pyo3::exceptions::PyOSError::new_err(err.to_string()))
}

/// The path of the OpenMP runtime the CPU kernels share, or `None` (rayon's pool).
#[pyfunction]
fn shared_openmp_runtime() -> Option<&'static str> {
    core::parallel::shared_openmp_runtime()
}

/// Double-quantize float32 `absmax` into `codes` (uint8) and `scales` (float32); returns the offset.
#[pyfunction]
fn double_quantize(
    py: Python<'_>,
    absmax: PyBuffer<u8>,
    mut codes: PyBuffer<u8>,
    mut scales: PyBuffer<u8>,
) -> PyResult<f32> {
    ensure_disjoint(&codes, &[&absmax, &scales])?;
    ensure_disjoint(&scales, &[&absmax])?;
    let absmax = view::<f32>(&absmax, "absmax")?;
    let codes = view_mut::<u8>(&mut codes, "nested codes")?;
    let scales = view_mut::<f32>(&mut scales, "nested scales")?;
    py.detach(|| core::double_quantize(absmax, codes, scales))
        .map_err(to_py_err)
}

/// Rebuild float32 absmax into `out` from nested `codes`, `scales` and `offset`.
#[pyfunction]
fn dequantize_absmax(
    py: Python<'_>,
    codes: PyBuffer<u8>,
    scales: PyBuffer<u8>,
    offset: f32,
    mut out: PyBuffer<u8>,
) -> PyResult<()> {
    ensure_disjoint(&out, &[&codes, &scales])?;
    let codes = view::<u8>(&codes, "nested codes")?;
    let scales = view::<f32>(&scales, "nested scales")?;
    let out = view_mut::<f32>(&mut out, "absmax out")?;
    py.detach(|| core::dequantize_absmax(codes, scales, offset, out))
        .map_err(to_py_err)
}

/// Mean of float32 `values` in torch's single-thread summation order (the offset rule).
#[pyfunction]
fn torch_order_mean(values: PyBuffer<u8>) -> PyResult<f32> {
    let values = view::<f32>(&values, "values")?;
    Ok(core::mean::torch_mean(values))
}

fn code_values(bits: &[u32]) -> Vec<f32> {
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("QlorakitError", py.get_type::<QlorakitError>())?;
    m.add("QuantizationError", py.get_type::<QuantizationError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add_class::<options::QuantizeOptions>()?;
    m.add_class::<reports::CheckpointReport>()?;
    m.add_class::<reports::TensorReport>()?;
    m.add_class::<reports::SearchReport>()?;
    m.add_class::<reports::GptqReport>()?;
    m.add_class::<checkpoint::TensorEntry>()?;
    m.add_class::<checkpoint::SafetensorsHeader>()?;
    m.add_function(wrap_pyfunction!(check_format, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::quantize_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(loading::quantize_in_memory, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::list_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::quant_state_json, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::read_header, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::tensor_checksums, m)?)?;
    m.add(
        "ERROR_SAMPLE_STRIDE",
        qlorakit_core::checkpoint::ERROR_SAMPLE_STRIDE,
    )?;
    m.add(
        "CHECKSUMS_KEY",
        qlorakit_core::checkpoint::writer::CHECKSUMS_KEY,
    )?;
    m.add("NF4_CODE", code_values(&core::NF4_CODE_BITS))?;
    m.add("FP4_CODE", code_values(&core::FP4_CODE_BITS))?;
    m.add("DYNAMIC_MAP", code_values(&core::DYNAMIC_MAP_BITS))?;
    m.add("QUANT_TYPES", QuantType::ALL.map(QuantType::name).to_vec())?;
    m.add(
        "QUANT_STATE_MARKER",
        qlorakit_core::checkpoint::quant_state::QUANT_STATE_MARKER,
    )?;
    m.add("BLOCKSIZES", core::BLOCKSIZES.to_vec())?;
    m.add("DEFAULT_BLOCKSIZE", core::DEFAULT_BLOCKSIZE)?;
    // Whether gemv_4bit runs a SIMD kernel (AVX2 or AVX-512) on this CPU (else the portable
    // one, slower than dequantize + matmul, so Python does not route few-row inputs to it).
    m.add(
        "GEMV_SIMD",
        core::gemv::GemvKernel::best() != core::gemv::GemvKernel::Portable,
    )?;
    m.add("GEMV_MAX_BATCH", core::GEMV_MAX_BATCH)?;
    m.add("CPU_KERNEL_ENV", core::CPU_KERNEL_ENV)?;
    m.add(
        "CPU_KERNELS_SUPPORTED",
        core::GemvKernel::ALL
            .into_iter()
            .filter(|kernel| kernel.is_supported())
            .map(core::GemvKernel::name)
            .collect::<Vec<_>>(),
    )?;
    m.add("NESTED_BLOCKSIZE", core::NESTED_BLOCKSIZE)?;
    m.add(
        "ELEMENT_DTYPES",
        [f32::NAME, bf16::NAME, f16::NAME].to_vec(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(gemv_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(share_openmp_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(shared_openmp_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_4bit_searched, m)?)?;
    m.add_function(wrap_pyfunction!(gptq::quantize_4bit_gptq, m)?)?;
    m.add_function(wrap_pyfunction!(double_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(torch_order_mean, m)?)?;
    Ok(())
}
