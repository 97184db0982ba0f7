//! Holds the fast, multithreaded paths to the scalar references on every input class:
//! `quantize_4bit` / `dequantize_4bit` against their `_reference` twins for every element
//! type, quant type and blocksize; the double quantization against a brute-force
//! definition; and the `PackedTensor` round trip against an honest error bound.
//!
//! Everything is deterministic: inputs come from a seeded splitmix64 generator below.

use std::fmt::Debug;

use half::{bf16, f16};
use qlorakit_core::mean::torch_mean;
use qlorakit_core::{
    dequantize_4bit, dequantize_4bit_reference, dequantize_absmax, double_quantize, dynamic_map,
    quantize_4bit, quantize_4bit_reference, quantize_4bit_with, Absmax, Blocksize, Codebook,
    Element, Encoder, PackedTensor, QuantError, QuantType, BLOCKSIZES, NESTED_BLOCKSIZE,
};

/// Elements per parallel task of the fast paths (a whole number of blocks of about 32K
/// elements: exactly 32768 for every blocksize in `BLOCKSIZES`).
const TASK_LEN: usize = 32_768;
/// bitsandbytes' floor on a block's absmax before its reciprocal is taken.
const ABSMAX_FLOOR: f32 = 1e-38;
/// Largest relative error of rounding to f32.
const F32_UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;
const QUANT_TYPES: [QuantType; 2] = QuantType::ALL;
/// Independent random inputs per configuration in the randomized tests (more where the
/// optimized build makes them cheap).
const ROUNDS: usize = if cfg!(debug_assertions) { 1 } else { 4 };

// ---------------------------------------------------------------------------------------
// Deterministic random numbers
// ---------------------------------------------------------------------------------------

mod common;

use common::Rng;

