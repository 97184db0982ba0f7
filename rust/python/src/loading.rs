//! Binding of the in-memory checkpoint pipeline: quantize-on-load (`qlorakit.from_pretrained`
//! of a full-precision directory) quantizes straight into the tensors the model will hold.
//! Also what both pipelines' bindings share: the selection with orientations, and running
//! the work beside a thread that reports progress and takes Ctrl-C.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use qlorakit_core::checkpoint::{
    self, CheckpointError as CoreError, Orientation, Report, Selection, Source, WeightOut,
};
use qlorakit_core::ScalesMut;

use crate::options::QuantizeOptions;
use crate::reports::CheckpointReport;
use crate::{view_mut, CheckpointError, QuantizationError};

pub(crate) fn checkpoint_err(err: CoreError) -> PyErr {
    CheckpointError::new_err(err.to_string())
}

/// (tensors_done, tensors_total, bytes_done, bytes_total, tensor name), as the callback gets it.
type ProgressEvent = (usize, usize, u64, u64, String);

/// The memory one selected tensor is quantized into: (name, codes, absmax, nested). `absmax`
/// holds float32 scales, or with `nested` (float32 nested scales) the uint8 nested codes.
type OutputBuffers = (String, PyBuffer<u8>, PyBuffer<u8>, Option<PyBuffer<u8>>);

/// Quantizes the tensors `selected` of the checkpoint at `source` with `options` into
/// `outputs` (one entry per selected tensor, fresh writable memory sized for it), with the
/// bytes `quantize_checkpoint` writes; nothing is written to disk and the tensors left as
/// stored are not read. `progress(tensors_done, tensors_total, bytes_done, bytes_total,
/// name)` is called after each tensor. Returns the report (no shards) and the quant_state
/// JSON of each quantized tensor, by its key.
#[pyfunction]
#[pyo3(signature = (source, selected, options, outputs, progress=None, transposed=Vec::new()))]
pub fn quantize_in_memory(
    py: Python<'_>,
    source: PathBuf,
    selected: Vec<String>,
    options: &Bound<'_, QuantizeOptions>,
    mut outputs: Vec<OutputBuffers>,
    progress: Option<Py<PyAny>>,
    transposed: Vec<String>,
) -> PyResult<(CheckpointReport, Vec<(String, String)>)> {
    let threads = options.get().threads;
    let options = options.get().core.clone();
    let selected = selection(selected, transposed)?;
    ensure_disjoint(&outputs)?;
    let mut targets: HashMap<String, WeightOut<'_>> = HashMap::with_capacity(outputs.len());
    for (name, codes, absmax, nested) in outputs.iter_mut() {
        let codes = view_mut::<u8>(codes, "codes")?;
        let scales = match nested.as_mut() {
            Some(nested) => ScalesMut::Nested {
                codes: view_mut::<u8>(absmax, "nested codes")?,
                scales: view_mut::<f32>(nested, "nested scales")?,
                offset: 0.0,
            },
            None => ScalesMut::Plain(view_mut::<f32>(absmax, "absmax")?),
        };
        if targets
            .insert(name.clone(), WeightOut { codes, scales })
            .is_some()
        {
            return Err(CheckpointError::new_err(format!(
                "tensor '{name}' is given output memory twice"
            )));
        }
    }
    let memory = run_reporting(py, threads, progress, move |report_progress| {
        let source = Source::open(&source)?;
        checkpoint::quantize_in_memory(&source, &selected, &options, targets, report_progress)
    })?;
    let report = Report {
        tensors: memory.tensors,
        shards: Vec::new(),
        seconds: memory.seconds,
    };
    Ok((CheckpointReport::from(report), memory.quant_states))
}

/// The selection with each tensor's orientation; refuses a transposed tensor not selected.
pub(crate) fn selection(selected: Vec<String>, transposed: Vec<String>) -> PyResult<Selection> {
    let transposed: HashSet<String> = transposed.into_iter().collect();
    if let Some(name) = transposed.iter().find(|name| !selected.contains(name)) {
        return Err(CheckpointError::new_err(format!(
            "tensor '{name}' is marked transposed but not selected for quantization"
        )));
    }
    Ok(selected
        .into_iter()
        .map(|name| {
            let orientation = if transposed.contains(&name) {
                Orientation::Transposed
            } else {
                Orientation::AsStored
            };
            (name, orientation)
        })
        .collect())
}

/// Refuses output buffers that overlap one another.
fn ensure_disjoint(outputs: &[OutputBuffers]) -> PyResult<()> {
    let mut spans: Vec<(usize, usize)> = outputs
        .iter()
        .flat_map(|(_, codes, absmax, nested)| {
            std::iter::once(codes)
                .chain(std::iter::once(absmax))
                .chain(nested.as_ref())
        })
        .map(|b| (b.buf_ptr() as usize, b.buf_ptr() as usize + b.len_bytes()))
        .filter(|(start, end)| end > start)
        .collect();
    spans.sort_unstable();
    if spans.windows(2).any(|pair| pair[1].0 < pair[0].1) {
        return Err(QuantizationError::new_err(
            "an output buffer overlaps another output buffer",
        ));
    }
    Ok(())
}

/// Runs `work` on a worker thread (in a pool of `threads` rayon threads, default one per
/// core) while this thread waits without the GIL, taking it briefly every tick and after
/// each tensor to run Python's signal handlers (only the main thread can, so Ctrl-C works)
/// and `progress`. An exception from either stops the work after the tensor at hand and
/// is raised.
pub(crate) fn run_reporting<R, W>(
    py: Python<'_>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    work: W,
) -> PyResult<R>
where
    R: Send,
    W: FnOnce(&mut dyn FnMut(checkpoint::Progress<'_>) -> bool) -> Result<R, CoreError> + Send,
{
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| CheckpointError::new_err(format!("cannot start worker threads: {e}")))?;
    let (events, received) = mpsc::channel::<ProgressEvent>();
    let (result, interrupt) = py.detach(move || {
        let cancelled = AtomicBool::new(false);
        let mut interrupt: Option<PyErr> = None;
        let result = std::thread::scope(|scope| {
            let (pool, cancelled) = (&pool, &cancelled);
            // The worker owns the sender: when it finishes, the channel disconnects.
            let worker = scope.spawn(move || {
                pool.install(|| {
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
                    work(&mut report_progress)
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
    result.map_err(checkpoint_err)
}
