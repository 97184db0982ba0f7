//! Blockwise 4-bit quantization (NF4/FP4) into packed codes and float32 absmax,
//! bit-exact with bitsandbytes' CPU (default backend) `quantize_4bit`.
//!
//! Rule, per block of `blocksize` consecutive elements of the flattened tensor:
//! `absmax = max |x|`; a full block scales `s = x * (1 / max(absmax, 1e-38))`, the
//! trailing partial block divides `s = x / max(absmax, 1e-38)` and stores that clamped
//! absmax; `s` is clamped to [-1, 1]; the code is the bucket of `s` among the codebook's
//! float32 midpoints, ties to the lower code. Two codes per byte, first in the high
//! nibble; an odd count is padded with the code of 0.0.
//!
//! [`quantize_4bit_reference`] is that rule written plainly; [`quantize_4bit`] is the
//! multithreaded, vectorized version, held to the reference by the tests.

use rayon::prelude::*;

use crate::codebook::{Codebook, QuantType};
use crate::dispatch::multiversion;
use crate::element::Element;
use crate::encode::Encoder;
use crate::error::{QuantError, Result};
use crate::layout::{check_len, packed_len, task_blocks, Blocksize, ABSMAX_FLOOR, BLOCKSIZES};

fn check_buffers(numel: usize, blocksize: Blocksize, packed: &[u8], absmax: &[f32]) -> Result<()> {
    if numel == 0 {
        return Err(QuantError::Empty);
    }
    check_len("packed output", packed_len(numel), packed.len())?;
    check_len("absmax output", blocksize.blocks(numel), absmax.len())
}

pub(crate) fn non_finite_error<T: Element>(input: &[T], index: usize) -> QuantError {
    QuantError::NonFinite {
        index,
        value: input[index].to_f32(),
    }
}

/// Scalar reference implementation of the rule in the module docs.
pub fn quantize_4bit_reference<T: Element>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check_buffers(input.len(), blocksize, packed, absmax)?;
    if let Some(index) = input.iter().position(|x| !x.to_f32().is_finite()) {
        return Err(non_finite_error(input, index));
    }
    let book = quant_type.codebook();
    let bs = blocksize.get();
    let mut codes = Vec::with_capacity(input.len() + 1);
    for (block, block_absmax) in input.chunks(bs).zip(absmax.iter_mut()) {
        let values: Vec<f32> = block.iter().map(|x| x.to_f32()).collect();
        let max_abs = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let floored = max_abs.max(ABSMAX_FLOOR);
        if block.len() == bs {
            *block_absmax = max_abs;
            let inverse = 1.0 / floored;
            codes.extend(
                values
                    .iter()
                    .map(|v| book.code_of((v * inverse).clamp(-1.0, 1.0))),
            );
        } else {
            *block_absmax = floored;
            codes.extend(
                values
                    .iter()
                    .map(|v| book.code_of((v / floored).clamp(-1.0, 1.0))),
            );
        }
    }
    if codes.len() % 2 == 1 {
        codes.push(book.code_of(0.0));
    }
    for (byte, pair) in packed.iter_mut().zip(codes.chunks_exact(2)) {
        *byte = (pair[0] << 4) | pair[1];
    }
    Ok(())
}

/// Multithreaded, vectorized quantization; same output as [`quantize_4bit_reference`].
///
/// `packed` must hold `ceil(n / 2)` bytes and `absmax` `ceil(n / blocksize)` floats.
/// On NaN/Inf returns [`QuantError::NonFinite`] with the lowest offending index
/// (the outputs are then unspecified).
pub fn quantize_4bit<T: Element>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    quantize_4bit_with(
        Encoder::best(),
        input,
        quant_type,
        blocksize,
        packed,
        absmax,
    )
}

/// [`quantize_4bit`] with a chosen block encoder (tests hold every encoder to the
/// reference; an encoder the CPU lacks falls back to the portable one).
pub fn quantize_4bit_with<T: Element>(
    encoder: Encoder,
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check_buffers(input.len(), blocksize, packed, absmax)?;
    let book = quant_type.codebook();
    let bs = blocksize.get();
    let blocks_per_task = task_blocks(bs);
    let task_len = blocks_per_task * bs;
    let first_bad = input
        .par_chunks(task_len)
        .zip(packed.par_chunks_mut(task_len / 2))
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .enumerate()
        .filter_map(|(task, ((values, codes), scales))| {
            quantize_task(values, codes, scales, book, bs, encoder)
                .map(|local| task * task_len + local)
        })
        .min();
    match first_bad {
        Some(index) => Err(non_finite_error(input, index)),
        None => Ok(()),
    }
}

multiversion! {
    fn quantize_task<T: Element>(
        values: &[T], packed: &mut [u8], absmax: &mut [f32], book: &Codebook, blocksize: usize,
        encoder: Encoder,
    ) -> Option<usize> => quantize_task_body
}

/// Quantizes consecutive blocks; returns the first non-finite index within `values`.
#[inline(always)]
fn quantize_task_body<T: Element>(
    values: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    book: &Codebook,
    blocksize: usize,
    encoder: Encoder,
) -> Option<usize> {
    let mut scratch = [0.0f32; BLOCKSIZES[BLOCKSIZES.len() - 1]];
    let blocks = values
        .chunks(blocksize)
        .zip(packed.chunks_mut(blocksize / 2))
        .zip(absmax.iter_mut());
    for (block_index, ((block, codes), block_absmax)) in blocks.enumerate() {
        let max_abs = match block_max_abs(block) {
            Ok(max_abs) => max_abs,
            Err(local) => return Some(block_index * blocksize + local),
        };
        let floored = max_abs.max(ABSMAX_FLOOR);
        if block.len() == blocksize {
            *block_absmax = max_abs;
            encoder.encode(T::widen(block, &mut scratch), 1.0 / floored, book, codes);
        } else {
            *block_absmax = floored;
            quantize_partial_block(block, codes, book, floored);
        }
    }
    None
}

/// A block's largest magnitude, or the block-local index of its first non-finite value.
#[inline(always)]
pub(crate) fn block_max_abs<T: Element>(block: &[T]) -> std::result::Result<f32, usize> {
    let max_bits = block.iter().fold(0u32, |m, x| m.max(x.abs_bits()));
    if max_bits >= T::NON_FINITE_ABS_BITS {
        let local = block
            .iter()
            .position(|x| x.abs_bits() >= T::NON_FINITE_ABS_BITS);
        return Err(local.unwrap_or(0));
    }
    Ok(T::from_abs_bits(max_bits))
}

pub(crate) fn quantize_partial_block<T: Element>(
    block: &[T],
    packed: &mut [u8],
    book: &Codebook,
    floored: f32,
) {
    let code = |x: Option<&T>| match x {
        Some(x) => book.code_of((x.to_f32() / floored).clamp(-1.0, 1.0)),
        None => book.code_of(0.0),
    };
    for (pair_index, byte) in packed.iter_mut().enumerate() {
        let high = code(block.get(2 * pair_index));
        let low = code(block.get(2 * pair_index + 1));
        *byte = (high << 4) | low;
    }
}
