//! The moments kernels behind scale search: every encoder returns bit-identical sums (the
//! canonical lane order) and the same codes as `Encoder::encode`, so searched scales do
//! not depend on the CPU; and the sums agree with a float64 evaluation.

mod common;

use common::Rng;
use qlorakit_core::encode::{Moments, MOMENT_LANES};
use qlorakit_core::{Encoder, QuantType};

impl Rng {
    /// Roughly normal values with occasional outliers, like trained weights.
    fn weight(&mut self) -> f32 {
        let u = (0..4)
            .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 2.0;
        if self.below(50) == 0 {
            u * 8.0
        } else {
            u
        }
    }
}

/// Float64 sums of the same codes (decoded from the packed bytes).
fn float64_moments(
    values: &[f32],
    weights: Option<&[f32]>,
    packed: &[u8],
    quant_type: QuantType,
) -> [f64; 3] {
    let book = quant_type.codebook();
    let mut sums = [0.0f64; 3];
    for (i, &x) in values.iter().enumerate() {
        let nibble = if i % 2 == 0 {
            packed[i / 2] >> 4
        } else {
            packed[i / 2] & 0xf
        };
        let c = f64::from(book.values[usize::from(nibble)]);
        let w = weights.map_or(1.0, |w| f64::from(w[i]));
        let x = f64::from(x);
        sums[0] += w * x * c;
        sums[1] += w * c * c;
        sums[2] += w * x * x;
    }
    sums
}

#[test]
fn every_encoder_gives_identical_moments_and_codes() {
    let mut rng = Rng(41);
    let encoders = Encoder::available();
    println!("encoders on this CPU: {encoders:?}");
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        let book = quant_type.codebook();
        for &len in &[16usize, 32, 64, 256, 4096] {
            for trial in 0..40 {
                let values: Vec<f32> = (0..len).map(|_| rng.weight()).collect();
                let weights: Vec<f32> = (0..len)
                    .map(|_| (rng.next_u64() % 1000) as f32 / 97.0)
                    .collect();
                let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // absmax, clipping candidates, and a scale larger than absmax.
                let scale = absmax * [1.0, 0.95, 0.8, 0.5, 1.3][trial % 5];
                let inverse = 1.0 / scale;
                let mut expected_codes = vec![0u8; len / 2];
                Encoder::Portable.encode(&values, inverse, book, &mut expected_codes);
                for weighted in [false, true] {
                    let w = weighted.then_some(&weights[..]);
                    let mut reference: Option<Moments> = None;
                    for &encoder in &encoders {
                        let mut codes = vec![0u8; len / 2];
                        let packed =
                            encoder.encode_moments(&values, w, inverse, book, Some(&mut codes));
                        let unpacked = encoder.encode_moments(&values, w, inverse, book, None);
                        assert_eq!(
                            codes, expected_codes,
                            "{encoder:?} {quant_type:?} len {len}"
                        );
                        let bits =
                            |m: Moments| [m.cross.to_bits(), m.energy.to_bits(), m.norm.to_bits()];
                        assert_eq!(bits(packed), bits(unpacked), "{encoder:?}");
                        if let Some(r) = reference {
                            assert_eq!(
                                bits(packed),
                                bits(r),
                                "{encoder:?} vs portable, len {len} w {weighted}"
                            );
                        }
                        reference = Some(packed);
                    }
                    let m = reference.unwrap_or_default();
                    let exact = float64_moments(&values, w, &expected_codes, quant_type);
                    for (got, want) in [m.cross, m.energy, m.norm].iter().zip(exact) {
                        let tolerance = 1e-5 * exact[2].max(exact[1]).max(1.0);
                        assert!(
                            (f64::from(*got) - want).abs() <= tolerance,
                            "{got} vs {want}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(MOMENT_LANES, 16);
}

#[test]
fn all_ones_weights_equal_unweighted_sums() {
    let mut rng = Rng(5);
    let values: Vec<f32> = (0..1024).map(|_| rng.weight()).collect();
    let ones = vec![1.0f32; values.len()];
    for encoder in Encoder::available() {
        let book = QuantType::Nf4.codebook();
        let plain = encoder.encode_moments(&values, None, 0.3, book, None);
        let weighted = encoder.encode_moments(&values, Some(&ones), 0.3, book, None);
        assert_eq!(plain, weighted, "{encoder:?}");
    }
}
