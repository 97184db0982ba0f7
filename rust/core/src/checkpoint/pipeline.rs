//! Quantizes a whole checkpoint: tensors are read from the memory-mapped source one at a
//! time, selected 2-D weights are quantized (multithreaded) and written as bitsandbytes'
//! serialization, every other tensor is copied unchanged, and output shards are written
//! as the work proceeds. Memory holds the current tensor's outputs, not the model.

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
use crate::double_quant::double_quantize;
use crate::element::Element;
use crate::gptq::{quantize_4bit_gptq, GptqReport, HessianFactor};
use crate::layout::{nested_blocks, packed_len, Blocksize};
use crate::packed::{PackedView, Scales, ScalesMut};
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
    let importance = match (&options.importance, options.scale_search) {
        (Some(path), true) => Some(ImportanceFile::open(path)?),
        _ => None,
    };
    let mut hessians = match &options.hessians {
        Some(path) => Some(HessianFile::open(path, options.gptq_damp)?),
        None => None,
    };
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
            planned.file.prefetch(planned.info);
            let report = if planned.quantize {
                work.quantize_into(
                    planned,
                    options,
                    importance.as_ref(),
                    hessians.as_mut(),
                    &mut writer,
                )?
            } else {
                copy_into(planned, &mut writer)?
            };
            planned.file.release(planned.info);
            bytes_done += report.bytes_in;
            reports.push(report);
            let carry_on = progress(Progress {
                tensors_done: reports.len(),
                tensors_total: plan.len(),
                bytes_done,
                bytes_total,
                tensor: &planned.info.name,
            });
            if !carry_on {
                return Err(CheckpointError::Cancelled);
            }
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
    Ok(TensorReport {
        name: planned.info.name.clone(),
        quantized: false,
        params: planned.info.numel() as u64,
        bytes_in: bytes.len() as u64,
        bytes_out: bytes.len() as u64,
        squared_error: 0.0,
        squared_norm: 0.0,
        nested_offset: None,
        search: None,
        gptq: None,
    })
}

/// Buffers reused from tensor to tensor.
#[derive(Default)]
struct Workspace {
    encoded: Encoded,
    decoded_absmax: Vec<f32>,
    aligned: Vec<u32>,
    bytes: Vec<u8>,
}

/// The current tensor's packed codes and block scales (float32 `absmax`, or the nested
/// `codes`/`scales` of double quantization).
#[derive(Default)]
struct Encoded {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

impl Workspace {
    fn quantize_into(
        &mut self,
        planned: &Planned<'_>,
        options: &Options,
        importance: Option<&ImportanceFile>,
        hessians: Option<&mut HessianFile>,
        writer: &mut ShardWriter,
    ) -> Result<TensorReport> {
        let info = planned.info;
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
                self.quantize_typed(values, planned, options, weights, factor, writer)
            }
            Dtype::BF16 => {
                let values = typed::<bf16>(raw, &mut aligned);
                self.quantize_typed(values, planned, options, weights, factor, writer)
            }
            Dtype::F16 => {
                let values = typed::<f16>(raw, &mut aligned);
                self.quantize_typed(values, planned, options, weights, factor, writer)
            }
            other => Err(CheckpointError::BadSelection {
                tensor: info.name.clone(),
                reason: format!("its dtype {} cannot be quantized", other.name()),
            }),
        };
        self.aligned = aligned;
        report
    }

    /// Quantizes `values` (the tensor `planned`) and writes bitsandbytes' tensors for it.
    fn quantize_typed<T: Element>(
        &mut self,
        values: &[T],
        planned: &Planned<'_>,
        options: &Options,
        weights: Option<&[f32]>,
        factor: Option<&HessianFactor>,
        writer: &mut ShardWriter,
    ) -> Result<TensorReport> {
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
        let (weight, (search, gptq)) = self
            .encoded
            .quantize(values, &shape, options, weights, factor)
            .map_err(context)?;
        let json_len = write_weight(&info.name, &weight, info.dtype, writer, &mut self.bytes)?;
        // The sampled error is measured against the scales as they decode.
        let scales = weight
            .scales()
            .decoded_in(&mut self.decoded_absmax)
            .map_err(context)?;
        let (squared_error, squared_norm) = sampled_error(values, &weight, scales, options);
        Ok(TensorReport {
            name: info.name.clone(),
            quantized: true,
            params: weight.numel() as u64,
            bytes_in: (info.end - info.begin) as u64,
            bytes_out: entries_bytes(&planned.outputs) + json_len as u64,
            squared_error,
            squared_norm,
            nested_offset: weight.scales().offset(),
            search,
            gptq,
        })
    }
}

