//! Batch-1 (decode-time) fused dequantize-and-multiply: `out = W x (+ bias)` for a 4-bit
//! weight `W [rows, cols]` and one input row `x`, reading the packed codes once instead of
//! writing the whole dequantized weight and reading it back.
//!
//! Each weight element is decoded exactly as [`crate::dequantize_4bit`] decodes it,
//! `w = T(code[nibble] * scale)` (a float32 product rounded once to `T`), so the result is
//! dequantize-then-matvec up to the order of the float32 summation.
//!
//! The summation order is fixed (the same on every CPU and in both kernels, so the
//! portable and AVX-512 results are bit-identical): a row's elements are split into
//! pieces at block boundaries (a row that starts on the low nibble of a byte first gives
//! its single first element a piece of its own); each piece is walked in groups of 16
//! from its start, element `LANE_ELEMENT[l]` of group `g` adding its product `w * x`
//! (rounded, not fused) to lane `l` of accumulator `g % 4` (4 x 16 float32 lanes: four
//! independent dependency chains keep the adds from waiting on each other); the
//! accumulators are added as 0 + 1 and 2 + 3, then those two; the 16 lanes are folded as
//! `i` and `i + 8`, then `i + 4`, `i + 2`, `i + 1`; the bias, if any, is added; the sum is
//! rounded once to `T`.

use std::any::TypeId;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::element::Element;
use crate::error::Result;
use crate::layout::check_len;
use crate::packed::PackedView;

/// Lanes of an accumulator, and elements per group of the summation order.
pub const GEMV_LANES: usize = 16;
/// Accumulators (of [`GEMV_LANES`] lanes) a row's groups take turns adding to.
pub const GEMV_ACCUMULATORS: usize = 4;

/// A row's partial sums: lane `l` of accumulator `a`.
type Lanes = [[f32; GEMV_LANES]; GEMV_ACCUMULATORS];

/// Weight elements per parallel task (whole rows, at least one): large enough to
/// amortize scheduling, small enough to balance a 4096-row layer over many threads.
const TASK_ELEMENTS: usize = 65_536;

/// `LANE_ELEMENT[lane]`: the element of a group of 16 that adds to accumulator `lane`.
///
/// The AVX-512 kernel reads a group's 8 packed bytes as one little-endian 64-bit word and
/// shifts 64-bit lane `k` right by `4 k`, so 32-bit lane `2 k + h` holds nibble
/// `n = k + 8 h` of the word; nibble `n` is element `n ^ 1` (the high nibble of a byte is
/// the even element). The portable kernel follows the same map, which makes the two
/// kernels' sums bit-identical.
pub const LANE_ELEMENT: [usize; GEMV_LANES] = {
    let mut map = [0; GEMV_LANES];
    let mut lane = 0;
    while lane < GEMV_LANES {
        map[lane] = ((lane >> 1) + 8 * (lane & 1)) ^ 1;
        lane += 1;
    }
    map
};

/// The lane of a group's element 0.
const LANE_OF_FIRST: usize = 2;

/// An implementation of the fused kernel; every one returns bit-identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX-512 F/BW/VL: the 16-entry table of a block held in one register,
    /// looked up per lane by `permutexvar`.
    Avx512,
}

impl GemvKernel {
    /// The fastest kernel the running CPU supports.
    pub fn best() -> GemvKernel {
        if GemvKernel::Avx512.is_supported() {
            GemvKernel::Avx512
        } else {
            GemvKernel::Portable
        }
    }

    /// Whether the running CPU can use this kernel.
    pub fn is_supported(self) -> bool {
        match self {
            GemvKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            GemvKernel::Avx512 => crate::dispatch::has_avx512(),
            #[cfg(not(target_arch = "x86_64"))]
            GemvKernel::Avx512 => false,
        }
    }
}

/// `out[r] = T(sum_c w[r, c] * x[c] (+ bias[r]))` for the row-major 4-bit weight
/// `[rows, cols]` (`weight`, as [`crate::quantize_4bit`] writes it; nested scales are
/// decoded first), accumulated in float32 in the order described in the module
/// documentation, rows split across rayon tasks. Uses the fastest kernel the CPU supports.
pub fn gemv_4bit<T: Element>(
    weight: &PackedView<'_>,
    x: &[T],
    bias: Option<&[T]>,
    out: &mut [T],
) -> Result<()> {
    gemv_4bit_with(GemvKernel::best(), weight, x, bias, out)
}

