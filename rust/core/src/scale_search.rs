//! Error-optimal block scales (opt-in): instead of `absmax`, each block's scale is chosen
//! to minimize its squared reconstruction error, letting the largest values clip. The
//! format is unchanged — a block still decodes as `code[q] * scale` — so every
//! bitsandbytes consumer loads the result.
//!
//! Per block (as llama.cpp's IQ4_NL does for its 16-level grid): for candidate scales
//! `absmax * (1 - k * CANDIDATE_STEP)`, take the nearest codes and the least-squares
//! scale for those codes, `s = sum(w x c) / sum(w c^2)`, which lowers the error below
//! the block's norm by `sum(w x c)^2 / sum(w c^2)`; keep the scale with the largest gain.
//! The candidates are tried from absmax down and the search stops at the first one that
//! gains less than the best so far (the gain is close to unimodal in the scale): on real
//! weights this keeps ~95% of the full grid's improvement at about half its cost.
//! `absmax` is candidate 0, so before double quantization a block is never worse than
//! with absmax scaling. Optional importance weights `w` (one per input column, e.g. mean
//! squared activations, llama.cpp's imatrix) make the error the one that matters to the
//! layer's output; without them `w = 1`.
//!
//! Double quantization then compresses the chosen scales exactly as it does absmax
//! values, and the codes are encoded last, against the scale as it decodes (nearest codes
//! for a fixed scale minimize each element's error, so this never loses to the codes
//! picked during the search). The same pass measures the error of the result; the error
//! of plain absmax quantization (bitsandbytes' output) comes from the candidate-0 sums
//! and the double-quantized absmax values. Should the search ever lose on a tensor after
//! double quantization, the absmax result is written instead: per tensor never worse.
//!
//! Cost: the search needs only the sums (no packing), the moments kernels of
//! [`crate::encode`] give them in the same pass as the codes, and their canonical lane
//! order makes the chosen scales identical on every CPU.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::codebook::{Codebook, QuantType};
use crate::dispatch::multiversion;
use crate::element::Element;
use crate::encode::{Encoder, Moments};
use crate::error::{QuantError, Result};
use crate::layout::{check_len, packed_len, task_blocks, Blocksize, ABSMAX_FLOOR, BLOCKSIZES};
use crate::packed::{Absmax, BlockScales, ScalesMut};
use crate::quantize::{block_max_abs, non_finite_error, quantize_4bit, quantize_partial_block};

/// Candidate scales per block: `absmax * (1 - k * CANDIDATE_STEP)`, `k < CANDIDATES`.
pub const CANDIDATES: usize = 4;
/// Spacing of the candidate grid, as a fraction of absmax.
pub const CANDIDATE_STEP: f32 = 0.05;

const MAX_BLOCK: usize = BLOCKSIZES[BLOCKSIZES.len() - 1];

/// Per-input-column importance: element `i` of the row-major tensor has weight
/// `weights[i % weights.len()]` (so a vector of `in_features` weights the columns of a
/// `[out, in]` weight).
#[derive(Debug, Clone, Copy)]
pub struct Importance<'a> {
    weights: &'a [f32],
}

impl<'a> Importance<'a> {
    /// Checks the weights: at least one, all finite and non-negative.
    pub fn new(weights: &'a [f32]) -> Result<Self> {
        if weights.is_empty() {
            return Err(QuantError::BadImportance("no weights".into()));
        }
        if let Some(i) = weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(QuantError::BadImportance(format!(
                "weight {i} is {}; weights must be finite and >= 0",
                weights[i]
            )));
        }
        Ok(Importance { weights })
    }

    /// The weights of `len` elements starting at flat index `start`.
    fn span<'s>(self, start: usize, len: usize, scratch: &'s mut [f32]) -> &'s [f32]
    where
        'a: 's,
    {
        let w = self.weights;
        let at = start % w.len();
        if at + len <= w.len() {
            return &w[at..at + len];
        }
        for (j, s) in scratch[..len].iter_mut().enumerate() {
            *s = w[(at + j) % w.len()];
        }
        &scratch[..len]
    }
}

