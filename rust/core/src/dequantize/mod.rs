//! Blockwise 4-bit dequantization: `out = T(code[nibble] * absmax)`, one float32
//! product rounded once to the output type — what bitsandbytes' `dequantize_4bit` does.
//!
//! [`dequantize_4bit_scaled`] takes the block scales as stored (plain or double-quantized)
//! and decodes nested ones inline, block by block, bit-identical to decoding them first
//! ([`crate::dequantize_absmax`]) but without allocating the float32 absmax. On CPUs with
//! AVX-512 F/BW/VL, whole blocks of at least 32 (float32) or 64 (16-bit) elements are
//! decoded by `avx512` (table lookups by `vpermps`/`vpermw`, bit-identical to the portable
//! loop, which takes the rest; `QLORAKIT_CPU_KERNEL=portable` forces the loop). No huge-page
//! advice on fresh outputs: `madvise(MADV_HUGEPAGE)` made a freed-then-reallocated output
//! 2.5x faster but a run of outputs kept alive (a merge, `dequantize_model`) 4x slower
//! (direct compaction on first touch), and without it a fresh output is already as fast
//! as bitsandbytes' (`tools/bench_gemv.py`).

#[cfg(target_arch = "x86_64")]
mod avx512;

use crate::block_scale::BlockScale;
use crate::codebook::QuantType;
use crate::dispatch::multiversion;
use crate::element::Element;
use crate::error::{QuantError, Result};
use crate::gemv::GemvKernel;
use crate::layout::{check_len, packed_len, task_blocks, Blocksize};
use crate::packed::Scales;
use crate::parallel;

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
    dequantize_checked(
        packed,
        BlockScale::Plain(absmax),
        quant_type,
        blocksize,
        out,
    );
    Ok(())
}

/// [`dequantize_4bit`] with the block scales as stored: nested (double-quantized) scales
/// are decoded inline, bit-identical to [`crate::dequantize_absmax`] followed by
/// [`dequantize_4bit`].
pub fn dequantize_4bit_scaled<T: Element>(
    packed: &[u8],
    scales: Scales<'_>,
    quant_type: QuantType,
    blocksize: Blocksize,
    out: &mut [T],
) -> Result<()> {
    if out.is_empty() {
        return Err(QuantError::Empty);
    }
    check_len("packed input", packed_len(out.len()), packed.len())?;
    scales.check(blocksize.blocks(out.len()))?;
    dequantize_checked(packed, BlockScale::new(scales), quant_type, blocksize, out);
    Ok(())
}

/// The parallel decode, lengths checked.
fn dequantize_checked<T: Element>(
    packed: &[u8],
    scales: BlockScale<'_>,
    quant_type: QuantType,
    blocksize: Blocksize,
    out: &mut [T],
) {
    let values = &quant_type.codebook().values;
    let bs = blocksize.get();
    let blocks_per_task = task_blocks(bs);
    let task_len = blocks_per_task * bs;
    let simd = use_avx512();
    parallel::for_each_chunk_mut(out, task_len, &|task, out| {
        let start = task * task_len / 2;
        let packed = &packed[start..(start + task_len / 2).min(packed.len())];
        let first_block = task * blocks_per_task;
        // The AVX-512 kernel takes the whole blocks it can; the loop below the rest.
        let done = if simd {
            simd_blocks(packed, scales, first_block, values, bs, out)
        } else {
            0
        };
        let (packed, out) = (&packed[done / 2..], &mut out[done..]);
        dequantize_task(packed, scales, first_block + done / bs, values, bs, out)
    });
}

/// Whether the AVX-512 kernel runs: the CPU has it and `QLORAKIT_CPU_KERNEL` does not
/// force `portable` (an invalid value is reported by gemv; here it leaves the default).
fn use_avx512() -> bool {
    GemvKernel::Avx512.is_supported() && GemvKernel::selected() != Ok(GemvKernel::Portable)
}

/// The AVX-512 kernel on the task's whole blocks, for the element types it knows; returns
/// the elements written (a multiple of the blocksize; 0 where it does not apply).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn simd_blocks<T: Element>(
    packed: &[u8],
    scales: BlockScale<'_>,
    first_block: usize,
    values: &[f32; 16],
    blocksize: usize,
    out: &mut [T],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if let Some(rounding) = crate::gemv::TableRounding::of::<T>() {
        // SAFETY: `use_avx512` checked the CPU; `rounding` is T's; the task's bytes and
        // scales cover its elements (checked by the callers).
        return unsafe {
            avx512::dequantize_blocks(
                rounding,
                packed,
                scales,
                first_block,
                values,
                blocksize,
                out,
            )
        };
    }
    0
}

multiversion! {
    fn dequantize_task<T: Element>(
        packed: &[u8], scales: BlockScale<'_>, first_block: usize, values: &[f32; 16],
        blocksize: usize, out: &mut [T],
    ) -> () => dequantize_task_body
}

#[inline(always)]
fn dequantize_task_body<T: Element>(
    packed: &[u8],
    scales: BlockScale<'_>,
    first_block: usize,
    values: &[f32; 16],
    blocksize: usize,
    out: &mut [T],
) {
    let blocks = out
        .chunks_mut(blocksize)
        .zip(packed.chunks(blocksize / 2))
        .enumerate();
    for (block, (out, bytes)) in blocks {
        let scale = scales.get(first_block + block);
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