/// [`gemv_4bit`] with a chosen kernel; one the CPU lacks (or an element type it has no
/// table rounding for) falls back to the portable kernel, so this is always safe.
pub fn gemv_4bit_with<T: Element>(
    kernel: GemvKernel,
    weight: &PackedView<'_>,
    x: &[T],
    bias: Option<&[T]>,
    out: &mut [T],
) -> Result<()> {
    // The view has checked the codes and scales against its (non-empty) shape.
    let (rows, cols) = weight.matrix()?;
    check_len("x input", cols, x.len())?;
    check_len("out", rows, out.len())?;
    if let Some(bias) = bias {
        check_len("bias input", rows, bias.len())?;
    }
    let absmax = weight.scales().decoded()?;

    // x is read once per row: widen it to float32 once per call (cols elements, cheap)
    // rather than in the inner loop.
    let mut scratch = if TypeId::of::<T>() == TypeId::of::<f32>() {
        Vec::new() // `widen` borrows float32 input as it is
    } else {
        vec![0.0f32; cols]
    };
    let x = T::widen(x, &mut scratch);
    let weight = Weight {
        packed: weight.codes(),
        absmax: &absmax,
        values: &weight.quant_type().codebook().values,
        block_shift: weight.blocksize().get().trailing_zeros(),
        cols,
    };
    let x_lane_order;
    let (kernel, x) = match (kernel, TableRounding::of::<T>()) {
        (GemvKernel::Avx512, Some(rounding)) if kernel.is_supported() => {
            // With whole groups of 16 per row, every group of every row starts at a
            // column that is a multiple of 16: x can be put in lane order once here
            // instead of permuted in the inner loop for every row.
            let lane_ordered = cols.is_multiple_of(GEMV_LANES);
            let x = if lane_ordered {
                x_lane_order = to_lane_order(x);
                &x_lane_order[..]
            } else {
                x
            };
            let kernel = RowKernel::Avx512 {
                rounding,
                lane_ordered,
            };
            (kernel, x)
        }
        _ => (RowKernel::Portable, x),
    };
    let rows_per_task = (TASK_ELEMENTS / cols).max(1);
    out.par_chunks_mut(rows_per_task)
        .enumerate()
        .for_each(|(task, out)| {
            let first_row = task * rows_per_task;
            for (row, o) in (first_row..).zip(out.iter_mut()) {
                let mut sum = fold(weight.row_lanes::<T>(kernel, row, x));
                if let Some(bias) = bias {
                    sum += bias[row].to_f32();
                }
                *o = T::from_f32(sum);
            }
        });
    Ok(())
}

/// The validated weight buffers and the geometry the row kernels need.
#[derive(Clone, Copy)]
struct Weight<'a> {
    packed: &'a [u8],
    absmax: &'a [f32],
    values: &'a [f32; 16],
    /// log2 of the blocksize (a power of two): the block of an element is a shift away.
    block_shift: u32,
    cols: usize,
}

/// How a kernel rounds a block's float32 table `code * scale` to the element type; the
/// AVX-512 kernel knows these three, any other `Element` uses the portable kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableRounding {
    Float32,
    Bfloat16,
    Float16,
}

impl TableRounding {
    fn of<T: 'static>() -> Option<TableRounding> {
        let id = TypeId::of::<T>();
        [
            (TypeId::of::<f32>(), TableRounding::Float32),
            (TypeId::of::<bf16>(), TableRounding::Bfloat16),
            (TypeId::of::<f16>(), TableRounding::Float16),
        ]
        .into_iter()
        .find_map(|(known, rounding)| (known == id).then_some(rounding))
    }
}

#[derive(Clone, Copy)]
enum RowKernel {
    Portable,
    /// With x in group lane order ([`to_lane_order`]) or as given.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512 {
        rounding: TableRounding,
        lane_ordered: bool,
    },
}

/// `x` rearranged so that each group of 16 holds its elements in lane order
/// (`out[16 g + lane] = x[16 g + LANE_ELEMENT[lane]]`); `x.len()` is a multiple of 16.
fn to_lane_order(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(GEMV_LANES)
        .flat_map(|group| LANE_ELEMENT.map(|element| group[element]))
        .collect()
}

