//! AVX2 lane-order kernel, bit-identical to the portable and AVX-512 ones: the 16 lanes of
//! an accumulator are two 8-lane registers (lanes 0-7, 8-15). Per block, the 16 decoded
//! values `T(code * scale)` in two registers; per group of 16 elements, the group's 8
//! packed bytes broadcast to every 64-bit lane and shifted by a per-lane count (lanes 0-7
//! take nibbles 0-3 and 8-11, lanes 8-15 nibbles 4-7 and 12-15, the order of
//! [`super::LANE_ELEMENT`]), looked up in each half of the table with `permutevar8x32`
//! and blended on the code's bit 3. The input rows come in lane order, and every piece of
//! a row holds whole groups (see [`super::input::Plan::choose`]).
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{Lanes, TableRounding, Weight, XRows, GEMV_ACCUMULATORS, GEMV_LANES};

/// Lanes of one AVX2 register: an accumulator's 16 lanes are two of them.
const HALF: usize = GEMV_LANES / 2;

/// [`row_lanes_for`] for `lanes.len()` (1 to 4) input rows.
///
/// # Safety
/// As [`row_lanes_for`].
pub(super) unsafe fn row_lanes(
    weight: &Weight<'_>,
    rounding: TableRounding,
    start: usize,
    xs: XRows<'_, f32>,
    lanes: &mut [Lanes],
) {
    // SAFETY: forwarded.
    unsafe {
        match lanes.len() {
            1 => by_rows::<1>(weight, rounding, start, xs, lanes),
            2 => by_rows::<2>(weight, rounding, start, xs, lanes),
            3 => by_rows::<3>(weight, rounding, start, xs, lanes),
            _ => by_rows::<4>(weight, rounding, start, xs, lanes),
        }
    }
}

/// # Safety
/// As [`row_lanes_for`]; `lanes` holds at least `B` rows.
unsafe fn by_rows<const B: usize>(
    weight: &Weight<'_>,
    rounding: TableRounding,
    start: usize,
    xs: XRows<'_, f32>,
    lanes: &mut [Lanes],
) {
    let x: [&[f32]; B] = std::array::from_fn(|b| xs.row(b));
    let init: [Lanes; B] = std::array::from_fn(|b| lanes[b]);
    // One compiled loop per rounding: no branch on it inside the loop.
    // SAFETY: forwarded.
    let out = unsafe {
        match rounding {
            TableRounding::Float32 => row_lanes_for::<0, B>(weight, start, x, init),
            TableRounding::Bfloat16 => row_lanes_for::<1, B>(weight, start, x, init),
            TableRounding::Float16 => row_lanes_for::<2, B>(weight, start, x, init),
        }
    };
    lanes[..B].copy_from_slice(&out);
}