impl Rng {
    /// A generator whose stream depends on the element type and a per-test salt.
    fn for_test<T: Element>(salt: u64) -> Self {
        let name_hash = T::NAME.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Rng(name_hash ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below((hi - lo) as usize) as u32
    }

    fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// True with probability `percent / 100`.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// Uniform in [-1, 1), on a 2^-23 grid.
    fn signed_unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    fn pick<X: Copy>(&mut self, items: &[X]) -> X {
        items[self.below(items.len())]
    }

    fn shuffle<X>(&mut self, items: &mut [X]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------

/// What the tests need to know about an element type, in terms of its raw bit pattern.
trait TestElement: Element + Default + Debug {
    const SIGN_RAW: u32;
    const MANTISSA_BITS: u32;
    /// Raw pattern of the smallest positive normal value; subnormals lie below it.
    const MIN_NORMAL_RAW: u32;
    const MAX_RAW: u32;
    const INFINITY_RAW: u32;
    /// The canonical quiet NaN.
    const NAN_RAW: u32;
    /// Largest relative error of a round-to-nearest conversion to this type.
    const UNIT_ROUNDOFF: f64;
    /// Smallest positive subnormal (the absolute spacing of the subnormal range).
    const MIN_SUBNORMAL: f64;

    fn to_raw(self) -> u32;
    fn from_raw(raw: u32) -> Self;
}

impl TestElement for f32 {
    const SIGN_RAW: u32 = 0x8000_0000;
    const MANTISSA_BITS: u32 = 23;
    const MIN_NORMAL_RAW: u32 = 0x0080_0000;
    const MAX_RAW: u32 = 0x7f7f_ffff;
    const INFINITY_RAW: u32 = 0x7f80_0000;
    const NAN_RAW: u32 = 0x7fc0_0000;
    const UNIT_ROUNDOFF: f64 = F32_UNIT_ROUNDOFF;
    const MIN_SUBNORMAL: f64 = 1.401_298_464_324_817e-45;

    fn to_raw(self) -> u32 {
        self.to_bits()
    }
    fn from_raw(raw: u32) -> Self {
        f32::from_bits(raw)
    }
}

impl TestElement for bf16 {
    const SIGN_RAW: u32 = 0x8000;
    const MANTISSA_BITS: u32 = 7;
    const MIN_NORMAL_RAW: u32 = 0x0080;
    const MAX_RAW: u32 = 0x7f7f;
    const INFINITY_RAW: u32 = 0x7f80;
    const NAN_RAW: u32 = 0x7fc0;
    const UNIT_ROUNDOFF: f64 = 1.0 / 256.0;
    const MIN_SUBNORMAL: f64 = 9.183_549_615_799_121e-41;

    fn to_raw(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn from_raw(raw: u32) -> Self {
        bf16::from_bits(raw as u16)
    }
}

impl TestElement for f16 {
    const SIGN_RAW: u32 = 0x8000;
    const MANTISSA_BITS: u32 = 10;
    const MIN_NORMAL_RAW: u32 = 0x0400;
    const MAX_RAW: u32 = 0x7bff;
    const INFINITY_RAW: u32 = 0x7c00;
    const NAN_RAW: u32 = 0x7e00;
    const UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;
    const MIN_SUBNORMAL: f64 = 5.960_464_477_539_063e-8;

    fn to_raw(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn from_raw(raw: u32) -> Self {
        f16::from_bits(raw as u16)
    }
}

/// Runs `$test::<T>()` for f32, bf16 and f16.
macro_rules! for_each_element_type {
    ($test:ident) => {
        $test::<f32>();
        $test::<bf16>();
        $test::<f16>();
    };
}

fn signed<T: TestElement>(magnitude_raw: u32, negative: bool) -> T {
    T::from_raw(magnitude_raw | if negative { T::SIGN_RAW } else { 0 })
}

fn zero<T: TestElement>(negative: bool) -> T {
    signed(0, negative)
}

/// A value of ordinary magnitude (`|x| < 2^exponent`), mixed sign; sometimes a zero of
/// either sign.
fn ordinary<T: TestElement>(rng: &mut Rng, exponent: i32) -> T {
    match rng.below(20) {
        0 => zero(false),
        1 => zero(true),
        _ => T::from_f32(rng.signed_unit() * 2f32.powi(exponent)),
    }
}

fn subnormal<T: TestElement>(rng: &mut Rng) -> T {
    signed(rng.range(1, T::MIN_NORMAL_RAW), rng.coin())
}

/// A value in [MAX / 2, MAX], mixed sign.
fn huge<T: TestElement>(rng: &mut Rng) -> T {
    let below_max = rng.range(0, 1 << T::MANTISSA_BITS);
    signed(T::MAX_RAW - below_max, rng.coin())
}

/// The values `x` and its neighbouring floats of the same sign, one raw step away.
fn with_neighbours<T: TestElement>(x: T) -> [T; 3] {
    let raw = x.to_raw();
    let magnitude = raw & !T::SIGN_RAW;
    let sign = raw & T::SIGN_RAW;
    let step_down = if magnitude == 0 { 0 } else { magnitude - 1 };
    [
        T::from_raw(sign | step_down),
        x,
        T::from_raw(sign | (magnitude + 1)),
    ]
}

fn raw_bits<T: TestElement>(values: &[T]) -> Vec<u32> {
    values.iter().map(|x| x.to_raw()).collect()
}

fn f32_bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------
// Configurations and lengths
// ---------------------------------------------------------------------------------------

/// Every (quant type, blocksize) pair.
fn configs() -> impl Iterator<Item = (QuantType, Blocksize)> {
    QUANT_TYPES.into_iter().flat_map(|quant_type| {
        BLOCKSIZES
            .into_iter()
            .map(move |size| (quant_type, Blocksize::new(size).unwrap()))
    })
}

fn awkward_lengths(blocksize: usize) -> Vec<usize> {
    let bs = blocksize;
    vec![
        1,
        2,
        3,
        31,
        33,
        bs - 1,
        bs,
        bs + 1,
        3 * bs,
        5 * bs + 3,
        7 * bs + 17,
    ]
}

/// Lengths over several parallel tasks, each ending in a partial block of odd length.
fn multi_task_lengths(blocksize: usize) -> Vec<usize> {
    vec![TASK_LEN + 1, 2 * TASK_LEN + blocksize + blocksize / 2 + 1]
}

/// Lengths of the trailing partial block the block-pattern inputs end with.
fn partial_lengths(blocksize: usize) -> [usize; 3] {
    [1, blocksize / 2 + 1, blocksize - 1]
}

fn context<T: Element>(
    quant_type: QuantType,
    blocksize: Blocksize,
    len: usize,
    case: &str,
) -> String {
    format!(
        "{} {} blocksize {} len {len} case {case:?}",
        T::NAME,
        quant_type.name(),
        blocksize.get()
    )
}

// ---------------------------------------------------------------------------------------
// Running both paths
// ---------------------------------------------------------------------------------------

struct Quantized {
    packed: Vec<u8>,
    absmax: Vec<f32>,
}

impl Quantized {
    fn zeroed(numel: usize, blocksize: Blocksize) -> Self {
        Quantized {
            packed: vec![0; numel.div_ceil(2)],
            absmax: vec![0.0; blocksize.blocks(numel)],
        }
    }
}

fn assert_same_sequence<X: PartialEq + Debug>(fast: &[X], reference: &[X], what: &str, ctx: &str) {
    assert_eq!(fast.len(), reference.len(), "{ctx}: {what} lengths");
    if let Some(i) = fast.iter().zip(reference).position(|(f, r)| f != r) {
        panic!(
            "{ctx}: {what} differ first at index {i}: fast {:?}, reference {:?}",
            fast[i], reference[i]
        );
    }
}

/// Errors compared field by field, a NaN value by its bit pattern.
fn assert_same_error(fast: &QuantError, reference: &QuantError, ctx: &str) {
    match (fast, reference) {
        (
            QuantError::NonFinite { index, value },
            QuantError::NonFinite {
                index: ref_index,
                value: ref_value,
            },
        ) => {
            assert_eq!(index, ref_index, "{ctx}: non-finite index");
            assert_eq!(
                value.to_bits(),
                ref_value.to_bits(),
                "{ctx}: non-finite value"
            );
        }
        _ => assert_eq!(fast, reference, "{ctx}"),
    }
}

/// The fast quantizers under test: the default entry point, then every encoder by name
/// (one the CPU lacks must fall back to the portable encoder, so all are run).
fn fast_quantizers() -> Vec<Option<Encoder>> {
    let mut quantizers = vec![None];
    quantizers.extend([Encoder::Portable, Encoder::Avx2, Encoder::Avx512].map(Some));
    quantizers
}

fn quantize_into<T: TestElement>(
    quantizer: Option<Encoder>,
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    out: &mut Quantized,
) -> Result<(), QuantError> {
    let (packed, absmax) = (&mut out.packed, &mut out.absmax);
    match quantizer {
        None => quantize_4bit(input, quant_type, blocksize, packed, absmax),
        Some(encoder) => quantize_4bit_with(encoder, input, quant_type, blocksize, packed, absmax),
    }
}

/// Quantizes with the reference and every fast quantizer; asserts the same codes and
/// absmax bits, or the same error. Returns the reference's result.
fn quantize_both<T: TestElement>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    ctx: &str,
) -> Result<Quantized, QuantError> {
    let mut reference = Quantized::zeroed(input.len(), blocksize);
    let reference_result = quantize_4bit_reference(
        input,
        quant_type,
        blocksize,
        &mut reference.packed,
        &mut reference.absmax,
    );
    for quantizer in fast_quantizers() {
        let ctx = format!("{ctx}, fast quantizer {quantizer:?}");
        let mut fast = Quantized::zeroed(input.len(), blocksize);
        let fast_result = quantize_into(quantizer, input, quant_type, blocksize, &mut fast);
        match (fast_result, &reference_result) {
            (Ok(()), Ok(())) => {
                assert_same_sequence(&fast.packed, &reference.packed, "packed codes", &ctx);
                assert_same_sequence(
                    &f32_bits(&fast.absmax),
                    &f32_bits(&reference.absmax),
                    "absmax bits",
                    &ctx,
                );
            }
            (Err(fast_error), Err(reference_error)) => {
                assert_same_error(&fast_error, reference_error, &ctx);
            }
            (fast_result, reference_result) => {
                panic!("{ctx}: fast {fast_result:?}, reference {reference_result:?}")
            }
        }
    }
    reference_result.map(|()| reference)
}

/// Dequantizes with both paths and asserts the same output bits; returns them.
fn dequantize_both<T: TestElement>(
    quantized: &Quantized,
    quant_type: QuantType,
    blocksize: Blocksize,
    numel: usize,
    ctx: &str,
) -> Vec<T> {
    let mut fast = vec![T::default(); numel];
    let mut reference = vec![T::default(); numel];
    dequantize_4bit(
        &quantized.packed,
        &quantized.absmax,
        quant_type,
        blocksize,
        &mut fast,
    )
    .unwrap_or_else(|e| panic!("{ctx}: fast dequantize: {e}"));
    dequantize_4bit_reference(
        &quantized.packed,
        &quantized.absmax,
        quant_type,
        blocksize,
        &mut reference,
    )
    .unwrap_or_else(|e| panic!("{ctx}: reference dequantize: {e}"));
    assert_same_sequence(
        &raw_bits(&fast),
        &raw_bits(&reference),
        "dequantized bits",
        ctx,
    );
    fast
}

/// Both paths agree on quantizing `input` and on dequantizing the result.
fn check_paths_agree<T: TestElement>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    case: &str,
) {
    let ctx = context::<T>(quant_type, blocksize, input.len(), case);
    let quantized = quantize_both(input, quant_type, blocksize, &ctx)
        .unwrap_or_else(|e| panic!("{ctx}: unexpected error {e}"));
    dequantize_both::<T>(&quantized, quant_type, blocksize, input.len(), &ctx);
}

// ---------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------

/// Mixed-sign values whose magnitude changes from block to block (2^-12 .. 2^12), with
/// zeros of both signs sprinkled in.
fn random_input<T: TestElement>(rng: &mut Rng, len: usize, blocksize: usize) -> Vec<T> {
    let mut values = Vec::with_capacity(len);
    while values.len() < len {
        let exponent = rng.range(0, 25) as i32 - 12;
        let run = blocksize.min(len - values.len());
        values.extend((0..run).map(|_| ordinary::<T>(rng, exponent)));
    }
    values
}

/// Three full blocks and a trailing partial one of `partial_len`, each filled by `fill`
/// (given the block's length).
fn blockwise_input<T>(
    rng: &mut Rng,
    blocksize: usize,
    partial_len: usize,
    mut fill: impl FnMut(&mut Rng, usize) -> Vec<T>,
) -> Vec<T> {
    let mut values = Vec::new();
    for len in [blocksize, blocksize, blocksize, partial_len] {
        values.extend(fill(rng, len));
    }
    values
}

/// Checks both paths on block-pattern inputs for every configuration and partial length.
fn check_block_pattern<T: TestElement>(
    case: &str,
    salt: u64,
    mut fill: impl FnMut(&mut Rng, &Codebook, usize) -> Vec<T>,
) {
    let mut rng = Rng::for_test::<T>(salt);
    for (quant_type, blocksize) in configs() {
        for _ in 0..ROUNDS {
            for partial_len in partial_lengths(blocksize.get()) {
                let book = quant_type.codebook();
                let input = blockwise_input(&mut rng, blocksize.get(), partial_len, |rng, len| {
                    fill(rng, book, len)
                });
                check_paths_agree(&input, quant_type, blocksize, case);
            }
        }
    }
}

/// A block of zeros (all +0, all -0, or mixed) with `nonzero` elements put at random
/// positions.
fn zeros_with<T: TestElement>(rng: &mut Rng, len: usize, nonzero: &[T]) -> Vec<T> {
    let mode = rng.below(3);
    let mut block: Vec<T> = (0..len)
        .map(|_| zero(mode == 1 || (mode == 2 && rng.coin())))
        .collect();
    for &x in nonzero {
        let i = rng.below(len);
        block[i] = x;
    }
    block
}

/// A block of `candidates` cycled in random order, with one element `±peak` so the
/// block's absmax is exactly `peak` (every candidate must have `|c| <= peak`).
fn block_with_peak<T: TestElement>(
    rng: &mut Rng,
    len: usize,
    candidates: &[T],
    peak: f32,
) -> Vec<T> {
    let mut block: Vec<T> = candidates.iter().copied().cycle().take(len).collect();
    rng.shuffle(&mut block);
    let sign = if rng.coin() { -1.0 } else { 1.0 };
    block[rng.below(len)] = T::from_f32(sign * peak);
    block
}

// ---------------------------------------------------------------------------------------
// quantize_4bit / dequantize_4bit against the references
// ---------------------------------------------------------------------------------------

#[test]
fn random_inputs_of_awkward_lengths() {
    fn run<T: TestElement>() {
        let mut rng = Rng::for_test::<T>(1);
        for (quant_type, blocksize) in configs() {
            for len in awkward_lengths(blocksize.get()).repeat(ROUNDS) {
                let input = random_input::<T>(&mut rng, len, blocksize.get());
                check_paths_agree(&input, quant_type, blocksize, "random");
            }
        }
    }
    for_each_element_type!(run);
}

#[test]
fn inputs_spanning_several_parallel_tasks() {
    fn run<T: TestElement>() {
        let mut rng = Rng::for_test::<T>(2);
        for (quant_type, blocksize) in configs() {
            for len in multi_task_lengths(blocksize.get()) {
                let input = random_input::<T>(&mut rng, len, blocksize.get());
                check_paths_agree(&input, quant_type, blocksize, "multi-task random");
            }
        }
    }
    for_each_element_type!(run);
}

#[test]
fn fast_paths_do_not_depend_on_the_thread_count() {
    fn run<T: TestElement>() {
        let mut rng = Rng::for_test::<T>(3);
        let blocksize = Blocksize::new(64).unwrap();
        let input = random_input::<T>(&mut rng, 3 * TASK_LEN + 101, blocksize.get());
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for quant_type in QUANT_TYPES {
                let case = format!("{threads} threads");
                pool.install(|| check_paths_agree(&input, quant_type, blocksize, &case));
            }
        }
    }
    for_each_element_type!(run);
}

#[test]
fn zero_blocks() {
    fn run<T: TestElement>() {
        check_block_pattern::<T>("zero blocks", 4, |rng, _, len| zeros_with(rng, len, &[]));
    }
    for_each_element_type!(run);
}

#[test]
fn blocks_with_a_single_nonzero_element() {
    fn run<T: TestElement>() {
        check_block_pattern::<T>("single non-zero", 5, |rng, _, len| {
            let lone: T = match rng.below(4) {
                0 => ordinary(rng, 0),
                1 => subnormal(rng),
                2 => huge(rng),
                _ => T::from_f32(rng.pick(&[1.0, -1.0])),
            };
            zeros_with(rng, len, &[lone])
        });
    }
    for_each_element_type!(run);
}

#[test]
fn huge_values() {
    fn run<T: TestElement>() {
        check_block_pattern::<T>("huge", 6, |rng, _, len| {
            let with_max = rng.coin();
            let mut block: Vec<T> = (0..len)
                .map(|_| {
                    if rng.chance(80) {
                        huge(rng)
                    } else {
                        ordinary(rng, 0)
                    }
                })
                .collect();
            if with_max {
                let i = rng.below(len);
                block[i] = signed(T::MAX_RAW, rng.coin());
            }
            block
        });
    }
    for_each_element_type!(run);
}

#[test]
fn subnormal_values_and_absmax_below_the_floor() {
    fn run<T: TestElement>() {
        let floor_raw = ABSMAX_FLOOR.to_bits();
        check_block_pattern::<T>("subnormal", 7, |rng, _, len| {
            let mode = rng.below(4);
            (0..len)
                .map(|_| match mode {
                    // Every value subnormal: absmax subnormal (below 1e-38 for f32/bf16).
                    0 => subnormal(rng),
                    // Only the smallest subnormals: scaled values quantized coarsely.
                    1 => signed(rng.range(0, 4), rng.coin()),
                    // Around the 1e-38 floor (f32/bf16 can hold these; f16 rounds to 0).
                    2 => {
                        let sign = rng.pick(&[1.0f32, -1.0]);
                        T::from_f32(sign * f32::from_bits(floor_raw - 64 + rng.range(0, 129)))
                    }
                    // Straddling the smallest normal.
                    _ => signed(T::MIN_NORMAL_RAW - 8 + rng.range(0, 17), rng.coin()),
                })
                .collect()
        });
    }
    for_each_element_type!(run);
}

#[test]
fn values_on_the_codebook_bounds() {
    fn run<T: TestElement>() {
        check_block_pattern::<T>("codebook bounds", 8, |rng, book, len| {
            // absmax = 2^k: the scaled values are the block values times an exact power
            // of two, so (for f32) they land exactly on the bounds and on their neighbours.
            let peak = 2f32.powi(rng.range(0, 7) as i32 - 3);
            let candidates: Vec<T> = book
                .bounds
                .iter()
                .chain(&book.values)
                .flat_map(|&v| with_neighbours(T::from_f32(v * peak)))
                .filter(|x| x.to_f32().abs() <= peak)
                .collect();
            block_with_peak(rng, len, &candidates, peak)
        });
    }
    for_each_element_type!(run);
}

#[test]
fn bounds_are_hit_exactly_for_f32() {
    // Guards the test above: with absmax 1.0 every bound itself is a scaled value.
    for quant_type in QUANT_TYPES {
        let book = quant_type.codebook();
        for blocksize in [32usize, 64] {
            let mut block = vec![1.0f32];
            block.extend(book.bounds);
            block.resize(blocksize, 0.0);
            for len in [blocksize, blocksize - 1] {
                let blocksize = Blocksize::new(blocksize).unwrap();
                let ctx = context::<f32>(quant_type, blocksize, len, "bounds exact");
                let quantized = quantize_both(&block[..len], quant_type, blocksize, &ctx).unwrap();
                for (r, &bound) in book.bounds.iter().enumerate() {
                    let i = r + 1;
                    assert_eq!(
                        nibble(&quantized.packed, i),
                        usize::from(book.rank_to_code[r]),
                        "{ctx}: bound {bound} goes to the lower code"
                    );
                }
            }
        }
    }
}

#[test]
fn dequantize_arbitrary_codes_and_scales() {
    fn run<T: TestElement>() {
        let mut rng = Rng::for_test::<T>(9);
        let odd_scales = [
            0.0,
            -0.0,
            -1.5,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            65504.0,
            f32::INFINITY,
            f32::NAN,
        ];
        for (quant_type, blocksize) in configs() {
            for len in [
                1,
                3,
                blocksize.get() + 1,
                4 * blocksize.get() - 1,
                TASK_LEN + 2 * blocksize.get() + 5,
            ] {
                let packed = (0..len.div_ceil(2)).map(|_| rng.next_u64() as u8).collect();
                let absmax = (0..blocksize.blocks(len))
                    .map(|_| {
                        if rng.chance(30) {
                            rng.pick(&odd_scales)
                        } else {
                            rng.signed_unit() * 100.0
                        }
                    })
                    .collect();
                let ctx = context::<T>(quant_type, blocksize, len, "arbitrary codes");
                dequantize_both::<T>(
                    &Quantized { packed, absmax },
                    quant_type,
                    blocksize,
                    len,
                    &ctx,
                );
            }
        }
    }
    for_each_element_type!(run);
}

// ---------------------------------------------------------------------------------------
// NaN / Inf
// ---------------------------------------------------------------------------------------

enum Bad {
    Nan,
    NegativeNan,
    /// A NaN with a payload other than the canonical quiet one.
    PayloadNan,
    Inf,
    NegInf,
}

impl Bad {
    fn value<T: TestElement>(&self) -> T {
        match self {
            Bad::Nan => T::from_raw(T::NAN_RAW),
            Bad::NegativeNan => T::from_raw(T::NAN_RAW | T::SIGN_RAW),
            Bad::PayloadNan => T::from_raw(T::INFINITY_RAW | 1),
            Bad::Inf => T::from_raw(T::INFINITY_RAW),
            Bad::NegInf => T::from_raw(T::INFINITY_RAW | T::SIGN_RAW),
        }
    }
}

/// Sets of bad (index, value) placements in an input of `len` elements.
fn bad_placements(len: usize, blocksize: usize) -> Vec<Vec<(usize, Bad)>> {
    let task2 = TASK_LEN + 5 * blocksize + 7;
    vec![
        vec![(0, Bad::Nan)],
        vec![(len - 1, Bad::Inf)],
        vec![(task2, Bad::NegInf)],
        vec![(task2 + 3, Bad::PayloadNan), (2 * TASK_LEN + 1, Bad::Nan)],
        // Several in one late block: the first in element order, not in scan order.
        vec![
            (task2 + 9, Bad::Inf),
            (task2 + 2, Bad::NegativeNan),
            (task2 + 5, Bad::NegInf),
        ],
        // The lowest sits at the very end of the first task, others in later tasks.
        vec![
            (2 * TASK_LEN + 3, Bad::NegInf),
            (TASK_LEN - 1, Bad::Nan),
            (TASK_LEN, Bad::Inf),
        ],
        // After a large finite value in the same block.
        vec![(blocksize + 1, Bad::Inf), (len - 2, Bad::Nan)],
    ]
}

#[test]
fn non_finite_values_report_the_lowest_index() {
    fn run<T: TestElement>() {
        let mut rng = Rng::for_test::<T>(10);
        for quant_type in QUANT_TYPES {
            for size in [32, 256, 4096] {
                let blocksize = Blocksize::new(size).unwrap();
                let len = 3 * TASK_LEN + size / 2 + 1;
                let clean = random_input::<T>(&mut rng, len, size);
                for placement in bad_placements(len, size) {
                    let mut input = clean.clone();
                    // A large finite value opening block 1, before a bad one there.
                    input[size] = T::from_f32(30000.0);
                    for (index, bad) in &placement {
                        input[*index] = bad.value();
                    }
                    let lowest = placement.iter().map(|(index, _)| *index).min().unwrap();
                    let ctx = context::<T>(quant_type, blocksize, len, &format!("bad at {lowest}"));
                    match quantize_both(&input, quant_type, blocksize, &ctx) {
                        Err(QuantError::NonFinite { index, value }) => {
                            assert_eq!(index, lowest, "{ctx}");
                            let expected = input[lowest];
                            assert_eq!(
                                value.is_nan(),
                                (expected.to_raw() & !T::SIGN_RAW) > T::INFINITY_RAW,
                                "{ctx}"
                            );
                            if !value.is_nan() {
                                assert!(value.is_infinite(), "{ctx}: reported value {value}");
                                assert_eq!(
                                    value.is_sign_negative(),
                                    (expected.to_raw() & T::SIGN_RAW) != 0,
                                    "{ctx}"
                                );
                            }
                        }
                        other => panic!("{ctx}: expected NonFinite, got {:?}", other.map(|_| ())),
                    }
                }
            }
        }
    }
    for_each_element_type!(run);
}

// ---------------------------------------------------------------------------------------
// Double quantization
// ---------------------------------------------------------------------------------------

struct Nested {
    codes: Vec<u8>,
    scales: Vec<f32>,
    offset: f32,
}

fn double_quantize_owned(absmax: &[f32]) -> Nested {
    let mut codes = vec![0u8; absmax.len()];
    let mut scales = vec![0.0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    let offset = double_quantize(absmax, &mut codes, &mut scales).unwrap();
    Nested {
        codes,
        scales,
        offset,
    }
}

fn dequantize_absmax_owned(nested: &Nested) -> Vec<f32> {
    let mut out = vec![0.0f32; nested.codes.len()];
    dequantize_absmax(&nested.codes, &nested.scales, nested.offset, &mut out).unwrap();
    out
}

/// Block scales as bitsandbytes produces them: positive, magnitudes over many octaves.
fn random_absmax(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.signed_unit().abs() + 1e-3) * 2f32.powi(rng.range(0, 9) as i32 - 6))
        .collect()
}

/// Index of the map entry nearest to `scaled` by brute force in f64 (exact near the
/// midpoints, where it matters), ties to the lower index. Out-of-range values clamp to
/// [-1, 1]; NaN (`0 * inf` when `1 / scale` overflows) gives index 0, as `torch.argmin`
/// over all-NaN distances does.
fn brute_force_nearest(map: &[f32; 256], scaled: f32) -> u8 {
    if scaled.is_nan() {
        return 0;
    }
    let target = f64::from(scaled.clamp(-1.0, 1.0));
    let mut best = 0;
    for (i, &entry) in map.iter().enumerate() {
        if (f64::from(entry) - target).abs() < (f64::from(map[best]) - target).abs() {
            best = i;
        }
    }
    best as u8
}

/// Checks `double_quantize` and `dequantize_absmax` against their definitions; returns
/// how many scaled values fell exactly halfway between two map entries.
fn check_double_quant_definition(absmax: &[f32], case: &str) -> usize {
    let map = dynamic_map();
    let nested = double_quantize_owned(absmax);
    let decoded = dequantize_absmax_owned(&nested);
    assert_eq!(
        nested.offset.to_bits(),
        torch_mean(absmax).to_bits(),
        "{case}: offset"
    );
    let mut ties = 0;
    let blocks = absmax
        .chunks(NESTED_BLOCKSIZE)
        .zip(nested.codes.chunks(NESTED_BLOCKSIZE));
    for (block_index, (block, codes)) in blocks.enumerate() {
        let scale = nested.scales[block_index];
        let expected_scale = block
            .iter()
            .fold(0.0f32, |m, a| m.max((a - nested.offset).abs()));
        assert_eq!(
            scale.to_bits(),
            expected_scale.to_bits(),
            "{case}: scale of block {block_index}"
        );
        for (i, (&a, &code)) in block.iter().zip(codes).enumerate() {
            let index = block_index * NESTED_BLOCKSIZE + i;
            let scaled = (a - nested.offset) * (1.0 / scale);
            let expected = if scale == 0.0 {
                0
            } else {
                brute_force_nearest(&map, scaled)
            };
            assert_eq!(
                code, expected,
                "{case}: code of absmax[{index}] = {a:e} (scaled {scaled:e})"
            );
            let code = usize::from(code);
            if code < 255
                && f64::from(scaled) == (f64::from(map[code]) + f64::from(map[code + 1])) / 2.0
            {
                ties += 1;
            }
            let product = map[code] * scale;
            let expected_decoded = product + nested.offset;
            assert_eq!(
                decoded[index].to_bits(),
                expected_decoded.to_bits(),
                "{case}: decoded absmax[{index}]"
            );
        }
    }
    ties
}

/// An array of `probes` and their negations, laid out so that torch's cascade sum adds
/// each value and its negation into the same (zero) accumulator lane: rows of 32 values
/// followed by the same row negated. The sum, and so the offset, is then exactly 0.
fn cancelling_absmax(probes: &[f32]) -> Vec<f32> {
    const ROW: usize = 32;
    let mut values = Vec::new();
    for row in probes.chunks(ROW) {
        let mut padded = row.to_vec();
        padded.resize(ROW, 0.0);
        values.extend(&padded);
        values.extend(padded.iter().map(|x| -x));
    }
    values
}

#[test]
fn double_quantize_codes_are_the_exact_nearest_map_entries() {
    let mut rng = Rng(11);
    let absmax = random_absmax(&mut rng, 9 * NESTED_BLOCKSIZE + 17);
    check_double_quant_definition(&absmax, "random absmax");

    // Probes on and next to every midpoint between map entries; with offset 0 and a
    // block scale of 1 the scaled value is the probe itself.
    let map = dynamic_map();
    let mut probes = vec![1.0];
    for pair in map.windows(2) {
        let midpoint = ((f64::from(pair[0]) + f64::from(pair[1])) / 2.0) as f32;
        probes.extend(with_neighbours(midpoint));
        probes.extend([pair[0], pair[1]]);
    }
    let absmax = cancelling_absmax(&probes);
    assert_eq!(
        double_quantize_owned(&absmax).offset,
        0.0,
        "the cancelling layout has mean 0"
    );
    let ties = check_double_quant_definition(&absmax, "midpoint probes");
    assert!(ties > 50, "only {ties} exact ties exercised");
}

#[test]
fn all_equal_absmax_block_has_scale_zero() {
    // Dyadic values: every partial sum is exact, so the mean is exactly 0.375.
    let base = 0.375f32;
    let mut absmax = vec![base; NESTED_BLOCKSIZE];
    for i in 0..NESTED_BLOCKSIZE / 2 {
        let delta = (i + 1) as f32 / 1024.0;
        absmax.extend([base + delta, base - delta]);
    }
    for values in [absmax, vec![base; 300]] {
        let nested = double_quantize_owned(&values);
        assert_eq!(nested.offset, base);
        assert_eq!(nested.scales[0], 0.0);
        assert!(nested.codes[..NESTED_BLOCKSIZE].iter().all(|&c| c == 0));
        let decoded = dequantize_absmax_owned(&nested);
        assert!(decoded[..NESTED_BLOCKSIZE].iter().all(|&d| d == base));
        check_double_quant_definition(&values, "all-equal block");
    }
}

#[test]
fn double_quantize_with_a_scale_whose_reciprocal_overflows() {
    // Subnormal absmax values: the block scale is below 1 / f32::MAX, so 1 / scale is
    // +Inf and an entry equal to the offset scales to NaN (0 * Inf).
    let raw = |r: u32| f32::from_bits(r);
    let mut absmax = Vec::new();
    for i in 0..NESTED_BLOCKSIZE {
        absmax.push(raw(if i.is_multiple_of(2) { 100 } else { 200 }));
    }
    for i in 0..NESTED_BLOCKSIZE {
        absmax.push(raw(if i.is_multiple_of(2) { 300 } else { 200 }));
    }
    let nested = double_quantize_owned(&absmax);
    assert_eq!(nested.offset, raw(200), "subnormal sums are exact");
    assert_eq!(1.0 / nested.scales[0], f32::INFINITY);
    check_double_quant_definition(&absmax, "overflowing reciprocal");
}

#[test]
fn double_quantize_is_independent_of_the_thread_count() {
    let len = if cfg!(debug_assertions) {
        1_000_003
    } else {
        3_000_017
    };
    let absmax = random_absmax(&mut Rng(12), len);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let nested = double_quantize_owned(&absmax);
            let decoded = dequantize_absmax_owned(&nested);
            (nested, decoded)
        })
    };
    let (first, first_decoded) = run(1);
    for threads in [2, 3, 7] {
        let ctx = format!("{threads} threads");
        let (nested, decoded) = run(threads);
        assert_eq!(
            nested.offset.to_bits(),
            first.offset.to_bits(),
            "{ctx}: offset"
        );
        assert_same_sequence(&nested.codes, &first.codes, "codes", &ctx);
        assert_same_sequence(
            &f32_bits(&nested.scales),
            &f32_bits(&first.scales),
            "scales",
            &ctx,
        );
        assert_same_sequence(
            &f32_bits(&decoded),
            &f32_bits(&first_decoded),
            "decoded",
            &ctx,
        );
    }
}

