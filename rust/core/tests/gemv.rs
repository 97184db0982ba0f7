//! Holds the fused batch-1 `gemv_4bit` to dequantize-then-dot: every kernel against a
//! float64 dot product of the weight as `dequantize_4bit_reference` decodes it, within the
//! float32 summation error bound, on awkward shapes (blocks straddling rows, odd element
//! counts, one row, one column), every blocksize, both quant types and the three element
//! types; the kernels against each other bit for bit; and the input validation.

use half::{bf16, f16};
use qlorakit_core::{
    dequantize_4bit_reference, gemv_4bit, gemv_4bit_with, Blocksize, Element, GemvKernel,
    PackedView, QuantError, QuantType, Scales, BLOCKSIZES,
};

mod common;

use common::Rng;

const QUANT_TYPES: [QuantType; 2] = QuantType::ALL;
/// The lane-order kernels (one summation order); one the CPU lacks runs the portable one.
const KERNELS: [GemvKernel; 3] = [GemvKernel::Portable, GemvKernel::Avx2, GemvKernel::Avx512];
/// Unit roundoff of float32.
const F32_UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

impl Rng {
    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Unit roundoff of the element type (`2^-p`, p significand bits) and the largest
/// absolute rounding error in its subnormal range (half its smallest spacing).
fn rounding_of<T: Element>() -> (f64, f64) {
    match T::NAME {
        "bfloat16" => (2f64.powi(-8), 2f64.powi(-134)),
        "float16" => (2f64.powi(-11), 2f64.powi(-25)),
        _ => (F32_UNIT_ROUNDOFF, 2f64.powi(-150)),
    }
}

/// A random layer: packed codes (every nibble, padding included, random), block scales
/// spanning four orders of magnitude, an input row and a bias.
struct Case<T> {
    rows: usize,
    cols: usize,
    blocksize: Blocksize,
    quant_type: QuantType,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    x: Vec<T>,
    bias: Vec<T>,
}

impl<T: Element> Case<T> {
    fn random(
        rng: &mut Rng,
        rows: usize,
        cols: usize,
        blocksize: usize,
        quant_type: QuantType,
    ) -> Self {
        let blocksize = Blocksize::new(blocksize).unwrap();
        let numel = rows * cols;
        let packed = (0..numel.div_ceil(2))
            .map(|_| rng.next_u64() as u8)
            .collect();
        let absmax = (0..blocksize.blocks(numel))
            .map(|_| 10f64.powf(rng.uniform(-3.0, 1.0)) as f32)
            .collect();
        // One input in eight exactly zero (as in sparse activations).
        let x = (0..cols)
            .map(|_| match rng.below(8) {
                0 => T::from_f32(0.0),
                _ => T::from_f32(rng.uniform(-4.0, 4.0) as f32),
            })
            .collect();
        let bias = (0..rows)
            .map(|_| T::from_f32(rng.uniform(-1.0, 1.0) as f32))
            .collect();
        Case {
            rows,
            cols,
            blocksize,
            quant_type,
            packed,
            absmax,
            x,
            bias,
        }
    }

    fn run(&self, kernel: GemvKernel, with_bias: bool) -> Vec<T> {
        let mut out = vec![T::from_f32(f32::NAN); self.rows];
        let bias = with_bias.then_some(&self.bias[..]);
        let shape = [self.rows, self.cols];
        let weight = PackedView::new(
            &self.packed,
            Scales::Plain(&self.absmax),
            self.quant_type,
            self.blocksize,
            &shape,
        )
        .unwrap();
        gemv_4bit_with(kernel, &weight, &self.x, bias, &mut out).unwrap();
        out
    }

