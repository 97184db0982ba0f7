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

/// # Safety
/// The CPU must support AVX2; `values.len()` must be a multiple of 16 and
/// `packed.len() * 2 == values.len()`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn encode(values: &[f32], inverse: f32, book: &Codebook, packed: &mut [u8]) {
    let (bounds_table, code_table) = (&book.padded_bounds, &book.rank_codes);
    let bounds_low = _mm256_loadu_ps(bounds_table.as_ptr());
    let bounds_high = _mm256_loadu_ps(bounds_table[8..].as_ptr());
    let codes_low = _mm256_loadu_ps(code_table.as_ptr().cast());
    let codes_high = _mm256_loadu_ps(code_table[8..].as_ptr().cast());
    let inverse = _mm256_set1_ps(inverse);
    let low = _mm256_set1_ps(-1.0);
    let high = _mm256_set1_ps(1.0);
    // Gathers the low 32 bits of each 64-bit lane into lanes 0..4.
    let even_lanes = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for (group, bytes) in values
        .chunks_exact(GROUP / 2)
        .zip(packed.chunks_exact_mut(GROUP / 4))
    {
        let x = _mm256_loadu_ps(group.as_ptr());
        let scaled = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inverse), low), high);
        let mut rank = _mm256_setzero_si256();
        for step in [8, 4, 2, 1] {
            let probe = _mm256_add_epi32(rank, _mm256_set1_epi32(step - 1));
            let bound = lookup16(bounds_low, bounds_high, probe);
            let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(scaled, bound));
            rank = _mm256_add_epi32(rank, _mm256_and_si256(above, _mm256_set1_epi32(step)));
        }
        let codes = _mm256_castps_si256(lookup16(codes_low, codes_high, rank));
        let pairs = _mm256_or_si256(
            _mm256_slli_epi64::<4>(codes),
            _mm256_srli_epi64::<32>(codes),
        );
        let pairs = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pairs, even_lanes));
        let narrowed = _mm_packus_epi16(_mm_packus_epi32(pairs, pairs), _mm_setzero_si128());
        let word = _mm_cvtsi128_si32(narrowed) as u32;
        bytes.copy_from_slice(&word.to_le_bytes());
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
    let (bounds_table, code_table) = (&book.padded_bounds, &book.rank_codes);
    let (sorted_table, squares_table) = (&book.sorted_values, &book.sorted_squares);
    let table = |t: &[f32; 16]| {
        (
            _mm256_loadu_ps(t.as_ptr()),
            _mm256_loadu_ps(t[8..].as_ptr()),
        )
    };
    let (bounds_low, bounds_high) = table(bounds_table);
    let (sorted_low, sorted_high) = table(sorted_table);
    let (squares_low, squares_high) = table(squares_table);
    let codes_low = _mm256_loadu_ps(code_table.as_ptr().cast());
    let codes_high = _mm256_loadu_ps(code_table[8..].as_ptr().cast());
    let inverse = _mm256_set1_ps(inverse);
    let low = _mm256_set1_ps(-1.0);
    let high = _mm256_set1_ps(1.0);
    let even_lanes = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    // Per 8-lane half: the cross, energy and norm accumulators.
    let mut halves = [[_mm256_setzero_ps(); 3]; 2];
    for (g, group) in values.chunks_exact(GROUP).enumerate() {
        for (half, acc) in halves.iter_mut().enumerate() {
            let at = g * GROUP + half * GROUP / 2;
            let x = _mm256_loadu_ps(group.as_ptr().add(half * GROUP / 2));
            let scaled = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inverse), low), high);
            let mut rank = _mm256_setzero_si256();
            for step in [8, 4, 2, 1] {
                let probe = _mm256_add_epi32(rank, _mm256_set1_epi32(step - 1));
                let bound = lookup16(bounds_low, bounds_high, probe);
                let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(scaled, bound));
                rank = _mm256_add_epi32(rank, _mm256_and_si256(above, _mm256_set1_epi32(step)));
            }
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
                let codes = _mm256_castps_si256(lookup16(codes_low, codes_high, rank));
                let pairs = _mm256_or_si256(
                    _mm256_slli_epi64::<4>(codes),
                    _mm256_srli_epi64::<32>(codes),
                );
                let pairs = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pairs, even_lanes));
                let narrowed =
                    _mm_packus_epi16(_mm_packus_epi32(pairs, pairs), _mm_setzero_si128());
                let word = _mm_cvtsi128_si32(narrowed) as u32;
                packed[at / 2..at / 2 + 4].copy_from_slice(&word.to_le_bytes());
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
