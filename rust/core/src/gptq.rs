//! Calibrated, error-compensating quantization (GPTQ, Frantar et al. 2022) into the
//! bitsandbytes NF4/FP4 format: the codes are chosen to minimize the error of a linear
//! layer's *output* on calibration inputs, not of its weights.
//!
//! For a weight `W [rows, cols]` (`y = W x`) and the inputs' second moment
//! `H = X^T X [cols, cols]`, the output error of a quantized `Q` is
//! `tr((W - Q) H (W - Q)^T)`, a sum over rows. Each row is rounded one column at a time
//! and the rounding error of a column is pushed onto the columns not yet rounded, through
//! the upper Cholesky factor `U` of the damped inverse Hessian
//! (`(H + lambda I)^{-1} = U^T U`): `w[j] -= (w[i] - q[i]) / U[i,i] * U[i,j]` for `j > i`.
//! Updates inside a span of [`BLOCK_COLUMNS`] columns are applied at once, the rest of
//! the row gets them as one matrix product per span (GPTQ's "lazy batch" updates). The
//! factor is shared by all rows, so rows are independent: they run in fixed tiles of
//! [`ROW_TILE`] rows on the thread pool, every product sequential inside its tile, and the
//! result does not depend on the thread count.
//!
//! Scales and double quantization. The format fixes one scale per block of `blocksize`
//! consecutive elements of the flattened weight, decoded (with double quantization) as
//! `map[code] * nested_scale + offset`, where the offset is the mean of *all* scales and
//! the nested scale the largest deviation among 256 of them. So no scale is final until
//! every scale is known, and choosing them while rounding (as GPTQ's per-group
//! parameters are) would make the codes target scales that double quantization then
//! moves. Instead the scales come first, from the original weight: absmax, or the scale
//! search of [`crate::scale_search`] weighted by `diag(H)` (the mean squared input of each
//! column); they are double-quantized, decoded, and the error-compensating rounding then
//! picks each code against the scale exactly as a decoder rebuilds it. An error-updated
//! value beyond its block's scale is clamped to the outermost code.
//!
//! Fallback. The same call also produces bitsandbytes' absmax result and the scale
//! search's, measures the output error of each with the undamped `H`, and writes the
//! best of the three, so per tensor the result is never worse on the calibration
//! activations than either. With `e = w - q` a row's error and `H_d = H + lambda I` the
//! damped matrix, `e H e^T = e H_d e^T - lambda |e|^2`. GPTQ's own `e H_d e^T` needs no
//! extra product: the rounding errors `d = e U^{-1}` are what the recursion computes, and
//! `e H_d e^T = |d|^2`. A baseline's is `|e R|^2` for the triangular `R` with
//! `H_d = R R^T`, which the factorization gives: half the work of `e H e^T`.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::codebook::{Codebook, QuantType};
use crate::element::Element;
use crate::error::{QuantError, Result};
use crate::layout::{check_len, packed_len, Blocksize};
use crate::packed::{Absmax, BlockScales, PackedTensor, ScalesMut};
use crate::scale_search::{quantize_4bit_searched, Importance};

/// Default damping: `lambda = DEFAULT_DAMP * mean(diag(H))`, as GPTQ's `percdamp`.
pub const DEFAULT_DAMP: f64 = 0.01;
/// Columns per lazy-update span.
pub const BLOCK_COLUMNS: usize = 128;
/// Rows per parallel task (fixed, so the result is independent of the thread count).
pub const ROW_TILE: usize = 64;
/// Times the damping is multiplied by 10 when the damped Hessian is not positive definite.
const DAMP_RETRIES: usize = 6;

/// A layer input's Hessian `H = X^T X` with the Cholesky factor GPTQ needs; build it once
/// and quantize every weight that reads the same input with it.
pub struct HessianFactor {
    cols: usize,
    /// `diag(H)`: the importance weights the scale search gets.
    diagonal: Vec<f32>,
    /// `U`, row-major upper triangular, with `H_d^{-1} = U^T U`.
    upper: Vec<f32>,
    /// `R`, row-major upper triangular, with `H_d = R R^T`.
    root: Vec<f32>,
    /// What was added to each diagonal entry of `H` to make `H_d`: the damping, plus 1
    /// for a dead column.
    added: Vec<f32>,
    /// The `lambda` added to the diagonal.
    damping: f64,
}