    /// Per row: the float64 dot product of the dequantized weight (in `T`, as
    /// `dequantize_4bit_reference` gives it) with x, plus the bias; and the bound on how
    /// far a float32 evaluation rounded to `T` may be from it. A float32 dot product of
    /// n terms, in any order, is within `gamma_n * sum |w x|` of the exact value
    /// (gamma_n = n u / (1 - n u), u = 2^-24; the bias is one more term); rounding to `T`
    /// then adds at most `u_T |value| + eta_T`.
    fn reference(&self, with_bias: bool) -> Vec<(f64, f64)> {
        let mut weight = vec![T::from_f32(0.0); self.rows * self.cols];
        dequantize_4bit_reference(
            &self.packed,
            &self.absmax,
            self.quant_type,
            self.blocksize,
            &mut weight,
        )
        .unwrap();
        let n = (self.cols + usize::from(with_bias)) as f64;
        let gamma = n * F32_UNIT_ROUNDOFF / (1.0 - n * F32_UNIT_ROUNDOFF);
        let (unit_t, eta_t) = rounding_of::<T>();
        weight
            .chunks(self.cols)
            .zip(&self.bias)
            .map(|(row, &bias)| {
                let mut exact = 0.0f64;
                let mut magnitude = 0.0f64;
                for (w, x) in row.iter().zip(&self.x) {
                    let product = f64::from(w.to_f32()) * f64::from(x.to_f32());
                    exact += product;
                    magnitude += product.abs();
                }
                if with_bias {
                    exact += f64::from(bias.to_f32());
                    magnitude += f64::from(bias.to_f32()).abs();
                }
                // The float64 sum itself errs by up to about cols * 2^-53 * magnitude,
                // a 2^-29 fraction of the float32 allowance: the factor covers it.
                let summation = gamma * magnitude * (1.0 + 1e-6);
                let bound = summation + unit_t * (exact.abs() + summation) + eta_t;
                (exact, bound)
            })
            .collect()
    }

    fn check(&self, with_bias: bool) {
        let reference = self.reference(with_bias);
        let mut results = Vec::new();
        for kernel in KERNELS {
            let out = self.run(kernel, with_bias);
            for (row, (got, (exact, bound))) in out.iter().zip(&reference).enumerate() {
                let err = (f64::from(got.to_f32()) - exact).abs();
                assert!(
                    err <= *bound,
                    "{} {kernel:?} {:?} bs {} [{}x{}] bias {with_bias} row {row}: got {}, \
                     exact {exact}, error {err:e} > bound {bound:e}",
                    T::NAME,
                    self.quant_type,
                    self.blocksize.get(),
                    self.rows,
                    self.cols,
                    got.to_f32(),
                );
            }
            results.push(out.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>());
        }
        // The kernels follow the same summation order: identical bits, not just close.
        for (kernel, result) in KERNELS.iter().zip(&results).skip(1) {
            assert_eq!(
                &results[0],
                result,
                "{} {:?} bs {} [{}x{}]: portable and {kernel:?} kernels differ",
                T::NAME,
                self.quant_type,
                self.blocksize.get(),
                self.rows,
                self.cols
            );
        }
    }
}

/// Shapes that stress the piece splitting: blocks straddling rows, rows starting on a low
/// nibble (odd `cols`), partial groups, a single row or column, several parallel tasks;
/// and rows of whole groups of 16 (the AVX2 kernel's layouts), blocks straddling them too.
fn shapes(blocksize: usize) -> Vec<(usize, usize)> {
    let mut shapes = vec![
        (1, 1),
        (1, 7),
        (7, 1),
        (3, 5),
        (5, 33),
        (2, blocksize),
        (3, blocksize + 1),
        (5, blocksize - 1),
        (3, 2 * blocksize + 17),
        (4, 3 * blocksize - 5),
        (9, 255),
        (1, 4097),
        (33, 64),
        (7, 48),
        (6, 96),
        (3, 2 * blocksize),
        (5, 4 * blocksize + 16),
    ];
    if !cfg!(debug_assertions) {
        // More than one parallel task (65536 elements each).
        shapes.extend([(40, 2000), (129, 1023), (24, 4096), (70, 1024)]);
    }
    shapes
}

fn check_all<T: Element>(salt: u64) {
    let mut rng = Rng(0x5eed_0000 ^ salt);
    for quant_type in QUANT_TYPES {
        for blocksize in BLOCKSIZES {
            for (rows, cols) in shapes(blocksize) {
                let case = Case::<T>::random(&mut rng, rows, cols, blocksize, quant_type);
                case.check(false);
                case.check(true);
            }
        }
    }
}

#[test]
fn gemv_matches_dequantize_then_dot_f32() {
    check_all::<f32>(1);
}

#[test]
fn gemv_matches_dequantize_then_dot_bf16() {
    check_all::<bf16>(2);
}

#[test]
fn gemv_matches_dequantize_then_dot_f16() {
    check_all::<f16>(3);
}

#[test]
fn gemv_is_deterministic_and_independent_of_the_thread_count() {
    let mut rng = Rng(7);
    for cols in [1000, 1024] {
        let case = Case::<bf16>::random(&mut rng, 300, cols, 64, QuantType::Nf4);
        let default = case.run(GemvKernel::best(), true);
        assert_eq!(case.run(GemvKernel::best(), true), default);
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| case.run(GemvKernel::best(), true));
        assert_eq!(single, default);
    }
}

