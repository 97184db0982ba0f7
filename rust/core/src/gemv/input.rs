//! The input rows as each kernel reads them, prepared once per call in a reused
//! per-thread buffer (no allocation once it has grown to the largest input seen).

use std::cell::Cell;
use std::thread::LocalKey;

use super::kernel::GemvKernel;
use super::{TableRounding, GEMV_LANES, LANE_ELEMENT};
use crate::element::Element;

/// The lane-order kernels (one summation order, bit-identical results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LaneKernel {
    Portable,
    /// With x in group lane order ([`to_lane_order`]) or as given.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512 {
        rounding: TableRounding,
        lane_ordered: bool,
    },
    /// Always with x in group lane order.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2 {
        rounding: TableRounding,
    },
}

/// What a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    Lanes(LaneKernel),
    /// The AVX512-BF16 kernel: x as bf16, per chunk of 64 the even elements then the odd.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Bf16Pairs,
    /// The AVX2 bf16 kernel: x as float32, each chunk of 64 in the kernel's order
    /// ([`super::avx2_bf16::CHUNK_ELEMENT`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Bf16Words,
}

/// Elements per chunk of the BF16 kernel (32 packed bytes).
pub(super) const BF16_CHUNK: usize = 64;

impl Plan {
    /// The plan for `kernel` on this CPU, element type and layout: the two bf16 kernels
    /// need bfloat16 input, blocks of at least a chunk and rows of whole chunks; the AVX-512
    /// lane kernel an element type it has table rounding for; the AVX2 one that too, rows
    /// of whole groups and blocks of at least a group; else portable.
    pub(super) fn choose<T: Element>(kernel: GemvKernel, block_shift: u32, cols: usize) -> Plan {
        let bf16_input = T::NAME == half::bf16::NAME;
        let chunked = (1usize << block_shift) >= BF16_CHUNK && cols.is_multiple_of(BF16_CHUNK);
        if bf16_input && chunked && kernel.is_supported() {
            match kernel {
                GemvKernel::Avx512Bf16 => return Plan::Bf16Pairs,
                GemvKernel::Avx2Bf16 => return Plan::Bf16Words,
                _ => {}
            }
        }
        let wide = matches!(kernel, GemvKernel::Avx512 | GemvKernel::Avx512Bf16);
        match TableRounding::of::<T>() {
            Some(rounding) if wide && GemvKernel::Avx512.is_supported() => {
                // With whole groups of 16 per row, every group of every row starts at a
                // column that is a multiple of 16: x can be put in lane order once
                // instead of permuted in the inner loop for every weight row.
                let lane_ordered = cols.is_multiple_of(GEMV_LANES);
                Plan::Lanes(LaneKernel::Avx512 {
                    rounding,
                    lane_ordered,
                })
            }
            Some(rounding)
                if matches!(kernel, GemvKernel::Avx2 | GemvKernel::Avx2Bf16)
                    && GemvKernel::Avx2.is_supported()
                    && cols.is_multiple_of(GEMV_LANES)
                    && (1usize << block_shift) >= GEMV_LANES =>
            {
                Plan::Lanes(LaneKernel::Avx2 { rounding })
            }
            _ => Plan::Lanes(LaneKernel::Portable),
        }
    }
}

/// `x` as the plan's kernel reads it.
#[derive(Clone, Copy)]
pub(super) enum Prepared<'a> {
    Float32 {
        x: &'a [f32],
        kernel: LaneKernel,
    },
    #[cfg(target_arch = "x86_64")]
    Bf16Pairs(&'a [u16]),
    #[cfg(target_arch = "x86_64")]
    Bf16Words(&'a [f32]),
}

impl<'a> Prepared<'a> {
    /// The prepared input rows (of `cols` elements each) from row `first` on.
    #[inline]
    pub(super) fn rows_from(self, first: usize, cols: usize) -> Prepared<'a> {
        let at = first * cols;
        match self {
            Prepared::Float32 { x, kernel } => Prepared::Float32 {
                x: &x[at..],
                kernel,
            },
            #[cfg(target_arch = "x86_64")]
            Prepared::Bf16Pairs(x) => Prepared::Bf16Pairs(&x[at..]),
            #[cfg(target_arch = "x86_64")]
            Prepared::Bf16Words(x) => Prepared::Bf16Words(&x[at..]),
        }
    }
}

