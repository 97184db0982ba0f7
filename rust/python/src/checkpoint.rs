//! Bindings for whole-checkpoint quantization and safetensors header reading (the
//! `TensorEntry` and `SafetensorsHeader` objects).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use pyo3::prelude::*;
use qlorakit_core::checkpoint::quant_state::QuantState;
use qlorakit_core::checkpoint::safetensors::{SafetensorsFile, TensorInfo};
use qlorakit_core::checkpoint::{
    self, CheckpointError as CoreError, Orientation, Selection, Source,
};

use crate::options::QuantizeOptions;
use crate::reports::CheckpointReport;
use crate::{parse_blocksize, parse_quant_type, CheckpointError};

fn checkpoint_err(err: CoreError) -> PyErr {
    CheckpointError::new_err(err.to_string())
}

/// (tensors_done, tensors_total, bytes_done, bytes_total, tensor name), as the callback gets it.
type ProgressEvent = (usize, usize, u64, u64, String);

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
    let transposed: HashSet<String> = transposed.into_iter().collect();
    if let Some(name) = transposed.iter().find(|name| !selected.contains(name)) {
        return Err(CheckpointError::new_err(format!(
            "tensor '{name}' is marked transposed but not selected for quantization"
        )));
    }
    let selected: Selection = selected
        .into_iter()
        .map(|name| {
            let orientation = if transposed.contains(&name) {
                Orientation::Transposed
            } else {
                Orientation::AsStored
            };
            (name, orientation)
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| CheckpointError::new_err(format!("cannot start worker threads: {e}")))?;
    let (events, received) = mpsc::channel::<ProgressEvent>();
    // The pipeline runs on a worker thread; this (calling, usually main) thread waits
    // without the GIL and takes it briefly every tick and after each tensor, to run Python
    // signal handlers — only the main thread can, so Ctrl-C works — and the progress
    // callback. An exception from either sets `cancelled`, which stops the pipeline after
    // the tensor at hand.
    let (result, interrupt) = py.detach(move || {
        let cancelled = AtomicBool::new(false);
        let mut interrupt: Option<PyErr> = None;
        let result = std::thread::scope(|scope| {
            let (source, selected, out_dir, options, metadata, pool, cancelled) = (
                &source, &selected, &out_dir, &options, &metadata, &pool, &cancelled,
            );
            // The worker owns the sender: when it finishes, the channel disconnects.
            let worker = scope.spawn(move || {
                pool.install(|| {
                    let source = Source::open(source)?;
                    let mut report_progress = |p: checkpoint::Progress<'_>| {
                        let event = (
                            p.tensors_done,
                            p.tensors_total,
                            p.bytes_done,
                            p.bytes_total,
                            p.tensor.to_string(),
                        );
                        let _ = events.send(event);
                        !cancelled.load(Ordering::Relaxed)
                    };
                    checkpoint::quantize_checkpoint(
                        &source,
                        selected,
                        out_dir,
                        options,
                        metadata,
                        &mut report_progress,
                    )
                })
            });
            loop {
                let event = match received.recv_timeout(Duration::from_millis(50)) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                if interrupt.is_some() {
                    continue;
                }
                let outcome = Python::attach(|py| {
                    py.check_signals()?;
                    match (&progress, event) {
                        (Some(callback), Some(event)) => callback.call1(py, event).map(drop),
                        _ => Ok(()),
                    }
                });
                if let Err(err) = outcome {
                    interrupt = Some(err);
                    cancelled.store(true, Ordering::Relaxed);
                }
            }
            worker.join().unwrap_or_else(|_| {
                Err(CoreError::Internal(
                    "the quantization worker panicked".into(),
                ))
            })
        });
        (result, interrupt)
    });
    if let Some(err) = interrupt {
        return Err(err);
    }
    let report = result.map_err(checkpoint_err)?;
    Ok(CheckpointReport::from(report))
}