#[test]
fn dequantize_absmax_rounds_the_product_and_the_sum_separately() {
    let map = dynamic_map();
    let mut rng = Rng(13);
    let len = 20 * NESTED_BLOCKSIZE + 3;
    let nested = Nested {
        codes: (0..len).map(|_| rng.next_u64() as u8).collect(),
        scales: (0..len.div_ceil(NESTED_BLOCKSIZE))
            .map(|_| rng.signed_unit().abs() * 3.0)
            .collect(),
        offset: 0.7 + rng.signed_unit() * 0.1,
    };
    let decoded = dequantize_absmax_owned(&nested);
    let mut fused_differs = 0;
    for (i, (&code, &out)) in nested.codes.iter().zip(&decoded).enumerate() {
        let scale = nested.scales[i / NESTED_BLOCKSIZE];
        let product = map[usize::from(code)] * scale;
        assert_eq!(
            out.to_bits(),
            (product + nested.offset).to_bits(),
            "entry {i}"
        );
        if map[usize::from(code)].mul_add(scale, nested.offset) != out {
            fused_differs += 1;
        }
    }
    // The check above tells two roundings from one fused multiply-add.
    assert!(
        fused_differs > 100,
        "only {fused_differs} entries distinguish a fused multiply-add"
    );
}

// ---------------------------------------------------------------------------------------
// PackedTensor round trip
// ---------------------------------------------------------------------------------------