#[test]
fn gemv_propagates_non_finite_inputs() {
    let mut rng = Rng(11);
    // 130 columns (portable layouts) and 128 (whole groups: the AVX2 kernel's too).
    for cols in [130, 128] {
        let mut case = Case::<f32>::random(&mut rng, 6, cols, 64, QuantType::Nf4);
        case.x[77] = f32::NAN;
        for kernel in KERNELS {
            assert!(case.run(kernel, false).iter().all(|v| v.is_nan()));
        }
        case.x[77] = 1.0;
        case.absmax[1] = f32::INFINITY; // block 1 lies in row 0 (elements 64..128)
        for kernel in KERNELS {
            let out = case.run(kernel, false);
            assert!(!out[0].is_finite(), "{kernel:?}");
            assert!(out[2..].iter().all(|v| v.is_finite()), "{kernel:?}");
        }
    }
}

#[test]
fn gemv_rejects_bad_lengths() {
    let blocksize = Blocksize::new(64).unwrap();
    let (rows, cols) = (3, 70); // 210 elements: 105 bytes, 4 blocks
    let packed = vec![0x12u8; 105];
    let absmax = vec![1.0f32; 4];
    let x = vec![1.0f32; cols];
    let bias = vec![0.0f32; rows];
    let mut out = vec![0.0f32; rows];
    let nf4 = QuantType::Nf4;
    let mismatch = |what, expected, actual| QuantError::LengthMismatch {
        what,
        expected,
        actual,
    };
    let call = |packed: &[u8], absmax: &[f32], rows, cols, x: &[f32], bias, out: &mut [f32]| {
        let shape = [rows, cols];
        let weight = PackedView::new(packed, Scales::Plain(absmax), nf4, blocksize, &shape)?;
        gemv_4bit(&weight, x, bias, out)
    };
    assert_eq!(
        call(&packed, &absmax, rows, cols, &x, Some(&bias), &mut out),
        Ok(())
    );
    assert_eq!(
        call(&packed[1..], &absmax, rows, cols, &x, None, &mut out),
        Err(mismatch("packed input", 105, 104))
    );
    assert_eq!(
        call(&packed, &absmax[1..], rows, cols, &x, None, &mut out),
        Err(mismatch("absmax input", 4, 3))
    );
    assert_eq!(
        call(&packed, &absmax, rows, cols, &x[1..], None, &mut out),
        Err(mismatch("x input", 70, 69))
    );
    assert_eq!(
        call(&packed, &absmax, rows, cols, &x, Some(&bias[1..]), &mut out),
        Err(mismatch("bias input", 3, 2))
    );
    assert_eq!(
        call(&packed, &absmax, rows, cols, &x, None, &mut out[1..]),
        Err(mismatch("out", 3, 2))
    );
    assert_eq!(
        call(&packed, &absmax, 0, cols, &x, None, &mut []),
        Err(QuantError::Empty)
    );
    assert_eq!(
        call(&packed, &absmax, rows, 0, &[], None, &mut out),
        Err(QuantError::Empty)
    );
    // rows * cols overflows: refused by the length check, no panic.
    assert!(matches!(
        call(&packed, &absmax, usize::MAX, cols, &x, None, &mut out),
        Err(QuantError::LengthMismatch {
            what: "packed input",
            ..
        })
    ));
}
