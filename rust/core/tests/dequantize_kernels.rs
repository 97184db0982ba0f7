//! `dequantize_4bit` (AVX-512 kernel where the CPU has it, the portable loop for small or
//! partial blocks) against `dequantize_4bit_reference`, bit for bit, with scales over the
//! whole float32 range: outputs that round to subnormals, overflow to infinity or are
//! exactly zero, every blocksize, lengths with partial blocks and odd element counts, the
//! three element types.

use half::{bf16, f16};
use qlorakit_core::{
    dequantize_4bit, dequantize_4bit_reference, Blocksize, Element, QuantType, BLOCKSIZES,
};

mod common;

use common::Rng;

fn check<T: Element + PartialEq>(salt: u64) {
    let mut rng = Rng(0xdec0_de00 ^ salt);
    for quant_type in QuantType::ALL {
        for blocksize in BLOCKSIZES {
            let bs = Blocksize::new(blocksize).unwrap();
            for numel in [
                1,
                blocksize - 1,
                blocksize,
                3 * blocksize + 1,
                40 * blocksize + 7,
                70_001,
            ] {
                let packed: Vec<u8> = (0..numel.div_ceil(2))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                let absmax: Vec<f32> = (0..bs.blocks(numel))
                    .map(|_| {
                        // Any finite exponent: subnormal, tiny, ordinary and huge scales.
                        let exponent = (rng.next_u64() % 254) as u32;
                        let mantissa = (rng.next_u64() as u32) & 0x7f_ffff;
                        match rng.below(10) {
                            0 => 0.0,
                            1 => f32::from_bits(mantissa), // a subnormal scale
                            _ => f32::from_bits((exponent << 23) | mantissa),
                        }
                    })
                    .collect();
                let mut want = vec![T::from_f32(0.0); numel];
                dequantize_4bit_reference(&packed, &absmax, quant_type, bs, &mut want).unwrap();
                let mut got = vec![T::from_f32(f32::NAN); numel];
                dequantize_4bit(&packed, &absmax, quant_type, bs, &mut got).unwrap();
                let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{} {quant_type:?} bs {blocksize} numel {numel}",
                    T::NAME
                );
            }
        }
    }
}

#[test]
fn dequantize_equals_the_reference_bit_for_bit_f32() {
    check::<f32>(1);
}

#[test]
fn dequantize_equals_the_reference_bit_for_bit_bf16() {
    check::<bf16>(2);
}

#[test]
fn dequantize_equals_the_reference_bit_for_bit_f16() {
    check::<f16>(3);
}