impl HessianFactor {
    /// Factors `hessian` (`cols x cols`, row-major; float32 or float64), damped by
    /// `damp * mean(diag(H))`. A column whose input is always zero (`H[i,i] == 0`) is
    /// rounded to nearest. Errors on a wrong length, a non-finite or negative-diagonal
    /// matrix, or one that stays indefinite after damping.
    pub fn new<F: Copy + Into<f64>>(hessian: &[F], cols: usize, damp: f64) -> Result<Self> {
        if cols == 0 {
            return Err(QuantError::Empty);
        }
        check_len("hessian", cols * cols, hessian.len())?;
        let bad = |reason: String| Err(QuantError::BadHessian(reason));
        if !(damp.is_finite() && damp >= 0.0) {
            return bad(format!("damping {damp} must be finite and >= 0"));
        }
        let at = |i: usize, j: usize| -> f64 { hessian[i * cols + j].into() };
        if let Some(i) = (0..cols * cols).find(|&i| !hessian[i].into().is_finite()) {
            return bad(format!("entry {i} is not finite"));
        }
        if let Some(i) = (0..cols).find(|&i| at(i, i) < 0.0) {
            return bad(format!("diagonal entry {i} is {} < 0", at(i, i)));
        }
        let diagonal_mean = (0..cols).map(|i| at(i, i)).sum::<f64>() / cols as f64;
        let mut damping = if diagonal_mean > 0.0 {
            damp * diagonal_mean
        } else {
            1.0
        };
        // Factor the reversed matrix: with P the reversal permutation and
        // P H P = L L^T, H^{-1} = M^T M for the upper triangular M = P L^{-1} P, so U is
        // one Cholesky factorization and one triangular inverse away.
        let mut lower = Mat::<f64>::zeros(cols, cols);
        let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f64>(
            cols,
            Par::Seq,
            Default::default(),
        ));
        let mut attempt = 0;
        loop {
            for a in 0..cols {
                for b in 0..=a {
                    let (i, j) = (cols - 1 - a, cols - 1 - b);
                    let mut value = 0.5 * (at(i, j) + at(j, i));
                    if a == b {
                        // A dead input column: its weight has no effect on the output.
                        value = if value == 0.0 { 1.0 } else { value } + damping;
                    }
                    lower[(a, b)] = value;
                }
            }
            let factored = cholesky_in_place(
                lower.as_mut(),
                Default::default(),
                Par::Seq,
                MemStack::new(&mut scratch),
                Default::default(),
            );
            if factored.is_ok() {
                break;
            }
            attempt += 1;
            if attempt > DAMP_RETRIES {
                return bad(format!(
                    "not positive definite even with damping {damping:e} added to the diagonal"
                ));
            }
            damping *= 10.0;
        }
        for a in 0..cols {
            for b in a + 1..cols {
                lower[(a, b)] = 0.0;
            }
        }
        let mut root = vec![0.0f32; cols * cols];
        for i in 0..cols {
            for j in i..cols {
                root[i * cols + j] = lower[(cols - 1 - i, cols - 1 - j)] as f32;
            }
        }
        let mut inverse = Mat::<f64>::zeros(cols, cols);
        invert_lower_triangular(inverse.as_mut(), lower.as_ref(), Par::Seq);
        drop(lower);
        let mut upper = vec![0.0f32; cols * cols];
        for i in 0..cols {
            for j in i..cols {
                upper[i * cols + j] = inverse[(cols - 1 - i, cols - 1 - j)] as f32;
            }
        }
        let not_positive = |d: f32| d.is_nan() || d <= 0.0;
        if let Some(i) = (0..cols).find(|&i| not_positive(upper[i * cols + i])) {
            return bad(format!("the inverse factor's diagonal entry {i} is not positive (the matrix is too ill-conditioned for float32)"));
        }
        let diagonal = (0..cols).map(|i| at(i, i) as f32).collect();
        let added = (0..cols)
            .map(|i| (damping + if at(i, i) == 0.0 { 1.0 } else { 0.0 }) as f32)
            .collect();
        Ok(HessianFactor {
            cols,
            diagonal,
            upper,
            root,
            added,
            damping,
        })
    }

    /// Input features (`cols`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The `lambda` added to the diagonal (after any retries).
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// `sum_i added_i e_i^2` over the elements of whole rows: what the damping adds.
    fn added_error(&self, errors: impl Iterator<Item = f32>) -> f64 {
        errors
            .zip(self.added.iter().cycle())
            .map(|(e, &a)| f64::from(a) * f64::from(e) * f64::from(e))
            .sum()
    }
}

