//! An owned packed tensor: codes plus (optionally double-quantized) block scales.

use crate::codebook::QuantType;
use crate::dequantize::dequantize_4bit;
use crate::double_quant::{dequantize_absmax, double_quantize};
use crate::element::Element;
use crate::error::Result;
use crate::layout::{nested_blocks, packed_len, Blocksize};
use crate::quantize::quantize_4bit;

/// The block scales of a packed tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One float32 absmax per block.
    Plain(Vec<f32>),
    /// Double-quantized: one 8-bit code per block, a float32 scale per 256 blocks,
    /// and the offset (mean of the original absmax).
    Nested {
        codes: Vec<u8>,
        scales: Vec<f32>,
        offset: f32,
    },
}

impl Absmax {
    /// The float32 absmax as the decoder sees it.
    pub fn decode(&self) -> Result<Vec<f32>> {
        match self {
            Absmax::Plain(absmax) => Ok(absmax.clone()),
            Absmax::Nested {
                codes,
                scales,
                offset,
            } => {
                let mut absmax = vec![0.0; codes.len()];
                dequantize_absmax(codes, scales, *offset, &mut absmax)?;
                Ok(absmax)
            }
        }
    }
}

/// A 4-bit quantized tensor (flattened; the caller keeps the shape).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedTensor {
    pub quant_type: QuantType,
    pub blocksize: Blocksize,
    pub numel: usize,
    /// Two codes per byte, first element in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl PackedTensor {
    /// Quantizes `input`, double-quantizing the scales when `double_quant` is set.
    pub fn quantize<T: Element>(
        input: &[T],
        quant_type: QuantType,
        blocksize: Blocksize,
        double_quant: bool,
    ) -> Result<Self> {
        let mut packed = vec![0u8; packed_len(input.len())];
        let mut absmax = vec![0.0f32; blocksize.blocks(input.len())];
        quantize_4bit(input, quant_type, blocksize, &mut packed, &mut absmax)?;
        let absmax = if double_quant {
            let mut codes = vec![0u8; absmax.len()];
            let mut scales = vec![0.0f32; nested_blocks(absmax.len())];
            let offset = double_quantize(&absmax, &mut codes, &mut scales)?;
            Absmax::Nested {
                codes,
                scales,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(PackedTensor {
            quant_type,
            blocksize,
            numel: input.len(),
            packed,
            absmax,
        })
    }

    /// Dequantizes into `out` (length `numel`).
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        let absmax = self.absmax.decode()?;
        dequantize_4bit(&self.packed, &absmax, self.quant_type, self.blocksize, out)
    }

    /// Dequantizes into a new vector.
    pub fn dequantize<T: Element + Default>(&self) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.numel];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }
}
