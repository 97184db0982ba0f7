//! Blockwise 4-bit dequantization: `out = T(code[nibble] * absmax)`, one float32
//! product rounded once to the output type — what bitsandbytes' `dequantize_4bit` does.

use rayon::prelude::*;

use crate::codebook::QuantType;
use crate::dispatch::multiversion;
use crate::element::Element;
use crate::error::{QuantError, Result};
use crate::layout::{check_len, packed_len, task_blocks, Blocksize};

fn check_buffers(numel: usize, blocksize: Blocksize, packed: &[u8], absmax: &[f32]) -> Result<()> {
    if numel == 0 {
        return Err(QuantError::Empty);
    }
    check_len("packed input", packed_len(numel), packed.len())?;
    check_len("absmax input", blocksize.blocks(numel), absmax.len())
}

/// Scalar reference dequantization into `out` (its length is the element count).
pub fn dequantize_4bit_reference<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: Blocksize,
    out: &mut [T],
) -> Result<()> {
    check_buffers(out.len(), blocksize, packed, absmax)?;
    let values = &quant_type.codebook().values;
    for (i, o) in out.iter_mut().enumerate() {
        let byte = packed[i / 2];
        let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0xf };
        *o = T::from_f32(values[usize::from(nibble)] * absmax[i / blocksize.get()]);
    }
    Ok(())
}

/// Multithreaded dequantization; same output as [`dequantize_4bit_reference`].
pub fn dequantize_4bit<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: Blocksize,
    out: &mut [T],
) -> Result<()> {
    check_buffers(out.len(), blocksize, packed, absmax)?;
    let values = &quant_type.codebook().values;
    let bs = blocksize.get();
    let blocks_per_task = task_blocks(bs);
    let task_len = blocks_per_task * bs;
    out.par_chunks_mut(task_len)
        .zip(packed.par_chunks(task_len / 2))
        .zip(absmax.par_chunks(blocks_per_task))
        .for_each(|((out, packed), absmax)| dequantize_task(packed, absmax, values, bs, out));
    Ok(())
}

multiversion! {
    fn dequantize_task<T: Element>(
        packed: &[u8], absmax: &[f32], values: &[f32; 16], blocksize: usize, out: &mut [T],
    ) -> () => dequantize_task_body
}

#[inline(always)]
fn dequantize_task_body<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    values: &[f32; 16],
    blocksize: usize,
    out: &mut [T],
) {
    let blocks = out
        .chunks_mut(blocksize)
        .zip(packed.chunks(blocksize / 2))
        .zip(absmax);
    for ((out, bytes), &scale) in blocks {
        // The 16 possible outputs of this block, each rounded once; the loop below is
        // then two table lookups per byte.
        let table: [T; 16] = std::array::from_fn(|q| T::from_f32(values[q] * scale));
        let mut pairs = out.chunks_exact_mut(2);
        for (pair, &byte) in (&mut pairs).zip(bytes) {
            pair[0] = table[usize::from(byte >> 4)];
            pair[1] = table[usize::from(byte & 0xf)];
        }
        if let ([last], Some(&byte)) = (pairs.into_remainder(), bytes.last()) {
            *last = table[usize::from(byte >> 4)];
        }
    }
}