/// Adds weight elements `start..start + len` (`len` the common length of the `B` rows of
/// `xs`) times each input row to that row's lanes.
///
/// # Safety
/// The CPU must support AVX2 and F16C; `start` must be a multiple of 16, `len` a multiple
/// of 16 and `start + len` at most the element count `weight`'s buffers were checked for;
/// the blocksize at least 16 (so every piece holds whole groups); each x row in group lane
/// order.
#[target_feature(enable = "avx2,f16c")]
unsafe fn row_lanes_for<const ROUNDING: u8, const B: usize>(
    weight: &Weight<'_>,
    start: usize,
    xs: [&[f32]; B],
    lanes: [Lanes; B],
) -> [Lanes; B] {
    let len = xs[0].len();
    debug_assert!(start.is_multiple_of(GEMV_LANES) && len.is_multiple_of(GEMV_LANES));
    let values = weight.values.as_ptr();
    let (codes_low, codes_high) = (_mm256_loadu_ps(values), _mm256_loadu_ps(values.add(HALF)));
    // Lanes 8-15 take the word shifted 16 further than lanes 0-7: one shift of the first.
    let shifts = _mm256_setr_epi64x(0, 4, 8, 12);
    let rounding = match ROUNDING {
        0 => TableRounding::Float32,
        1 => TableRounding::Bfloat16,
        _ => TableRounding::Float16,
    };
    // Indexed only by constants (after unrolling), so LLVM keeps what fits in registers.
    let mut acc: [[[__m256; 2]; GEMV_ACCUMULATORS]; B] = lanes.map(|lanes| {
        lanes.map(|lanes| {
            let p = lanes.as_ptr();
            [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(HALF))]
        })
    });
    let mut done = 0;
    while done < len {
        let first = start + done;
        let (block, piece) = weight.piece(first, len - done);
        weight.prefetch_ahead(first, piece);
        let scale = weight.scales.get(block);
        let scale_lanes = _mm256_set1_ps(scale);
        let may_be_nan = !scale.is_finite(); // code * scale is NaN only for an Inf or NaN scale
        let table_low = round_table(_mm256_mul_ps(codes_low, scale_lanes), rounding, may_be_nan);
        let table_high = round_table(_mm256_mul_ps(codes_high, scale_lanes), rounding, may_be_nan);
        // A 4-bit code's value: entry `code & 7` of the half its bit 3 selects.
        let lookup = |codes: __m256i| {
            let low = _mm256_permutevar8x32_ps(table_low, codes);
            let high = _mm256_permutevar8x32_ps(table_high, codes);
            _mm256_blendv_ps(
                low,
                high,
                _mm256_castsi256_ps(_mm256_slli_epi32::<28>(codes)),
            )
        };
        // SAFETY (pointer arithmetic below): the piece's bytes are
        // `first / 2 .. (first + piece) / 2`, inside `packed`, and its x values are
        // `done .. done + piece` of each row, inside it; both are whole groups.
        let bytes = weight.packed.as_ptr().add(first / 2);
        let xp: [*const f32; B] = xs.map(|x| x.as_ptr().add(done));
        let decode = |j: usize| {
            let word = _mm256_set1_epi64x(bytes.add(j / 2).cast::<i64>().read_unaligned());
            let low = _mm256_srlv_epi64(word, shifts);
            [lookup(low), lookup(_mm256_srli_epi64::<16>(low))]
        };
        let multiply_add = |acc: &mut [__m256; 2], w: [__m256; 2], x: *const f32| {
            for (h, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, _mm256_loadu_ps(x.add(h * HALF))));
            }
        };
        debug_assert!(piece.is_multiple_of(GEMV_LANES));
        let groups = piece / GEMV_LANES;
        // Whole rounds of one group per accumulator, then the remaining groups. Each group
        // is decoded just before its adds (16 ymm registers: holding a round's four
        // decoded groups next to the accumulators would spill).
        let mut g = 0;
        while g + GEMV_ACCUMULATORS <= groups {
            let j = g * GEMV_LANES;
            for a in 0..GEMV_ACCUMULATORS {
                let w = decode(j + a * GEMV_LANES);
                for (b, acc) in acc.iter_mut().enumerate() {
                    multiply_add(&mut acc[a], w, xp[b].add(j + a * GEMV_LANES));
                }
            }
            g += GEMV_ACCUMULATORS;
        }
        while g < groups {
            let j = g * GEMV_LANES;
            let w = decode(j);
            for (b, acc) in acc.iter_mut().enumerate() {
                // A match, not `acc[g % 4]`: a runtime index would keep the accumulators
                // in memory.
                let acc = match g % GEMV_ACCUMULATORS {
                    0 => &mut acc[0],
                    1 => &mut acc[1],
                    2 => &mut acc[2],
                    _ => &mut acc[3],
                };
                multiply_add(acc, w, xp[b].add(j));
            }
            g += 1;
        }
        done += piece;
    }
    acc.map(|acc| {
        acc.map(|[low, high]| {
            let mut out = [0.0f32; GEMV_LANES];
            _mm256_storeu_ps(out.as_mut_ptr(), low);
            _mm256_storeu_ps(out.as_mut_ptr().add(HALF), high);
            out
        })
    })
}

/// Each lane rounded to the element type and widened back, bit for bit as
/// `T::from_f32(v).to_f32()` (`half`'s round-to-nearest-even, NaN kept NaN), as the
/// AVX-512 kernel's `round_table` on 8 lanes. `may_be_nan`: whether any lane can be NaN.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn round_table(table: __m256, rounding: TableRounding, may_be_nan: bool) -> __m256 {
    match rounding {
        TableRounding::Float32 => table,
        TableRounding::Bfloat16 => {
            // Round to nearest even on the upper 16 bits: add 0x7fff plus the lowest kept
            // bit, then clear the low half. A NaN would carry into the exponent or sign,
            // so it takes half's quiet NaN (payload top bits kept) instead.
            let bits = _mm256_castps_si256(table);
            let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
            let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let rounded = _mm256_and_si256(
                _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd),
                high,
            );
            if !may_be_nan {
                return _mm256_castsi256_ps(rounded);
            }
            let quiet_nan =
                _mm256_or_si256(_mm256_and_si256(bits, high), _mm256_set1_epi32(0x0040_0000));
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(table, table);
            _mm256_blendv_ps(
                _mm256_castsi256_ps(rounded),
                _mm256_castsi256_ps(quiet_nan),
                nan,
            )
        }
        // F16C's immediate is the rounding mode alone (it raises no exceptions it reports).
        TableRounding::Float16 => {
            _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(table))
        }
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::element::Element;
    use crate::gemv::rounding_check::check_table_rounding;
    use crate::gemv::GemvKernel;

    /// The AVX2 table rounding equals `T::from_f32(v).to_f32()` on every class of float32
    /// input: normals, values that round to subnormals or overflow, ties, Inf, NaN.
    #[test]
    fn avx2_table_rounding_matches_half() {
        if !GemvKernel::Avx2.is_supported() {
            eprintln!("skipped: no AVX2 + F16C on this CPU");
            return;
        }
        fn check<T: Element>(rounding: TableRounding) {
            check_table_rounding::<T, HALF>(|values, may_be_nan| {
                let mut got = [0.0f32; HALF];
                // SAFETY: AVX2 + F16C support checked above; the arrays hold 8 floats.
                unsafe {
                    let v = _mm256_loadu_ps(values.as_ptr());
                    _mm256_storeu_ps(got.as_mut_ptr(), round_table(v, rounding, may_be_nan));
                }
                got
            });
        }
        check::<f32>(TableRounding::Float32);
        check::<bf16>(TableRounding::Bfloat16);
        check::<f16>(TableRounding::Float16);
    }
}
