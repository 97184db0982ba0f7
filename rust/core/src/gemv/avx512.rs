//! AVX-512 lane-order kernel, bit-identical to the portable one: per block, the 16 decoded
//! values `T(code * scale)` in one register; per group of 16 elements, the group's 8
//! packed bytes broadcast to every 64-bit lane and shifted by a per-lane count so that
//! each 32-bit lane's low nibble is one code (the lane order of [`super::LANE_ELEMENT`]),
//! looked up with `permutexvar`, then multiplied with each input row's x and added to that
//! row's lanes. No shuffle is spent on the codes beyond the lookup itself.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{Lanes, TableRounding, Weight, XRows, GEMV_ACCUMULATORS, GEMV_LANES, LANE_ELEMENT};

/// Per 64-bit lane `k`: shift right by `4 k`, which puts nibble `k` of the little-endian
/// group word in the low 32-bit half and nibble `k + 8` in the high one.
const NIBBLE_SHIFTS: [u64; 8] = [0, 4, 8, 12, 16, 20, 24, 28];

/// [`row_lanes_for`] for `lanes.len()` (1 to 4) input rows.
///
/// # Safety
/// As [`row_lanes_for`].
pub(super) unsafe fn row_lanes(
    weight: &Weight<'_>,
    rounding: TableRounding,
    lane_ordered: bool,
    start: usize,
    xs: XRows<'_, f32>,
    lanes: &mut [Lanes],
) {
    // SAFETY: forwarded.
    unsafe {
        match lanes.len() {
            1 => by_rows::<1>(weight, rounding, lane_ordered, start, xs, lanes),
            2 => by_rows::<2>(weight, rounding, lane_ordered, start, xs, lanes),
            3 => by_rows::<3>(weight, rounding, lane_ordered, start, xs, lanes),
            _ => by_rows::<4>(weight, rounding, lane_ordered, start, xs, lanes),
        }
    }
}

/// # Safety
/// As [`row_lanes_for`]; `lanes` holds at least `B` rows.
unsafe fn by_rows<const B: usize>(
    weight: &Weight<'_>,
    rounding: TableRounding,
    lane_ordered: bool,
    start: usize,
    xs: XRows<'_, f32>,
    lanes: &mut [Lanes],
) {
    let x: [&[f32]; B] = std::array::from_fn(|b| xs.row(b));
    let init: [Lanes; B] = std::array::from_fn(|b| lanes[b]);
    use TableRounding::*;
    // One compiled loop per combination: no branch on either inside it.
    // SAFETY: forwarded.
    let out = unsafe {
        match (rounding, lane_ordered) {
            (Float32, true) => row_lanes_for::<true, 0, B>(weight, start, x, init),
            (Float32, false) => row_lanes_for::<false, 0, B>(weight, start, x, init),
            (Bfloat16, true) => row_lanes_for::<true, 1, B>(weight, start, x, init),
            (Bfloat16, false) => row_lanes_for::<false, 1, B>(weight, start, x, init),
            (Float16, true) => row_lanes_for::<true, 2, B>(weight, start, x, init),
            (Float16, false) => row_lanes_for::<false, 2, B>(weight, start, x, init),
        }
    };
    lanes[..B].copy_from_slice(&out);
}

