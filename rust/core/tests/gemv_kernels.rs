//! The batched (2 to 8 input rows) and AVX512-BF16 paths of `gemv_4bit`, and inline
//! decoding of double-quantized scales: every kernel's batched rows bit for bit equal to
//! single-row calls; nested scales bit for bit equal to decoding them first; the BF16
//! kernel bit for bit equal to a scalar emulation of the summation order documented in
//! `gemv` (subnormals flushed as `vdpbf16ps` does) and within the documented bound of the
//! exact dot product; results independent of the thread count; the batch validation.

use half::{bf16, f16};
use qlorakit_core::{
    dequantize_4bit, dequantize_4bit_reference, dequantize_4bit_scaled, dequantize_absmax,
    double_quantize, gemv_4bit, gemv_4bit_with, Absmax, Blocksize, Element, GemvKernel, PackedView,
    QuantError, QuantType, Scales, GEMV_MAX_BATCH,
};

mod common;

use common::Rng;

impl Rng {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A random layer with `batch` input rows; scales plain or double-quantized.
struct Layer<T> {
    rows: usize,
    cols: usize,
    blocksize: Blocksize,
    quant_type: QuantType,
    packed: Vec<u8>,
    scales: Absmax,
    x: Vec<T>,
    bias: Vec<T>,
}

impl<T: Element> Layer<T> {
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut Rng,
        rows: usize,
        cols: usize,
        blocksize: usize,
        quant_type: QuantType,
        nested: bool,
        batch: usize,
    ) -> Self {
        let blocksize = Blocksize::new(blocksize).unwrap();
        let numel = rows * cols;
        let packed = (0..numel.div_ceil(2))
            .map(|_| rng.next_u64() as u8)
            .collect();
        let absmax: Vec<f32> = (0..blocksize.blocks(numel))
            .map(|_| 10f64.powf(rng.uniform(-3.0, 1.0)) as f32)
            .collect();
        let scales = Absmax::stored(absmax, nested).unwrap();
        let x = (0..batch * cols)
            .map(|_| match rng.below(8) {
                0 => T::from_f32(0.0),
                _ => T::from_f32(rng.uniform(-4.0, 4.0) as f32),
            })
            .collect();
        let bias = (0..rows)
            .map(|_| T::from_f32(rng.uniform(-1.0, 1.0) as f32))
            .collect();
        Layer {
            rows,
            cols,
            blocksize,
            quant_type,
            packed,
            scales,
            x,
            bias,
        }
    }

    fn view<'a>(&'a self, scales: Scales<'a>, shape: &'a [usize; 2]) -> PackedView<'a> {
        PackedView::new(&self.packed, scales, self.quant_type, self.blocksize, shape).unwrap()
    }

    fn run_on(&self, kernel: GemvKernel, scales: Scales<'_>, x: &[T], bias: bool) -> Vec<T> {
        let shape = [self.rows, self.cols];
        let mut out = vec![T::from_f32(f32::NAN); self.rows * (x.len() / self.cols)];
        let bias = bias.then_some(&self.bias[..]);
        gemv_4bit_with(kernel, &self.view(scales, &shape), x, bias, &mut out).unwrap();
        out
    }

    fn run(&self, kernel: GemvKernel, bias: bool) -> Vec<T> {
        self.run_on(kernel, self.scales.view(), &self.x, bias)
    }

    fn decoded_absmax(&self) -> Vec<f32> {
        self.scales.decode().unwrap()
    }

    /// The weight as `dequantize_4bit_reference` gives it, widened to float32.
    fn weight(&self) -> Vec<f32> {
        let mut weight = vec![T::from_f32(0.0); self.rows * self.cols];
        let absmax = self.decoded_absmax();
        dequantize_4bit_reference(
            &self.packed,
            &absmax,
            self.quant_type,
            self.blocksize,
            &mut weight,
        )
        .unwrap();
        weight.iter().map(|w| w.to_f32()).collect()
    }
}

