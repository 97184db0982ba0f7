//! Double quantization: the float32 block scales (absmax) compressed to 8-bit codes of
//! the signed dynamic map, in blocks of 256, around their mean.
//!
//! `offset = mean(absmax)` (torch's single-thread order, see [`crate::mean`]);
//! `x = absmax - offset`; per 256-block `scale = max |x|` and `code = nearest(x * (1 / scale))`.
//! Decoding is `map[code] * scale` rounded to float32, then `+ offset` rounded again —
//! two separate roundings, never a fused multiply-add, exactly as bitsandbytes'
//! `dequantize_4bit` rebuilds the absmax.

use rayon::prelude::*;

use crate::dynamic_map::{dynamic_map, nearest_code};
use crate::error::{QuantError, Result};
use crate::layout::{check_len, nested_blocks, NESTED_BLOCKSIZE};
use crate::mean::torch_mean;

/// Compresses `absmax` into `codes` (one per block) and `scales` (one per 256 blocks);
/// returns the offset. Deterministic whatever the thread count.
pub fn double_quantize(absmax: &[f32], codes: &mut [u8], scales: &mut [f32]) -> Result<f32> {
    if absmax.is_empty() {
        return Err(QuantError::Empty);
    }
    check_len("nested codes output", absmax.len(), codes.len())?;
    check_len(
        "nested scales output",
        nested_blocks(absmax.len()),
        scales.len(),
    )?;
    if let Some(index) = absmax.iter().position(|a| !a.is_finite()) {
        return Err(QuantError::NonFinite {
            index,
            value: absmax[index],
        });
    }
    let offset = torch_mean(absmax);
    if !offset.is_finite() {
        return Err(QuantError::AbsmaxMeanOverflow);
    }
    absmax
        .par_chunks(NESTED_BLOCKSIZE)
        .zip(codes.par_chunks_mut(NESTED_BLOCKSIZE))
        .zip(scales.par_iter_mut())
        .for_each(|((absmax, codes), scale)| {
            *scale = absmax.iter().fold(0.0f32, |m, a| m.max((a - offset).abs()));
            if *scale == 0.0 {
                // Every entry decodes to `offset` whatever its code; take the lowest
                // index, as a nearest search with ties to the lower index would.
                codes.fill(0);
                return;
            }
            let inverse = 1.0 / *scale;
            for (code, a) in codes.iter_mut().zip(absmax) {
                *code = nearest_code((a - offset) * inverse);
            }
        });
    Ok(offset)
}

/// Rebuilds the float32 absmax from nested codes, scales and offset.
pub fn dequantize_absmax(codes: &[u8], scales: &[f32], offset: f32, out: &mut [f32]) -> Result<()> {
    check_len("nested codes input", out.len(), codes.len())?;
    check_len(
        "nested scales input",
        nested_blocks(out.len()),
        scales.len(),
    )?;
    let map = dynamic_map();
    out.par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(codes.par_chunks(NESTED_BLOCKSIZE))
        .zip(scales.par_iter())
        .for_each(|((out, codes), &scale)| {
            for (o, &code) in out.iter_mut().zip(codes) {
                let product = map[usize::from(code)] * scale;
                *o = product + offset;
            }
        });
    Ok(())
}