/// The outcome of [`quantize_4bit_searched`]. Errors are (importance-weighted) squared
/// reconstruction errors summed over the tensor, of the result as it decodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchReport {
    /// Error of what was written.
    pub squared_error: f64,
    /// Error of plain absmax quantization (bitsandbytes' bytes) with the same options.
    pub absmax_squared_error: f64,
    /// (Weighted) squared norm of the input.
    pub squared_norm: f64,
    /// The search lost on this tensor after double quantization and the absmax result
    /// was written.
    pub kept_absmax: bool,
    /// Importance weights weighted the errors.
    pub weighted: bool,
}

/// Shared, read-only inputs of the per-task loops.
struct Context<'a> {
    book: &'a Codebook,
    encoder: Encoder,
    blocksize: usize,
    importance: Option<Importance<'a>>,
}

/// Quantizes `input` with searched block scales (see the module docs) into `packed` and
/// `scales` (nested ones get their offset too). The trailing partial block keeps
/// bitsandbytes' absmax rule.
pub fn quantize_4bit_searched<T: Element>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    importance: Option<Importance<'_>>,
    packed: &mut [u8],
    scales: &mut ScalesMut<'_>,
) -> Result<SearchReport> {
    let numel = input.len();
    if numel == 0 {
        return Err(QuantError::Empty);
    }
    let blocks = blocksize.blocks(numel);
    check_len("packed output", packed_len(numel), packed.len())?;
    scales.check_output(blocks)?;
    let ctx = Context {
        book: quant_type.codebook(),
        encoder: Encoder::best(),
        blocksize: blocksize.get(),
        importance,
    };
    let per_task = task_blocks(ctx.blocksize);
    let task_len = per_task * ctx.blocksize;

    // 1. Search: absmax, the chosen scale and the candidate-0 (absmax) sums per block.
    let mut absmax = vec![0.0f32; blocks];
    let mut chosen = vec![0.0f32; blocks];
    let mut baseline = vec![Moments::default(); blocks];
    let first_bad = input
        .par_chunks(task_len)
        .zip(absmax.par_chunks_mut(per_task))
        .zip(chosen.par_chunks_mut(per_task))
        .zip(baseline.par_chunks_mut(per_task))
        .enumerate()
        .filter_map(|(task, (((values, absmax), chosen), baseline))| {
            search_task(values, task * per_task, absmax, chosen, baseline, &ctx)
                .map(|local| task * task_len + local)
        })
        .min();
    if let Some(index) = first_bad {
        return Err(non_finite_error(input, index));
    }

    // 2. Store the chosen scales; the scales as they decode, for them and for absmax.
    scales.store(&chosen)?;
    let decoded = match scales.view().decoded()? {
        Cow::Owned(decoded) => decoded,
        Cow::Borrowed(_) => chosen, // stored as they are
    };
    let decoded_absmax = match scales {
        BlockScales::Nested { .. } => {
            let mut absmax_scales = Absmax::zeroed(blocks, true);
            absmax_scales.write_with(|scales| scales.store(&absmax))?;
            absmax_scales.view().decoded()?.into_owned()
        }
        BlockScales::Plain(_) => absmax.clone(),
    };

    // 3. Codes against the stored scales, with the error of the result per block.
    let mut errors = vec![0.0f64; blocks];
    input
        .par_chunks(task_len)
        .zip(packed.par_chunks_mut(task_len / 2))
        .zip(decoded.par_chunks(per_task))
        .zip(errors.par_chunks_mut(per_task))
        .enumerate()
        .for_each(|(task, (((values, codes), scales), errors))| {
            encode_task(values, task * per_task, scales, codes, errors, &ctx)
        });
    // Sums in block order: the totals (and the guard below) do not depend on threads.
    let squared_error: f64 = errors.iter().sum();
    let absmax_squared_error: f64 = baseline
        .iter()
        .zip(&decoded_absmax)
        .map(|(m, &s)| m.error_at(s))
        .sum();
    let squared_norm: f64 = baseline.iter().map(|m| f64::from(m.norm)).sum();
    let mut report = SearchReport {
        squared_error,
        absmax_squared_error,
        squared_norm,
        kept_absmax: false,
        weighted: ctx.importance.is_some(),
    };
    if squared_error > absmax_squared_error {
        // Never worse than absmax per tensor: write bitsandbytes' result instead.
        quantize_4bit(input, quant_type, blocksize, packed, &mut absmax)?;
        scales.store(&absmax)?;
        report.squared_error = absmax_squared_error;
        report.kept_absmax = true;
    }
    Ok(report)
}