/// Which of the three results was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// The error-compensating rounding.
    Gptq,
    /// bitsandbytes' absmax quantization (its bytes exactly).
    Absmax,
    /// The scale search alone (importance `diag(H)`).
    Searched,
}

impl Chosen {
    /// `"gptq"`, `"absmax"` or `"searched"`.
    pub fn name(self) -> &'static str {
        match self {
            Chosen::Gptq => "gptq",
            Chosen::Absmax => "absmax",
            Chosen::Searched => "searched",
        }
    }
}

/// The outcome of [`quantize_4bit_gptq`]. Errors are output errors
/// `tr((W - Q) H (W - Q)^T)` with the undamped `H`, of each result as it decodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqReport {
    pub chosen: Chosen,
    /// Error of what was written (the smallest of the three).
    pub output_error: f64,
    pub gptq_output_error: f64,
    pub absmax_output_error: f64,
    pub searched_output_error: f64,
}

/// Quantizes the row-major weight `weight [rows, factor.cols()]` with error compensation
/// (see the module docs) into `packed` and `scales`, in bitsandbytes' layout (nested
/// scales get their offset too). With `scale_search` the block scales are the search's
/// (weighted by `diag(H)`), else absmax. `scales` decides double quantization, as for
/// [`quantize_4bit_searched`].
#[allow(clippy::too_many_arguments)]
pub fn quantize_4bit_gptq<T: Element>(
    weight: &[T],
    rows: usize,
    factor: &HessianFactor,
    quant_type: QuantType,
    blocksize: Blocksize,
    scale_search: bool,
    packed: &mut [u8],
    scales: &mut ScalesMut<'_>,
) -> Result<GptqReport> {
    let cols = factor.cols;
    if rows == 0 {
        return Err(QuantError::Empty);
    }
    check_len("weight", rows * cols, weight.len())?;
    let numel = weight.len();
    check_len("packed output", packed_len(numel), packed.len())?;
    let double_quant = matches!(scales, BlockScales::Nested { .. });

    // The two baselines; the absmax one also rejects NaN/Inf.
    let absmax = PackedTensor::quantize(weight, quant_type, blocksize, double_quant)?;
    let searched = searched_candidate(
        weight,
        quant_type,
        blocksize,
        &factor.diagonal,
        double_quant,
    )?;

    // The error-compensating rounding against the decoded scales of the chosen base.
    let base = if scale_search { &searched } else { &absmax };
    let decoded = base.absmax.decode()?;
    let book = quant_type.codebook();
    let rounded = gptq_round(weight, rows, factor, &decoded, book, blocksize.get());

    let absmax_error = output_error(weight, &absmax.dequantize::<f32>()?, factor);
    let searched_error = output_error(weight, &searched.dequantize::<f32>()?, factor);
    let mut report = GptqReport {
        chosen: Chosen::Gptq,
        output_error: rounded.output_error,
        gptq_output_error: rounded.output_error,
        absmax_output_error: absmax_error,
        searched_output_error: searched_error,
    };
    if absmax_error < report.output_error {
        (report.chosen, report.output_error) = (Chosen::Absmax, absmax_error);
    }
    if searched_error < report.output_error {
        (report.chosen, report.output_error) = (Chosen::Searched, searched_error);
    }
    let written = match report.chosen {
        Chosen::Gptq => {
            pack_codes(&rounded.codes, packed);
            &base.absmax
        }
        Chosen::Absmax => {
            packed.copy_from_slice(&absmax.packed);
            &absmax.absmax
        }
        Chosen::Searched => {
            packed.copy_from_slice(&searched.packed);
            &searched.absmax
        }
    };
    write_scales(written, scales)?;
    Ok(report)
}

