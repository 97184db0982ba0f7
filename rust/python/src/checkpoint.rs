//! Bindings for whole-checkpoint quantization and safetensors header reading (the
//! `TensorEntry` and `SafetensorsHeader` objects).

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use qlorakit_core::checkpoint::quant_state::QuantState;
use qlorakit_core::checkpoint::safetensors::{SafetensorsFile, TensorInfo};
use qlorakit_core::checkpoint::{self, Source};

use crate::loading::{checkpoint_err, run_reporting, selection};
use crate::options::QuantizeOptions;
use crate::reports::CheckpointReport;
use crate::{parse_blocksize, parse_quant_type};

/// One tensor of a safetensors file, as its header describes it.
#[pyclass(frozen, get_all, module = "qlorakit._core")]
#[derive(Clone)]
pub struct TensorEntry {
    pub name: String,
    /// safetensors' dtype name (`F32`, `BF16`, `U8`, ...).
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    /// The safetensors file holding it.
    pub file: String,
    /// Its bytes: `[begin, end)` of the file's data section (which follows the header).
    pub begin: usize,
    pub end: usize,
}

impl TensorEntry {
    fn new(file: &SafetensorsFile, tensor: &TensorInfo) -> Self {
        TensorEntry {
            name: tensor.name.clone(),
            dtype: tensor.dtype.name(),
            shape: tensor.shape.clone(),
            file: file.path.display().to_string(),
            begin: tensor.begin,
            end: tensor.end,
        }
    }
}

#[pymethods]
impl TensorEntry {
    fn __repr__(&self) -> String {
        format!(
            "TensorEntry(name={:?}, dtype={:?}, shape={:?}, file={:?}, begin={}, end={})",
            self.name, self.dtype, self.shape, self.file, self.begin, self.end
        )
    }
}

/// One safetensors file's header (validated): its metadata and tensors, in file order.
#[pyclass(frozen, get_all, module = "qlorakit._core")]
pub struct SafetensorsHeader {
    pub file: String,
    /// The header's `__metadata__` (empty without one).
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorEntry>,
}

#[pymethods]
impl SafetensorsHeader {
    fn __repr__(&self) -> String {
        format!(
            "SafetensorsHeader(file={:?}, metadata=<{} keys>, tensors=<{} entries>)",
            self.file,
            self.metadata.len(),
            self.tensors.len()
        )
    }
}

/// Every tensor of a checkpoint (directory or file), file by file in file order.
#[pyfunction]
pub fn list_tensors(py: Python<'_>, source: PathBuf) -> PyResult<Vec<TensorEntry>> {
    let source = py
        .detach(|| Source::open(&source))
        .map_err(checkpoint_err)?;
    Ok(source
        .tensors()
        .map(|(file, t)| TensorEntry::new(file, t))
        .collect())
}

/// One safetensors file's header: its metadata and tensors.
#[pyfunction]
pub fn read_header(path: PathBuf) -> PyResult<SafetensorsHeader> {
    let file = SafetensorsFile::open(&path).map_err(checkpoint_err)?;
    Ok(SafetensorsHeader {
        file: file.path.display().to_string(),
        metadata: file.metadata.clone(),
        tensors: file
            .tensors
            .iter()
            .map(|t| TensorEntry::new(&file, t))
            .collect(),
    })
}

/// CRC-32 of each tensor of a safetensors file, recomputed from its bytes.
#[pyfunction]
pub fn tensor_checksums(py: Python<'_>, path: PathBuf) -> PyResult<BTreeMap<String, String>> {
    py.detach(|| {
        let file = SafetensorsFile::open(&path)?;
        Ok(file
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    format!(
                        "{:08x}",
                        qlorakit_core::checkpoint::writer::checksum(file.bytes(t))
                    ),
                )
            })
            .collect())
    })
    .map_err(checkpoint_err)
}

/// The quant_state JSON bitsandbytes stores beside a weight, byte-for-byte as it writes it.
#[pyfunction]
#[pyo3(signature = (quant_type, blocksize, dtype, shape, nested_offset=None, nested_dtype="float32"))]
pub fn quant_state_json(
    quant_type: &str,
    blocksize: i64,
    dtype: &str,
    shape: Vec<usize>,
    nested_offset: Option<f32>,
    nested_dtype: &str,
) -> PyResult<String> {
    let state = QuantState {
        quant_type: parse_quant_type(quant_type)?,
        blocksize: parse_blocksize(blocksize)?,
        dtype,
        shape: &shape,
        nested_offset,
        nested_dtype,
    };
    Ok(state.to_json())
}

/// Quantizes the checkpoint at `source` into the existing empty directory `out_dir` with
/// `options`. `progress(tensors_done, tensors_total, bytes_done, bytes_total, name)` is
/// called after each tensor.
#[pyfunction]
#[pyo3(signature = (source, out_dir, selected, options, metadata, progress=None, transposed=Vec::new()))]
#[allow(clippy::too_many_arguments)] // seven Python arguments and the GIL token
pub fn quantize_checkpoint(
    py: Python<'_>,
    source: PathBuf,
    out_dir: PathBuf,
    selected: Vec<String>,
    options: &Bound<'_, QuantizeOptions>,
    metadata: BTreeMap<String, String>,
    progress: Option<Py<PyAny>>,
    transposed: Vec<String>,
) -> PyResult<CheckpointReport> {
    let threads = options.get().threads;
    let options = options.get().core.clone();
    let selected = selection(selected, transposed)?;
    let report = run_reporting(py, threads, progress, move |report_progress| {
        let source = Source::open(&source)?;
        checkpoint::quantize_checkpoint(
            &source,
            &selected,
            &out_dir,
            &options,
            &metadata,
            report_progress,
        )
    })?;
    Ok(CheckpointReport::from(report))
}
