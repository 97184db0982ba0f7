//! Small-batch (decode-time) fused dequantize-and-multiply: `out[b] = W x[b] (+ bias)` for
//! a 4-bit weight `W [rows, cols]` and 1 to [`GEMV_MAX_BATCH`] input rows `x[b]`, reading
//! the packed codes once instead of writing the whole dequantized weight and reading it
//! back. Each group of weights is decoded once and multiplied with every input row.
//!
//! Each weight element is decoded exactly as [`crate::dequantize_4bit`] decodes it,
//! `w = T(code[nibble] * scale)` (a float32 product rounded once to `T`), so the result is
//! dequantize-then-matvec up to the order of the float32 summation. Double-quantized
//! scales are decoded inline, per block, with dequantization's own float32 operations
//! (`map[code] * nested_scale`, rounded, then `+ offset`, rounded): bit-identical to
//! decoding them first, with no allocation per call.
//!
//! # Kernels
//!
//! [`GemvKernel::selected`] picks the kernel: the CPU's best, or the one the environment
//! variable `QLORAKIT_CPU_KERNEL` (`portable`, `avx2`, `avx2bf16`, `avx512`, `avx512bf16`;
//! read once per process) forces. An unknown name, or a kernel this CPU lacks, makes every
//! call fail with an error naming the variable. `avx512bf16` and `avx2bf16` apply to
//! bfloat16 inputs with blocksize >= 64 and `cols` a multiple of 64; other inputs under them
//! take `avx512` and `avx2`. `avx2` applies to rows of whole groups of 16 and blocks of at
//! least 16; other layouts under it take `portable`.
//!
//! Every SIMD kernel prefetches the packed bytes `PREFETCH_BYTES` (4 KiB) ahead of those it
//! decodes: the order of the loads, not of the arithmetic, so results are unchanged.
//!
//! # Summation order of `portable`, `avx2` and `avx512` (bfloat16 too, but for the bf16 kernels)
//!
//! Fixed, the same on every CPU and in all three kernels, so their results are
//! bit-identical: a
//! row's elements are split into pieces at block boundaries (a row that starts on the low
//! nibble of a byte first gives its single first element a piece of its own); each piece
//! is walked in groups of 16 from its start, element `LANE_ELEMENT[l]` of group `g` adding
//! its product `w * x` (rounded, not fused) to lane `l` of accumulator `g % 4` (4 x 16
//! float32 lanes: four independent dependency chains keep the adds from waiting on each
//! other); the accumulators are added as 0 + 1 and 2 + 3, then those two; the 16 lanes are
//! folded as `i` and `i + 8`, then `i + 4`, `i + 2`, `i + 1`; the bias, if any, is added;
//! the sum is rounded once to `T`.
//!
//! # Summation order of `avx512bf16`
//!
//! Its own, also fixed: the row is walked in chunks of 64 elements (`cols` is a multiple of
//! 64 and a block holds whole chunks, so one scale per chunk); chunk `k` adds its even
//! elements to accumulator `2 (k % 2)` and its odd elements to accumulator `2 (k % 2) + 1`,
//! lane `j` of the even accumulator taking element `4j + 2` then `4j` of the chunk, lane
//! `j` of the odd one element `4j + 3` then `4j + 1` (`vdpbf16ps`: each product is exact,
//! each addition rounded to nearest even); then the same fold, bias and rounding as above.
//! `vdpbf16ps` treats subnormal inputs as zero and flushes subnormal results to zero:
//! subnormal bfloat16 weights or inputs, products below 2^-126, and partial sums below
//! 2^-126 count as zero. This is the one difference to exact float32 arithmetic.
//!
//! # Summation order of `avx2bf16`
//!
//! Its own, also fixed: 8 accumulators of 8 float32 lanes; the row is walked in chunks of
//! 64 elements (one scale per chunk, as above), and lane `d` of accumulator `a` takes
//! element `CHUNK_ELEMENT[8 a + d]` of every chunk in turn (`avx2_bf16::CHUNK_ELEMENT`,
//! the order its byte shuffles produce), by a fused multiply-add: the product of two bf16
//! values is exact in float32, so each step rounds once, like an add. The fold: accumulators
//! `(0 + 1) + (2 + 3)` and `(4 + 5) + (6 + 7)`, then those two; then lanes `i` and `i + 4`,
//! `i + 2`, `i + 1`; then bias and rounding as above. Subnormals are kept (no flush).
//!
//! # Error bound
//!
//! Every kernel returns the same result on every run and thread count (each output is
//! computed by one task, in the fixed order). Against the exact dot product `s` of the
//! weight as dequantized (in `T`) with `x`, plus the bias (`n` = `cols` + 1 terms `t_i`),
//! the float32 sum before the final rounding is within
//! `gamma_n * sum |t_i|` (`gamma_n = n u / (1 - n u)`, `u = 2^-24`, any summation order) for
//! `portable`, `avx2`, `avx2bf16` and `avx512`, and within `gamma_n * sum |t_i| +
//! sum_{flushed} |t_i| + cols * 2^-126` for `avx512bf16` (the terms flushed as above, and one flush of at most
//! 2^-126 per addition of the dot products); the rounding to `T` then adds at most
//! `u_T |value|` plus half of `T`'s smallest subnormal.