impl Weight<'_> {
    /// The partial sums of row `row` (before the fold).
    #[inline]
    fn row_lanes<T: Element>(&self, kernel: RowKernel, row: usize, x: &[f32]) -> Lanes {
        let mut start = row * self.cols;
        let mut x = x;
        let mut lanes = [[0.0f32; GEMV_LANES]; GEMV_ACCUMULATORS];
        if start % 2 == 1 {
            // The row starts on the low nibble of a byte: that element is a piece of its
            // own (element 0 of group 0, hence accumulator 0, lane LANE_OF_FIRST), so
            // every later piece starts on a high nibble.
            let code = self.packed[start / 2] & 0xf;
            let scale = self.absmax[start >> self.block_shift];
            let w = T::from_f32(self.values[usize::from(code)] * scale).to_f32();
            lanes[0][LANE_OF_FIRST] += w * x[0];
            start += 1;
            x = &x[1..];
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only chosen after checking the CPU's support; `start`
            // is even, `start + x.len()` is at most `rows * cols`, the element count the
            // buffer lengths were checked against, and lane-ordered x (only used when
            // `cols` is a multiple of 16, so the row starts even) holds whole groups.
            RowKernel::Avx512 {
                rounding,
                lane_ordered,
            } => unsafe {
                use avx512::row_lanes as kernel;
                use TableRounding::*;
                // One compiled loop per combination: no branch on either inside it.
                match (rounding, lane_ordered) {
                    (Float32, true) => kernel::<true, 0>(self, start, x, lanes),
                    (Float32, false) => kernel::<false, 0>(self, start, x, lanes),
                    (Bfloat16, true) => kernel::<true, 1>(self, start, x, lanes),
                    (Bfloat16, false) => kernel::<false, 1>(self, start, x, lanes),
                    (Float16, true) => kernel::<true, 2>(self, start, x, lanes),
                    (Float16, false) => kernel::<false, 2>(self, start, x, lanes),
                }
            },
            _ => self.row_lanes_portable::<T>(start, x, lanes),
        }
    }

    /// Portable row kernel: elements `start..start + x.len()` (`start` even).
    #[inline]
    fn row_lanes_portable<T: Element>(&self, start: usize, x: &[f32], mut lanes: Lanes) -> Lanes {
        let mut done = 0;
        while done < x.len() {
            let first = start + done;
            let block = first >> self.block_shift;
            let piece = (x.len() - done).min(((block + 1) << self.block_shift) - first);
            let scale = self.absmax[block];
            let table: [f32; 16] =
                std::array::from_fn(|q| T::from_f32(self.values[q] * scale).to_f32());
            // Pieces start on a high nibble (even element), so byte k of the piece holds
            // its elements 2k and 2k + 1.
            let bytes = &self.packed[first / 2..(first + piece).div_ceil(2)];
            let xs = &x[done..done + piece];
            let groups = xs.chunks(GEMV_LANES).zip(bytes.chunks(GEMV_LANES / 2));
            for (g, (group, codes)) in groups.enumerate() {
                let acc = &mut lanes[g % GEMV_ACCUMULATORS];
                for (lane, &element) in LANE_ELEMENT.iter().enumerate() {
                    if let Some(&xj) = group.get(element) {
                        let byte = codes[element / 2];
                        let code = if element % 2 == 0 {
                            byte >> 4
                        } else {
                            byte & 0xf
                        };
                        acc[lane] += table[usize::from(code)] * xj;
                    }
                }
            }
            done += piece;
        }
        lanes
    }
}

