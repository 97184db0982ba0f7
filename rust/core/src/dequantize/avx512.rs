//! AVX-512 dequantization, bit-identical to the portable loop: per block, the 16 values
//! `T(code * scale)` in one register (rounded exactly as `half` rounds, see
//! [`crate::gemv::avx512::round_table`]); per step, the packed bytes zero-extended to
//! lanes, the high nibbles (even elements) by a shift and the low ones (odd elements) by a
//! mask, each looked up in the table, then interleaved back into element order by one
//! two-source permute per 16 (float32) or 32 (16-bit) outputs and stored. A step is 32
//! elements (float32) or 64 (bfloat16/float16); blocks smaller than a step, and a partial
//! last block, take the portable loop.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::block_scale::BlockScale;
use crate::element::Element;
use crate::gemv::avx512::round_table;
use crate::gemv::TableRounding;

/// Dequantizes the whole blocks of one task (`first_block` its first block); returns
/// without touching `out` past the last block that is whole and at least one step long,
/// i.e. it writes `out[..done]` and returns `done` (a multiple of the blocksize).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `T` must be the element type of `rounding`
/// (float32 for `Float32`, a 16-bit float otherwise); `packed` must hold the codes of `out`
/// (`out.len().div_ceil(2)` bytes) and `scales` a scale for every block of it.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dequantize_blocks<T: Element>(
    rounding: TableRounding,
    packed: &[u8],
    scales: BlockScale<'_>,
    first_block: usize,
    values: &[f32; 16],
    blocksize: usize,
    out: &mut [T],
) -> usize {
    let step = match rounding {
        TableRounding::Float32 => 32,
        _ => 64,
    };
    if blocksize < step {
        return 0;
    }
    let whole = out.len() / blocksize;
    let codes = _mm512_loadu_ps(values.as_ptr());
    for block in 0..whole {
        let scale = scales.get(first_block + block);
        let product = _mm512_mul_ps(codes, _mm512_set1_ps(scale));
        let start = block * blocksize;
        // SAFETY: the block's elements `start..start + blocksize` lie in `out`, its bytes
        // `start / 2..` + blocksize / 2 in `packed`.
        let bytes = packed.as_ptr().add(start / 2);
        let dst = out.as_mut_ptr().add(start);
        match rounding {
            TableRounding::Float32 => block_f32(product, bytes, dst.cast(), blocksize),
            TableRounding::Bfloat16 => {
                // Rounded exactly as `half` rounds: bf16 in the upper halves.
                let rounded = round_table(product, rounding, !scale.is_finite());
                let words =
                    _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(rounded)));
                block_16bit(words, bytes, dst.cast(), blocksize)
            }
            TableRounding::Float16 => {
                // vcvtps2ph rounds to nearest even like `half` (see round_table's test).
                let words =
                    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(product);
                block_16bit(words, bytes, dst.cast(), blocksize)
            }
        }
    }
    whole * blocksize
}

/// Output lane `i` of the interleave takes source lane `INTERLEAVE[i]` (`>= n`: the odd
/// vector): even 0, odd 0, even 1, odd 1, ...
const INTERLEAVE_F32: [[i32; 16]; 2] = {
    let mut idx = [[0i32; 16]; 2];
    let mut i = 0;
    while i < 16 {
        idx[0][i] = (i / 2 + 16 * (i % 2)) as i32;
        idx[1][i] = (8 + i / 2 + 16 * (i % 2)) as i32;
        i += 1;
    }
    idx
};

const INTERLEAVE_16: [[i16; 32]; 2] = {
    let mut idx = [[0i16; 32]; 2];
    let mut i = 0;
    while i < 32 {
        idx[0][i] = (i / 2 + 32 * (i % 2)) as i16;
        idx[1][i] = (16 + i / 2 + 32 * (i % 2)) as i16;
        i += 1;
    }
    idx
};

/// One block of float32 outputs, 32 per step (16 bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block_f32(table: __m512, bytes: *const u8, dst: *mut f32, blocksize: usize) {
    let low_nibble = _mm512_set1_epi32(0x0f);
    let first = _mm512_loadu_si512(INTERLEAVE_F32[0].as_ptr().cast());
    let second = _mm512_loadu_si512(INTERLEAVE_F32[1].as_ptr().cast());
    let mut done = 0;
    while done < blocksize {
        // SAFETY: 16 bytes of the block and 32 outputs of it, per the caller.
        let wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.add(done / 2).cast()));
        let even = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(wide), table);
        let odd = _mm512_permutexvar_ps(_mm512_and_si512(wide, low_nibble), table);
        _mm512_storeu_ps(dst.add(done), _mm512_permutex2var_ps(even, first, odd));
        _mm512_storeu_ps(
            dst.add(done + 16),
            _mm512_permutex2var_ps(even, second, odd),
        );
        done += 32;
    }
}

/// One block of 16-bit outputs (`words`: the 16 table entries), 64 per step (32 bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block_16bit(words: __m256i, bytes: *const u8, dst: *mut u16, blocksize: usize) {
    // Only words 0..15 are looked up (indices are nibbles).
    let table = _mm512_castsi256_si512(words);
    let low_nibble = _mm512_set1_epi16(0x0f);
    let first = _mm512_loadu_si512(INTERLEAVE_16[0].as_ptr().cast());
    let second = _mm512_loadu_si512(INTERLEAVE_16[1].as_ptr().cast());
    let mut done = 0;
    while done < blocksize {
        // SAFETY: 32 bytes of the block and 64 outputs of it, per the caller.
        let wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes.add(done / 2).cast()));
        let even = _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(wide), table);
        let odd = _mm512_permutexvar_epi16(_mm512_and_si512(wide, low_nibble), table);
        let out = dst.add(done).cast::<__m512i>();
        _mm512_storeu_si512(out, _mm512_permutex2var_epi16(even, first, odd));
        _mm512_storeu_si512(out.add(1), _mm512_permutex2var_epi16(even, second, odd));
        done += 64;
    }
}