multiversion! {
    fn search_task<T: Element>(
        values: &[T], first_block: usize, absmax: &mut [f32], chosen: &mut [f32],
        baseline: &mut [Moments], ctx: &Context<'_>,
    ) -> Option<usize> => search_task_body
}

/// Search pass over one task's blocks; returns the task-local index of the first
/// non-finite value, if any.
#[inline(always)]
fn search_task_body<T: Element>(
    values: &[T],
    first_block: usize,
    absmax: &mut [f32],
    chosen: &mut [f32],
    baseline: &mut [Moments],
    ctx: &Context<'_>,
) -> Option<usize> {
    let bs = ctx.blocksize;
    let (mut wide, mut scratch) = ([0.0f32; MAX_BLOCK], [0.0f32; MAX_BLOCK]);
    let blocks = values
        .chunks(bs)
        .zip(absmax)
        .zip(chosen)
        .zip(baseline)
        .enumerate();
    for (i, (((block, absmax), chosen), baseline)) in blocks {
        let max_abs = match block_max_abs(block) {
            Ok(max_abs) => max_abs,
            Err(local) => return Some(i * bs + local),
        };
        let floored = max_abs.max(ABSMAX_FLOOR);
        let weights = ctx
            .importance
            .map(|imp| imp.span((first_block + i) * bs, block.len(), &mut scratch));
        if block.len() < bs {
            // The trailing partial block: bitsandbytes' rule, no search.
            *absmax = floored;
            *chosen = floored;
            *baseline = partial_moments(block, weights, floored, ctx.book);
            continue;
        }
        let x = T::widen(block, &mut wide);
        *absmax = max_abs;
        *baseline = ctx
            .encoder
            .encode_moments(x, weights, 1.0 / floored, ctx.book, None);
        *chosen = choose_scale(x, weights, max_abs, *baseline, ctx);
    }
    None
}

/// The candidate with the largest least-squares gain (ties keep the earlier candidate).
#[inline(always)]
fn choose_scale(
    x: &[f32],
    weights: Option<&[f32]>,
    max_abs: f32,
    at_absmax: Moments,
    ctx: &Context<'_>,
) -> f32 {
    let Some((mut best, mut gain)) = at_absmax.best_scale() else {
        return max_abs; // an all-zero block (or all-zero weights): absmax as usual
    };
    for k in 1..CANDIDATES {
        let candidate = max_abs * (1.0 - k as f32 * CANDIDATE_STEP);
        let sums = ctx
            .encoder
            .encode_moments(x, weights, 1.0 / candidate, ctx.book, None);
        match sums.best_scale() {
            Some((scale, g)) if g > gain => (best, gain) = (scale, g),
            // The gain over the grid is close to unimodal: once a smaller scale does worse,
            // smaller ones rarely win again, and stopping saves most of the search's time.
            _ => break,
        }
    }
    best
}

multiversion! {
    fn encode_task<T: Element>(
        values: &[T], first_block: usize, scales: &[f32], packed: &mut [u8],
        errors: &mut [f64], ctx: &Context<'_>,
    ) -> () => encode_task_body
}

