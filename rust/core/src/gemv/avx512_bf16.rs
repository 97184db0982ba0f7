//! AVX512-BF16 kernel for bfloat16 inputs: per chunk of 64 elements (32 packed bytes, one
//! block scale), the bytes zero-extended to 16-bit lanes, the high nibbles (even elements)
//! by a shift and the low ones (odd elements) by a mask, each looked up in the block's 16
//! bf16 weights (`vpermw`); `vdpbf16ps` then multiplies 32 weights with 32 inputs (x was
//! arranged once per call as each chunk's even elements, then its odd ones) and adds the
//! pairs into float32 lanes. The products of two bf16 are exact; the order is the one of
//! the module documentation. The block's weights come from `vcvtneps2bf16` of
//! `code * scale` (round to nearest even, like `half`, except that it flushes subnormals,
//! which `vdpbf16ps` would treat as zero anyway).
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::input::BF16_CHUNK;
use super::{Lanes, Weight, XRows, GEMV_ACCUMULATORS, GEMV_LANES};

/// [`row_lanes_for`] for `lanes.len()` (1 to 4) input rows.
///
/// # Safety
/// As [`row_lanes_for`].
pub(super) unsafe fn row_lanes(
    weight: &Weight<'_>,
    row: usize,
    xs: XRows<'_, u16>,
    lanes: &mut [Lanes],
) {
    // SAFETY: forwarded.
    unsafe {
        match lanes.len() {
            1 => by_rows::<1>(weight, row, xs, lanes),
            2 => by_rows::<2>(weight, row, xs, lanes),
            3 => by_rows::<3>(weight, row, xs, lanes),
            _ => by_rows::<4>(weight, row, xs, lanes),
        }
    }
}

/// # Safety
/// As [`row_lanes_for`]; `lanes` holds at least `B` rows.
unsafe fn by_rows<const B: usize>(
    weight: &Weight<'_>,
    row: usize,
    xs: XRows<'_, u16>,
    lanes: &mut [Lanes],
) {
    let x: [&[u16]; B] = std::array::from_fn(|b| xs.row(b));
    // SAFETY: forwarded.
    let out = unsafe { row_lanes_for::<B>(weight, row, x) };
    lanes[..B].copy_from_slice(&out);
}

/// The partial sums of weight row `row` with each of the `B` arranged input rows.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and AVX512-BF16; `weight.cols` must be a multiple
/// of 64 and the blocksize at least 64; `row < rows`; each x row holds `cols` elements
/// arranged per chunk (even elements, then odd).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn row_lanes_for<const B: usize>(
    weight: &Weight<'_>,
    row: usize,
    xs: [&[u16]; B],
) -> [Lanes; B] {
    let cols = weight.cols;
    let start = row * cols;
    let chunks = cols / BF16_CHUNK;
    let codes = _mm512_loadu_ps(weight.values.as_ptr());
    let low_nibble = _mm512_set1_epi16(0x0f);
    let mut acc = [[_mm512_setzero_ps(); GEMV_ACCUMULATORS]; B];
    let mut table_block = usize::MAX;
    let mut table = _mm512_setzero_si512();
    let xp: [*const u16; B] = xs.map(|x| x.as_ptr());
    // SAFETY (pointer arithmetic): chunk `k` of the row is elements
    // `start + 64 k .. start + 64 k + 64`, bytes `(start + 64 k) / 2 ..` + 32, inside
    // `packed` (checked for `rows * cols` elements); its x values are `64 k ..` + 64 of
    // each row.
    let mut decode = |k: usize| {
        let first = start + k * BF16_CHUNK;
        let block = first >> weight.block_shift;
        if block != table_block {
            let scale = weight.scales.get(block);
            let rounded: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_mul_ps(
                codes,
                _mm512_set1_ps(scale),
            )));
            // Only words 0..15 are ever looked up (indices are nibbles).
            table = _mm512_castsi256_si512(rounded);
            table_block = block;
        }
        let bytes = _mm256_loadu_si256(weight.packed.as_ptr().add(first / 2).cast());
        let wide = _mm512_cvtepu8_epi16(bytes);
        let even = _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(wide), table);
        let odd = _mm512_permutexvar_epi16(_mm512_and_si512(wide, low_nibble), table);
        (as_bh(even), as_bh(odd))
    };
    let x_even = |b: usize, k: usize| as_bh(_mm512_loadu_si512(xp[b].add(k * BF16_CHUNK).cast()));
    let x_odd = |b: usize, k: usize| {
        as_bh(_mm512_loadu_si512(
            xp[b].add(k * BF16_CHUNK + BF16_CHUNK / 2).cast(),
        ))
    };
    let mut k = 0;
    while k + 2 <= chunks {
        let (even0, odd0) = decode(k);
        let (even1, odd1) = decode(k + 1);
        for (b, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm512_dpbf16_ps(acc[0], even0, x_even(b, k));
            acc[1] = _mm512_dpbf16_ps(acc[1], odd0, x_odd(b, k));
            acc[2] = _mm512_dpbf16_ps(acc[2], even1, x_even(b, k + 1));
            acc[3] = _mm512_dpbf16_ps(acc[3], odd1, x_odd(b, k + 1));
        }
        k += 2;
    }
    if k < chunks {
        let (even, odd) = decode(k);
        for (b, acc) in acc.iter_mut().enumerate() {
            acc[0] = _mm512_dpbf16_ps(acc[0], even, x_even(b, k));
            acc[1] = _mm512_dpbf16_ps(acc[1], odd, x_odd(b, k));
        }
    }
    acc.map(|acc| {
        acc.map(|acc| {
            let mut out = [0.0f32; GEMV_LANES];
            _mm512_storeu_ps(out.as_mut_ptr(), acc);
            out
        })
    })
}

/// 32 bf16 lanes of an integer vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512-bit plain-data vectors; every bit pattern is valid.
    unsafe { std::mem::transmute(v) }
}
