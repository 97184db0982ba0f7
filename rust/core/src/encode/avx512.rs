//! AVX-512 block encoder (16 lanes).

use std::arch::x86_64::*;

use super::{Moments, GROUP};
use crate::codebook::Codebook;

/// # Safety
/// The CPU must support AVX-512 F, BW and VL; `values.len()` must be a multiple of 16
/// and `packed.len() * 2 == values.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn encode(values: &[f32], inverse: f32, book: &Codebook, packed: &mut [u8]) {
    let bounds = _mm512_loadu_ps(book.padded_bounds.as_ptr());
    let codes_by_rank = _mm512_loadu_si512(book.rank_codes.as_ptr().cast());
    let inverse = _mm512_set1_ps(inverse);
    for (group, bytes) in values
        .chunks_exact(GROUP)
        .zip(packed.chunks_exact_mut(GROUP / 2))
    {
        let rank = ranks(_mm512_loadu_ps(group.as_ptr()), inverse, bounds);
        store_codes(rank, codes_by_rank, bytes.as_mut_ptr());
    }
}

/// The sorted rank of each lane's `clamp(x * inverse, -1, 1)`: the number of bounds
/// strictly below it, by a branch-free binary search (8/4/2/1) over the 16 padded bounds.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn ranks(x: __m512, inverse: __m512, bounds: __m512) -> __m512i {
    let clamped = _mm512_min_ps(
        _mm512_max_ps(_mm512_mul_ps(x, inverse), _mm512_set1_ps(-1.0)),
        _mm512_set1_ps(1.0),
    );
    let mut rank = _mm512_setzero_si512();
    for step in [8, 4, 2, 1] {
        let probe = _mm512_add_epi32(rank, _mm512_set1_epi32(step - 1));
        let bound = _mm512_permutexvar_ps(probe, bounds);
        let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(clamped, bound);
        rank = _mm512_mask_add_epi32(rank, above, rank, _mm512_set1_epi32(step));
    }
    rank
}

/// Writes the 16 lanes' codes (by rank) as 8 packed bytes at `out`, first in the high nibble.
///
/// # Safety
/// `out` must be valid for 8 bytes of writes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_codes(rank: __m512i, codes_by_rank: __m512i, out: *mut u8) {
    let codes = _mm512_permutexvar_epi32(rank, codes_by_rank);
    // Each 64-bit lane holds (even code, odd code); fold to (even << 4 | odd) in its low
    // byte, then narrow the 8 lanes to 8 bytes.
    let pairs = _mm512_or_si512(
        _mm512_slli_epi64::<4>(codes),
        _mm512_srli_epi64::<32>(codes),
    );
    _mm_storel_epi64(out.cast(), _mm512_cvtepi64_epi8(pairs));
}

/// [`super::Encoder::encode_moments`] with AVX-512: the rank search of [`encode`], then
/// the code value and its square looked up by rank from two registers.
///
/// # Safety
/// As [`encode`]; when `WEIGHTED`, `weights.len() == values.len()`; when `PACK`,
/// `packed.len() * 2 == values.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn encode_moments<const WEIGHTED: bool, const PACK: bool>(
    values: &[f32],
    weights: &[f32],
    inverse: f32,
    book: &Codebook,
    packed: &mut [u8],
) -> Moments {
    let bounds = _mm512_loadu_ps(book.padded_bounds.as_ptr());
    let codes_by_rank = _mm512_loadu_si512(book.rank_codes.as_ptr().cast());
    let sorted = _mm512_loadu_ps(book.sorted_values.as_ptr());
    let squares = _mm512_loadu_ps(book.sorted_squares.as_ptr());
    let inverse = _mm512_set1_ps(inverse);
    let (mut cross, mut energy, mut norm) = (
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
    );
    for (g, group) in values.chunks_exact(GROUP).enumerate() {
        let x = _mm512_loadu_ps(group.as_ptr());
        let rank = ranks(x, inverse, bounds);
        let code_value = _mm512_permutexvar_ps(rank, sorted);
        let code_square = _mm512_permutexvar_ps(rank, squares);
        let (wx, wc2) = if WEIGHTED {
            let w = _mm512_loadu_ps(weights.as_ptr().add(g * GROUP));
            (_mm512_mul_ps(w, x), _mm512_mul_ps(w, code_square))
        } else {
            (x, code_square)
        };
        // Separate multiply and add (no FMA): the portable and AVX2 sums round alike.
        cross = _mm512_add_ps(cross, _mm512_mul_ps(wx, code_value));
        energy = _mm512_add_ps(energy, wc2);
        norm = _mm512_add_ps(norm, _mm512_mul_ps(wx, x));
        if PACK {
            store_codes(rank, codes_by_rank, packed.as_mut_ptr().add(g * GROUP / 2));
        }
    }
    Moments {
        cross: fold16(cross),
        energy: fold16(energy),
        norm: fold16(norm),
    }
}

/// The canonical fold of [`Moments`]: lanes i and i + 8 (the two 256-bit halves), then
/// the 8-lane tree.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold16(v: __m512) -> f32 {
    let swapped = _mm512_shuffle_f32x4::<0b11_10_11_10>(v, v);
    super::avx2::fold8(_mm512_castps512_ps256(_mm512_add_ps(v, swapped)))
}
