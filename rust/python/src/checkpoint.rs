//! Bindings for whole-checkpoint quantization and safetensors header reading.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use qlorakit_core::checkpoint::safetensors::SafetensorsFile;
use qlorakit_core::checkpoint::{self, CheckpointError as CoreError, Options, Source};
use qlorakit_core::Blocksize;

use crate::{parse_quant_type, to_py_err, CheckpointError};

fn checkpoint_err(err: CoreError) -> PyErr {
    CheckpointError::new_err(err.to_string())
}

/// (name, dtype, shape, file) of one tensor.
type TensorRow = (String, String, Vec<usize>, String);

/// Every tensor of a checkpoint (directory or file): list of (name, dtype, shape, file).
#[pyfunction]
pub fn list_tensors(py: Python<'_>, source: PathBuf) -> PyResult<Vec<TensorRow>> {
    let source = py
        .detach(|| Source::open(&source))
        .map_err(checkpoint_err)?;
    Ok(source
        .tensors()
        .map(|(file, t)| {
            (
                t.name.clone(),
                t.dtype.name().to_string(),
                t.shape.clone(),
                file.path.display().to_string(),
            )
        })
        .collect())
}

/// One safetensors file's metadata and tensors: (metadata, [(name, dtype, shape, begin, end)]).
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn read_header(
    path: PathBuf,
) -> PyResult<(
    BTreeMap<String, String>,
    Vec<(String, String, Vec<usize>, usize, usize)>,
)> {
    let file = SafetensorsFile::open(&path).map_err(checkpoint_err)?;
    let tensors = file
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype.name().to_string(),
                t.shape.clone(),
                t.begin,
                t.end,
            )
        })
        .collect();
    Ok((file.metadata.clone(), tensors))
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

/// Quantizes the checkpoint at `source` into the existing empty directory `out_dir`.
/// `progress(tensors_done, tensors_total, bytes_done, bytes_total, name)` is called after
/// each tensor. Returns the report as a dict.
#[pyfunction]
#[pyo3(signature = (source, out_dir, selected, quant_type, blocksize, double_quant, max_shard_bytes, metadata, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_checkpoint<'py>(
    py: Python<'py>,
    source: PathBuf,
    out_dir: PathBuf,
    selected: Vec<String>,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
    max_shard_bytes: u64,
    metadata: BTreeMap<String, String>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let options = Options {
        quant_type: parse_quant_type(quant_type)?,
        blocksize: Blocksize::new(blocksize).map_err(to_py_err)?,
        double_quant,
        max_shard_bytes,
        error_sample_stride: checkpoint::ERROR_SAMPLE_STRIDE,
    };
    let selected: HashSet<String> = selected.into_iter().collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| CheckpointError::new_err(format!("cannot start worker threads: {e}")))?;
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        pool.install(|| {
            let source = Source::open(&source)?;
            // Each tensor: take the GIL briefly to run pending signal handlers (Ctrl-C) and
            // the progress callback; an exception from either stops the run.
            let mut report_progress = |p: checkpoint::Progress<'_>| {
                Python::attach(|py| {
                    let outcome = py.check_signals().and_then(|()| match &progress {
                        Some(callback) => callback
                            .call1(
                                py,
                                (
                                    p.tensors_done,
                                    p.tensors_total,
                                    p.bytes_done,
                                    p.bytes_total,
                                    p.tensor,
                                ),
                            )
                            .map(drop),
                        None => Ok(()),
                    });
                    outcome.map_err(|err| callback_error = Some(err)).is_ok()
                })
            };
            checkpoint::quantize_checkpoint(
                &source,
                &selected,
                &out_dir,
                &options,
                &metadata,
                &mut report_progress,
            )
        })
    });
    if let Some(err) = callback_error {
        return Err(err);
    }
    let report = result.map_err(checkpoint_err)?;
    let dict = PyDict::new(py);
    let tensors: Vec<(String, bool, u64, u64, u64, f64, f64)> = report
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.quantized,
                t.params,
                t.bytes_in,
                t.bytes_out,
                t.squared_error,
                t.squared_norm,
            )
        })
        .collect();
    dict.set_item("tensors", tensors)?;
    dict.set_item("shards", report.shards)?;
    dict.set_item("seconds", report.seconds)?;
    Ok(dict)
}