/// The canonical fold of a row's partial sums: accumulators 0 + 1 and 2 + 3, then those
/// two; then lanes `i` and `i + 8`, `i + 4`, `i + 2`, `i + 1`.
#[inline]
fn fold([a0, a1, a2, a3]: Lanes) -> f32 {
    let mut lanes: [f32; GEMV_LANES] = std::array::from_fn(|i| (a0[i] + a1[i]) + (a2[i] + a3[i]));
    let mut width = GEMV_LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512 row kernel: per block, the 16 decoded values `T(code * scale)` in one
    //! register; per group of 16 elements, the group's 8 packed bytes broadcast to every
    //! 64-bit lane and shifted by a per-lane count so that each 32-bit lane's low nibble
    //! is one code (the lane order of [`super::LANE_ELEMENT`]), looked up with
    //! `permutexvar`, times x, added to the lanes. No shuffle is spent on the codes
    //! beyond the lookup itself.

    use std::arch::x86_64::*;

    use super::{Lanes, TableRounding, Weight, GEMV_ACCUMULATORS, GEMV_LANES, LANE_ELEMENT};

    /// Per 64-bit lane `k`: shift right by `4 k`, which puts nibble `k` of the
    /// little-endian group word in the low 32-bit half and nibble `k + 8` in the high one.
    const NIBBLE_SHIFTS: [u64; 8] = [0, 4, 8, 12, 16, 20, 24, 28];

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VL; `start` must be even and
    /// `start + x.len()` at most the element count `weight`'s buffers were checked for.
    /// With `LANE_ORDERED`, `x` is in group lane order and every group it holds is whole
    /// (a row of a multiple of 16 columns).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn row_lanes<const LANE_ORDERED: bool, const ROUNDING: u8>(
        weight: &Weight<'_>,
        start: usize,
        x: &[f32],
        lanes: Lanes,
    ) -> Lanes {
        let codes = _mm512_loadu_ps(weight.values.as_ptr());
        let shifts = _mm512_loadu_si512(NIBBLE_SHIFTS.as_ptr().cast());
        let lane_elements = _mm512_loadu_si512(LANE_ELEMENT.map(|e| e as i32).as_ptr().cast());
        // Four named accumulators, not an array: an array indexed by a runtime value
        // lives on the stack, and the store-reload between blocks lengthens every chain.
        let [mut acc0, mut acc1, mut acc2, mut acc3] =
            lanes.map(|lanes| _mm512_loadu_ps(lanes.as_ptr()));
        let mut done = 0;
        while done < x.len() {
            let first = start + done;
            let block = first >> weight.block_shift;
            let piece = (x.len() - done).min(((block + 1) << weight.block_shift) - first);
            let scale = weight.absmax[block];
            let rounding = match ROUNDING {
                0 => TableRounding::Float32,
                1 => TableRounding::Bfloat16,
                _ => TableRounding::Float16,
            };
            let table = round_table(
                _mm512_mul_ps(codes, _mm512_set1_ps(scale)),
                rounding,
                !scale.is_finite(), // code * scale is NaN only for an Inf or NaN scale
            );
            // SAFETY (pointer arithmetic below): the piece's bytes are
            // `first / 2 .. (first + piece).div_ceil(2)`, inside `packed`; its x values
            // are `done .. done + piece`, inside `x`.
            let bytes = weight.packed.as_ptr().add(first / 2);
            let xs = x.as_ptr().add(done);
            let group = |j: usize| {
                let word = _mm512_set1_epi64(bytes.add(j / 2).cast::<i64>().read_unaligned());
                let w = _mm512_permutexvar_ps(_mm512_srlv_epi64(word, shifts), table);
                let x_group = _mm512_loadu_ps(xs.add(j));
                let x_lanes = if LANE_ORDERED {
                    x_group
                } else {
                    _mm512_permutexvar_ps(lane_elements, x_group)
                };
                _mm512_mul_ps(w, x_lanes)
            };
            let full = piece / GEMV_LANES;
            // Whole rounds of one group per accumulator, then the remaining whole groups.
            let mut g = 0;
            while g + GEMV_ACCUMULATORS <= full {
                let j = g * GEMV_LANES;
                acc0 = _mm512_add_ps(acc0, group(j));
                acc1 = _mm512_add_ps(acc1, group(j + GEMV_LANES));
                acc2 = _mm512_add_ps(acc2, group(j + 2 * GEMV_LANES));
                acc3 = _mm512_add_ps(acc3, group(j + 3 * GEMV_LANES));
                g += GEMV_ACCUMULATORS;
            }
            while g < full {
                let product = group(g * GEMV_LANES);
                match g % GEMV_ACCUMULATORS {
                    0 => acc0 = _mm512_add_ps(acc0, product),
                    1 => acc1 = _mm512_add_ps(acc1, product),
                    2 => acc2 = _mm512_add_ps(acc2, product),
                    _ => acc3 = _mm512_add_ps(acc3, product),
                }
                g += 1;
            }
            let j = full * GEMV_LANES;
            if j < piece {
                // A partial last group: masked loads read only the piece's own bytes and
                // x values, and the masked add leaves the lanes of absent elements as
                // they are.
                let len = piece - j;
                let element_mask: __mmask16 = (1 << len) - 1;
                let byte_mask: __mmask16 = (1 << len.div_ceil(2)) - 1;
                let lane_mask =
                    _mm512_cmplt_epi32_mask(lane_elements, _mm512_set1_epi32(len as i32));
                let word = _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8(
                    byte_mask,
                    bytes.add(j / 2).cast(),
                ));
                let w = _mm512_permutexvar_ps(_mm512_srlv_epi64(word, shifts), table);
                let x_lanes = if LANE_ORDERED {
                    _mm512_maskz_loadu_ps(lane_mask, xs.add(j))
                } else {
                    let x_group = _mm512_maskz_loadu_ps(element_mask, xs.add(j));
                    _mm512_permutexvar_ps(lane_elements, x_group)
                };
                let product = _mm512_mul_ps(w, x_lanes);
                let add = |acc| _mm512_mask_add_ps(acc, lane_mask, acc, product);
                match full % GEMV_ACCUMULATORS {
                    0 => acc0 = add(acc0),
                    1 => acc1 = add(acc1),
                    2 => acc2 = add(acc2),
                    _ => acc3 = add(acc3),
                }
            }
            done += piece;
        }
        let mut out = [[0.0f32; GEMV_LANES]; GEMV_ACCUMULATORS];
        for (out, acc) in out.iter_mut().zip([acc0, acc1, acc2, acc3]) {
            _mm512_storeu_ps(out.as_mut_ptr(), acc);
        }
        out
    }

    /// Each lane rounded to the element type and widened back, bit for bit as
    /// `T::from_f32(v).to_f32()` (`half`'s round-to-nearest-even, NaN kept NaN).
    /// `may_be_nan`: whether any lane can be NaN (skips the NaN fix-up when not).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn round_table(table: __m512, rounding: TableRounding, may_be_nan: bool) -> __m512 {
        match rounding {
            TableRounding::Float32 => table,
            TableRounding::Bfloat16 => {
                // Round to nearest even on the upper 16 bits: add 0x7fff plus the lowest
                // kept bit, then clear the low half. A NaN would carry into the exponent
                // or sign, so it takes half's quiet NaN (payload top bits kept) instead.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 table rounding equals `T::from_f32(v).to_f32()` on every class of
    /// float32 input: normals, values that round to subnormals or overflow, ties, Inf, NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_table_rounding_matches_half() {
        if !GemvKernel::Avx512.is_supported() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        fn check<T: Element>(rounding: TableRounding) {
            use std::arch::x86_64::*;
            let mut state = 0x1234_5678_9abc_def0u64;
            let specials = [
                0x0000_0000,
                0x8000_0000,
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_0000,
                0x7f80_0001,
                0xffff_ffff,
                0x7fff_ffff,
                0x3f80_8000,
                0x3f81_8000,
                0x477f_f000,
                0x477f_e000,
                0x3380_0000,
                0x3300_0000,
                0x0000_0001,
                0x7f7f_ffff,
                0x387f_c000,
                0x337f_ffff,
            ];
            for round in 0..20_000 {
                let bits: [u32; 16] = std::array::from_fn(|i| {
                    if round == 0 && i < specials.len() {
                        return specials[i];
                    }
                    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    (z ^ (z >> 31)) as u32
                });
                let values = bits.map(f32::from_bits);
                // The NaN fix-up may be skipped only where no lane is NaN.
                let any_nan = values.iter().any(|v| v.is_nan());
                for may_be_nan in [true, false] {
                    if any_nan && !may_be_nan {
                        continue;
                    }
                    let mut got = [0.0f32; 16];
                    // SAFETY: AVX-512 support checked above; the arrays hold 16 floats.
                    unsafe {
                        let v = _mm512_loadu_ps(values.as_ptr());
                        let rounded = avx512::round_table(v, rounding, may_be_nan);
                        _mm512_storeu_ps(got.as_mut_ptr(), rounded);
                    }
                    for (v, g) in values.iter().zip(got) {
                        let want = T::from_f32(*v).to_f32();
                        if want.is_nan() {
                            assert!(g.is_nan(), "{} {:#x}: got {g}", T::NAME, v.to_bits());
                        } else {
                            let bits = v.to_bits();
                            assert_eq!(g.to_bits(), want.to_bits(), "{} {bits:#x}", T::NAME);
                        }
                    }
                }
            }
        }
        check::<f32>(TableRounding::Float32);
        check::<bf16>(TableRounding::Bfloat16);
        check::<f16>(TableRounding::Float16);
    }

    #[test]
    fn lane_map_is_a_permutation_with_element_0_in_lane_of_first() {
        let mut seen = [false; GEMV_LANES];
        for &element in &LANE_ELEMENT {
            assert!(!seen[element]);
            seen[element] = true;
        }
        assert_eq!(LANE_ELEMENT[LANE_OF_FIRST], 0);
    }

    #[test]
    fn table_rounding_is_known_for_the_three_element_types() {
        assert_eq!(TableRounding::of::<f32>(), Some(TableRounding::Float32));
        assert_eq!(TableRounding::of::<bf16>(), Some(TableRounding::Bfloat16));
        assert_eq!(TableRounding::of::<f16>(), Some(TableRounding::Float16));
        assert_eq!(TableRounding::of::<f64>(), None);
    }
}