/// Final pass over one task's blocks: nearest codes for each stored scale, and the error.
#[inline(always)]
fn encode_task_body<T: Element>(
    values: &[T],
    first_block: usize,
    scales: &[f32],
    packed: &mut [u8],
    errors: &mut [f64],
    ctx: &Context<'_>,
) {
    let bs = ctx.blocksize;
    let (mut wide, mut scratch) = ([0.0f32; MAX_BLOCK], [0.0f32; MAX_BLOCK]);
    let blocks = values
        .chunks(bs)
        .zip(packed.chunks_mut(bs / 2))
        .zip(scales)
        .zip(errors)
        .enumerate();
    for (i, (((block, codes), &scale), error)) in blocks {
        let weights = ctx
            .importance
            .map(|imp| imp.span((first_block + i) * bs, block.len(), &mut scratch));
        let sums = if block.len() < bs {
            // A zero scale decodes everything to 0; divide by infinity to code 0 exactly.
            let divisor = if scale == 0.0 { f32::INFINITY } else { scale };
            quantize_partial_block(block, codes, ctx.book, divisor);
            partial_moments(block, weights, divisor, ctx.book)
        } else {
            let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            let x = T::widen(block, &mut wide);
            ctx.encoder
                .encode_moments(x, weights, inverse, ctx.book, Some(codes))
        };
        *error = sums.error_at(scale);
    }
}

