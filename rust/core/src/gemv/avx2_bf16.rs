//! AVX2 kernel for bfloat16 inputs (no AVX-512 needed): per chunk of 64 elements (32
//! packed bytes, one block scale), the low and high nibbles of the bytes are each looked
//! up 32 at a time with `pshufb` in two 16-byte tables (the low and the high byte of the
//! block's 16 bf16 weights), the two byte vectors are interleaved into bf16 words, and
//! each register of 16 words widens to float32 by a shift (its even words) and a mask
//! (its odd words). The 8 float32 vectors of a chunk go to 8 accumulators by fused
//! multiply-add with x, which was arranged once per call in the same order
//! ([`CHUNK_ELEMENT`]). The product of two bf16 values is exact in float32, so each
//! multiply-add rounds once, as the separate multiply and add of the lane kernels would;
//! the order is the kernel's own (module documentation of [`crate::gemv`]). The block's
//! weights are `T(code * scale)` rounded as [`super::avx2`] rounds them, bit for bit as
//! dequantization.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::avx2::round_table;
use super::input::BF16_CHUNK;
use super::{sum_128, TableRounding, Weight, XRows, GEMV_MAX_BATCH};

/// Accumulators of 8 float32 lanes per input row: one per decoded vector of a chunk.
pub const WORD_ACCUMULATORS: usize = 8;
/// Lanes of one accumulator.
const LANES: usize = 8;

/// Chunks of a segment of the several-row path: 16 chunks of 8 vectors, 4 KiB of stack,
/// well inside L1.
const SEGMENT_CHUNKS: usize = 16;

/// `CHUNK_ELEMENT[8 a + d]`: the element of a chunk of 64 that lane `d` of accumulator
/// `a` takes. With `j = 2 d + (a % 2)` (the word of a 16-word register: even words widen
/// by the shift, odd ones by the mask), `p = j % 8 + 8 ((a / 2) % 2) + 16 (j / 8)` (the
/// byte `unpacklo`/`unpackhi` put there) and the nibble `a / 4` (0: high nibbles, the even
/// elements; 1: low nibbles, the odd ones), the element is `2 p + a / 4`.
pub const CHUNK_ELEMENT: [usize; BF16_CHUNK] = {
    let mut map = [0; BF16_CHUNK];
    let mut i = 0;
    while i < BF16_CHUNK {
        let (a, d) = (i / LANES, i % LANES);
        let j = 2 * d + a % 2;
        let p = j % 8 + 8 * ((a / 2) % 2) + 16 * (j / 8);
        map[i] = 2 * p + a / 4;
        i += 1;
    }
    map
};

/// The sums (folded, before the bias) of weight row `row` with each of the `sums.len()`
/// (1 to [`GEMV_MAX_BATCH`]) arranged input rows of `xs`. One row decodes and multiplies
/// chunk by chunk (its 8 accumulators fill half of the 16 registers); several rows decode
/// a segment of chunks once into a stack buffer and then walk it once per row, in the same
/// order, so each row's sums are bit for bit those of the row alone.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `weight.cols` must be a multiple of 64 and the
/// blocksize at least 64; `row < rows`; each x row holds `cols` float32 values, arranged
/// per chunk as [`CHUNK_ELEMENT`].
pub(super) unsafe fn row_sums(
    weight: &Weight<'_>,
    row: usize,
    xs: XRows<'_, f32>,
    sums: &mut [f32],
) {
    debug_assert!((1..=GEMV_MAX_BATCH).contains(&sums.len()));
    // SAFETY: forwarded.
    unsafe {
        if let [sum] = sums {
            *sum = one_row(weight, row, xs.row(0));
        } else {
            several_rows(weight, row, xs, sums);
        }
    }
}

/// One input row: each chunk decoded and multiplied into the accumulators at once.
///
/// # Safety
/// As [`row_sums`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_row(weight: &Weight<'_>, row: usize, x: &[f32]) -> f32 {
    let start = row * weight.cols;
    let mut decoder = Decoder::new(weight);
    let mut acc = [_mm256_setzero_ps(); WORD_ACCUMULATORS];
    for k in 0..weight.cols / BF16_CHUNK {
        // SAFETY: chunk `k` of the row (see `Decoder::chunk`); its x values are `64 k ..`
        // + 64 of the row.
        let weights = unsafe { decoder.chunk(weight, start + k * BF16_CHUNK) };
        for (a, (acc, weights)) in acc.iter_mut().zip(weights).enumerate() {
            let x = unsafe { _mm256_loadu_ps(x.as_ptr().add(k * BF16_CHUNK + a * LANES)) };
            *acc = _mm256_fmadd_ps(weights, x, *acc);
        }
    }
    fold(acc)
}

