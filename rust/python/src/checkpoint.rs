//! Bindings for whole-checkpoint quantization and safetensors header reading.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use pyo3::prelude::*;
use qlorakit_core::checkpoint::quant_state::QuantState;
use qlorakit_core::checkpoint::safetensors::SafetensorsFile;
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
