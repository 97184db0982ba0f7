//! Error-optimal block scales (opt-in): instead of `absmax`, each block's scale is chosen
//! to minimize its squared reconstruction error, letting the largest values clip. The
//! format is unchanged — a block still decodes as `code[q] * scale` — so every
//! bitsandbytes consumer loads the result.
//!
//! Search, per block (as llama.cpp's IQ4_NL does for its 16-level grid): for candidate
//! scales `absmax * (1 - k * STEP)`, take the nearest codes, then the least-squares scale
//! for those codes, `s* = sum(x c) / sum(c^2)`; keep the pair with the lowest error.
//! `absmax` itself is candidate 0, so a block is never worse than with absmax scaling.

use rayon::prelude::*;

use crate::codebook::{Codebook, QuantType};
use crate::element::Element;
use crate::encode::Encoder;
use crate::error::{QuantError, Result};
use crate::layout::{check_len, packed_len, task_blocks, Blocksize};
use crate::quantize::quantize_4bit;

/// Candidate scales per block: `absmax * (1 - k * CANDIDATE_STEP)`, `k < CANDIDATES`.
pub const CANDIDATES: usize = 4;
/// Spacing of the candidate grid, as a fraction of absmax.
pub const CANDIDATE_STEP: f32 = 0.05;

/// Quantizes like [`quantize_4bit`] but with searched scales in `scales` (one per block).
/// The trailing partial block keeps bitsandbytes' absmax rule.
pub fn quantize_4bit_searched<T: Element>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    packed: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    // The absmax pass validates the input and fills the partial block the standard way.
    quantize_4bit(input, quant_type, blocksize, packed, scales)?;
    let book = quant_type.codebook();
    let encoder = Encoder::best();
    let bs = blocksize.get();
    let full_blocks = input.len() / bs;
    let per_task = task_blocks(bs);
    input[..full_blocks * bs]
        .par_chunks(per_task * bs)
        .zip(packed.par_chunks_mut(per_task * bs / 2))
        .zip(scales.par_chunks_mut(per_task))
        .for_each(|((values, codes), scales)| {
            let mut wide = vec![0.0f32; bs];
            let mut trial = vec![0u8; bs / 2];
            for ((block, block_codes), scale) in values
                .chunks_exact(bs)
                .zip(codes.chunks_mut(bs / 2))
                .zip(scales)
            {
                let block = T::widen(block, &mut wide);
                if *scale > 0.0 {
                    *scale = search_block(block, *scale, book, encoder, block_codes, &mut trial);
                }
            }
        });
    Ok(())
}

/// Sum of `x * c[q]` and of `c[q]^2` over a block (float32 sums, returned as f64).
fn moments(values: &[f32], codes: &[u8], book: &Codebook) -> (f64, f64) {
    // Per-byte lookups of both nibbles' code values; four partial sums keep the adds
    // independent so the loop pipelines.
    let (mut cross, mut energy) = ([0.0f32; 4], [0.0f32; 4]);
    for (lane, (pair, &byte)) in values.chunks_exact(2).zip(codes).enumerate() {
        let high = book.values[usize::from(byte >> 4)];
        let low = book.values[usize::from(byte & 0xf)];
        cross[lane % 4] += pair[0] * high + pair[1] * low;
        energy[lane % 4] += high * high + low * low;
    }
    let sum = |parts: [f32; 4]| f64::from((parts[0] + parts[1]) + (parts[2] + parts[3]));
    (sum(cross), sum(energy))
}

