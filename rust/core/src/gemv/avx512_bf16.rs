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
use super::{sum_128, Weight, XRows, GEMV_ACCUMULATORS};

/// [`row_sums_for`] for `sums.len()` (1 to [`super::GEMV_MAX_BATCH`]) input rows: every
/// weight chunk is decoded once for all of them (4 accumulators per row; callers hand it
/// the groups of [`group_split`], at most [`SPLIT_ABOVE`] rows).
///
/// # Safety
/// As [`row_sums_for`].
pub(super) unsafe fn row_sums(
    weight: &Weight<'_>,
    row: usize,
    xs: XRows<'_, u16>,
    sums: &mut [f32],
) {
    // SAFETY: forwarded.
    unsafe {
        match sums.len() {
            1 => by_rows::<1>(weight, row, xs, sums),
            2 => by_rows::<2>(weight, row, xs, sums),
            3 => by_rows::<3>(weight, row, xs, sums),
            4 => by_rows::<4>(weight, row, xs, sums),
            5 => by_rows::<5>(weight, row, xs, sums),
            6 => by_rows::<6>(weight, row, xs, sums),
            7 => by_rows::<7>(weight, row, xs, sums),
            _ => by_rows::<8>(weight, row, xs, sums),
        }
    }
}

/// Input rows above which a call's rows go in two groups ([`group_split`]).
const SPLIT_ABOVE: usize = 6;

/// Where a call of `batch` input rows splits into two groups, each walked through a whole
/// tile of weight rows before the next (`Weight::tile_sums`; `batch`: no split). Up to
/// [`SPLIT_ABOVE`] rows go through each weight row in one pass. More split (each weight
/// chunk is then decoded twice): one pass over them all needs more accumulators than there
/// are registers (4 per row, 32 registers), and for long rows their x is more than an L1
/// cache holds (8 rows of 4096 columns: 64 KiB, read again for every weight row), while a
/// group's x stays in L1 across the tile. On a 2-core AMD EPYC (Zen 5),
/// `examples/gemv_throughput`, 2 threads, the same run: 8 rows of 1024x1024 / 2048x2048 /
/// 4096x4096 75-81 / 248 / 990-1045 us, one pass 101-105 / 325-349 / 1400-1430 us; 7 rows
/// 10-25% less; 4096x11008 and 11008x4096 19-29% less.
pub(super) fn group_split(batch: usize) -> usize {
    if batch > SPLIT_ABOVE {
        batch / 2
    } else {
        batch
    }
}

/// # Safety
/// As [`row_sums_for`]; `sums` holds at least `B` rows.
unsafe fn by_rows<const B: usize>(
    weight: &Weight<'_>,
    row: usize,
    xs: XRows<'_, u16>,
    sums: &mut [f32],
) {
    let x: [&[u16]; B] = std::array::from_fn(|b| xs.row(b));
    // SAFETY: forwarded.
    let out = unsafe { row_sums_for::<B>(weight, row, x) };
    sums[..B].copy_from_slice(&out);
}

/// The sums (folded, before the bias) of weight row `row` with each of the `B` arranged
/// input rows.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and AVX512-BF16; `weight.cols` must be a multiple
/// of 64 and the blocksize at least 64; `row < rows`; each x row holds `cols` elements
/// arranged per chunk (even elements, then odd).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn row_sums_for<const B: usize>(
    weight: &Weight<'_>,
    row: usize,
    xs: [&[u16]; B],
) -> [f32; B] {
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
        weight.prefetch_ahead(start + k * BF16_CHUNK, 2 * BF16_CHUNK);
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
    acc.map(|acc| fold(acc))
}

/// The canonical fold of [`super::fold`] in registers, bit for bit: accumulators 0 + 1 and
/// 2 + 3, then those two; then lanes `i` and `i + 8`, `i + 4`, `i + 2`, `i + 1`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl")]
fn fold([a0, a1, a2, a3]: [__m512; GEMV_ACCUMULATORS]) -> f32 {
    let sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    let low = _mm512_castps512_ps256(sum);
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(sum)));
    let eight = _mm256_add_ps(low, high);
    let four = _mm_add_ps(
        _mm256_castps256_ps128(eight),
        _mm256_extractf128_ps::<1>(eight),
    );
    sum_128(four)
}

/// 32 bf16 lanes of an integer vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512-bit plain-data vectors; every bit pattern is valid.
    unsafe { std::mem::transmute(v) }
}