/// Adds weight elements `start..start + len` (`len` the common length of the `B` rows of
/// `xs`) times each input row to that row's lanes.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL; `start` must be even and `start + len` at
/// most the element count `weight`'s buffers were checked for. With `LANE_ORDERED`, each x
/// row is in group lane order and every group it holds is whole (a row of a multiple of
/// 16 columns).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn row_lanes_for<const LANE_ORDERED: bool, const ROUNDING: u8, const B: usize>(
    weight: &Weight<'_>,
    start: usize,
    xs: [&[f32]; B],
    lanes: [Lanes; B],
) -> [Lanes; B] {
    let len = xs[0].len();
    let codes = _mm512_loadu_ps(weight.values.as_ptr());
    let shifts = _mm512_loadu_si512(NIBBLE_SHIFTS.as_ptr().cast());
    let lane_elements = _mm512_loadu_si512(LANE_ELEMENT.map(|e| e as i32).as_ptr().cast());
    let rounding = match ROUNDING {
        0 => TableRounding::Float32,
        1 => TableRounding::Bfloat16,
        _ => TableRounding::Float16,
    };
    // Indexed only by constants (after unrolling over B and the four accumulators), so
    // LLVM keeps every accumulator in a register.
    let mut acc: [[__m512; GEMV_ACCUMULATORS]; B] =
        lanes.map(|lanes| lanes.map(|lanes| _mm512_loadu_ps(lanes.as_ptr())));
    let mut done = 0;
    while done < len {
        let first = start + done;
        let (block, piece) = weight.piece(first, len - done);
        weight.prefetch_ahead(first, piece);
        let scale = weight.scales.get(block);
        let table = round_table(
            _mm512_mul_ps(codes, _mm512_set1_ps(scale)),
            rounding,
            !scale.is_finite(), // code * scale is NaN only for an Inf or NaN scale
        );
        // SAFETY (pointer arithmetic below): the piece's bytes are
        // `first / 2 .. (first + piece).div_ceil(2)`, inside `packed`; its x values are
        // `done .. done + piece` of each row, inside it.
        let bytes = weight.packed.as_ptr().add(first / 2);
        let xp: [*const f32; B] = xs.map(|x| x.as_ptr().add(done));
        let decode = |j: usize| {
            let word = _mm512_set1_epi64(bytes.add(j / 2).cast::<i64>().read_unaligned());
            _mm512_permutexvar_ps(_mm512_srlv_epi64(word, shifts), table)
        };
        let x_lanes = |b: usize, j: usize| {
            let x_group = _mm512_loadu_ps(xp[b].add(j));
            if LANE_ORDERED {
                x_group
            } else {
                _mm512_permutexvar_ps(lane_elements, x_group)
            }
        };
        let full = piece / GEMV_LANES;
        // Whole rounds of one group per accumulator, then the remaining whole groups.
        let mut g = 0;
        while g + GEMV_ACCUMULATORS <= full {
            let j = g * GEMV_LANES;
            let w = [0, 1, 2, 3].map(|a| decode(j + a * GEMV_LANES));
            for (b, acc) in acc.iter_mut().enumerate() {
                for (a, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
                    *acc = _mm512_add_ps(*acc, _mm512_mul_ps(w, x_lanes(b, j + a * GEMV_LANES)));
                }
            }
            g += GEMV_ACCUMULATORS;
        }
        while g < full {
            let j = g * GEMV_LANES;
            let w = decode(j);
            let a = g % GEMV_ACCUMULATORS;
            for (b, acc) in acc.iter_mut().enumerate() {
                let product = _mm512_mul_ps(w, x_lanes(b, j));
                // A match, not `acc[a]`: a runtime index would keep the accumulators in
                // memory.
                match a {
                    0 => acc[0] = _mm512_add_ps(acc[0], product),
                    1 => acc[1] = _mm512_add_ps(acc[1], product),
                    2 => acc[2] = _mm512_add_ps(acc[2], product),
                    _ => acc[3] = _mm512_add_ps(acc[3], product),
                }
            }
            g += 1;
        }
        let j = full * GEMV_LANES;
        if j < piece {
            // A partial last group: masked loads read only the piece's own bytes and x
            // values, and the masked add leaves the lanes of absent elements as they are.
            let present = piece - j;
            let element_mask: __mmask16 = (1 << present) - 1;
            let byte_mask: __mmask16 = (1 << present.div_ceil(2)) - 1;
            let lane_mask =
                _mm512_cmplt_epi32_mask(lane_elements, _mm512_set1_epi32(present as i32));
            let word =
                _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8(byte_mask, bytes.add(j / 2).cast()));
            let w = _mm512_permutexvar_ps(_mm512_srlv_epi64(word, shifts), table);
            let a = full % GEMV_ACCUMULATORS;
            for (b, acc) in acc.iter_mut().enumerate() {
                let x_lanes = if LANE_ORDERED {
                    _mm512_maskz_loadu_ps(lane_mask, xp[b].add(j))
                } else {
                    let x_group = _mm512_maskz_loadu_ps(element_mask, xp[b].add(j));
                    _mm512_permutexvar_ps(lane_elements, x_group)
                };
                let product = _mm512_mul_ps(w, x_lanes);
                let add = |acc| _mm512_mask_add_ps(acc, lane_mask, acc, product);
                match a {
                    0 => acc[0] = add(acc[0]),
                    1 => acc[1] = add(acc[1]),
                    2 => acc[2] = add(acc[2]),
                    _ => acc[3] = add(acc[3]),
                }
            }
        }
        done += piece;
    }
    acc.map(|acc| {
        acc.map(|acc| {
            let mut out = [0.0f32; GEMV_LANES];
            _mm512_storeu_ps(out.as_mut_ptr(), acc);
            out
        })
    })
}

/// Each lane rounded to the element type and widened back, bit for bit as
/// `T::from_f32(v).to_f32()` (`half`'s round-to-nearest-even, NaN kept NaN).
/// `may_be_nan`: whether any lane can be NaN (skips the NaN fix-up when not).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn round_table(table: __m512, rounding: TableRounding, may_be_nan: bool) -> __m512 {
    match rounding {
        TableRounding::Float32 => table,
        TableRounding::Bfloat16 => {
            // Round to nearest even on the upper 16 bits: add 0x7fff plus the lowest kept
            // bit, then clear the low half. A NaN would carry into the exponent or sign,
            // so it takes half's quiet NaN (payload top bits kept) instead.
            let bits = _mm512_castps_si512(table);
            let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded = _mm512_and_si512(
                _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd),
                high,
            );
            if !may_be_nan {
                return _mm512_castsi512_ps(rounded);
            }
            let quiet_nan =
                _mm512_or_si512(_mm512_and_si512(bits, high), _mm512_set1_epi32(0x0040_0000));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(table, table);
            _mm512_castsi512_ps(_mm512_mask_mov_epi32(rounded, nan, quiet_nan))
        }
        TableRounding::Float16 => _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(table)),
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::element::Element;
    use crate::gemv::rounding_check::check_table_rounding;
    use crate::gemv::GemvKernel;

    /// The AVX-512 table rounding equals `T::from_f32(v).to_f32()` on every class of
    /// float32 input: normals, values that round to subnormals or overflow, ties, Inf, NaN.
    #[test]
    fn avx512_table_rounding_matches_half() {
        if !GemvKernel::Avx512.is_supported() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        fn check<T: Element>(rounding: TableRounding) {
            check_table_rounding::<T, 16>(|values, may_be_nan| {
                let mut got = [0.0f32; 16];
                // SAFETY: AVX-512 support checked above; the arrays hold 16 floats.
                unsafe {
                    let v = _mm512_loadu_ps(values.as_ptr());
                    _mm512_storeu_ps(got.as_mut_ptr(), round_table(v, rounding, may_be_nan));
                }
                got
            });
        }
        check::<f32>(TableRounding::Float32);
        check::<bf16>(TableRounding::Bfloat16);
        check::<f16>(TableRounding::Float16);
    }
}
