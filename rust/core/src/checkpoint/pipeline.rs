//! Quantizes a whole checkpoint: tensors are read from the memory-mapped source one at a
//! time, selected 2-D weights are quantized (multithreaded) and written as bitsandbytes'
//! serialization, every other tensor is copied unchanged, and output shards are written
//! as the work proceeds. Memory holds the current tensor's outputs, not the model.
//!
//! [`quantize_in_memory`] runs the same per-tensor work into memory the caller provides for
//! each selected tensor (what a loader keeps), with no shards: the same bytes, written once,
//! and the tensors that stay as stored are neither read nor copied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use super::error::{CheckpointError, Result};
use super::hessian::HessianFile;
use super::importance::ImportanceFile;
use super::quant_state::{quant_state_key, QuantState};
use super::safetensors::{Dtype, SafetensorsFile, TensorInfo};
use super::source::{Source, INDEX_FILE, SINGLE_FILE};
use super::writer::{EntrySpec, ShardWriter};
use crate::codebook::QuantType;
use crate::element::Element;
use crate::gptq::{quantize_4bit_gptq, GptqReport, HessianFactor};
use crate::layout::{nested_blocks, packed_len, Blocksize};
use crate::packed::{BlockScales, PackedView, ScalesMut};
use crate::quantize::quantize_4bit;
use crate::scale_search::{quantize_4bit_searched, Importance, SearchReport};

/// How to quantize.
#[derive(Debug, Clone)]
pub struct Options {
    pub quant_type: QuantType,
    pub blocksize: Blocksize,
    pub double_quant: bool,
    /// Largest output shard in bytes (a bigger single tensor gets a shard of its own).
    pub max_shard_bytes: u64,
    /// The reconstruction error is measured on every `error_sample_stride`-th block.
    pub error_sample_stride: usize,
    /// Error-optimal block scales instead of absmax (see [`crate::scale_search`]).
    pub scale_search: bool,
    /// With `scale_search`: a safetensors file of per-input-column importance vectors
    /// (see [`super::importance`]).
    pub importance: Option<PathBuf>,
    /// Calibration Hessians (see [`super::hessian`]): the tensors they cover are
    /// quantized with GPTQ (see [`crate::gptq`]), its block scales searched when
    /// `scale_search` is set.
    pub hessians: Option<PathBuf>,
    /// GPTQ's relative damping ([`crate::gptq::DEFAULT_DAMP`]).
    pub gptq_damp: f64,
    /// Sync every shard to disk before it counts as written. Off only for a scratch output
    /// that is read back at once and deleted (nothing to lose in a crash).
    pub durable: bool,
}

/// How a selected tensor is laid out in the source, relative to the `[out, in]` weight
/// of the linear layer a loader builds for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// Stored `[out, in]` (`nn.Linear`): quantized as stored.
    AsStored,
    /// Stored `[in, out]` (GPT-2's `Conv1D`): quantized as its transpose, the layout
    /// transformers gives the 4-bit layer it converts a `Conv1D` into.
    Transposed,
}

/// The tensors to quantize, by name, with their orientation.
pub type Selection = HashMap<String, Orientation>;

/// Default sampling of the reconstruction error: every 32nd block (about 3% of the work of
/// quantizing, against an exact figure that would cost as much again).
pub const ERROR_SAMPLE_STRIDE: usize = 32;

/// Progress after each tensor.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub tensor: &'a str,
}

/// What happened to one source tensor.
#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    pub quantized: bool,
    pub params: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Sums over the sampled blocks (quantized tensors only).
    pub squared_error: f64,
    pub squared_norm: f64,
    /// Double quantization's offset of a quantized tensor (`None` with float32 scales).
    pub nested_offset: Option<f32>,
    /// With scale search: the exact errors with and without it, over all the tensor's
    /// elements, weighted by the importance vector when one was given.
    pub search: Option<SearchReport>,
    /// With a calibration Hessian: GPTQ's output errors on the calibration inputs, and
    /// which result was written.
    pub gptq: Option<GptqReport>,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub tensors: Vec<TensorReport>,
    /// Output file names and sizes.
    pub shards: Vec<(String, u64)>,
    pub seconds: f64,
}

/// Largest quant_state JSON: the fixed text plus a shape of up to 8 dims and a float.
const MAX_QUANT_STATE_LEN: usize = 400;