/// Picks the block's scale; leaves the chosen codes in `codes`. `absmax` codes are
/// already in `codes` on entry (candidate 0).
fn search_block(
    values: &[f32],
    absmax: f32,
    book: &Codebook,
    encoder: Encoder,
    codes: &mut [u8],
    trial: &mut [u8],
) -> f32 {
    let norm: f64 = values.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let error_at =
        |cross: f64, energy: f64, scale: f64| norm - 2.0 * scale * cross + scale * scale * energy;
    let (cross, energy) = moments(values, codes, book);
    let mut best_scale = absmax;
    let mut best_error = error_at(cross, energy, f64::from(absmax));
    for k in 0..CANDIDATES {
        let candidate = absmax * (1.0 - k as f32 * CANDIDATE_STEP);
        encoder.encode(values, 1.0 / candidate, book, trial);
        let (cross, energy) = moments(values, trial, book);
        if energy <= 0.0 {
            continue;
        }
        let refined = (cross / energy) as f32; // least-squares scale for these codes
        for scale in [candidate, refined] {
            let error = error_at(cross, energy, f64::from(scale));
            if scale > 0.0 && scale.is_finite() && error < best_error {
                best_error = error;
                best_scale = scale;
                codes.copy_from_slice(trial);
            }
        }
    }
    best_scale
}

/// Re-chooses, per block, between the codes picked for the searched scale and the
/// nearest codes for the scale that double quantization actually stores (`decoded`),
/// whichever reconstructs the block better. Returns the total squared error.
pub fn refit_to_decoded_scales<T: Element>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    decoded: &[f32],
    packed: &mut [u8],
) -> Result<f64> {
    check_len("packed", packed_len(input.len()), packed.len())?;
    check_len(
        "decoded scales",
        blocksize.blocks(input.len()),
        decoded.len(),
    )?;
    if input.is_empty() {
        return Err(QuantError::Empty);
    }
    let book = quant_type.codebook();
    let encoder = Encoder::best();
    let bs = blocksize.get();
    let full = input.len() / bs * bs;
    let error = input[..full]
        .par_chunks(bs)
        .zip(packed.par_chunks_mut(bs / 2))
        .zip(decoded.par_iter())
        .map_init(
            || (vec![0.0f32; bs], vec![0u8; bs / 2]),
            |(wide, nearest), ((block, codes), &scale)| {
                let block = T::widen(block, wide);
                let norm: f64 = block.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                let error_of = |codes: &[u8]| {
                    let (cross, energy) = moments(block, codes, book);
                    let s = f64::from(scale);
                    norm - 2.0 * s * cross + s * s * energy
                };
                let kept = error_of(codes);
                if scale > 0.0 {
                    encoder.encode(block, 1.0 / scale, book, nearest);
                    let refit = error_of(nearest);
                    if refit < kept {
                        codes.copy_from_slice(nearest);
                        return refit;
                    }
                }
                kept
            },
        )
        .sum();
    Ok(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searched_scales_never_lose_to_absmax_per_block() {
        let mut state = 7u64;
        let values: Vec<f32> = (0..64 * 200)
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
            .collect();
        let blocksize = Blocksize::default();
        let blocks = blocksize.blocks(values.len());
        let (mut packed_a, mut scales_a) = (vec![0u8; values.len() / 2], vec![0f32; blocks]);
        let (mut packed_s, mut scales_s) = (vec![0u8; values.len() / 2], vec![0f32; blocks]);
        quantize_4bit(
            &values,
            QuantType::Nf4,
            blocksize,
            &mut packed_a,
            &mut scales_a,
        )
        .unwrap();
        quantize_4bit_searched(
            &values,
            QuantType::Nf4,
            blocksize,
            &mut packed_s,
            &mut scales_s,
        )
        .unwrap();
        let book = QuantType::Nf4.codebook();
        let (mut total_a, mut total_s) = (0.0, 0.0);
        for b in 0..blocks {
            let block = &values[b * 64..(b + 1) * 64];
            let err = |packed: &[u8], scale: f32| {
                let (cross, energy) = moments(block, &packed[b * 32..(b + 1) * 32], book);
                let norm: f64 = block.iter().map(|&x| f64::from(x * x)).sum();
                norm - 2.0 * f64::from(scale) * cross + f64::from(scale).powi(2) * energy
            };
            let (a, s) = (err(&packed_a, scales_a[b]), err(&packed_s, scales_s[b]));
            assert!(s <= a + 1e-9, "block {b}: {s} > {a}");
            total_a += a;
            total_s += s;
        }
        assert!(
            total_s < 0.97 * total_a,
            "search {total_s} vs absmax {total_a}"
        );
    }
}
