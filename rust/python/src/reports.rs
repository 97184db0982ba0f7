//! Report objects returned to Python: `CheckpointReport` (a checkpoint run), its
//! `TensorReport` rows, `SearchReport` (scale search's outcome on one tensor) and
//! `GptqReport` (GPTQ's outcome on one tensor).

use pyo3::prelude::*;
use qlorakit_core::checkpoint::{Report, TensorReport as CoreTensorReport};
use qlorakit_core::gptq::GptqReport as CoreGptqReport;
use qlorakit_core::scale_search::SearchReport as CoreSearchReport;

/// Scale search's outcome on one tensor: exact (importance-weighted) squared errors over all
/// its elements, of what was written and of plain absmax quantization (bitsandbytes' bytes).
#[pyclass(frozen, get_all, module = "qlorakit._core")]
#[derive(Clone)]
pub struct SearchReport {
    /// Double quantization's offset of the written scales (None with float32 scales).
    pub offset: Option<f32>,
    pub squared_error: f64,
    pub absmax_squared_error: f64,
    pub squared_norm: f64,
    /// The search lost on this tensor after double quantization; absmax's result was written.
    pub kept_absmax: bool,
    /// An importance vector weighted the errors.
    pub weighted: bool,
}

impl SearchReport {
    pub(crate) fn new(report: &CoreSearchReport, offset: Option<f32>) -> Self {
        SearchReport {
            offset,
            squared_error: report.squared_error,
            absmax_squared_error: report.absmax_squared_error,
            squared_norm: report.squared_norm,
            kept_absmax: report.kept_absmax,
            weighted: report.weighted,
        }
    }
}

#[pymethods]
impl SearchReport {
    fn __repr__(&self) -> String {
        format!(
            "SearchReport(squared_error={:e}, absmax_squared_error={:e}, kept_absmax={}, weighted={})",
            self.squared_error,
            self.absmax_squared_error,
            if self.kept_absmax { "True" } else { "False" },
            if self.weighted { "True" } else { "False" },
        )
    }
}

/// GPTQ's outcome on one tensor: output errors `tr((W - Q) H (W - Q)^T)` on the calibration
/// inputs (undamped `H`) of the error-compensating rounding, of plain absmax quantization
/// (bitsandbytes' bytes) and of the scale search alone, and which of them was written.
#[pyclass(frozen, get_all, module = "qlorakit._core")]
#[derive(Clone)]
pub struct GptqReport {
    /// Double quantization's offset of the written scales (None with float32 scales).
    pub offset: Option<f32>,
    /// `"gptq"`, or the baseline written instead (`"absmax"`, `"searched"`).
    pub chosen: &'static str,
    /// Error of what was written (the smallest of the three).
    pub output_error: f64,
    pub gptq_output_error: f64,
    pub absmax_output_error: f64,
    pub searched_output_error: f64,
}

impl GptqReport {
    pub(crate) fn new(report: &CoreGptqReport, offset: Option<f32>) -> Self {
        GptqReport {
            offset,
            chosen: report.chosen.name(),
            output_error: report.output_error,
            gptq_output_error: report.gptq_output_error,
            absmax_output_error: report.absmax_output_error,
            searched_output_error: report.searched_output_error,
        }
    }
}

#[pymethods]
impl GptqReport {
    fn __repr__(&self) -> String {
        format!(
            "GptqReport(chosen={:?}, output_error={:e}, absmax_output_error={:e}, searched_output_error={:e})",
            self.chosen, self.output_error, self.absmax_output_error, self.searched_output_error,
        )
    }
}

/// What happened to one source tensor of a checkpoint run.
#[pyclass(frozen, get_all, module = "qlorakit._core")]
#[derive(Clone)]
pub struct TensorReport {
    pub name: String,
    /// Quantized (else copied unchanged).
    pub quantized: bool,
    pub params: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Squared reconstruction error and squared norm over the sampled blocks (quantized
    /// tensors only; 0 otherwise).
    pub squared_error: f64,
    pub squared_norm: f64,
    /// Double quantization's offset (None when kept or with float32 scales).
    pub nested_offset: Option<f32>,
    /// With scale search: its outcome on this tensor.
    pub search: Option<SearchReport>,
    /// With a calibration Hessian for this tensor: GPTQ's outcome on it.
    pub gptq: Option<GptqReport>,
}

impl From<&CoreTensorReport> for TensorReport {
    fn from(t: &CoreTensorReport) -> Self {
        TensorReport {
            name: t.name.clone(),
            quantized: t.quantized,
            params: t.params,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            squared_error: t.squared_error,
            squared_norm: t.squared_norm,
            nested_offset: t.nested_offset,
            search: t
                .search
                .as_ref()
                .map(|s| SearchReport::new(s, t.nested_offset)),
            gptq: t.gptq.as_ref().map(|g| GptqReport::new(g, t.nested_offset)),
        }
    }
}

#[pymethods]
impl TensorReport {
    fn __repr__(&self) -> String {
        format!(
            "TensorReport(name={:?}, quantized={}, params={})",
            self.name,
            if self.quantized { "True" } else { "False" },
            self.params
        )
    }
}

/// The outcome of `quantize_checkpoint`: one row per source tensor, in file order, and the
/// files written.
#[pyclass(frozen, get_all, module = "qlorakit._core")]
pub struct CheckpointReport {
    pub tensors: Vec<TensorReport>,
    /// (file name, size in bytes) of each output shard.
    pub shards: Vec<(String, u64)>,
    /// Wall time of the pipeline.
    pub seconds: f64,
}

impl From<Report> for CheckpointReport {
    fn from(report: Report) -> Self {
        CheckpointReport {
            tensors: report.tensors.iter().map(TensorReport::from).collect(),
            shards: report.shards,
            seconds: report.seconds,
        }
    }
}

#[pymethods]
impl CheckpointReport {
    fn __repr__(&self) -> String {
        format!(
            "CheckpointReport(tensors=<{} rows>, shards={}, seconds={:.3})",
            self.tensors.len(),
            self.shards.len(),
            self.seconds
        )
    }
}