/// The largest gap between adjacent code values (in value order).
fn largest_gap(values: &[f32]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sorted.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

fn nibble(packed: &[u8], i: usize) -> usize {
    let byte = packed[i / 2];
    usize::from(if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0xf
    })
}

/// How far the decoded absmax may be from the true one: half the largest map gap times
/// the block's nested scale, plus the roundings of `x * (1 / scale)`, of the product and
/// of the sum.
fn nested_absmax_bound(map_half_gap: f64, scale: f32, decoded: f32) -> f64 {
    f64::from(scale) * (map_half_gap + 4.0 * F32_UNIT_ROUNDOFF)
        + f64::from(decoded.abs()) * 2.0 * F32_UNIT_ROUNDOFF
}

fn check_round_trip<T: TestElement>(
    input: &[T],
    quant_type: QuantType,
    blocksize: Blocksize,
    double_quant: bool,
) {
    let ctx = context::<T>(
        quant_type,
        blocksize,
        input.len(),
        &format!("round trip, double quant {double_quant}"),
    );
    let tensor = PackedTensor::quantize(input, quant_type, blocksize, double_quant).unwrap();
    let decoded_values: Vec<T> = tensor.dequantize().unwrap();
    let decoded_absmax = tensor.absmax.decode().unwrap();
    let true_absmax = match PackedTensor::quantize(input, quant_type, blocksize, false)
        .unwrap()
        .absmax
    {
        Absmax::Plain(absmax) => absmax,
        Absmax::Nested { .. } => unreachable!(),
    };
    if let Absmax::Nested { scales, .. } = &tensor.absmax {
        let map_half_gap = largest_gap(&dynamic_map()) / 2.0;
        for (block, (&a, &d)) in true_absmax.iter().zip(&decoded_absmax).enumerate() {
            let bound = nested_absmax_bound(map_half_gap, scales[block / NESTED_BLOCKSIZE], d);
            assert!(
                f64::from((a - d).abs()) <= bound,
                "{ctx}: absmax[{block}] {a:e} decoded {d:e}"
            );
        }
    } else {
        assert_eq!(f32_bits(&decoded_absmax), f32_bits(&true_absmax), "{ctx}");
    }

    let book = quant_type.codebook();
    let half_gap = largest_gap(&book.values) / 2.0;
    for (i, (&x, &y)) in input.iter().zip(&decoded_values).enumerate() {
        let block = i / blocksize.get();
        let absmax = decoded_absmax[block];
        let expected = T::from_f32(book.values[nibble(&tensor.packed, i)] * absmax);
        assert_eq!(y.to_raw(), expected.to_raw(), "{ctx}: element {i}");
        // Rounding the code choice (x * (1 / absmax) and the f32 bounds), the absmax
        // error of the double quantization, and rounding the product to f32 then to T.
        let (x, y) = (f64::from(x.to_f32()), f64::from(y.to_f32()));
        let true_absmax = f64::from(true_absmax[block]);
        let bound = true_absmax * (half_gap + 4.0 * F32_UNIT_ROUNDOFF)
            + (true_absmax - f64::from(absmax)).abs()
            + y.abs() * (T::UNIT_ROUNDOFF + F32_UNIT_ROUNDOFF)
            + T::MIN_SUBNORMAL;
        assert!(
            (x - y).abs() <= bound,
            "{ctx}: element {i}: {x:e} decoded as {y:e} (bound {bound:e})"
        );
    }
}