/// [`Moments`] of a trailing partial block coded as bitsandbytes does (`x / scale`).
fn partial_moments<T: Element>(
    block: &[T],
    weights: Option<&[f32]>,
    scale: f32,
    book: &Codebook,
) -> Moments {
    let mut sums = Moments::default();
    for (j, x) in block.iter().enumerate() {
        let x = x.to_f32();
        let c = book.values[usize::from(book.code_of((x / scale).clamp(-1.0, 1.0)))];
        let w = weights.map_or(1.0, |w| w[j]);
        sums.cross += w * x * c;
        sums.energy += w * (c * c);
        sums.norm += w * x * x;
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize::dequantize_4bit;
    use crate::double_quant::dequantize_absmax;
    use crate::layout::nested_blocks;
    use crate::NESTED_BLOCKSIZE;

    /// Uniform noise with an outlier every 97 values.
    fn outlier_values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 97 == 0 {
                    u * 12.0
                } else {
                    u
                }
            })
            .collect()
    }

    fn squared_error(values: &[f32], decoded: &[f32], weights: Option<&[f32]>) -> f64 {
        values
            .iter()
            .zip(decoded)
            .enumerate()
            .map(|(i, (&x, &y))| {
                let w = weights.map_or(1.0, |w| f64::from(w[i % w.len()]));
                w * (f64::from(x) - f64::from(y)).powi(2)
            })
            .sum()
    }

    fn decode(packed: &[u8], scales: &[f32], blocksize: Blocksize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n];
        dequantize_4bit(packed, scales, QuantType::Nf4, blocksize, &mut out).unwrap();
        out
    }

    #[test]
    fn float_scales_never_lose_to_absmax_per_block_and_report_true_errors() {
        let n = 64 * 200 + 37; // with a trailing partial block
        let values = outlier_values(n, 7);
        let blocksize = Blocksize::default();
        let blocks = blocksize.blocks(n);
        let (mut packed_a, mut scales_a) = (vec![0u8; packed_len(n)], vec![0f32; blocks]);
        let (mut packed_s, mut scales_s) = (vec![0u8; packed_len(n)], vec![0f32; blocks]);
        quantize_4bit(
            &values,
            QuantType::Nf4,
            blocksize,
            &mut packed_a,
            &mut scales_a,
        )
        .unwrap();
        let report = quantize_4bit_searched(
            &values,
            QuantType::Nf4,
            blocksize,
            None,
            &mut packed_s,
            &mut ScalesMut::Plain(&mut scales_s),
        )
        .unwrap();
        let absmax_decoded = decode(&packed_a, &scales_a, blocksize, n);
        let searched_decoded = decode(&packed_s, &scales_s, blocksize, n);
        for b in 0..blocks {
            let range = b * 64..((b + 1) * 64).min(n);
            let a = squared_error(&values[range.clone()], &absmax_decoded[range.clone()], None);
            let s = squared_error(&values[range.clone()], &searched_decoded[range], None);
            assert!(s <= a * (1.0 + 1e-6), "block {b}: {s} > {a}");
        }
        let (a, s) = (
            squared_error(&values, &absmax_decoded, None),
            squared_error(&values, &searched_decoded, None),
        );
        assert!(s < 0.97 * a, "search {s} vs absmax {a}");
        assert!(
            (report.squared_error - s).abs() <= 1e-3 * s,
            "{report:?} vs {s}"
        );
        assert!(
            (report.absmax_squared_error - a).abs() <= 1e-3 * a,
            "{report:?} vs {a}"
        );
        assert!(!report.kept_absmax);
    }

    #[test]
    fn double_quantized_result_is_scored_as_it_decodes() {
        let n = 64 * NESTED_BLOCKSIZE * 3;
        let values = outlier_values(n, 11);
        let blocksize = Blocksize::default();
        let blocks = blocksize.blocks(n);
        let mut packed = vec![0u8; packed_len(n)];
        let (mut codes, mut nested) = (vec![0u8; blocks], vec![0f32; nested_blocks(blocks)]);
        let mut stored = ScalesMut::Nested {
            codes: &mut codes,
            scales: &mut nested,
            offset: f32::NAN,
        };
        let report = quantize_4bit_searched(
            &values,
            QuantType::Nf4,
            blocksize,
            None,
            &mut packed,
            &mut stored,
        )
        .unwrap();
        let offset = stored.offset().unwrap();
        let mut scales = vec![0f32; blocks];
        dequantize_absmax(&codes, &nested, offset, &mut scales).unwrap();
        let err = squared_error(&values, &decode(&packed, &scales, blocksize, n), None);
        assert!((report.squared_error - err).abs() <= 1e-3 * err);
        assert!(
            report.squared_error < 0.97 * report.absmax_squared_error,
            "{report:?}"
        );
    }

    #[test]
    fn importance_weights_lower_the_weighted_error() {
        let (rows, cols) = (64, 256);
        let values = outlier_values(rows * cols, 3);
        let importance: Vec<f32> = (0..cols)
            .map(|c| if c % 8 == 0 { 50.0 } else { 0.1 })
            .collect();
        let blocksize = Blocksize::default();
        let blocks = blocksize.blocks(values.len());
        let run = |weights: Option<&[f32]>| {
            let (mut packed, mut scales) = (vec![0u8; values.len() / 2], vec![0f32; blocks]);
            let imp = weights.map(|w| Importance::new(w).unwrap());
            quantize_4bit_searched(
                &values,
                QuantType::Nf4,
                blocksize,
                imp,
                &mut packed,
                &mut ScalesMut::Plain(&mut scales),
            )
            .unwrap();
            decode(&packed, &scales, blocksize, values.len())
        };
        let plain = squared_error(&values, &run(None), Some(&importance));
        let weighted = squared_error(&values, &run(Some(&importance)), Some(&importance));
        assert!(
            weighted < 0.95 * plain,
            "weighted {weighted} vs plain {plain}"
        );
        // All-ones weights are the unweighted search, bit for bit.
        let ones = vec![1.0f32; cols];
        assert_eq!(run(None), run(Some(&ones)));
    }

    #[test]
    fn bad_importance_is_rejected() {
        assert!(Importance::new(&[]).is_err());
        assert!(Importance::new(&[1.0, -0.5]).is_err());
        assert!(Importance::new(&[1.0, f32::NAN]).is_err());
    }
}