/// The scale search's result (importance `diag(H)`) as a [`PackedTensor`].
fn searched_candidate<T: Element>(
    weight: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    diagonal: &[f32],
    double_quant: bool,
) -> Result<PackedTensor> {
    let numel = weight.len();
    let blocks = blocksize.blocks(numel);
    let mut packed = vec![0u8; packed_len(numel)];
    let importance = Some(Importance::new(diagonal)?);
    let mut absmax = Absmax::zeroed(blocks, double_quant);
    absmax.write_with(|scales| {
        quantize_4bit_searched(
            weight,
            quant_type,
            blocksize,
            importance,
            &mut packed,
            scales,
        )
    })?;
    Ok(PackedTensor {
        quant_type,
        blocksize,
        numel,
        packed,
        absmax,
    })
}

/// Copies `scales` into `out` (whose kind matches by construction), the offset included.
fn write_scales(scales: &Absmax, out: &mut ScalesMut<'_>) -> Result<()> {
    match (scales, out) {
        (BlockScales::Plain(values), BlockScales::Plain(out)) => {
            check_len("absmax output", values.len(), out.len())?;
            out.copy_from_slice(values);
        }
        (
            BlockScales::Nested {
                codes,
                scales,
                offset,
            },
            BlockScales::Nested {
                codes: codes_out,
                scales: scales_out,
                offset: offset_out,
            },
        ) => {
            check_len("nested codes output", codes.len(), codes_out.len())?;
            check_len("nested scales output", scales.len(), scales_out.len())?;
            codes_out.copy_from_slice(codes);
            scales_out.copy_from_slice(scales);
            *offset_out = *offset;
        }
        _ => unreachable!("the candidates are built with the output's kind of scales"),
    }
    Ok(())
}

/// Codes (one per element, row-major) of the error-compensating rounding, and their
/// output error.
pub struct Rounded {
    pub codes: Vec<u8>,
    /// `tr(E H E^T)` with the undamped `H`.
    pub output_error: f64,
}

/// Error-compensating rounding of `weight [rows, cols]` against fixed block scales
/// (`scales[flat_index / blocksize]`, as they decode).
pub fn gptq_round<T: Element>(
    weight: &[T],
    rows: usize,
    factor: &HessianFactor,
    scales: &[f32],
    book: &Codebook,
    blocksize: usize,
) -> Rounded {
    let cols = factor.cols;
    let mut codes = vec![0u8; rows * cols];
    let sums: Vec<(f64, f64)> = codes
        .par_chunks_mut(ROW_TILE * cols)
        .zip(weight.par_chunks(ROW_TILE * cols))
        .enumerate()
        .map(|(tile, (codes, weight))| {
            round_tile(
                weight,
                tile * ROW_TILE,
                factor,
                scales,
                book,
                blocksize,
                codes,
            )
        })
        .collect();
    // Summed in tile order: the same on every thread count.
    let (damped, added) = sums
        .iter()
        .fold((0.0, 0.0), |(d, e), &(td, te)| (d + td, e + te));
    Rounded {
        codes,
        output_error: (damped - added).max(0.0),
    }
}

/// Nearest code of `scaled` (clamped to [-1, 1]), ties to the lower code.
#[inline(always)]
fn nearest(book: &Codebook, scaled: f32) -> u8 {
    let scaled = scaled.clamp(-1.0, 1.0);
    book.rank_to_code[book.bounds.partition_point(|&b| b < scaled)]
}