thread_local! {
    static FLOATS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static HALVES: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a `len`-element buffer of this thread's scratch. The buffer is taken out of
/// its slot while `f` runs (a nested call on the same thread, as a rayon worker may make,
/// finds the slot empty and allocates its own) and put back after.
fn with_scratch<E: Copy + Default + 'static, R>(
    slot: &'static LocalKey<Cell<Vec<E>>>,
    len: usize,
    f: impl FnOnce(&mut [E]) -> R,
) -> R {
    let mut buffer = slot.take();
    buffer.clear();
    buffer.resize(len, E::default());
    let result = f(&mut buffer);
    slot.set(buffer);
    result
}

/// Runs `f` with `x` (whole rows of `cols`, the plan's layout conditions holding)
/// prepared for `plan`.
pub(super) fn with_prepared<T: Element, R>(
    plan: Plan,
    x: &[T],
    f: impl FnOnce(Prepared<'_>) -> R,
) -> R {
    match plan {
        #[cfg(target_arch = "x86_64")]
        Plan::Bf16Pairs => with_scratch(&HALVES, x.len(), |pairs| {
            to_bf16_pairs(x, pairs);
            f(Prepared::Bf16Pairs(pairs))
        }),
        #[cfg(target_arch = "x86_64")]
        Plan::Bf16Words => with_scratch(&FLOATS, x.len(), |words| {
            to_bf16_words(x, words);
            f(Prepared::Bf16Words(words))
        }),
        #[cfg(not(target_arch = "x86_64"))]
        Plan::Bf16Pairs | Plan::Bf16Words => {
            unreachable!("the bf16 kernels are only planned on x86-64")
        }
        Plan::Lanes(kernel) => {
            let lane_ordered = matches!(
                kernel,
                LaneKernel::Avx512 {
                    lane_ordered: true,
                    ..
                } | LaneKernel::Avx2 { .. }
            );
            let is_f32 = T::NAME == f32::NAME;
            if is_f32 && !lane_ordered {
                // `widen` borrows float32 input as it is.
                let x = T::widen(x, &mut []);
                return f(Prepared::Float32 { x, kernel });
            }
            with_scratch(&FLOATS, x.len(), |wide| {
                for (wide, value) in wide.iter_mut().zip(x) {
                    *wide = value.to_f32();
                }
                if lane_ordered {
                    to_lane_order(wide);
                }
                f(Prepared::Float32 { x: wide, kernel })
            })
        }
    }
}

/// Rearranges each group of 16 (`x.len()` is a multiple of 16) into lane order:
/// `x[16 g + lane] = old x[16 g + LANE_ELEMENT[lane]]`.
fn to_lane_order(x: &mut [f32]) {
    for group in x.chunks_exact_mut(GEMV_LANES) {
        let old: [f32; GEMV_LANES] = std::array::from_fn(|i| group[i]);
        for (value, &element) in group.iter_mut().zip(&LANE_ELEMENT) {
            *value = old[element];
        }
    }
}

/// bfloat16 `x` (whole chunks of 64) as bit patterns, each chunk's 32 even elements then
/// its 32 odd ones: the order the BF16 kernel's weight lookups produce.
#[cfg(target_arch = "x86_64")]
fn to_bf16_pairs<T: Element>(x: &[T], out: &mut [u16]) {
    let bits = |v: T| (v.to_f32().to_bits() >> 16) as u16; // exact for bfloat16
    for (chunk, out) in x
        .chunks_exact(BF16_CHUNK)
        .zip(out.chunks_exact_mut(BF16_CHUNK))
    {
        let (even, odd) = out.split_at_mut(BF16_CHUNK / 2);
        for ((pair, e), o) in chunk.chunks_exact(2).zip(even).zip(odd) {
            *e = bits(pair[0]);
            *o = bits(pair[1]);
        }
    }
}

/// `x` (whole chunks of 64) widened to float32, each chunk in the AVX2 bf16 kernel's
/// order: `out[64 k + i] = x[64 k + CHUNK_ELEMENT[i]]`.
#[cfg(target_arch = "x86_64")]
fn to_bf16_words<T: Element>(x: &[T], out: &mut [f32]) {
    use super::avx2_bf16::CHUNK_ELEMENT;
    for (chunk, out) in x
        .chunks_exact(BF16_CHUNK)
        .zip(out.chunks_exact_mut(BF16_CHUNK))
    {
        for (out, &element) in out.iter_mut().zip(&CHUNK_ELEMENT) {
            *out = chunk[element].to_f32();
        }
    }
}
