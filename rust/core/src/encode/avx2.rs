//! AVX2 block encoder (8 lanes; 16-entry tables as two registers plus a blend).

use std::arch::x86_64::*;

use super::{Moments, GROUP};
use crate::codebook::Codebook;

/// Looks up 16-entry table (`low` = entries 0..8, `high` = 8..16) at `index` per lane.
#[inline]
#[target_feature(enable = "avx2")]
fn lookup16(low: __m256, high: __m256, index: __m256i) -> __m256 {
    let from_low = _mm256_permutevar8x32_ps(low, index);
    let from_high = _mm256_permutevar8x32_ps(high, index);
    // Bit 3 of the index selects the high half; move it to the sign bit for blendv.
    let use_high = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(index));
    _mm256_blendv_ps(from_low, from_high, use_high)
}

/// A 16-entry table as two registers (entries 0..8, 8..16).
#[inline]
#[target_feature(enable = "avx2")]
fn table16(t: &[f32; 16]) -> (__m256, __m256) {
    // SAFETY: both loads read 8 floats inside the 16-entry array.
    unsafe {
        (
            _mm256_loadu_ps(t.as_ptr()),
            _mm256_loadu_ps(t[8..].as_ptr()),
        )
    }
}

/// The sorted rank of each lane's `clamp(x * inverse, -1, 1)`: the number of bounds
/// strictly below it, by a branch-free binary search (8/4/2/1) over the padded bounds.
#[inline]
#[target_feature(enable = "avx2")]
fn ranks(x: __m256, inverse: __m256, bounds: (__m256, __m256)) -> __m256i {
    let clamped = _mm256_min_ps(
        _mm256_max_ps(_mm256_mul_ps(x, inverse), _mm256_set1_ps(-1.0)),
        _mm256_set1_ps(1.0),
    );
    let mut rank = _mm256_setzero_si256();
    for step in [8, 4, 2, 1] {
        let probe = _mm256_add_epi32(rank, _mm256_set1_epi32(step - 1));
        let bound = lookup16(bounds.0, bounds.1, probe);
        let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(clamped, bound));
        rank = _mm256_add_epi32(rank, _mm256_and_si256(above, _mm256_set1_epi32(step)));
    }
    rank
}

/// The 8 lanes' codes (by rank) packed into 4 bytes, first in the high nibble.
#[inline]
#[target_feature(enable = "avx2")]
fn pack_codes(rank: __m256i, codes_by_rank: (__m256, __m256)) -> [u8; 4] {
    let codes = _mm256_castps_si256(lookup16(codes_by_rank.0, codes_by_rank.1, rank));
    let pairs = _mm256_or_si256(
        _mm256_slli_epi64::<4>(codes),
        _mm256_srli_epi64::<32>(codes),
    );
    // Gather the low 32 bits of each 64-bit lane into lanes 0..4, then narrow to bytes.
    let even_lanes = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    let pairs = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pairs, even_lanes));
    let narrowed = _mm_packus_epi16(_mm_packus_epi32(pairs, pairs), _mm_setzero_si128());
    (_mm_cvtsi128_si32(narrowed) as u32).to_le_bytes()
}

/// The rank-to-code table as float lanes (the bits of i32 codes) for [`lookup16`].
fn code_table(book: &Codebook) -> [f32; 16] {
    book.rank_codes.map(|c| f32::from_bits(c as u32))
}

/// # Safety
/// The CPU must support AVX2; `values.len()` must be a multiple of 16 and
/// `packed.len() * 2 == values.len()`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn encode(values: &[f32], inverse: f32, book: &Codebook, packed: &mut [u8]) {
    let bounds = table16(&book.padded_bounds);
    let codes_by_rank = table16(&code_table(book));
    let inverse = _mm256_set1_ps(inverse);
    for (group, bytes) in values
        .chunks_exact(GROUP / 2)
        .zip(packed.chunks_exact_mut(GROUP / 4))
    {
        let rank = ranks(_mm256_loadu_ps(group.as_ptr()), inverse, bounds);
        bytes.copy_from_slice(&pack_codes(rank, codes_by_rank));
    }
}

/// [`super::Encoder::encode_moments`] with AVX2: a 16-value group as two 8-lane halves,
/// each with its own accumulators (canonical lanes 0..8 and 8..16).
///
/// # Safety
/// As [`encode`]; when `WEIGHTED`, `weights.len() == values.len()`; when `PACK`,
/// `packed.len() * 2 == values.len()`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn encode_moments<const WEIGHTED: bool, const PACK: bool>(
    values: &[f32],
    weights: &[f32],
    inverse: f32,
    book: &Codebook,
    packed: &mut [u8],
) -> Moments {
    let bounds = table16(&book.padded_bounds);
    let codes_by_rank = table16(&code_table(book));
    let (sorted_low, sorted_high) = table16(&book.sorted_values);
    let (squares_low, squares_high) = table16(&book.sorted_squares);
    let inverse = _mm256_set1_ps(inverse);
    // Per 8-lane half: the cross, energy and norm accumulators.
    let mut halves = [[_mm256_setzero_ps(); 3]; 2];
    for (g, group) in values.chunks_exact(GROUP).enumerate() {
        for (half, acc) in halves.iter_mut().enumerate() {
            let at = g * GROUP + half * GROUP / 2;
            let x = _mm256_loadu_ps(group.as_ptr().add(half * GROUP / 2));
            let rank = ranks(x, inverse, bounds);
            let code_value = lookup16(sorted_low, sorted_high, rank);
            let code_square = lookup16(squares_low, squares_high, rank);
            let (wx, wc2) = if WEIGHTED {
                let w = _mm256_loadu_ps(weights.as_ptr().add(at));
                (_mm256_mul_ps(w, x), _mm256_mul_ps(w, code_square))
            } else {
                (x, code_square)
            };
            acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(wx, code_value));
            acc[1] = _mm256_add_ps(acc[1], wc2);
            acc[2] = _mm256_add_ps(acc[2], _mm256_mul_ps(wx, x));
            if PACK {
                packed[at / 2..at / 2 + 4].copy_from_slice(&pack_codes(rank, codes_by_rank));
            }
        }
    }
    // Canonical fold: lanes i and i + 8 first (the two halves), then within 8 lanes.
    let [low, high] = halves;
    let [cross, energy, norm] = std::array::from_fn(|k| fold8(_mm256_add_ps(low[k], high[k])));
    Moments {
        cross,
        energy,
        norm,
    }
}

/// Sums 8 lanes in the canonical tree of [`Moments`]: `i + 4`, then `i + 2`, then `i + 1`.
#[inline]
#[target_feature(enable = "avx")]
pub(super) fn fold8(v: __m256) -> f32 {
    let four = _mm256_castps256_ps128(v);
    let four = _mm_add_ps(four, _mm256_extractf128_ps::<1>(v));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_add_ss(two, _mm_shuffle_ps::<1>(two, two));
    _mm_cvtss_f32(one)
}