/// Several input rows: per segment of [`SEGMENT_CHUNKS`] chunks, the decoded weights go to
/// a stack buffer once, then each row adds the whole segment to its accumulators (kept in
/// memory between segments), chunk by chunk in the order of [`one_row`].
///
/// # Safety
/// As [`row_sums`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn several_rows(weight: &Weight<'_>, row: usize, xs: XRows<'_, f32>, sums: &mut [f32]) {
    let start = row * weight.cols;
    let chunks = weight.cols / BF16_CHUNK;
    let mut decoder = Decoder::new(weight);
    let mut accs = [[_mm256_setzero_ps(); WORD_ACCUMULATORS]; GEMV_MAX_BATCH];
    let mut decoded = [[_mm256_setzero_ps(); WORD_ACCUMULATORS]; SEGMENT_CHUNKS];
    for first_chunk in (0..chunks).step_by(SEGMENT_CHUNKS) {
        let segment = SEGMENT_CHUNKS.min(chunks - first_chunk);
        for (c, weights) in decoded[..segment].iter_mut().enumerate() {
            // SAFETY: chunk `first_chunk + c` of the row (see `Decoder::chunk`).
            *weights = unsafe { decoder.chunk(weight, start + (first_chunk + c) * BF16_CHUNK) };
        }
        for (b, accs) in accs[..sums.len()].iter_mut().enumerate() {
            let x = xs.row(b);
            let mut acc = *accs;
            for (c, weights) in decoded[..segment].iter().enumerate() {
                let k = first_chunk + c;
                for (a, (acc, &weights)) in acc.iter_mut().zip(weights).enumerate() {
                    // SAFETY: the x values of chunk `k` are `64 k ..` + 64 of the row.
                    let x = unsafe { _mm256_loadu_ps(x.as_ptr().add(k * BF16_CHUNK + a * LANES)) };
                    *acc = _mm256_fmadd_ps(weights, x, *acc);
                }
            }
            *accs = acc;
        }
    }
    for (sum, acc) in sums.iter_mut().zip(accs) {
        *sum = fold(acc);
    }
}

/// Decodes a row's chunks into bf16 weights widened to float32, in accumulator order,
/// building each block's byte tables when the block changes.
struct Decoder {
    /// The codebook as the table build wants it: entries 0-3 and 8-11, 4-7 and 12-15.
    codes_a: __m256,
    codes_b: __m256,
    /// Bytes 2 and 3 of each float32 lane (the rounded bf16) to byte positions 0-3 and
    /// 8-11 of each 128-bit half (`codes_a`), 4-7 and 12-15 (`codes_b`); -1 writes zero.
    pick_a: __m256i,
    pick_b: __m256i,
    low_nibbles: __m256i,
    high_words: __m256i,
    table_block: usize,
    table_low: __m256i,
    table_high: __m256i,
}

impl Decoder {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new(weight: &Weight<'_>) -> Decoder {
        let v = weight.values;
        #[rustfmt::skip]
        let (pick_a, pick_b) = (
            _mm256_setr_epi8(
                2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1,
                2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1,
            ),
            _mm256_setr_epi8(
                -1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15,
                -1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15,
            ),
        );
        Decoder {
            codes_a: _mm256_setr_ps(v[0], v[1], v[2], v[3], v[8], v[9], v[10], v[11]),
            codes_b: _mm256_setr_ps(v[4], v[5], v[6], v[7], v[12], v[13], v[14], v[15]),
            pick_a,
            pick_b,
            low_nibbles: _mm256_set1_epi8(0x0f),
            // Through black_box: a known mask would be turned into a blend with zero,
            // which runs on the two shuffle pipes instead of any vector pipe.
            high_words: std::hint::black_box(_mm256_set1_epi32(0xffff_0000_u32 as i32)),
            table_block: usize::MAX,
            table_low: _mm256_setzero_si256(),
            table_high: _mm256_setzero_si256(),
        }
    }