mod avx2;
mod avx2_bf16;
pub(crate) mod avx512;
mod avx512_bf16;
mod input;
mod kernel;
mod portable;

use std::marker::PhantomData;

use crate::block_scale::BlockScale;
use crate::element::Element;
use crate::error::{QuantError, Result};
use crate::layout::check_len;
use crate::packed::PackedView;
use crate::parallel;

pub use kernel::{GemvKernel, CPU_KERNEL_ENV};

use input::{Plan, Prepared};

/// Lanes of an accumulator, and elements per group of the summation order.
pub const GEMV_LANES: usize = 16;
/// Accumulators (of [`GEMV_LANES`] lanes) a row's groups take turns adding to.
pub const GEMV_ACCUMULATORS: usize = 4;
/// The most input rows one call takes (speculative or batched decoding); more rows are
/// better served by dequantize + matmul.
pub const GEMV_MAX_BATCH: usize = 8;
/// Input rows one lane-kernel call carries (4 accumulators each, 16 registers); a batch of
/// up to [`GEMV_MAX_BATCH`] runs as two calls per weight row, the second reading the row's
/// codes from L1. The two bf16 kernels carry all of a batch in one call.
const KERNEL_BATCH: usize = 4;

/// Weight rows a task hands [`Weight::tile_sums`] at once: a batch the AVX512-BF16 kernel
/// splits into two groups walks them group by group (16 rows measured faster than 4).
const TILE_ROWS: usize = 16;

/// A row's partial sums: lane `l` of accumulator `a`.
type Lanes = [[f32; GEMV_LANES]; GEMV_ACCUMULATORS];

/// Weight elements below which a call runs on the calling thread: spreading a small matrix
/// over the pool costs more in wake-ups than it saves (about 50 us of work on one core).
const MIN_PARALLEL_ELEMENTS: usize = 1 << 20;
/// Weight elements per parallel task, at least: large enough to amortize scheduling.
const MIN_TASK_ELEMENTS: usize = 1 << 18;
/// Tasks per pool thread, at most: enough to balance when a thread is busy elsewhere.
const TASKS_PER_THREAD: usize = 4;

/// How far ahead of the bytes they decode the SIMD kernels prefetch the packed codes.
/// The hardware prefetchers alone left a decode chain (each layer's bytes from memory)
/// waiting on loads at 42% of a plain copy's bandwidth on an Intel AVX512-BF16 VM, 104%
/// with this; 2 to 16 KiB measured alike there, 1 KiB and less slower (`tools/bench_gemv.py`).
const PREFETCH_BYTES: usize = 4096;
/// Bytes of a cache line, the unit of a prefetch.
const CACHE_LINE: usize = 64;

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