/// One tile of rows: returns `(|d|^2, sum added_i e_i^2)` (see the module docs).
fn round_tile<T: Element>(
    weight: &[T],
    first_row: usize,
    factor: &HessianFactor,
    scales: &[f32],
    book: &Codebook,
    blocksize: usize,
    codes: &mut [u8],
) -> (f64, f64) {
    let cols = factor.cols;
    let tile_rows = weight.len() / cols;
    let u = &factor.upper;
    let mut work: Vec<f32> = weight.iter().map(|x| x.to_f32()).collect();
    let mut errors = vec![0.0f32; tile_rows * BLOCK_COLUMNS];
    let mut damped = 0.0f64;
    for start in (0..cols).step_by(BLOCK_COLUMNS) {
        let end = (start + BLOCK_COLUMNS).min(cols);
        for i in start..end {
            let diagonal = u[i * cols + i];
            let span = &u[i * cols + i + 1..i * cols + end];
            for r in 0..tile_rows {
                let row = &mut work[r * cols..(r + 1) * cols];
                let value = row[i];
                let scale = scales[((first_row + r) * cols + i) / blocksize];
                let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
                let code = nearest(book, value * inverse);
                codes[r * cols + i] = code;
                let error = (value - book.values[usize::from(code)] * scale) / diagonal;
                damped += f64::from(error) * f64::from(error);
                for (w, &step) in row[i + 1..end].iter_mut().zip(span) {
                    *w -= error * step;
                }
                errors[r * BLOCK_COLUMNS + (i - start)] = error;
            }
        }
        if end < cols {
            // The rest of every row: W[:, end..] -= errors @ U[start..end, end..], written
            // transposed so every operand is column-major with unit stride (row-major
            // memory read as its transpose).
            let width = end - start;
            let lhs = MatRef::from_column_major_slice_with_stride(
                &u[start * cols + end..(end - 1) * cols + cols],
                cols - end,
                width,
                cols,
            );
            let rhs = MatRef::from_column_major_slice_with_stride(
                &errors[..(tile_rows - 1) * BLOCK_COLUMNS + width],
                width,
                tile_rows,
                BLOCK_COLUMNS,
            );
            let dst = MatMut::from_column_major_slice_with_stride_mut(
                &mut work[end..],
                cols - end,
                tile_rows,
                cols,
            );
            matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::Seq);
        }
    }
    let errors = weight
        .iter()
        .zip(codes.iter())
        .enumerate()
        .map(|(k, (x, &code))| {
            let scale = scales[(first_row * cols + k) / blocksize];
            x.to_f32() - book.values[usize::from(code)] * scale
        });
    (damped, factor.added_error(errors))
}

/// Packs one code per element into bytes, first element in the high nibble.
fn pack_codes(codes: &[u8], packed: &mut [u8]) {
    for (byte, pair) in packed.iter_mut().zip(codes.chunks(2)) {
        let low = pair.get(1).copied().unwrap_or(0);
        *byte = (pair[0] << 4) | low;
    }
}

