//! AVX-512 block encoder (16 lanes).

use std::arch::x86_64::*;

use super::{padded_bounds, rank_codes, GROUP};
use crate::codebook::Codebook;

/// # Safety
/// The CPU must support AVX-512 F, BW and VL; `values.len()` must be a multiple of 16
/// and `packed.len() * 2 == values.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn encode(values: &[f32], inverse: f32, book: &Codebook, packed: &mut [u8]) {
    let bounds_table = padded_bounds(book);
    let code_table = rank_codes(book);
    let bounds = _mm512_loadu_ps(bounds_table.as_ptr());
    let codes_by_rank = _mm512_loadu_si512(code_table.as_ptr().cast());
    let inverse = _mm512_set1_ps(inverse);
    let low = _mm512_set1_ps(-1.0);
    let high = _mm512_set1_ps(1.0);
    for (group, bytes) in values
        .chunks_exact(GROUP)
        .zip(packed.chunks_exact_mut(GROUP / 2))
    {
        let x = _mm512_loadu_ps(group.as_ptr());
        let scaled = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, inverse), low), high);
        // rank = number of bounds strictly below `scaled`: binary search, 8/4/2/1.
        let mut rank = _mm512_setzero_si512();
        for step in [8, 4, 2, 1] {
            let probe = _mm512_add_epi32(rank, _mm512_set1_epi32(step - 1));
            let bound = _mm512_permutexvar_ps(probe, bounds);
            let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(scaled, bound);
            rank = _mm512_mask_add_epi32(rank, above, rank, _mm512_set1_epi32(step));
        }
        let codes = _mm512_permutexvar_epi32(rank, codes_by_rank);
        // Each 64-bit lane holds (even code, odd code); fold to (even << 4 | odd) in its
        // low byte, then narrow the 8 lanes to 8 bytes.
        let pairs = _mm512_or_si512(
            _mm512_slli_epi64::<4>(codes),
            _mm512_srli_epi64::<32>(codes),
        );
        let packed_pairs = _mm512_cvtepi64_epi8(pairs);
        _mm_storel_epi64(bytes.as_mut_ptr().cast(), packed_pairs);
    }
}
