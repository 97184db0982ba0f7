//! The borrowed packed tensor, `PackedView`: its length checks against the shape, and that
//! dequantize and gemv through it (plain or double-quantized scales) give the bits of the
//! slice functions on the scales as they decode.

use half::bf16;
use qlorakit_core::{
    dequantize_4bit, dequantize_absmax, gemv_4bit, Blocksize, PackedTensor, PackedView, QuantError,
    QuantType, Scales, NESTED_BLOCKSIZE,
};

mod common;

use common::Rng;

fn mismatch(what: &'static str, expected: usize, actual: usize) -> QuantError {
    QuantError::LengthMismatch {
        what,
        expected,
        actual,
    }
}

/// `numel` float32 values in [-2, 2), one in 61 scaled up 9x so the block scales differ.
fn random_values(rng: &mut Rng, numel: usize) -> Vec<f32> {
    (0..numel)
        .map(|_| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0;
            if rng.below(61) == 0 {
                u * 9.0
            } else {
                u
            }
        })
        .collect()
}

#[test]
fn view_checks_its_buffers_against_the_shape() {
    let blocksize = Blocksize::new(64).unwrap();
    let nf4 = QuantType::Nf4;
    let shape = [3, 70]; // 210 elements: 105 bytes, 4 blocks, 1 nested block
    let packed = vec![0u8; 105];
    let absmax = vec![1.0f32; 4];
    let codes = vec![0u8; 4];
    let nested = vec![1.0f32; 1];
    let nested_scales = |codes, scales| Scales::Nested {
        codes,
        scales,
        offset: 0.5,
    };
    let view = |packed, scales, shape| PackedView::new(packed, scales, nf4, blocksize, shape);

    let plain = view(&packed, Scales::Plain(&absmax), &shape).unwrap();
    assert_eq!((plain.numel(), plain.matrix()), (210, Ok((3, 70))));
    assert!(view(&packed, nested_scales(&codes, &nested), &shape).is_ok());
    assert_eq!(
        view(&packed[1..], Scales::Plain(&absmax), &shape),
        Err(mismatch("packed input", 105, 104))
    );
    assert_eq!(
        view(&packed, Scales::Plain(&absmax[1..]), &shape),
        Err(mismatch("absmax input", 4, 3))
    );
    assert_eq!(
        view(&packed, nested_scales(&codes[1..], &nested), &shape),
        Err(mismatch("nested codes input", 4, 3))
    );
    assert_eq!(
        view(&packed, nested_scales(&codes, &[]), &shape),
        Err(mismatch("nested scales input", 1, 0))
    );
    assert_eq!(
        view(&packed, Scales::Plain(&absmax), &[3, 0]),
        Err(QuantError::Empty)
    );
    // The element count overflows: refused by the length check, no panic.
    assert!(matches!(
        view(&packed, Scales::Plain(&absmax), &[usize::MAX, 3]),
        Err(QuantError::LengthMismatch {
            what: "packed input",
            ..
        })
    ));
    // gemv needs a matrix.
    let flat = [210];
    let vector = view(&packed, Scales::Plain(&absmax), &flat).unwrap();
    let mut out = vec![0.0f32; 3];
    assert_eq!(
        gemv_4bit(&vector, &[1.0f32; 70], None, &mut out),
        Err(QuantError::NotAMatrix(vec![210]))
    );
}

#[test]
fn dequantize_and_gemv_through_the_view_match_the_slice_functions() {
    let mut rng = Rng(0x0f1e_55ed);
    for quant_type in QuantType::ALL {
        for (rows, cols, blocksize) in [(3, 70, 64), (33, 1000, 64), (300, 64, 32), (7, 513, 128)] {
            let blocksize = Blocksize::new(blocksize).unwrap();
            let values = random_values(&mut rng, rows * cols);
            let x: Vec<bf16> = random_values(&mut rng, cols)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let shape = [rows, cols];
            for double_quant in [false, true] {
                let ctx =
                    format!("{quant_type:?} [{rows}x{cols}] bs {blocksize:?} dq {double_quant}");
                let tensor =
                    PackedTensor::quantize(&values, quant_type, blocksize, double_quant).unwrap();
                let view = tensor.view(&shape).unwrap();
                let absmax = match view.scales() {
                    Scales::Plain(absmax) => absmax.to_vec(),
                    Scales::Nested {
                        codes,
                        scales,
                        offset,
                    } => {
                        assert_eq!(scales.len(), codes.len().div_ceil(NESTED_BLOCKSIZE));
                        let mut absmax = vec![0.0f32; codes.len()];
                        dequantize_absmax(codes, scales, offset, &mut absmax).unwrap();
                        absmax
                    }
                };
                assert_eq!(tensor.absmax.decode().unwrap(), absmax, "{ctx}");

                let mut through_view = vec![bf16::ZERO; rows * cols];
                let mut through_slices = vec![bf16::ZERO; rows * cols];
                view.dequantize_into(&mut through_view).unwrap();
                dequantize_4bit(
                    &tensor.packed,
                    &absmax,
                    quant_type,
                    blocksize,
                    &mut through_slices,
                )
                .unwrap();
                assert_eq!(through_view, through_slices, "{ctx}: dequantize");

                // gemv on the view equals gemv on a plain view of the decoded scales.
                let plain = PackedView::new(
                    &tensor.packed,
                    Scales::Plain(&absmax),
                    quant_type,
                    blocksize,
                    &shape,
                )
                .unwrap();
                let (mut got, mut want) = (vec![bf16::ZERO; rows], vec![bf16::ZERO; rows]);
                gemv_4bit(&view, &x, None, &mut got).unwrap();
                gemv_4bit(&plain, &x, None, &mut want).unwrap();
                let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{ctx}: gemv");
            }
        }
    }
}

#[test]
fn owned_tensor_view_needs_a_shape_of_its_element_count() {
    let values = vec![0.25f32; 130];
    let tensor =
        PackedTensor::quantize(&values, QuantType::Fp4, Blocksize::default(), true).unwrap();
    assert!(tensor.view(&[13, 10]).is_ok());
    assert_eq!(
        tensor.view(&[2, 65]).map(|v| v.shape().to_vec()),
        Ok(vec![2, 65])
    );
    assert!(tensor.view(&[12, 10]).is_err());
}
