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
/// groups, blocks straddling rows, and rows of whole chunks of 64 (the BF16 kernel's).
const SHAPES: [(usize, usize, usize); 9] = [
    (3, 5, 32),
    (5, 33, 64),
    (4, 100, 64),
    (7, 64, 64),
    (6, 128, 64),
    (9, 192, 128),
    (3, 256, 256),
    (5, 64, 4096),
    (17, 1024, 64),
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
            let mut lanes: [f32; 16] =
                std::array::from_fn(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]));
            let mut width = 8;
            while width > 0 {
                for i in 0..width {
                    lanes[i] += lanes[i + width];
                }
                width /= 2;
            }
            let sum = bias.map_or(lanes[0], |bias| lanes[0] + bias[r].to_f32());
            out.push(bf16::from_f32(sum));
        }
    }
    out
}

/// The documented bound of the BF16 kernel against the exact dot product of the
/// dequantized (bf16) weight with x plus the bias: `gamma_n sum |t| + sum_flushed |t| +
/// cols 2^-126`, then the rounding to bf16 (`2^-8 |value|` plus half the smallest
/// subnormal).
fn bf16_bound(weight: &[f32], x: &[bf16], bias: Option<&[bf16]>, cols: usize) -> Vec<(f64, f64)> {
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
            let summation = gamma * magnitude * (1.0 + 1e-6) + flushed + cols as f64 * tiny;
            let bound = summation + 2f64.powi(-8) * (exact.abs() + summation) + 2f64.powi(-134);
            out.push((exact, bound));
        }
    }
    out
}

fn check_bf16_against_emulation(layer: &Layer<bf16>, what: &str) {
    let weight = layer.weight();
    for bias in [false, true] {
        let got = layer.run(GemvKernel::Avx512Bf16, bias);
        let b = bias.then_some(&layer.bias[..]);
        let want = emulate_bf16(&weight, &layer.x, b, layer.cols);
        assert_eq!(
            bits(&got),
            bits(&want),
            "{what} bias {bias}: kernel vs emulation"
        );
        for (i, (g, (exact, bound))) in got
            .iter()
            .zip(bf16_bound(&weight, &layer.x, b, layer.cols))
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

#[test]
fn bf16_kernel_follows_its_documented_order_and_bound() {
    if !GemvKernel::Avx512Bf16.is_supported() {
        eprintln!("skipped: no AVX512-BF16 on this CPU");
        return;
    }
    let mut rng = Rng(0xbf16);
    for quant_type in QuantType::ALL {
        for blocksize in [64, 128, 256, 1024, 4096] {
            for (rows, cols) in [(1, 64), (3, 128), (5, 192), (4, 4096), (33, 320)] {
                for batch in [1, 3, 8] {
                    let nested = rng.below(2) == 1;
                    let layer = Layer::<bf16>::random(
                        &mut rng, rows, cols, blocksize, quant_type, nested, batch,
                    );
                    let what = format!("{quant_type:?} bs {blocksize} [{rows}x{cols}] x{batch}");
                    check_bf16_against_emulation(&layer, &what);
                }
            }
        }
    }
}

/// Subnormal inputs, weights (tiny scales) and products (tiny inputs times small
/// weights) are flushed as documented, and the result stays within the bound that
/// counts the flushed terms.
#[test]
fn bf16_kernel_flushes_subnormals_as_documented() {
    if !GemvKernel::Avx512Bf16.is_supported() {
        eprintln!("skipped: no AVX512-BF16 on this CPU");
        return;
    }
    let mut rng = Rng(0xde_0a11);
    for round in 0..20 {
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
        check_bf16_against_emulation(&layer, &format!("subnormals, round {round}"));
    }
}

/// Layouts and element types the BF16 kernel does not take run the AVX-512 lane kernel.
#[test]
fn bf16_kernel_falls_back_to_avx512_elsewhere() {
    if !GemvKernel::Avx512Bf16.is_supported() {
        eprintln!("skipped: no AVX512-BF16 on this CPU");
        return;
    }
    let mut rng = Rng(0xfa11);
    for (rows, cols, blocksize) in [(4, 128, 32), (5, 100, 64), (3, 96, 64), (2, 33, 128)] {
        let layer = Layer::<bf16>::random(&mut rng, rows, cols, blocksize, QuantType::Nf4, true, 2);
        let lanes = layer.run(GemvKernel::Avx512, true);
        assert_eq!(bits(&layer.run(GemvKernel::Avx512Bf16, true)), bits(&lanes));
    }
    let layer = Layer::<f32>::random(&mut rng, 4, 128, 64, QuantType::Nf4, true, 2);
    assert_eq!(
        bits(&layer.run(GemvKernel::Avx512Bf16, true)),
        bits(&layer.run(GemvKernel::Avx512, true))
    );
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