fn bits<T: Element>(values: &[T]) -> Vec<u32> {
    values.iter().map(|v| v.to_f32().to_bits()).collect()
}

fn supported_kernels() -> Vec<GemvKernel> {
    GemvKernel::ALL
        .into_iter()
        .filter(|kernel| kernel.is_supported())
        .collect()
}

/// Shapes for the batch tests: odd columns (rows starting on a low nibble), partial
/// groups, blocks straddling rows, and rows of whole chunks of 64 (the BF16 kernel's; the
/// last one long enough that the AVX512-BF16 kernel splits 7 and 8 input rows into two
/// groups, over a tile of 16 weight rows and a partial one).
const SHAPES: [(usize, usize, usize); 10] = [
    (3, 5, 32),
    (5, 33, 64),
    (4, 100, 64),
    (7, 64, 64),
    (6, 128, 64),
    (9, 192, 128),
    (3, 256, 256),
    (5, 64, 4096),
    (17, 1024, 64),
    (19, 2560, 64),
];

fn check_batches<T: Element>(salt: u64) {
    let mut rng = Rng(0xba7c_4000 ^ salt);
    for (rows, cols, blocksize) in SHAPES {
        for nested in [false, true] {
            let layer =
                Layer::<T>::random(&mut rng, rows, cols, blocksize, QuantType::Nf4, nested, 8);
            for kernel in supported_kernels() {
                for batch in 1..=GEMV_MAX_BATCH {
                    let x = &layer.x[..batch * cols];
                    let together = layer.run_on(kernel, layer.scales.view(), x, true);
                    for b in 0..batch {
                        let single = &x[b * cols..(b + 1) * cols];
                        let alone = layer.run_on(kernel, layer.scales.view(), single, true);
                        assert_eq!(
                            bits(&together[b * rows..(b + 1) * rows]),
                            bits(&alone),
                            "{} {kernel:?} [{rows}x{cols}] bs {blocksize} nested {nested} \
                             batch {batch} row {b}",
                            T::NAME
                        );
                    }
                }
            }
            // The lane-order kernels share one summation order, batched too.
            let portable = layer.run(GemvKernel::Portable, true);
            for kernel in [GemvKernel::Avx2, GemvKernel::Avx512] {
                if kernel.is_supported() {
                    assert_eq!(
                        bits(&portable),
                        bits(&layer.run(kernel, true)),
                        "{kernel:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn batched_rows_equal_single_row_calls_bit_for_bit_f32() {
    check_batches::<f32>(1);
}

#[test]
fn batched_rows_equal_single_row_calls_bit_for_bit_bf16() {
    check_batches::<bf16>(2);
}

#[test]
fn batched_rows_equal_single_row_calls_bit_for_bit_f16() {
    check_batches::<f16>(3);
}

/// Nested scales decoded inline give the bits of the same call with the absmax decoded
/// first (`dequantize_absmax`), on every kernel, and `dequantize_4bit_scaled` those of
/// `dequantize_4bit` on the decoded absmax, for outputs small and large.
#[test]
fn nested_scales_decode_inline_bit_identically() {
    let mut rng = Rng(0x5ca1e);
    for (rows, cols, blocksize) in SHAPES {
        let layer = Layer::<bf16>::random(&mut rng, rows, cols, blocksize, QuantType::Fp4, true, 3);
        let Absmax::Nested {
            codes,
            scales,
            offset,
        } = &layer.scales
        else {
            unreachable!()
        };
        let mut absmax = vec![0.0f32; codes.len()];
        dequantize_absmax(codes, scales, *offset, &mut absmax).unwrap();
        for kernel in supported_kernels() {
            let inline = layer.run(kernel, false);
            let first = layer.run_on(kernel, Scales::Plain(&absmax), &layer.x, false);
            assert_eq!(bits(&inline), bits(&first), "{kernel:?} [{rows}x{cols}]");
        }
    }
    for numel in [1usize, 777, 4096 * 1024 + 64] {
        let blocksize = Blocksize::new(64).unwrap();
        let packed: Vec<u8> = (0..numel.div_ceil(2))
            .map(|_| rng.next_u64() as u8)
            .collect();
        let absmax: Vec<f32> = (0..blocksize.blocks(numel))
            .map(|_| rng.uniform(0.01, 3.0) as f32)
            .collect();
        let mut codes = vec![0u8; absmax.len()];
        let mut scales = vec![0.0f32; absmax.len().div_ceil(256)];
        let offset = double_quantize(&absmax, &mut codes, &mut scales).unwrap();
        let mut decoded = vec![0.0f32; absmax.len()];
        dequantize_absmax(&codes, &scales, offset, &mut decoded).unwrap();
        let mut want = vec![f16::ZERO; numel];
        dequantize_4bit(&packed, &decoded, QuantType::Nf4, blocksize, &mut want).unwrap();
        let mut got = vec![f16::ZERO; numel];
        let nested = Scales::Nested {
            codes: &codes,
            scales: &scales,
            offset,
        };
        dequantize_4bit_scaled(&packed, nested, QuantType::Nf4, blocksize, &mut got).unwrap();
        assert!(got == want, "numel {numel}");
        assert_eq!(
            dequantize_4bit_scaled(&packed[1..], nested, QuantType::Nf4, blocksize, &mut got),
            Err(QuantError::LengthMismatch {
                what: "packed input",
                expected: packed.len(),
                actual: packed.len() - 1
            })
        );
    }
}

/// `vdpbf16ps`'s treatment of a float32 value: subnormals are zero.
fn flush(v: f32) -> f32 {
    if v != 0.0 && v.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(v)
    } else {
        v
    }
}

/// The BF16 kernel's documented order, in scalar Rust: chunk `k` of 64 elements adds its
/// even elements to accumulator `2 (k % 2)` (lane `j`: element `4j + 2`, then `4j`) and
/// its odd ones to `2 (k % 2) + 1` (lane `j`: `4j + 3`, then `4j + 1`), every input,
/// product and partial sum flushed; then the common fold, the bias, one rounding.
#[allow(clippy::needless_range_loop)] // lane j of two accumulators, as the order is written
fn emulate_bf16(weight: &[f32], x: &[bf16], bias: Option<&[bf16]>, cols: usize) -> Vec<bf16> {
    let mut out = Vec::new();
    for xr in x.chunks(cols) {
        for (r, w) in weight.chunks(cols).enumerate() {
            let mut acc = [[0.0f32; 16]; 4];
            let product = |c: usize| flush(flush(w[c]) * flush(xr[c].to_f32()));
            for k in 0..cols / 64 {
                let e = 64 * k;
                let a = 2 * (k % 2);
                for j in 0..16 {
                    let even = flush(acc[a][j] + product(e + 4 * j + 2));
                    acc[a][j] = flush(even + product(e + 4 * j));
                    let odd = flush(acc[a + 1][j] + product(e + 4 * j + 3));
                    acc[a + 1][j] = flush(odd + product(e + 4 * j + 1));
                }
            }
            let lanes: [f32; 16] =
                std::array::from_fn(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]));
            out.push(finish(lanes, bias.map(|bias| bias[r])));
        }
    }
    out
}

/// The kernels' lane fold (`i` and `i + N/2`, then halving), the bias, one rounding.
fn finish<const N: usize>(mut lanes: [f32; N], bias: Option<bf16>) -> bf16 {
    let mut width = N / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    bf16::from_f32(bias.map_or(lanes[0], |bias| lanes[0] + bias.to_f32()))
}

/// The documented bound of the BF16 kernel against the exact dot product of the
/// dequantized (bf16) weight with x plus the bias: `gamma_n sum |t| + sum_flushed |t| +
/// cols 2^-126`, then the rounding to bf16 (`2^-8 |value|` plus half the smallest
/// subnormal).
fn bf16_bound(weight: &[f32], x: &[bf16], bias: Option<&[bf16]>, cols: usize) -> Vec<(f64, f64)> {
    sum_bound(weight, x, bias, cols, true)
}

/// The documented bound of the AVX2 bf16 kernel (and the lane kernels): as [`bf16_bound`]
/// without flushed terms, `gamma_n sum |t|`, then the rounding to bf16.
fn fma_bound(weight: &[f32], x: &[bf16], bias: Option<&[bf16]>, cols: usize) -> Vec<(f64, f64)> {
    sum_bound(weight, x, bias, cols, false)
}

/// Per output, the exact value and its bound: `gamma_n sum |t|` (plus, when `flushes`,
/// the terms below 2^-126 and one 2^-126 per column), then the rounding to bf16.
fn sum_bound(
    weight: &[f32],
    x: &[bf16],
    bias: Option<&[bf16]>,
    cols: usize,
    flushes: bool,
) -> Vec<(f64, f64)> {
    let n = (cols + usize::from(bias.is_some())) as f64;
    let u = 2f64.powi(-24);
    let gamma = n * u / (1.0 - n * u);
    let tiny = f64::from(f32::MIN_POSITIVE);
    let mut out = Vec::new();
    for xr in x.chunks(cols) {
        for (r, w) in weight.chunks(cols).enumerate() {
            let (mut exact, mut magnitude, mut flushed) = (0.0f64, 0.0f64, 0.0f64);
            for (&w, x) in w.iter().zip(xr) {
                let t = f64::from(w) * f64::from(x.to_f32());
                exact += t;
                magnitude += t.abs();
                if f64::from(w).abs() < tiny || f64::from(x.to_f32()).abs() < tiny || t.abs() < tiny
                {
                    flushed += t.abs();
                }
            }
            if let Some(bias) = bias {
                exact += f64::from(bias[r].to_f32());
                magnitude += f64::from(bias[r].to_f32()).abs();
            }
            let flush_terms = if flushes {
                flushed + cols as f64 * tiny
            } else {
                0.0
            };
            let summation = gamma * magnitude * (1.0 + 1e-6) + flush_terms;
            let bound = summation + 2f64.powi(-8) * (exact.abs() + summation) + 2f64.powi(-134);
            out.push((exact, bound));
        }
    }
    out
}

/// The emulation of a bf16 kernel's documented order and its error bound, per output:
/// `(weight, x, bias, cols)` as the two functions above take them.
type Emulation = fn(&[f32], &[bf16], Option<&[bf16]>, usize) -> Vec<bf16>;
type Bound = fn(&[f32], &[bf16], Option<&[bf16]>, usize) -> Vec<(f64, f64)>;

/// `kernel` on `layer`, with and without bias: bit for bit its emulation, within its bound.
fn check_against_emulation(
    kernel: GemvKernel,
    (emulate, bound): (Emulation, Bound),
    layer: &Layer<bf16>,
    what: &str,
) {
    let weight = layer.weight();
    for bias in [false, true] {
        let got = layer.run(kernel, bias);
        let b = bias.then_some(&layer.bias[..]);
        let want = emulate(&weight, &layer.x, b, layer.cols);
        assert_eq!(
            bits(&got),
            bits(&want),
            "{what} bias {bias}: kernel vs emulation"
        );
        for (i, (g, (exact, bound))) in got
            .iter()
            .zip(bound(&weight, &layer.x, b, layer.cols))
            .enumerate()
        {
            let err = (f64::from(g.to_f32()) - exact).abs();
            assert!(
                err <= bound,
                "{what} output {i}: error {err:e} > bound {bound:e}"
            );
        }
    }
}

/// Random bf16 layers over every quant type, the blocksizes and shapes the bf16 kernels
/// take, and batches of 1, 3 and 8 rows.
fn bf16_order_cases(seed: u64, mut check: impl FnMut(&Layer<bf16>, &str)) {
    let mut rng = Rng(seed);
    for quant_type in QuantType::ALL {
        for blocksize in [64, 128, 256, 1024, 4096] {
            for (rows, cols) in [(1, 64), (3, 128), (5, 192), (4, 4096), (33, 320)] {
                for batch in [1, 3, 8] {
                    let nested = rng.below(2) == 1;
                    let layer = Layer::<bf16>::random(
                        &mut rng, rows, cols, blocksize, quant_type, nested, batch,
                    );
                    check(
                        &layer,
                        &format!("{quant_type:?} bs {blocksize} [{rows}x{cols}] x{batch}"),
                    );
                }
            }
        }
    }
}

/// 20 bf16 layers with subnormal weights (tiny scales), products that underflow, and
/// subnormal or tiny inputs, each with its label.
fn subnormal_layers(seed: u64) -> impl Iterator<Item = (Layer<bf16>, String)> {
    let mut rng = Rng(seed);
    (0..20).map(move |round| {
        let mut layer = Layer::<bf16>::random(&mut rng, 6, 256, 64, QuantType::Nf4, false, 2);
        if let Absmax::Plain(absmax) = &mut layer.scales {
            for (block, scale) in absmax.iter_mut().enumerate() {
                *scale = match (block + round) % 4 {
                    0 => 1e-39,                                            // subnormal weights
                    1 => f32::MIN_POSITIVE * rng.uniform(1.0, 4.0) as f32, // products underflow
                    2 => 1e-30,
                    _ => rng.uniform(0.1, 2.0) as f32,
                };
            }
        }
        for (i, x) in layer.x.iter_mut().enumerate() {
            *x = match (i + round) % 5 {
                0 => bf16::from_bits(0x0001 + (i % 100) as u16), // subnormal inputs
                1 => bf16::from_f32(1e-10 * rng.uniform(-1.0, 1.0) as f32),
                2 => bf16::from_f32(-f32::MIN_POSITIVE * 3.0),
                _ => bf16::from_f32(rng.uniform(-2.0, 2.0) as f32),
            };
        }
        (layer, format!("subnormals, round {round}"))
    })
}

/// The AVX2 bf16 kernel's documented order, in scalar Rust: lane `d` of accumulator `a`
/// (8 of 8 lanes) takes element `2 p + a / 4` of each chunk of 64, `p = j % 8 +
/// 8 ((a / 2) % 2) + 16 (j / 8)`, `j = 2 d + a % 2`, chunk after chunk, by fused
/// multiply-add; the accumulators fold as `(0 + 1) + (2 + 3)` and `(4 + 5) + (6 + 7)`,
/// then those two, the lanes as `i + (i + 4)`, `i + 2`, `i + 1`; then the bias, one
/// rounding.
fn emulate_avx2_bf16(weight: &[f32], x: &[bf16], bias: Option<&[bf16]>, cols: usize) -> Vec<bf16> {
    let element = |a: usize, d: usize| {
        let j = 2 * d + a % 2;
        2 * (j % 8 + 8 * ((a / 2) % 2) + 16 * (j / 8)) + a / 4
    };
    let mut out = Vec::new();
    for xr in x.chunks(cols) {
        for (r, w) in weight.chunks(cols).enumerate() {
            let mut acc = [[0.0f32; 8]; 8];
            for k in 0..cols / 64 {
                for (a, acc) in acc.iter_mut().enumerate() {
                    for (d, acc) in acc.iter_mut().enumerate() {
                        let e = 64 * k + element(a, d);
                        *acc = w[e].mul_add(xr[e].to_f32(), *acc);
                    }
                }
            }
            let half = |i: usize, j: usize| std::array::from_fn(|l| acc[i][l] + acc[j][l]);
            let [h01, h23, h45, h67]: [[f32; 8]; 4] =
                [half(0, 1), half(2, 3), half(4, 5), half(6, 7)];
            let lanes: [f32; 8] = std::array::from_fn(|l| (h01[l] + h23[l]) + (h45[l] + h67[l]));
            out.push(finish(lanes, bias.map(|bias| bias[r])));
        }
    }
    out
}

/// Inf and NaN scales, plain or decoded from double quantization (an Inf nested scale, or
/// one that overflows with the offset): the AVX2 bf16 kernel gives what its emulation gives
/// (NaN or Inf for the rows they reach).
#[test]
fn avx2_bf16_kernel_keeps_non_finite_values() {
    if !GemvKernel::Avx2Bf16.is_supported() {
        eprintln!("skipped: no AVX2 + FMA + F16C on this CPU");
        return;
    }
    let mut rng = Rng(0x1_0f);
    /// A case: its name, whether the scales are double-quantized, and what spoils them.
    type Case = (&'static str, bool, fn(&mut Absmax));
    let cases: [Case; 3] = [
        ("plain Inf and NaN", false, |scales| {
            if let Absmax::Plain(absmax) = scales {
                absmax[1] = f32::INFINITY;
                absmax[4] = f32::NAN;
            }
        }),
        ("Inf nested scale", true, |scales| {
            if let Absmax::Nested { scales, .. } = scales {
                scales[0] = f32::INFINITY;
            }
        }),
        ("nested scale + offset overflow", true, |scales| {
            if let Absmax::Nested { scales, offset, .. } = scales {
                scales[0] = f32::MAX;
                *offset = f32::MAX;
            }
        }),
    ];
    for (case, nested, poison) in cases {
        let mut layer = Layer::<bf16>::random(&mut rng, 4, 128, 64, QuantType::Nf4, nested, 1);
        poison(&mut layer.scales);
        let weight = layer.weight();
        let got = layer.run(GemvKernel::Avx2Bf16, false);
        let want = emulate_avx2_bf16(&weight, &layer.x, None, layer.cols);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.to_f32().is_nan() == w.to_f32().is_nan() && (w.is_nan() || g == w),
                "case {case}: {g} vs {w}"
            );
        }
        if nested {
            assert!(
                got.iter().all(|g| !g.to_f32().is_finite()),
                "case {case}: {got:?}"
            );
        } else {
            assert!(got[0].is_nan() && got[2].is_nan(), "{got:?}");
        }
    }
}

/// Each bf16 kernel with its emulation and bound, the lane kernel its other inputs take,
/// and the seed of its cases.
const BF16_KERNELS: [(GemvKernel, (Emulation, Bound), GemvKernel, u64); 2] = [
    (
        GemvKernel::Avx512Bf16,
        (emulate_bf16, bf16_bound),
        GemvKernel::Avx512,
        0xbf16,
    ),
    (
        GemvKernel::Avx2Bf16,
        (emulate_avx2_bf16, fma_bound),
        GemvKernel::Avx2,
        0xa2bf,
    ),
];

/// The bf16 kernels this CPU runs (a skip message for the others).
fn supported_bf16_kernels(
) -> impl Iterator<Item = (GemvKernel, (Emulation, Bound), GemvKernel, u64)> {
    BF16_KERNELS.into_iter().filter(|(kernel, ..)| {
        let supported = kernel.is_supported();
        if !supported {
            eprintln!("skipped {}: this CPU lacks it", kernel.name());
        }
        supported
    })
}

#[test]
fn bf16_kernels_follow_their_documented_order_and_bound() {
    for (kernel, emulation, _, seed) in supported_bf16_kernels() {
        bf16_order_cases(seed, |layer, what| {
            check_against_emulation(
                kernel,
                emulation,
                layer,
                &format!("{} {what}", kernel.name()),
            )
        });
    }
}

/// Subnormal inputs, weights (tiny scales) and products (tiny inputs times small weights):
/// `avx512bf16` flushes them as documented (the bound counts the flushed terms),
/// `avx2bf16` keeps them (exact float32 arithmetic); each is bit for bit its emulation.
#[test]
fn bf16_kernels_treat_subnormals_as_documented() {
    for (kernel, emulation, _, seed) in supported_bf16_kernels() {
        for (layer, what) in subnormal_layers(seed ^ 0xde_0a11) {
            check_against_emulation(
                kernel,
                emulation,
                &layer,
                &format!("{} {what}", kernel.name()),
            );
        }
    }
}

/// Layouts and element types a bf16 kernel does not take run its lane kernel, bit for bit.
#[test]
fn bf16_kernels_fall_back_to_their_lane_kernel_elsewhere() {
    for (kernel, _, lanes, seed) in supported_bf16_kernels() {
        let mut rng = Rng(seed ^ 0xfa11);
        for (rows, cols, blocksize) in [(4, 128, 32), (5, 100, 64), (3, 96, 64), (2, 33, 128)] {
            let layer =
                Layer::<bf16>::random(&mut rng, rows, cols, blocksize, QuantType::Nf4, true, 2);
            assert_eq!(
                bits(&layer.run(kernel, true)),
                bits(&layer.run(lanes, true)),
                "{kernel:?}"
            );
        }
        for quant_type in QuantType::ALL {
            let layer = Layer::<f32>::random(&mut rng, 4, 128, 64, quant_type, true, 2);
            assert_eq!(
                bits(&layer.run(kernel, true)),
                bits(&layer.run(lanes, true)),
                "{kernel:?}"
            );
            let layer = Layer::<f16>::random(&mut rng, 4, 128, 64, quant_type, true, 2);
            assert_eq!(
                bits(&layer.run(kernel, true)),
                bits(&layer.run(lanes, true)),
                "{kernel:?}"
            );
        }
    }
}

#[test]
fn every_kernel_is_independent_of_the_thread_count() {
    let mut rng = Rng(77);
    // Large enough to be split into parallel tasks (over 2^20 weight elements).
    let layer = Layer::<bf16>::random(&mut rng, 600, 2048, 64, QuantType::Nf4, true, 5);
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let many = rayon::ThreadPoolBuilder::new()
        .num_threads(7)
        .build()
        .unwrap();
    for kernel in supported_kernels() {
        let default = layer.run(kernel, true);
        assert_eq!(bits(&layer.run(kernel, true)), bits(&default));
        assert_eq!(
            bits(&single.install(|| layer.run(kernel, true))),
            bits(&default)
        );
        assert_eq!(
            bits(&many.install(|| layer.run(kernel, true))),
            bits(&default)
        );
    }
}

#[test]
fn batch_sizes_are_validated() {
    let blocksize = Blocksize::new(64).unwrap();
    let (rows, cols) = (3, 70);
    let packed = vec![0x12u8; 105];
    let absmax = vec![1.0f32; 4];
    let shape = [rows, cols];
    let weight = PackedView::new(
        &packed,
        Scales::Plain(&absmax),
        QuantType::Nf4,
        blocksize,
        &shape,
    )
    .unwrap();
    let x = vec![1.0f32; (GEMV_MAX_BATCH + 1) * cols];
    let mut out = vec![0.0f32; (GEMV_MAX_BATCH + 1) * rows];
    assert_eq!(
        gemv_4bit(&weight, &x, None, &mut out),
        Err(QuantError::GemvBatch {
            rows: GEMV_MAX_BATCH + 1,
            max: GEMV_MAX_BATCH
        })
    );
    assert_eq!(
        gemv_4bit(&weight, &x[..2 * cols + 1], None, &mut out[..2 * rows]),
        Err(QuantError::LengthMismatch {
            what: "x input",
            expected: 2 * cols,
            actual: 2 * cols + 1
        })
    );
    assert_eq!(
        gemv_4bit(&weight, &x[..2 * cols], None, &mut out[..rows]),
        Err(QuantError::LengthMismatch {
            what: "out",
            expected: 2 * rows,
            actual: rows
        })
    );
    assert_eq!(
        gemv_4bit(&weight, &x[..8 * cols], None, &mut out[..8 * rows]),
        Ok(())
    );
    // Eight identical input rows: eight identical output rows.
    assert!((0..8 * rows).all(|i| out[i] == out[i % rows]));
}
