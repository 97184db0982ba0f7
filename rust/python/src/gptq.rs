//! Binding for calibrated, error-compensating quantization of one weight (the core's `gptq`).

use half::{bf16, f16};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use qlorakit_core::gptq::{quantize_4bit_gptq as core_gptq, HessianFactor, DEFAULT_DAMP};
use qlorakit_core::{Blocksize, Element, QuantType, ScalesMut};

use crate::reports::GptqReport;
use crate::{
    ensure_disjoint, parse_blocksize, parse_quant_type, to_py_err, view, view_mut,
    QuantizationError,
};

/// GPTQ of the row-major weight `input [rows, cols]` (bytes of `dtype`) given the
/// Hessian `hessian [cols, cols]` (float32 or float64, `hessian_dtype`). Outputs as for
/// `quantize_4bit_searched`: without `nested`, float32 scales into `absmax`; with it, the
/// uint8 nested codes into `absmax` and the float32 nested scales into `nested`. Returns
/// the `GptqReport` (with the offset of the nested scales).
#[pyfunction]
#[pyo3(signature = (input, dtype, rows, hessian, hessian_dtype, quant_type, blocksize, packed, absmax, nested=None, scale_search=true, damp=DEFAULT_DAMP))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_4bit_gptq(
    py: Python<'_>,
    input: PyBuffer<u8>,
    dtype: &str,
    rows: usize,
    hessian: PyBuffer<u8>,
    hessian_dtype: &str,
    quant_type: &str,
    blocksize: i64,
    mut packed: PyBuffer<u8>,
    mut absmax: PyBuffer<u8>,
    mut nested: Option<PyBuffer<u8>>,
    scale_search: bool,
    damp: f64,
) -> PyResult<GptqReport> {
    let quant_type = parse_quant_type(quant_type)?;
    let blocksize = parse_blocksize(blocksize)?;
    ensure_disjoint(&packed, &[&input, &absmax, &hessian])?;
    ensure_disjoint(&absmax, &[&input, &hessian])?;
    if let Some(nested) = &nested {
        ensure_disjoint(nested, &[&input, &packed, &absmax, &hessian])?;
    }
    if rows == 0 {
        return Err(QuantizationError::new_err("rows must be positive"));
    }
    let numel_bytes = input.len_bytes();
    let element = match dtype {
        "float32" => 4,
        "bfloat16" | "float16" => 2,
        other => {
            return Err(QuantizationError::new_err(format!(
                "unsupported dtype {other:?}; expected float32, bfloat16 or float16"
            )))
        }
    };
    let cols = numel_bytes / element / rows;
    let factor = match hessian_dtype {
        "float32" => {
            let h = view::<f32>(&hessian, "hessian")?;
            py.detach(|| HessianFactor::new(h, cols, damp))
        }
        "float64" => {
            let h = view::<f64>(&hessian, "hessian")?;
            py.detach(|| HessianFactor::new(h, cols, damp))
        }
        other => {
            return Err(QuantizationError::new_err(format!(
                "unsupported hessian dtype {other:?}; expected float32 or float64"
            )))
        }
    }
    .map_err(to_py_err)?;
    let packed = view_mut::<u8>(&mut packed, "packed")?;
    let mut scales = match nested.as_mut() {
        Some(nested) => ScalesMut::Nested {
            codes: view_mut::<u8>(&mut absmax, "nested codes")?,
            scales: view_mut::<f32>(nested, "nested scales")?,
            offset: 0.0,
        },
        None => ScalesMut::Plain(view_mut::<f32>(&mut absmax, "absmax")?),
    };
    fn typed<T: Element>(
        py: Python<'_>,
        input: &PyBuffer<u8>,
        rows: usize,
        factor: &HessianFactor,
        (quant_type, blocksize, scale_search): (QuantType, Blocksize, bool),
        packed: &mut [u8],
        scales: &mut ScalesMut<'_>,
    ) -> PyResult<GptqReport> {
        let weight = view::<T>(input, "input")?;
        let report = py
            .detach(|| {
                core_gptq(
                    weight,
                    rows,
                    factor,
                    quant_type,
                    blocksize,
                    scale_search,
                    packed,
                    &mut *scales,
                )
            })
            .map_err(to_py_err)?;
        Ok(GptqReport::new(&report, scales.offset()))
    }
    let options = (quant_type, blocksize, scale_search);
    match dtype {
        "float32" => typed::<f32>(py, &input, rows, &factor, options, packed, &mut scales),
        "bfloat16" => typed::<bf16>(py, &input, rows, &factor, options, packed, &mut scales),
        _ => typed::<f16>(py, &input, rows, &factor, options, packed, &mut scales),
    }
}