    /// The 64 weights of the chunk that starts at element `first` (a multiple of 64),
    /// as 8 vectors, vector `a` lane `d` holding element `CHUNK_ELEMENT[8 a + d]`.
    ///
    /// # Safety
    /// As [`row_sums`]; elements `first..first + 64` lie inside the weight, which holds
    /// whole chunks of one block each.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk(&mut self, weight: &Weight<'_>, first: usize) -> [__m256; WORD_ACCUMULATORS] {
        if (first / BF16_CHUNK).is_multiple_of(2) {
            weight.prefetch_ahead(first, 2 * BF16_CHUNK); // a cache line: two chunks
        }
        let block = first >> weight.block_shift;
        if block != self.table_block {
            self.build_tables(weight.scales.get(block));
            self.table_block = block;
        }
        // SAFETY: the chunk's bytes are `first / 2 ..` + 32, inside `packed` (checked for
        // `rows * cols` elements).
        let bytes = unsafe { _mm256_loadu_si256(weight.packed.as_ptr().add(first / 2).cast()) };
        let nibbles = [
            _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), self.low_nibbles),
            _mm256_and_si256(bytes, self.low_nibbles),
        ];
        let mut out = [_mm256_setzero_ps(); WORD_ACCUMULATORS];
        for (n, codes) in nibbles.into_iter().enumerate() {
            let low = _mm256_shuffle_epi8(self.table_low, codes);
            let high = _mm256_shuffle_epi8(self.table_high, codes);
            let words = [
                _mm256_unpacklo_epi8(low, high),
                _mm256_unpackhi_epi8(low, high),
            ];
            for (w, words) in words.into_iter().enumerate() {
                out[4 * n + 2 * w] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(words));
                out[4 * n + 2 * w + 1] =
                    _mm256_castsi256_ps(_mm256_and_si256(words, self.high_words));
            }
        }
        out
    }

    /// The block's byte tables: per 128-bit half, the low bytes of the 16 rounded
    /// `code * scale` (`table_low`) and their high bytes (`table_high`), in both halves.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn build_tables(&mut self, scale: f32) {
        let scale_lanes = _mm256_set1_ps(scale);
        let may_be_nan = !scale.is_finite(); // code * scale is NaN only for these
        let round = |codes| {
            let product = _mm256_mul_ps(codes, scale_lanes);
            _mm256_castps_si256(round_table(product, TableRounding::Bfloat16, may_be_nan))
        };
        // Per 128-bit half: the low bytes of entries 0-7 (or 8-15), then their high bytes;
        // each table is one 64-bit lane of each half, in both halves.
        let halves = _mm256_or_si256(
            _mm256_shuffle_epi8(round(self.codes_a), self.pick_a),
            _mm256_shuffle_epi8(round(self.codes_b), self.pick_b),
        );
        self.table_low = _mm256_permute4x64_epi64::<0b10_00_10_00>(halves);
        self.table_high = _mm256_permute4x64_epi64::<0b11_01_11_01>(halves);
    }
}

/// The kernel's fold: accumulators `(0 + 1) + (2 + 3)` and `(4 + 5) + (6 + 7)`, then
/// those two; then lanes `i` and `i + 4`, `i + 2`, `i + 1`.
#[inline]
#[target_feature(enable = "avx2")]
fn fold(acc: [__m256; WORD_ACCUMULATORS]) -> f32 {
    let pair = |a, b| _mm256_add_ps(a, b);
    let sum = pair(
        pair(pair(acc[0], acc[1]), pair(acc[2], acc[3])),
        pair(pair(acc[4], acc[5]), pair(acc[6], acc[7])),
    );
    sum_128(_mm_add_ps(
        _mm256_castps256_ps128(sum),
        _mm256_extractf128_ps::<1>(sum),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_order_is_a_permutation() {
        let mut seen = [false; BF16_CHUNK];
        for &element in &CHUNK_ELEMENT {
            assert!(!seen[element]);
            seen[element] = true;
        }
        // Accumulator 0 takes even elements from the first bytes of each 128-bit half.
        assert_eq!(CHUNK_ELEMENT[..LANES], [0, 4, 8, 12, 32, 36, 40, 44]);
        assert_eq!(CHUNK_ELEMENT[7 * LANES..], [19, 23, 27, 31, 51, 55, 59, 63]);
    }
}