/// The last steps of the bf16 kernels' in-register fold, on 4 lanes: lanes `i` and
/// `i + 2`, then `i + 1`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "sse")]
fn sum_128(four: std::arch::x86_64::__m128) -> f32 {
    use std::arch::x86_64::*;
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_add_ss(two, _mm_shuffle_ps::<0b01>(two, two));
    _mm_cvtss_f32(one)
}

/// The lane of a group's element 0.
const LANE_OF_FIRST: usize = 2;

/// `out[b * rows + r] = T(sum_c w[r, c] * x[b * cols + c] (+ bias[r]))` for the row-major
/// 4-bit weight `[rows, cols]` (`weight`, as [`crate::quantize_4bit`] writes it, plain or
/// double-quantized scales) and `x` holding `batch` rows of `cols` (1 to
/// [`GEMV_MAX_BATCH`]; `out` holds `batch * rows`), accumulated in float32 in the order
/// described in the module documentation, weight rows split across parallel tasks ([`crate::parallel`]). Uses
/// [`GemvKernel::selected`].
pub fn gemv_4bit<T: Element>(
    weight: &PackedView<'_>,
    x: &[T],
    bias: Option<&[T]>,
    out: &mut [T],
) -> Result<()> {
    gemv_4bit_with(GemvKernel::selected()?, weight, x, bias, out)
}

/// [`gemv_4bit`] with a chosen kernel; one the CPU lacks falls back to the portable kernel
/// (and `Avx512Bf16` on inputs it does not take to `Avx512`), so this is always safe.
pub fn gemv_4bit_with<T: Element>(
    kernel: GemvKernel,
    weight: &PackedView<'_>,
    x: &[T],
    bias: Option<&[T]>,
    out: &mut [T],
) -> Result<()> {
    // The view has checked the codes and scales against its (non-empty) shape.
    let (rows, cols) = weight.matrix()?;
    let batch = x.len() / cols;
    check_len("x input", cols * batch.max(1), x.len())?;
    if batch > GEMV_MAX_BATCH {
        return Err(QuantError::GemvBatch {
            rows: batch,
            max: GEMV_MAX_BATCH,
        });
    }
    check_len("out", rows * batch, out.len())?;
    if let Some(bias) = bias {
        check_len("bias input", rows, bias.len())?;
    }
    let weight = Weight {
        packed: weight.codes(),
        scales: BlockScale::new(weight.scales()),
        values: &weight.quant_type().codebook().values,
        block_shift: weight.blocksize().get().trailing_zeros(),
        cols,
    };
    let plan = Plan::choose::<T>(kernel, weight.block_shift, cols);
    input::with_prepared(plan, x, |x| {
        run(&weight, x, batch, bias, OutRows::new(out, rows, batch))
    });
    Ok(())
}

/// Splits the weight rows into tasks (or none, for a small matrix) and writes every output.
fn run<T: Element>(
    weight: &Weight<'_>,
    x: Prepared<'_>,
    batch: usize,
    bias: Option<&[T]>,
    out: OutRows<'_, T>,
) {
    let rows = out.rows;
    let elements = rows * weight.cols;
    let task = |first: usize, last: usize| {
        let mut sums = [[0.0f32; GEMV_MAX_BATCH]; TILE_ROWS];
        for tile in (first..last).step_by(TILE_ROWS) {
            let tile = tile..(tile + TILE_ROWS).min(last);
            weight.tile_sums::<T>(x, tile.clone(), batch, &mut sums);
            for (row, sums) in tile.zip(&sums) {
                let bias = bias.map(|bias| bias[row].to_f32());
                for (b, &sum) in sums[..batch].iter().enumerate() {
                    let sum = bias.map_or(sum, |bias| sum + bias);
                    // SAFETY: rows `first..last` belong to this task alone.
                    unsafe { out.write(b, row, T::from_f32(sum)) };
                }
            }
        }
    };
    let threads = parallel::current_num_threads();
    if elements < MIN_PARALLEL_ELEMENTS || threads == 1 {
        return task(0, rows);
    }
    let tasks = (elements / MIN_TASK_ELEMENTS)
        .min(TASKS_PER_THREAD * threads)
        .clamp(1, rows);
    let rows_per_task = rows.div_ceil(tasks);
    parallel::for_each_task(rows.div_ceil(rows_per_task), &|t| {
        task(t * rows_per_task, ((t + 1) * rows_per_task).min(rows))
    });
}