/// One output tensor produced from a source tensor.
struct Planned<'a> {
    file: &'a SafetensorsFile,
    info: &'a TensorInfo,
    quantize: bool,
    orientation: Orientation,
    outputs: Vec<EntrySpec>,
    out_bytes: u64,
}

impl Planned<'_> {
    /// The shape the tensor is quantized in (and that its quant_state records).
    fn quantized_shape(&self) -> Vec<usize> {
        match self.orientation {
            Orientation::AsStored => self.info.shape.clone(),
            Orientation::Transposed => self.info.shape.iter().rev().copied().collect(),
        }
    }
}

/// Runs the whole pipeline into `out_dir` (which must exist and be empty). `progress` is
/// called after each tensor; returning `false` stops the run with [`CheckpointError::Cancelled`].
pub fn quantize_checkpoint(
    source: &Source,
    selected: &Selection,
    out_dir: &Path,
    options: &Options,
    metadata: &BTreeMap<String, String>,
    progress: &mut dyn FnMut(Progress<'_>) -> bool,
) -> Result<Report> {
    let start = Instant::now();
    let plan = plan_tensors(source, selected, options)?;
    let shards = assign_shards(&plan, options.max_shard_bytes);
    let shard_count = shards.len();
    let bytes_total: u64 = plan
        .iter()
        .map(|p| (p.info.end - p.info.begin) as u64)
        .sum();
    let (importance, mut hessians) = calibration(options)?;
    let mut work = Workspace::default();
    let mut reports = Vec::with_capacity(plan.len());
    let mut shard_files = Vec::with_capacity(shard_count);
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut bytes_done = 0u64;
    for (shard_index, members) in shards.iter().enumerate() {
        let file_name = if shard_count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!(
                "model-{:05}-of-{:05}.safetensors",
                shard_index + 1,
                shard_count
            )
        };
        let fixed: Vec<EntrySpec> = members
            .iter()
            .flat_map(|&i| plan[i].outputs.iter().cloned())
            .collect();
        let variable: Vec<String> = members
            .iter()
            .filter(|&&i| plan[i].quantize)
            .map(|&i| quant_state_key(&plan[i].info.name, options.quant_type))
            .collect();
        for name in fixed.iter().map(|e| &e.name).chain(&variable) {
            weight_map.insert(name.clone(), file_name.clone());
        }
        let mut writer = ShardWriter::create(
            &out_dir.join(&file_name),
            fixed,
            &variable,
            MAX_QUANT_STATE_LEN,
            metadata.clone(),
            options.durable,
        )?;
        for &i in members {
            let planned = &plan[i];
            let report = if planned.quantize {
                let (report, _) = work.quantize_into(
                    planned,
                    options,
                    importance.as_ref(),
                    hessians.as_mut(),
                    Target::Shard(&mut writer),
                )?;
                report
            } else {
                copy_into(planned, &mut writer)?
            };
            planned.file.release(planned.info);
            bytes_done += report.bytes_in;
            reports.push(report);
            tell(
                progress,
                Progress {
                    tensors_done: reports.len(),
                    tensors_total: plan.len(),
                    bytes_done,
                    bytes_total,
                    tensor: &planned.info.name,
                },
            )?;
        }
        let size = writer.finish()?;
        shard_files.push((file_name, size));
    }
    if shard_count > 1 {
        write_index(out_dir, &shard_files, &weight_map)?;
    }
    Ok(Report {
        tensors: reports,
        shards: shard_files,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn plan_tensors<'a>(
    source: &'a Source,
    selected: &Selection,
    options: &Options,
) -> Result<Vec<Planned<'a>>> {
    let mut found: HashSet<&str> = HashSet::new();
    let mut plan = Vec::new();
    for (file, info) in source.tensors() {
        let orientation = selected.get(&info.name).copied();
        let quantize = orientation.is_some();
        if quantize {
            found.insert(&info.name);
            let bad = |reason: String| CheckpointError::BadSelection {
                tensor: info.name.clone(),
                reason,
            };
            if info.dtype.torch_name().is_none() {
                return Err(bad(format!(
                    "its dtype {} is not float32, bfloat16 or float16",
                    info.dtype.name()
                )));
            }
            if info.shape.len() != 2 || info.numel() == 0 {
                return Err(bad(format!(
                    "its shape {:?} is not a non-empty 2-D matrix",
                    info.shape
                )));
            }
        }
        let outputs = if quantize {
            quantized_outputs(info, options)
        } else {
            vec![EntrySpec {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
            }]
        };
        let out_bytes = entries_bytes(&outputs)
            + if quantize {
                MAX_QUANT_STATE_LEN as u64
            } else {
                0
            };
        plan.push(Planned {
            file,
            info,
            quantize,
            orientation: orientation.unwrap_or(Orientation::AsStored),
            outputs,
            out_bytes,
        });
    }
    if let Some(missing) = selected.keys().find(|name| !found.contains(name.as_str())) {
        return Err(CheckpointError::BadSelection {
            tensor: missing.clone(),
            reason: "no such tensor exists in the checkpoint".into(),
        });
    }
    Ok(plan)
}

/// The fixed-size tensors bitsandbytes stores for one quantized weight.
fn quantized_outputs(info: &TensorInfo, options: &Options) -> Vec<EntrySpec> {
    let numel = info.numel();
    let blocks = options.blocksize.blocks(numel);
    let entry = |suffix: &str, dtype: Dtype, shape: Vec<usize>| EntrySpec {
        name: if suffix.is_empty() {
            info.name.clone()
        } else {
            format!("{}.{suffix}", info.name)
        },
        dtype,
        shape,
    };
    let mut outputs = vec![
        entry("", Dtype::U8, vec![packed_len(numel), 1]),
        entry("quant_map", Dtype::F32, vec![16]),
    ];
    if options.double_quant {
        outputs.push(entry("absmax", Dtype::U8, vec![blocks]));
        outputs.push(entry(
            "nested_absmax",
            Dtype::F32,
            vec![nested_blocks(blocks)],
        ));
        outputs.push(entry("nested_quant_map", Dtype::F32, vec![256]));
    } else {
        outputs.push(entry("absmax", Dtype::F32, vec![blocks]));
    }
    outputs
}

/// Total bytes of the fixed-size tensors `entries`.
fn entries_bytes(entries: &[EntrySpec]) -> u64 {
    entries.iter().map(|e| e.byte_len() as u64).sum()
}

/// Groups consecutive tensors into shards of at most `max_bytes` (estimated output size).
fn assign_shards(plan: &[Planned<'_>], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (i, planned) in plan.iter().enumerate() {
        if current > 0 && current + planned.out_bytes > max_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += planned.out_bytes;
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    shards
}

fn copy_into(planned: &Planned<'_>, writer: &mut ShardWriter) -> Result<TensorReport> {
    let bytes = planned.file.bytes(planned.info);
    writer.write(&planned.info.name, bytes)?;
    Ok(kept_report(planned, bytes.len() as u64))
}

/// The report of a tensor left as stored (`bytes_out`: what the output holds of it).
fn kept_report(planned: &Planned<'_>, bytes_out: u64) -> TensorReport {
    TensorReport {
        name: planned.info.name.clone(),
        quantized: false,
        params: planned.info.numel() as u64,
        bytes_in: (planned.info.end - planned.info.begin) as u64,
        bytes_out,
        squared_error: 0.0,
        squared_norm: 0.0,
        nested_offset: None,
        search: None,
        gptq: None,
    }
}

/// Memory one selected tensor is quantized into (see [`quantize_in_memory`]): its packed
/// codes (`packed_len(numel)` bytes) and block scales (float32 absmax, or with double
/// quantization the nested codes and scales; the offset is set when they are written).
#[derive(Debug)]
pub struct WeightOut<'a> {
    pub codes: &'a mut [u8],
    pub scales: ScalesMut<'a>,
}

impl WeightOut<'_> {
    /// The written codes and scales as a packed tensor of `shape`.
    fn view<'v>(&'v self, options: &Options, shape: &'v [usize]) -> crate::Result<PackedView<'v>> {
        PackedView::new(
            self.codes,
            self.scales.view(),
            options.quant_type,
            options.blocksize,
            shape,
        )
    }
}