/// `tr((W - Q) H (W - Q)^T)` for the decoded `Q`, as `|E R|^2` less what the damping adds,
/// in fixed row tiles.
pub fn output_error<T: Element>(weight: &[T], decoded: &[f32], factor: &HessianFactor) -> f64 {
    let cols = factor.cols;
    // Row-major R read column-major is R^T (lower triangular); (E R)^T = R^T E^T.
    let root_t = MatRef::from_column_major_slice(&factor.root, cols, cols);
    let sums: Vec<f64> = weight
        .par_chunks(ROW_TILE * cols)
        .zip(decoded.par_chunks(ROW_TILE * cols))
        .map(|(weight, decoded)| {
            let tile_rows = weight.len() / cols;
            let difference: Vec<f32> = weight
                .iter()
                .zip(decoded)
                .map(|(x, q)| x.to_f32() - q)
                .collect();
            let mut product = vec![0.0f32; difference.len()];
            let e = MatRef::from_column_major_slice(&difference, cols, tile_rows);
            let out = MatMut::from_column_major_slice_mut(&mut product, cols, tile_rows);
            triangular::matmul(
                out,
                BlockStructure::Rectangular,
                Accum::Replace,
                root_t,
                BlockStructure::TriangularLower,
                e,
                BlockStructure::Rectangular,
                1.0f32,
                Par::Seq,
            );
            let damped: f64 = product.iter().map(|&p| f64::from(p) * f64::from(p)).sum();
            damped - factor.added_error(difference.iter().copied())
        })
        .collect();
    sums.iter().sum::<f64>().max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize::dequantize_4bit;
    use crate::double_quant::dequantize_absmax;
    use crate::layout::nested_blocks;
    use crate::quantize::quantize_4bit;

    struct Lcg(u64);

    impl Lcg {
        fn uniform(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Inputs with correlated features (a shared component) and uneven scales, and `H`.
    fn correlated_hessian(tokens: usize, cols: usize, seed: u64) -> Vec<f64> {
        let mut rng = Lcg(seed);
        let mut h = vec![0.0f64; cols * cols];
        let gains: Vec<f32> = (0..cols).map(|c| 0.2 + (c % 7) as f32).collect();
        for _ in 0..tokens {
            let shared = rng.uniform();
            let x: Vec<f64> = (0..cols)
                .map(|c| f64::from((0.7 * shared + 0.3 * rng.uniform()) * gains[c]))
                .collect();
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += x[i] * x[j];
                }
            }
        }
        h
    }

    /// `tr(E H E^T)` written plainly, in float64.
    fn naive_output_error(weight: &[f32], decoded: &[f32], h: &[f64], cols: usize) -> f64 {
        let mut total = 0.0;
        for (row, row_q) in weight.chunks(cols).zip(decoded.chunks(cols)) {
            let e: Vec<f64> = row
                .iter()
                .zip(row_q)
                .map(|(a, b)| f64::from(a - b))
                .collect();
            for i in 0..cols {
                for j in 0..cols {
                    total += e[i] * h[i * cols + j] * e[j];
                }
            }
        }
        total
    }

    fn weight(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = Lcg(seed);
        (0..rows * cols).map(|_| rng.uniform()).collect()
    }

    fn run(
        weight: &[f32],
        rows: usize,
        factor: &HessianFactor,
        scale_search: bool,
        double_quant: bool,
    ) -> (Vec<u8>, Vec<f32>, GptqReport) {
        let blocksize = Blocksize::default();
        let blocks = blocksize.blocks(weight.len());
        let mut packed = vec![0u8; packed_len(weight.len())];
        let (mut scales, mut codes) = (vec![0f32; blocks], vec![0u8; blocks]);
        let mut nested = vec![0f32; nested_blocks(blocks)];
        let mut store = if double_quant {
            ScalesMut::Nested {
                codes: &mut codes,
                scales: &mut nested,
                offset: 0.0,
            }
        } else {
            ScalesMut::Plain(&mut scales)
        };
        let report = quantize_4bit_gptq(
            weight,
            rows,
            factor,
            QuantType::Nf4,
            blocksize,
            scale_search,
            &mut packed,
            &mut store,
        )
        .unwrap();
        if let Some(offset) = store.offset() {
            dequantize_absmax(&codes, &nested, offset, &mut scales).unwrap();
        }
        (packed, scales, report)
    }

    fn decode(packed: &[u8], scales: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        dequantize_4bit(
            packed,
            scales,
            QuantType::Nf4,
            Blocksize::default(),
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn identity_hessian_is_round_to_nearest_against_the_absmax() {
        let (rows, cols) = (16, 192);
        let w = weight(rows, cols, 5);
        let mut identity = vec![0.0f32; cols * cols];
        for i in 0..cols {
            identity[i * cols + i] = 1.0;
        }
        let factor = HessianFactor::new(&identity, cols, 0.0).unwrap();
        let blocksize = Blocksize::default();
        let (mut packed, mut absmax) = (vec![0u8; rows * cols / 2], vec![0f32; rows * cols / 64]);
        quantize_4bit(&w, QuantType::Nf4, blocksize, &mut packed, &mut absmax).unwrap();
        let rounded = gptq_round(&w, rows, &factor, &absmax, QuantType::Nf4.codebook(), 64);
        let mut gptq_packed = vec![0u8; packed.len()];
        pack_codes(&rounded.codes, &mut gptq_packed);
        // No correlation, no error to propagate: the nearest codes, i.e. bitsandbytes' bytes.
        assert_eq!(gptq_packed, packed);
        let decoded = decode(&packed, &absmax, w.len());
        let direct: f64 = w
            .iter()
            .zip(&decoded)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        assert!((rounded.output_error - direct).abs() <= 1e-4 * direct);
    }

    #[test]
    fn factor_inverts_a_known_matrix() {
        // H = [[4, 2], [2, 3]]: H^{-1} = [[3, -2], [-2, 4]] / 8 = U^T U with
        // U = [[sqrt(3/8) , -2/sqrt(24)], [0, sqrt(1/3)]].
        let factor = HessianFactor::new(&[4.0f64, 2.0, 2.0, 3.0], 2, 0.0).unwrap();
        let expected = [
            (3.0f64 / 8.0).sqrt(),
            -2.0 / 24.0f64.sqrt(),
            0.0,
            (1.0f64 / 3.0).sqrt(),
        ];
        for (got, want) in factor.upper.iter().zip(expected) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn output_error_is_lower_than_absmax_and_search_and_reported_exactly() {
        let (rows, cols) = (96, 256);
        let w = weight(rows, cols, 9);
        let h = correlated_hessian(2000, cols, 1);
        let factor = HessianFactor::new(&h, cols, DEFAULT_DAMP).unwrap();
        for double_quant in [false, true] {
            let (packed, scales, report) = run(&w, rows, &factor, true, double_quant);
            assert_eq!(report.chosen, Chosen::Gptq, "{report:?}");
            assert!(
                report.output_error < 0.7 * report.absmax_output_error,
                "{report:?}"
            );
            assert!(
                report.output_error < 0.7 * report.searched_output_error,
                "{report:?}"
            );
            // The reported error is the one of the bytes as they decode.
            let measured = naive_output_error(&w, &decode(&packed, &scales, w.len()), &h, cols);
            assert!(
                (measured - report.output_error).abs() <= 1e-3 * measured,
                "{measured} vs {report:?}"
            );
        }
    }

    #[test]
    fn result_does_not_depend_on_the_thread_count() {
        let (rows, cols) = (200, 320); // tiles of 64 rows, a partial one, spans of 128 columns
        let w = weight(rows, cols, 21);
        let h = correlated_hessian(600, cols, 2);
        let factor = HessianFactor::new(&h, cols, DEFAULT_DAMP).unwrap();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run(&w, rows, &factor, true, true))
        };
        let (one, three) = (on(1), on(3));
        assert_eq!(one.0, three.0);
        assert_eq!(one.1, three.1);
        assert_eq!(one.2, three.2);
    }

    #[test]
    fn falls_back_when_a_baseline_is_better() {
        // With a huge damping GPTQ is round-to-nearest against the searched scales, which
        // the search itself matches; a Hessian that weights one column only then makes
        // the comparison decide. Whatever wins, what is written is the minimum.
        let (rows, cols) = (8, 64);
        let w = weight(rows, cols, 4);
        let mut h = vec![0.0f64; cols * cols];
        h[0] = 1.0;
        let factor = HessianFactor::new(&h, cols, 1e6).unwrap();
        let (packed, scales, report) = run(&w, rows, &factor, false, false);
        let minimum = report
            .gptq_output_error
            .min(report.absmax_output_error)
            .min(report.searched_output_error);
        assert_eq!(report.output_error, minimum);
        let measured = naive_output_error(&w, &decode(&packed, &scales, w.len()), &h, cols);
        assert!(
            (measured - minimum).abs() <= 1e-6 + 1e-3 * minimum,
            "{measured} vs {report:?}"
        );
        if report.chosen == Chosen::Absmax {
            let (mut expected, mut absmax) = (vec![0u8; packed.len()], vec![0f32; scales.len()]);
            quantize_4bit(
                &w,
                QuantType::Nf4,
                Blocksize::default(),
                &mut expected,
                &mut absmax,
            )
            .unwrap();
            assert_eq!(packed, expected);
        }
    }

    #[test]
    fn bad_hessians_are_rejected() {
        assert!(matches!(
            HessianFactor::new(&[1.0f32, 0.0, 0.0], 2, 0.01),
            Err(QuantError::LengthMismatch { .. })
        ));
        assert!(matches!(
            HessianFactor::new(&[f32::NAN, 0.0, 0.0, 1.0], 2, 0.01),
            Err(QuantError::BadHessian(_))
        ));
        assert!(matches!(
            HessianFactor::new(&[-1.0f32, 0.0, 0.0, 1.0], 2, 0.01),
            Err(QuantError::BadHessian(_))
        ));
        // Indefinite beyond what damping repairs.
        assert!(matches!(
            HessianFactor::new(&[1.0f64, 1e9, 1e9, 1.0], 2, 0.01),
            Err(QuantError::BadHessian(_))
        ));
        // A dead column (always-zero input) is fine.
        assert!(HessianFactor::new(&[0.0f32, 0.0, 0.0, 2.0], 2, 0.01).is_ok());
    }
}