/// The outputs `[batch, rows]`, written by several tasks, each its own rows.
struct OutRows<'a, T> {
    ptr: *mut T,
    rows: usize,
    batch: usize,
    _out: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks write disjoint elements (see `write`); T is Send.
unsafe impl<T: Send> Sync for OutRows<'_, T> {}

impl<'a, T> OutRows<'a, T> {
    /// `out` must hold `batch * rows` elements (checked by the caller).
    fn new(out: &'a mut [T], rows: usize, batch: usize) -> Self {
        assert_eq!(out.len(), rows * batch, "gemv output length");
        OutRows {
            ptr: out.as_mut_ptr(),
            rows,
            batch,
            _out: PhantomData,
        }
    }

    /// Writes output `row` of input row `b`.
    ///
    /// # Safety
    /// No other thread may write or read the same `(b, row)` concurrently.
    #[inline]
    unsafe fn write(&self, b: usize, row: usize, value: T) {
        assert!(b < self.batch && row < self.rows, "gemv output index");
        // SAFETY: in bounds (asserted); exclusive per the contract.
        unsafe { self.ptr.add(b * self.rows + row).write(value) }
    }
}

/// The validated weight buffers and the geometry the row kernels need.
#[derive(Clone, Copy)]
struct Weight<'a> {
    packed: &'a [u8],
    scales: BlockScale<'a>,
    values: &'a [f32; 16],
    /// log2 of the blocksize (a power of two): the block of an element is a shift away.
    block_shift: u32,
    cols: usize,
}

/// How a kernel rounds a block's float32 table `code * scale` to the element type; the
/// AVX-512 kernel knows these three, any other `Element` uses the portable kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableRounding {
    Float32,
    Bfloat16,
    Float16,
}

impl TableRounding {
    pub(crate) fn of<T: 'static>() -> Option<TableRounding> {
        use half::{bf16, f16};
        use std::any::TypeId;
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

impl Weight<'_> {
    /// The piece of a row that starts at element `first` with `remaining` elements left in
    /// the row: `(block, len)`, the block it lies in and how many elements it holds (up to
    /// the block's end). Rows are walked piece by piece, one scale per piece.
    #[inline(always)]
    fn piece(&self, first: usize, remaining: usize) -> (usize, usize) {
        let block = first >> self.block_shift;
        (
            block,
            remaining.min(((block + 1) << self.block_shift) - first),
        )
    }