/// The outcome of [`quantize_in_memory`].
#[derive(Debug, Clone)]
pub struct MemoryReport {
    /// Every source tensor, in source order (`bytes_out` as a checkpoint would store it; the
    /// reconstruction error is not measured: `squared_error` and `squared_norm` are 0).
    pub tensors: Vec<TensorReport>,
    /// The quant_state JSON of each quantized tensor, by its key (`X.weight.quant_state.bitsandbytes__nf4`),
    /// byte-for-byte what a checkpoint stores.
    pub quant_states: Vec<(String, String)>,
    pub seconds: f64,
}

/// Quantizes the selected tensors of `source` into `outputs` (one entry per selected
/// tensor, sized for it; each is used once), exactly as [`quantize_checkpoint`] writes
/// them; the tensors that stay as stored are not read. `progress` is called after each
/// tensor; returning `false` stops the run with [`CheckpointError::Cancelled`].
pub fn quantize_in_memory(
    source: &Source,
    selected: &Selection,
    options: &Options,
    mut outputs: HashMap<String, WeightOut<'_>>,
    progress: &mut dyn FnMut(Progress<'_>) -> bool,
) -> Result<MemoryReport> {
    let start = Instant::now();
    let plan = plan_tensors(source, selected, options)?;
    if let Some(name) = outputs.keys().find(|name| !selected.contains_key(*name)) {
        return Err(CheckpointError::BadOutput {
            tensor: name.clone(),
            reason: "given for a tensor that is not selected".into(),
        });
    }
    // Every output checked before any work is done.
    for planned in plan.iter().filter(|p| p.quantize) {
        let name = &planned.info.name;
        let out = outputs
            .get(name)
            .ok_or_else(|| CheckpointError::BadOutput {
                tensor: name.clone(),
                reason: "no output memory was given for it".into(),
            })?;
        check_output(out, name, planned.info.numel(), options)?;
    }
    let bytes_total: u64 = plan
        .iter()
        .map(|p| (p.info.end - p.info.begin) as u64)
        .sum();
    let (importance, mut hessians) = calibration(options)?;
    let mut work = Workspace::default();
    let mut reports = Vec::with_capacity(plan.len());
    let mut quant_states = Vec::with_capacity(selected.len());
    let mut bytes_done = 0u64;
    for planned in &plan {
        let report = if planned.quantize {
            let name = &planned.info.name;
            let out = outputs
                .remove(name)
                .ok_or_else(|| CheckpointError::Internal(format!("no output for '{name}'")))?;
            let (report, state) = work.quantize_into(
                planned,
                options,
                importance.as_ref(),
                hessians.as_mut(),
                Target::Memory(out),
            )?;
            planned.file.release(planned.info);
            quant_states.push(state);
            report
        } else {
            kept_report(planned, (planned.info.end - planned.info.begin) as u64)
        };
        bytes_done += report.bytes_in;
        reports.push(report);
        tell(
            progress,
            Progress {
                tensors_done: reports.len(),
                tensors_total: plan.len(),
                bytes_done,
                bytes_total,
                tensor: &planned.info.name,
            },
        )?;
    }
    Ok(MemoryReport {
        tensors: reports,
        quant_states,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The importance vectors (with scale search) and calibration Hessians `options` name.
fn calibration(options: &Options) -> Result<(Option<ImportanceFile>, Option<HessianFile>)> {
    let importance = match (&options.importance, options.scale_search) {
        (Some(path), true) => Some(ImportanceFile::open(path)?),
        _ => None,
    };
    let hessians = match &options.hessians {
        Some(path) => Some(HessianFile::open(path, options.gptq_damp)?),
        None => None,
    };
    Ok((importance, hessians))
}

/// Where a quantized tensor goes: into a shard (its outputs staged in the workspace's
/// buffers first), or straight into caller memory.
enum Target<'w, 'o> {
    Shard(&'w mut ShardWriter),
    Memory(WeightOut<'o>),
}

/// Buffers reused from tensor to tensor.
#[derive(Default)]
struct Workspace {
    encoded: Encoded,
    /// Float32 block scales before double quantization.
    absmax: Vec<f32>,
    decoded_absmax: Vec<f32>,
    aligned: Vec<u32>,
    bytes: Vec<u8>,
}

/// The current tensor's packed codes and block scales (float32 `absmax`, or the nested
/// `codes`/`scales` of double quantization), on their way into a shard.
#[derive(Default)]
struct Encoded {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

impl Encoded {
    /// These buffers sized for a tensor of `numel` elements, as its [`WeightOut`].
    fn target(&mut self, numel: usize, options: &Options) -> WeightOut<'_> {
        let blocks = options.blocksize.blocks(numel);
        self.packed.resize(packed_len(numel), 0);
        let scales = if options.double_quant {
            self.codes.resize(blocks, 0);
            self.scales.resize(nested_blocks(blocks), 0.0);
            BlockScales::Nested {
                codes: &mut self.codes[..],
                scales: &mut self.scales[..],
                offset: 0.0,
            }
        } else {
            self.absmax.resize(blocks, 0.0);
            BlockScales::Plain(&mut self.absmax[..])
        };
        WeightOut {
            codes: &mut self.packed,
            scales,
        }
    }
}

impl Workspace {
    /// Quantizes one selected tensor into `target`; returns its report and its quant_state
    /// (key and JSON).
    fn quantize_into(
        &mut self,
        planned: &Planned<'_>,
        options: &Options,
        importance: Option<&ImportanceFile>,
        hessians: Option<&mut HessianFile>,
        target: Target<'_, '_>,
    ) -> Result<(TensorReport, (String, String))> {
        let info = planned.info;
        // Not mapped ahead (MADV_POPULATE_READ): its pages fault in on the threads that read
        // them, in parallel, which is faster than mapping them all from this one thread first.
        let raw = planned.file.bytes(info);
        let in_features = planned.quantized_shape()[1];
        let factor = match hessians {
            Some(file) => file.factor(&info.name, in_features)?,
            None => None,
        };
        let factor = factor.as_deref();
        let weights = match importance {
            Some(file) => file.vector(&info.name, in_features)?,
            None => None,
        };
        let weights = weights.as_deref();
        // Unaligned data is copied into `aligned` once; the buffer is handed back after.
        let mut aligned = std::mem::take(&mut self.aligned);
        let report = match info.dtype {
            Dtype::F32 => {
                let values = typed::<f32>(raw, &mut aligned);
                self.quantize_typed(values, planned, options, weights, factor, target)
            }
            Dtype::BF16 => {
                let values = typed::<bf16>(raw, &mut aligned);
                self.quantize_typed(values, planned, options, weights, factor, target)
            }
            Dtype::F16 => {
                let values = typed::<f16>(raw, &mut aligned);
                self.quantize_typed(values, planned, options, weights, factor, target)
            }
            other => Err(CheckpointError::BadSelection {
                tensor: info.name.clone(),
                reason: format!("its dtype {} cannot be quantized", other.name()),
            }),
        };
        self.aligned = aligned;
        report
    }

    /// Quantizes `values` (the tensor `planned`) into `target` (for a shard: into the
    /// workspace, then bitsandbytes' tensors written from there).
    fn quantize_typed<T: Element>(
        &mut self,
        values: &[T],
        planned: &Planned<'_>,
        options: &Options,
        weights: Option<&[f32]>,
        factor: Option<&HessianFactor>,
        target: Target<'_, '_>,
    ) -> Result<(TensorReport, (String, String))> {
        let info = planned.info;
        let shape = planned.quantized_shape();
        let transposed;
        let values = match planned.orientation {
            Orientation::AsStored => values,
            Orientation::Transposed => {
                transposed = transpose(values, info.shape[0], info.shape[1]);
                &transposed[..]
            }
        };
        let context = |source| CheckpointError::Quantization {
            path: planned.file.path.clone(),
            tensor: info.name.clone(),
            source,
        };
        // A loader has no use for the reconstruction error: only a checkpoint run measures it.
        let measure_error = matches!(target, Target::Shard(_));
        let (mut out, writer) = match target {
            Target::Shard(writer) => (self.encoded.target(values.len(), options), Some(writer)),
            Target::Memory(out) => (out, None),
        };
        check_output(&out, &info.name, values.len(), options)?;
        let (search, gptq) = encode(
            values,
            &shape,
            options,
            weights,
            factor,
            &mut out,
            &mut self.absmax,
        )
        .map_err(context)?;
        let weight = out.view(options, &shape).map_err(context)?;
        let state = quant_state(&info.name, &weight, info.dtype);
        if let Some(writer) = writer {
            write_weight(&info.name, &weight, writer, &mut self.bytes)?;
            writer.push_variable(state.0.clone(), state.1.clone().into_bytes());
        }
        let (squared_error, squared_norm) = if measure_error {
            // The sampled error is measured against the scales as they decode.
            let scales = weight
                .scales()
                .decoded_in(&mut self.decoded_absmax)
                .map_err(context)?;
            sampled_error(values, &weight, scales, options)
        } else {
            (0.0, 0.0)
        };
        let report = TensorReport {
            name: info.name.clone(),
            quantized: true,
            params: weight.numel() as u64,
            bytes_in: (info.end - info.begin) as u64,
            bytes_out: entries_bytes(&planned.outputs) + state.1.len() as u64,
            squared_error,
            squared_norm,
            nested_offset: weight.scales().offset(),
            search,
            gptq,
        };
        Ok((report, state))
    }
}

/// Refuses caller memory that does not fit a tensor of `numel` elements with `options`.
fn check_output(out: &WeightOut<'_>, name: &str, numel: usize, options: &Options) -> Result<()> {
    let bad = |reason: String| CheckpointError::BadOutput {
        tensor: name.to_string(),
        reason,
    };
    if out.codes.len() != packed_len(numel) {
        return Err(bad(format!(
            "holds {} bytes of codes, {} needed",
            out.codes.len(),
            packed_len(numel)
        )));
    }
    let blocks = options.blocksize.blocks(numel);
    match (&out.scales, options.double_quant) {
        (BlockScales::Plain(absmax), false) if absmax.len() == blocks => Ok(()),
        (BlockScales::Nested { codes, scales, .. }, true)
            if codes.len() == blocks && scales.len() == nested_blocks(blocks) =>
        {
            Ok(())
        }
        _ => Err(bad(format!(
            "does not hold the {} scales of {blocks} blocks",
            if options.double_quant {
                "double-quantized"
            } else {
                "float32"
            }
        ))),
    }
}

/// What [`encode`] ran: scale search's or GPTQ's report, if either.
type Outcome = (Option<SearchReport>, Option<GptqReport>);

/// Quantizes `values` (of `shape`) with `options` into `out`, with scale search's or
/// GPTQ's report when one ran (`absmax`: scratch for float32 scales that are then
/// double-quantized). With a Hessian `factor` the tensor is quantized with GPTQ
/// (`importance` then unused).
fn encode<T: Element>(
    values: &[T],
    shape: &[usize],
    options: &Options,
    importance: Option<&[f32]>,
    factor: Option<&HessianFactor>,
    out: &mut WeightOut<'_>,
    absmax: &mut Vec<f32>,
) -> crate::Result<Outcome> {
    let (quant_type, blocksize) = (options.quant_type, options.blocksize);
    if let Some(factor) = factor {
        let report = quantize_4bit_gptq(
            values,
            shape[0],
            factor,
            quant_type,
            blocksize,
            options.scale_search,
            out.codes,
            &mut out.scales,
        )?;
        return Ok((None, Some(report)));
    }
    if options.scale_search {
        let importance = importance.map(Importance::new).transpose()?;
        let report = quantize_4bit_searched(
            values,
            quant_type,
            blocksize,
            importance,
            out.codes,
            &mut out.scales,
        )?;
        return Ok((Some(report), None));
    }
    match &mut out.scales {
        BlockScales::Plain(plain) => {
            quantize_4bit(values, quant_type, blocksize, out.codes, plain)?
        }
        nested => {
            absmax.resize(blocksize.blocks(values.len()), 0.0);
            quantize_4bit(values, quant_type, blocksize, out.codes, absmax)?;
            nested.store(absmax)?;
        }
    }
    Ok((None, None))
}

/// The quant_state of the quantized weight `name` (source dtype `dtype`): its key and JSON.
fn quant_state(name: &str, weight: &PackedView<'_>, dtype: Dtype) -> (String, String) {
    let state = QuantState {
        quant_type: weight.quant_type(),
        blocksize: weight.blocksize(),
        dtype: dtype.torch_name().unwrap_or("float32"),
        shape: weight.shape(),
        nested_offset: weight.scales().offset(),
        nested_dtype: "float32",
    };
    (state.key(name), state.to_json())
}

/// Writes bitsandbytes' fixed-size tensors for the quantized weight `name` (its quant_state
/// goes in with [`ShardWriter::push_variable`]).
fn write_weight(
    name: &str,
    weight: &PackedView<'_>,
    writer: &mut ShardWriter,
    bytes: &mut Vec<u8>,
) -> Result<()> {
    let quant_type = weight.quant_type();
    writer.write(
        &format!("{name}.quant_map"),
        f32_bytes(&quant_type.codebook().values, bytes),
    )?;
    match weight.scales() {
        BlockScales::Nested { codes, scales, .. } => {
            writer.write(&format!("{name}.absmax"), codes)?;
            writer.write(&format!("{name}.nested_absmax"), f32_bytes(scales, bytes))?;
            writer.write(
                &format!("{name}.nested_quant_map"),
                f32_bytes(&crate::dynamic_map(), bytes),
            )?;
        }
        BlockScales::Plain(absmax) => {
            writer.write(&format!("{name}.absmax"), f32_bytes(absmax, bytes))?;
        }
    }
    writer.write(name, weight.codes())
}

/// Squared reconstruction error and squared norm of `weight` (its scales decoded as
/// `absmax`) against `values` over every `stride`-th block: each block summed in float32,
/// the blocks in float64.
fn sampled_error<T: Element>(
    values: &[T],
    weight: &PackedView<'_>,
    absmax: &[f32],
    options: &Options,
) -> (f64, f64) {
    let bs = weight.blocksize().get();
    let stride = options.error_sample_stride.max(1);
    let table = &weight.quant_type().codebook().values;
    let packed = weight.codes();
    (0..absmax.len())
        .into_par_iter()
        .step_by(stride)
        .map(|block| {
            let start = block * bs;
            let end = (start + bs).min(values.len());
            let scaled: [f32; 16] = std::array::from_fn(|q| table[q] * absmax[block]);
            let (mut error, mut norm) = (0.0f32, 0.0f32);
            for (i, x) in values[start..end].iter().enumerate() {
                let byte = packed[(start + i) / 2];
                let nibble = if (start + i).is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0xf
                };
                let x = x.to_f32();
                let difference = scaled[usize::from(nibble)] - x;
                error += difference * difference;
                norm += x * x;
            }
            (f64::from(error), f64::from(norm))
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// The `[cols, rows]` transpose of the row-major `[rows, cols]` matrix `values`, copied in
/// tiles (so both sides stay in cache) with the output rows split over the threads.
fn transpose<T: Element>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 32;
    let mut out = vec![values[0]; values.len()];
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, chunk)| {
            let first_col = band * TILE;
            let band_cols = chunk.len() / rows;
            for row_start in (0..rows).step_by(TILE) {
                for c in 0..band_cols {
                    let source_col = first_col + c;
                    for r in row_start..(row_start + TILE).min(rows) {
                        chunk[c * rows + r] = values[r * cols + source_col];
                    }
                }
            }
        });
    out
}

/// Reports a finished tensor; `Cancelled` when the callback asks to stop.
fn tell(progress: &mut dyn FnMut(Progress<'_>) -> bool, done: Progress<'_>) -> Result<()> {
    if progress(done) {
        Ok(())
    } else {
        Err(CheckpointError::Cancelled)
    }
}

/// `raw` as `&[T]`: borrowed when aligned, else copied into `scratch`.
fn typed<'a, T: Element>(raw: &'a [u8], scratch: &'a mut Vec<u32>) -> &'a [T] {
    let size = std::mem::size_of::<T>();
    let count = raw.len() / size;
    if (raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        // SAFETY: aligned, `count * size` bytes in bounds, and T (f32/bf16/f16) is valid
        // for every bit pattern; safetensors data is little-endian like the host.
        return unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<T>(), count) };
    }
    scratch.clear();
    scratch.resize((raw.len()).div_ceil(4), 0);
    // SAFETY: the u32 buffer is 4-aligned (enough for T) and at least raw.len() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(raw.as_ptr(), scratch.as_mut_ptr().cast::<u8>(), raw.len());
        std::slice::from_raw_parts(scratch.as_ptr().cast::<T>(), count)
    }
}

fn f32_bytes<'a>(values: &[f32], buffer: &'a mut Vec<u8>) -> &'a [u8] {
    buffer.clear();
    buffer.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    buffer
}

fn write_index(
    out_dir: &Path,
    shards: &[(String, u64)],
    weight_map: &BTreeMap<String, String>,
) -> Result<()> {
    let total: u64 = shards.iter().map(|(_, size)| size).sum();
    let map: Map<String, Value> = weight_map
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let index = json!({"metadata": {"total_size": total}, "weight_map": map});
    let path: PathBuf = out_dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(CheckpointError::io(&path))
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transpose_matches_the_definition_on_awkward_shapes() {
        for (rows, cols) in [
            (1, 1),
            (1, 70),
            (70, 1),
            (3, 70),
            (33, 65),
            (64, 32),
            (100, 257),
        ] {
            let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let out = transpose(&values, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        values[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