#[test]
fn packed_tensor_round_trip_is_within_half_a_code_gap() {
    fn run<T: TestElement>() {
        let mut rng = Rng::for_test::<T>(14);
        for (quant_type, blocksize) in configs() {
            for len in [33, 5 * blocksize.get() + 3, 300 * 64 + 1] {
                let input = random_input::<T>(&mut rng, len, blocksize.get());
                for double_quant in [false, true] {
                    check_round_trip(&input, quant_type, blocksize, double_quant);
                }
            }
        }
    }
    for_each_element_type!(run);
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

fn mismatch(what: &'static str, expected: usize, actual: usize) -> QuantError {
    QuantError::LengthMismatch {
        what,
        expected,
        actual,
    }
}

/// Runs the reference and every fast quantizer on buffers of the given lengths; asserts
/// they all return the same error.
fn quantize_error<T: TestElement>(input: &[T], packed_len: usize, absmax_len: usize) -> QuantError {
    let blocksize = Blocksize::new(64).unwrap();
    let buffers = || Quantized {
        packed: vec![0; packed_len],
        absmax: vec![0.0; absmax_len],
    };
    let mut out = buffers();
    let reference = quantize_4bit_reference(
        input,
        QuantType::Nf4,
        blocksize,
        &mut out.packed,
        &mut out.absmax,
    )
    .expect_err("reference must fail");
    for quantizer in fast_quantizers() {
        let fast = quantize_into(quantizer, input, QuantType::Nf4, blocksize, &mut buffers())
            .expect_err("fast must fail");
        assert_same_error(
            &fast,
            &reference,
            &format!("quantize buffers, {quantizer:?}"),
        );
    }
    reference
}

/// Runs both dequantize paths on the given buffers; asserts they return the same error.
fn dequantize_error<T: TestElement>(
    packed_len: usize,
    absmax_len: usize,
    numel: usize,
) -> QuantError {
    let blocksize = Blocksize::new(64).unwrap();
    let run = |reference: bool| {
        let packed = vec![0u8; packed_len];
        let absmax = vec![1.0f32; absmax_len];
        let mut out = vec![T::default(); numel];
        let dequantize = if reference {
            dequantize_4bit_reference::<T>
        } else {
            dequantize_4bit::<T>
        };
        dequantize(&packed, &absmax, QuantType::Fp4, blocksize, &mut out).expect_err("must fail")
    };
    let (fast, reference) = (run(false), run(true));
    assert_same_error(&fast, &reference, "dequantize buffers");
    fast
}

#[test]
fn bad_buffers_return_errors() {
    fn run<T: TestElement>() {
        let input = vec![T::from_f32(0.5); 129];
        assert_eq!(quantize_error::<T>(&[], 0, 0), QuantError::Empty);
        assert_eq!(
            quantize_error(&input, 64, 3),
            mismatch("packed output", 65, 64)
        );
        assert_eq!(
            quantize_error(&input, 66, 3),
            mismatch("packed output", 65, 66)
        );
        assert_eq!(
            quantize_error(&input, 65, 2),
            mismatch("absmax output", 3, 2)
        );
        assert_eq!(
            quantize_error(&input, 65, 4),
            mismatch("absmax output", 3, 4)
        );

        assert_eq!(dequantize_error::<T>(0, 0, 0), QuantError::Empty);
        assert_eq!(
            dequantize_error::<T>(64, 3, 129),
            mismatch("packed input", 65, 64)
        );
        assert_eq!(
            dequantize_error::<T>(65, 2, 129),
            mismatch("absmax input", 3, 2)
        );
        assert_eq!(
            dequantize_error::<T>(65, 3, 128),
            mismatch("packed input", 64, 65)
        );

        let blocksize = Blocksize::default();
        assert_eq!(
            PackedTensor::quantize::<T>(&[], QuantType::Nf4, blocksize, true),
            Err(QuantError::Empty)
        );
        let tensor = PackedTensor::quantize(&input, QuantType::Nf4, blocksize, true).unwrap();
        let mut short = vec![T::default(); 128];
        assert_eq!(
            tensor.dequantize_into(&mut short),
            Err(mismatch("packed input", 64, 65))
        );
    }
    for_each_element_type!(run);
}

#[test]
fn bad_double_quant_buffers_return_errors() {
    let absmax = vec![1.0f32; 300];
    let nested = |codes_len: usize, scales_len: usize| {
        double_quantize(&absmax, &mut vec![0; codes_len], &mut vec![0.0; scales_len]).unwrap_err()
    };
    assert_eq!(
        double_quantize(&[], &mut [], &mut []),
        Err(QuantError::Empty)
    );
    assert_eq!(nested(299, 2), mismatch("nested codes output", 300, 299));
    assert_eq!(nested(300, 1), mismatch("nested scales output", 2, 1));
    assert_eq!(nested(300, 3), mismatch("nested scales output", 2, 3));

    let mut with_bad = absmax.clone();
    with_bad[290] = f32::NEG_INFINITY;
    with_bad[7] = f32::INFINITY;
    let error = double_quantize(&with_bad, &mut [0; 300], &mut [0.0; 2]).unwrap_err();
    assert_eq!(
        error,
        QuantError::NonFinite {
            index: 7,
            value: f32::INFINITY
        }
    );

    let mut out = vec![0.0f32; 300];
    assert_eq!(
        dequantize_absmax(&[0; 299], &[1.0; 2], 0.0, &mut out),
        Err(mismatch("nested codes input", 300, 299))
    );
    assert_eq!(
        dequantize_absmax(&[0; 300], &[1.0; 1], 0.0, &mut out),
        Err(mismatch("nested scales input", 2, 1))
    );
    assert_eq!(
        Blocksize::new(48),
        Err(QuantError::UnsupportedBlocksize(48))
    );
}