    /// Asks the CPU to bring the packed bytes of elements `first..first + len`, moved
    /// [`PREFETCH_BYTES`] ahead, into the cache: one prefetch per cache line. A hint only
    /// (it never faults, so the address may lie past the buffer's end).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_ahead(&self, first: usize, len: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let ahead = self
            .packed
            .as_ptr()
            .wrapping_add(first / 2 + PREFETCH_BYTES);
        for line in (0..len.div_ceil(2)).step_by(CACHE_LINE) {
            // SAFETY: a prefetch reads nothing and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
        }
    }

    /// [`Weight::row_sums`] of each weight row of `rows` (at most [`TILE_ROWS`]) into
    /// `sums[r]`, the `batch` input rows in the groups the kernel takes
    /// (`avx512_bf16::group_split`; one group for the others), each group through all the
    /// tile's rows before the next. The same bits in any grouping: each input row's sums do
    /// not depend on the others.
    #[inline]
    fn tile_sums<T: Element>(
        &self,
        x: Prepared<'_>,
        rows: std::ops::Range<usize>,
        batch: usize,
        sums: &mut [[f32; GEMV_MAX_BATCH]; TILE_ROWS],
    ) {
        let split = match x {
            #[cfg(target_arch = "x86_64")]
            Prepared::Bf16Pairs(_) => avx512_bf16::group_split(batch),
            _ => batch,
        };
        for group in [0..split, split..batch] {
            if group.is_empty() {
                continue;
            }
            let x = x.rows_from(group.start, self.cols);
            for (row, sums) in rows.clone().zip(sums.iter_mut()) {
                self.row_sums::<T>(x, row, &mut sums[group.clone()]);
            }
        }
    }

    /// The sums (before the bias) of weight row `row` with each of the `sums.len()` input
    /// rows of `x`.
    #[inline]
    fn row_sums<T: Element>(&self, x: Prepared<'_>, row: usize, sums: &mut [f32]) {
        match x {
            // The bf16 kernels carry every input row in one call (each decodes a chunk once
            // for all of them).
            // SAFETY (both): their plans are only prepared after checking the CPU's support
            // and the layout (see `Plan::choose`); each of the `sums.len()` rows of `x` is
            // one arranged row of `cols` elements.
            #[cfg(target_arch = "x86_64")]
            Prepared::Bf16Pairs(x) => unsafe {
                avx512_bf16::row_sums(self, row, self.whole_rows(x), sums)
            },
            #[cfg(target_arch = "x86_64")]
            Prepared::Bf16Words(x) => unsafe {
                avx2_bf16::row_sums(self, row, self.whole_rows(x), sums)
            },
            Prepared::Float32 { x, kernel } => {
                let batch = sums.len();
                for b0 in (0..batch).step_by(KERNEL_BATCH) {
                    let n = (batch - b0).min(KERNEL_BATCH);
                    let lanes = self.lane_row::<T>(kernel, row, &x[b0 * self.cols..], n);
                    for (sum, lanes) in sums[b0..b0 + n].iter_mut().zip(lanes) {
                        *sum = fold(lanes);
                    }
                }
            }
        }
    }

    /// Arranged input rows of `cols` elements each, back to back in `x`.
    #[cfg(target_arch = "x86_64")]
    fn whole_rows<'a, E>(&self, x: &'a [E]) -> XRows<'a, E> {
        XRows {
            x,
            stride: self.cols,
            skip: 0,
        }
    }

    /// The partial sums (before the fold) of weight row `row` with the first `n` (at most
    /// [`KERNEL_BATCH`]) input rows of `x`.
    #[inline]
    fn lane_row<T: Element>(
        &self,
        kernel: input::LaneKernel,
        row: usize,
        x: &[f32],
        n: usize,
    ) -> [Lanes; KERNEL_BATCH] {
        let mut start = row * self.cols;
        let mut skip = 0;
        let mut lanes = [[[0.0f32; GEMV_LANES]; GEMV_ACCUMULATORS]; KERNEL_BATCH];
        if start % 2 == 1 {
            // The row starts on the low nibble of a byte: that element is a piece of its
            // own (element 0 of group 0, hence accumulator 0, lane LANE_OF_FIRST), so
            // every later piece starts on a high nibble.
            let code = self.packed[start / 2] & 0xf;
            let scale = self.scales.get(start >> self.block_shift);
            let w = T::from_f32(self.values[usize::from(code)] * scale).to_f32();
            for (b, lanes) in lanes[..n].iter_mut().enumerate() {
                lanes[0][LANE_OF_FIRST] += w * x[b * self.cols];
            }
            start += 1;
            skip = 1;
        }
        let xs = XRows {
            x,
            stride: self.cols,
            skip,
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only chosen after checking the CPU's support; `start`
            // is even, `start + cols - skip` is at most `rows * cols`, the element count
            // the buffer lengths were checked against, and lane-ordered x (only used when
            // `cols` is a multiple of 16, so the row starts even) holds whole groups.
            input::LaneKernel::Avx512 {
                rounding,
                lane_ordered,
            } => unsafe {
                avx512::row_lanes(self, rounding, lane_ordered, start, xs, &mut lanes[..n])
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is only chosen after checking the CPU's support, for rows of
            // whole groups of 16 (so `start` is a multiple of 16 and `skip` is 0) and
            // blocks of at least 16, with x in lane order; `start + cols` is at most
            // `rows * cols`, the element count the buffer lengths were checked against.
            input::LaneKernel::Avx2 { rounding } => unsafe {
                avx2::row_lanes(self, rounding, start, xs, &mut lanes[..n])
            },
            _ => portable::row_lanes::<T>(self, start, xs, &mut lanes[..n]),
        }
        lanes
    }
}