/// What [`Encoded::quantize`] ran: scale search's or GPTQ's report, if either.
type Outcome = (Option<SearchReport>, Option<GptqReport>);

impl Encoded {
    /// Quantizes `values` (of `shape`) with `options` into these buffers and returns them
    /// as a view, with scale search's or GPTQ's report when one ran. With a Hessian
    /// `factor` the tensor is quantized with GPTQ (`importance` then unused).
    fn quantize<'a, T: Element>(
        &'a mut self,
        values: &[T],
        shape: &'a [usize],
        options: &Options,
        importance: Option<&[f32]>,
        factor: Option<&HessianFactor>,
    ) -> crate::Result<(PackedView<'a>, Outcome)> {
        let (quant_type, blocksize) = (options.quant_type, options.blocksize);
        let blocks = blocksize.blocks(values.len());
        self.packed.resize(packed_len(values.len()), 0);
        self.absmax.resize(blocks, 0.0);
        let (outcome, offset) = if let Some(factor) = factor {
            let mut scales =
                scale_store(options, &mut self.absmax, &mut self.codes, &mut self.scales);
            let report = quantize_4bit_gptq(
                values,
                shape[0],
                factor,
                quant_type,
                blocksize,
                options.scale_search,
                &mut self.packed,
                &mut scales,
            )?;
            ((None, Some(report)), scales.offset())
        } else if options.scale_search {
            let importance = importance.map(Importance::new).transpose()?;
            let mut scales =
                scale_store(options, &mut self.absmax, &mut self.codes, &mut self.scales);
            let report = quantize_4bit_searched(
                values,
                quant_type,
                blocksize,
                importance,
                &mut self.packed,
                &mut scales,
            )?;
            ((Some(report), None), scales.offset())
        } else {
            quantize_4bit(
                values,
                quant_type,
                blocksize,
                &mut self.packed,
                &mut self.absmax,
            )?;
            let offset = if options.double_quant {
                self.codes.resize(blocks, 0);
                self.scales.resize(nested_blocks(blocks), 0.0);
                Some(double_quantize(
                    &self.absmax,
                    &mut self.codes,
                    &mut self.scales,
                )?)
            } else {
                None
            };
            ((None, None), offset)
        };
        let scales = match offset {
            Some(offset) => Scales::Nested {
                codes: &self.codes,
                scales: &self.scales,
                offset,
            },
            None => Scales::Plain(&self.absmax),
        };
        let view = PackedView::new(&self.packed, scales, quant_type, blocksize, shape)?;
        Ok((view, outcome))
    }
}

/// Where searched or GPTQ scales go: `absmax` as floats, or with double quantization the
/// nested `codes`/`scales` (resized to `absmax`'s block count; the offset set when stored).
fn scale_store<'a>(
    options: &Options,
    absmax: &'a mut [f32],
    codes: &'a mut Vec<u8>,
    scales: &'a mut Vec<f32>,
) -> ScalesMut<'a> {
    if options.double_quant {
        codes.resize(absmax.len(), 0);
        scales.resize(nested_blocks(absmax.len()), 0.0);
        ScalesMut::Nested {
            codes,
            scales,
            offset: 0.0,
        }
    } else {
        ScalesMut::Plain(absmax)
    }
}

/// Writes bitsandbytes' tensors for the quantized weight `name` (source dtype `dtype`) and
/// its quant_state; returns the length of the quant_state JSON.
fn write_weight(
    name: &str,
    weight: &PackedView<'_>,
    dtype: Dtype,
    writer: &mut ShardWriter,
    bytes: &mut Vec<u8>,
) -> Result<usize> {
    let quant_type = weight.quant_type();
    writer.write(
        &format!("{name}.quant_map"),
        f32_bytes(&quant_type.codebook().values, bytes),
    )?;
    match weight.scales() {
        Scales::Nested { codes, scales, .. } => {
            writer.write(&format!("{name}.absmax"), codes)?;
            writer.write(&format!("{name}.nested_absmax"), f32_bytes(scales, bytes))?;
            writer.write(
                &format!("{name}.nested_quant_map"),
                f32_bytes(&crate::dynamic_map(), bytes),
            )?;
        }
        Scales::Plain(absmax) => {
            writer.write(&format!("{name}.absmax"), f32_bytes(absmax, bytes))?;
        }
    }
    writer.write(name, weight.codes())?;
    let state = QuantState {
        quant_type,
        blocksize: weight.blocksize(),
        dtype: dtype.torch_name().unwrap_or("float32"),
        shape: weight.shape(),
        nested_offset: weight.scales().offset(),
        nested_dtype: "float32",
    };
    let json = state.to_json().into_bytes();
    let json_len = json.len();
    writer.push_variable(state.key(name), json);
    Ok(json_len)
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