/// Input rows of one kernel call: row `b` is `x[b * stride + skip..(b + 1) * stride]`.
#[derive(Clone, Copy)]
struct XRows<'a, E> {
    x: &'a [E],
    stride: usize,
    skip: usize,
}

impl<'a, E> XRows<'a, E> {
    #[inline(always)]
    fn row(&self, b: usize) -> &'a [E] {
        &self.x[b * self.stride + self.skip..(b + 1) * self.stride]
    }
}

/// The canonical fold of a row's partial sums: accumulators 0 + 1 and 2 + 3, then those
/// two; then lanes `i` and `i + 8`, `i + 4`, `i + 2`, `i + 1`.
#[inline]
fn fold([a0, a1, a2, a3]: Lanes) -> f32 {
    let lanes: [f32; GEMV_LANES] = std::array::from_fn(|i| (a0[i] + a1[i]) + (a2[i] + a3[i]));
    crate::lanes::tree_sum(lanes)
}

/// Shared by the SIMD kernels' table-rounding tests.
#[cfg(test)]
pub(crate) mod rounding_check {
    use crate::element::Element;
    /// Float32 inputs for testing a SIMD table rounding against `half`, `N` lanes at a time:
    /// every class of value (zeros, Inf, quiet and signalling NaN, ties, values that round to
    /// subnormals or overflow) in the first lanes, then 20 000 rounds of random bit patterns.
    fn probe_lanes<const N: usize>() -> impl Iterator<Item = [f32; N]> {
        const SPECIALS: [u32; 18] = [
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
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut index = 0;
        let mut next = move || {
            index += 1;
            if let Some(&special) = SPECIALS.get(index - 1) {
                return f32::from_bits(special);
            }
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            f32::from_bits((z ^ (z >> 31)) as u32)
        };
        (0..20_000).map(move |_| std::array::from_fn(|_| next()))
    }

    /// Checks that `round(values, may_be_nan)`, a SIMD table rounding of `N` lanes, equals
    /// `T::from_f32(v).to_f32()` lane by lane on [`probe_lanes`] (a NaN only as a NaN); the
    /// NaN fix-up is skipped (`may_be_nan` false) only where no lane is NaN.
    pub(crate) fn check_table_rounding<T: Element, const N: usize>(
        round: impl Fn([f32; N], bool) -> [f32; N],
    ) {
        for values in probe_lanes::<N>() {
            let any_nan = values.iter().any(|v| v.is_nan());
            for may_be_nan in [true, false] {
                if any_nan && !may_be_nan {
                    continue;
                }
                for (v, g) in values.iter().zip(round(values, may_be_nan)) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        use half::{bf16, f16};
        assert_eq!(TableRounding::of::<f32>(), Some(TableRounding::Float32));
        assert_eq!(TableRounding::of::<bf16>(), Some(TableRounding::Bfloat16));
        assert_eq!(TableRounding::of::<f16>(), Some(TableRounding::Float16));
        assert_eq!(TableRounding::of::<f64>(), None);
    }
}
