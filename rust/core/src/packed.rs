//! The packed 4-bit tensor: codes plus plain or double-quantized block scales.
//!
//! [`PackedView`] borrows one (what dequantize, gemv and the checkpoint writer read);
//! [`PackedTensor`] owns one. Their scales are one enum, [`BlockScales`], generic over who
//! holds the buffers: [`Scales`] borrows them, [`ScalesMut`] is written by a quantizer
//! (scale search), [`Absmax`] owns them.

use std::borrow::Cow;

use crate::codebook::QuantType;
use crate::dequantize::dequantize_4bit_scaled;
use crate::double_quant::{dequantize_absmax, double_quantize};
use crate::element::Element;
use crate::error::{QuantError, Result};
use crate::layout::{check_len, nested_blocks, packed_len, Blocksize};
use crate::quantize::quantize_4bit;

/// The block scales of a packed tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BlockScales<F, C> {
    /// One float32 absmax per block.
    Plain(F),
    /// Double-quantized: one 8-bit code per block, a float32 scale per
    /// [`crate::NESTED_BLOCKSIZE`] blocks, and the offset (mean of the original absmax).
    Nested { codes: C, scales: F, offset: f32 },
}

/// Borrowed block scales.
pub type Scales<'a> = BlockScales<&'a [f32], &'a [u8]>;
/// Block scales a quantizer writes (the offset included).
pub type ScalesMut<'a> = BlockScales<&'a mut [f32], &'a mut [u8]>;
/// Owned block scales.
pub type Absmax = BlockScales<Vec<f32>, Vec<u8>>;

impl<F: AsRef<[f32]>, C: AsRef<[u8]>> BlockScales<F, C> {
    /// The scales borrowed.
    pub fn view(&self) -> Scales<'_> {
        match self {
            BlockScales::Plain(absmax) => BlockScales::Plain(absmax.as_ref()),
            BlockScales::Nested {
                codes,
                scales,
                offset,
            } => BlockScales::Nested {
                codes: codes.as_ref(),
                scales: scales.as_ref(),
                offset: *offset,
            },
        }
    }

    /// Double quantization's offset (`None` for plain scales).
    pub fn offset(&self) -> Option<f32> {
        match self {
            BlockScales::Plain(_) => None,
            BlockScales::Nested { offset, .. } => Some(*offset),
        }
    }

    /// The float32 absmax as the decoder sees it, in a new vector.
    pub fn decode(&self) -> Result<Vec<f32>> {
        self.view().decoded().map(Cow::into_owned)
    }

    /// Checks the lengths for `blocks` blocks; `names`: of the absmax, nested codes and
    /// nested scales buffers, for the error.
    fn check_lengths(
        &self,
        blocks: usize,
        [absmax_name, codes_name, scales_name]: [&'static str; 3],
    ) -> Result<()> {
        match self {
            BlockScales::Plain(absmax) => check_len(absmax_name, blocks, absmax.as_ref().len()),
            BlockScales::Nested { codes, scales, .. } => {
                check_len(codes_name, blocks, codes.as_ref().len())?;
                check_len(scales_name, nested_blocks(blocks), scales.as_ref().len())
            }
        }
    }
}

/// Buffer names in the length errors of inputs and of outputs.
const INPUT_NAMES: [&str; 3] = ["absmax input", "nested codes input", "nested scales input"];
const OUTPUT_NAMES: [&str; 3] = [
    "absmax output",
    "nested codes output",
    "nested scales output",
];

impl<'a> Scales<'a> {
    /// Checks the input buffer lengths for `blocks` blocks (the errors name the buffer).
    pub fn check(&self, blocks: usize) -> Result<()> {
        self.check_lengths(blocks, INPUT_NAMES)
    }

    /// The float32 absmax as the decoder sees it: plain scales borrowed, nested ones
    /// decoded ([`dequantize_absmax`]).
    pub fn decoded(&self) -> Result<Cow<'a, [f32]>> {
        match *self {
            BlockScales::Plain(absmax) => Ok(Cow::Borrowed(absmax)),
            BlockScales::Nested { .. } => {
                let mut absmax = Vec::new();
                self.decoded_in(&mut absmax)?;
                Ok(Cow::Owned(absmax))
            }
        }
    }

    /// [`Scales::decoded`] into a reused buffer: plain scales borrowed, nested ones
    /// decoded into `scratch`.
    pub fn decoded_in<'s>(&self, scratch: &'s mut Vec<f32>) -> Result<&'s [f32]>
    where
        'a: 's,
    {
        match *self {
            BlockScales::Plain(absmax) => Ok(absmax),
            BlockScales::Nested {
                codes,
                scales,
                offset,
            } => {
                scratch.resize(codes.len(), 0.0);
                dequantize_absmax(codes, scales, offset, scratch)?;
                Ok(scratch)
            }
        }
    }
}

impl ScalesMut<'_> {
    /// Checks the output buffer lengths for `blocks` blocks (the errors name the buffer).
    pub fn check_output(&self, blocks: usize) -> Result<()> {
        self.check_lengths(blocks, OUTPUT_NAMES)
    }

    /// Stores the float32 block scales `absmax` (double-quantizing them into the codes,
    /// nested scales and offset when nested).
    pub fn store(&mut self, absmax: &[f32]) -> Result<()> {
        match self {
            BlockScales::Plain(out) => {
                check_len("absmax output", absmax.len(), out.len())?;
                out.copy_from_slice(absmax);
            }
            BlockScales::Nested {
                codes,
                scales,
                offset,
            } => *offset = double_quantize(absmax, codes, scales)?,
        }
        Ok(())
    }
}

impl Absmax {
    /// Float32 block scales as stored: double-quantized (codes, nested scales, offset) when
    /// `double_quant` is set, else kept as they are.
    pub fn stored(absmax: Vec<f32>, double_quant: bool) -> Result<Self> {
        if !double_quant {
            return Ok(BlockScales::Plain(absmax));
        }
        let mut codes = vec![0u8; absmax.len()];
        let mut scales = vec![0.0f32; nested_blocks(absmax.len())];
        let offset = double_quantize(&absmax, &mut codes, &mut scales)?;
        Ok(BlockScales::Nested {
            codes,
            scales,
            offset,
        })
    }

    /// Zeroed scales for `blocks` blocks: double-quantized (codes, nested scales, offset 0) when
    /// `double_quant` is set, else plain float32.
    pub fn zeroed(blocks: usize, double_quant: bool) -> Self {
        if double_quant {
            BlockScales::Nested {
                codes: vec![0; blocks],
                scales: vec![0.0; nested_blocks(blocks)],
                offset: 0.0,
            }
        } else {
            BlockScales::Plain(vec![0.0; blocks])
        }
    }

    /// Lets `write` fill these scales as a quantizer writes [`ScalesMut`], keeping the offset it sets.
    pub fn write_with<R>(
        &mut self,
        write: impl FnOnce(&mut ScalesMut<'_>) -> Result<R>,
    ) -> Result<R> {
        match self {
            BlockScales::Plain(absmax) => write(&mut BlockScales::Plain(absmax.as_mut_slice())),
            BlockScales::Nested {
                codes,
                scales,
                offset,
            } => {
                let mut target = BlockScales::Nested {
                    codes: codes.as_mut_slice(),
                    scales: scales.as_mut_slice(),
                    offset: *offset,
                };
                let result = write(&mut target)?;
                *offset = target.offset().unwrap_or(*offset);
                Ok(result)
            }
        }
    }
}

/// A borrowed packed 4-bit tensor: row-major codes (two per byte, first element in the
/// high nibble), its block scales, the format and the shape. Built by [`PackedView::new`],
/// which checks the buffer lengths against the shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackedView<'a> {
    codes: &'a [u8],
    scales: Scales<'a>,
    quant_type: QuantType,
    blocksize: Blocksize,
    shape: &'a [usize],
    numel: usize,
}

impl<'a> PackedView<'a> {
    /// Checks that `codes` and `scales` hold what a tensor of `shape` needs.
    pub fn new(
        codes: &'a [u8],
        scales: Scales<'a>,
        quant_type: QuantType,
        blocksize: Blocksize,
        shape: &'a [usize],
    ) -> Result<Self> {
        // A product that overflows saturates, and then fails the length check below: no
        // slice can hold usize::MAX / 2 bytes.
        let numel = shape.iter().fold(1usize, |n, &d| n.saturating_mul(d));
        if numel == 0 {
            return Err(QuantError::Empty);
        }
        check_len("packed input", packed_len(numel), codes.len())?;
        scales.check(blocksize.blocks(numel))?;
        Ok(PackedView {
            codes,
            scales,
            quant_type,
            blocksize,
            shape,
            numel,
        })
    }

    /// The packed codes.
    pub fn codes(&self) -> &'a [u8] {
        self.codes
    }

    /// The block scales.
    pub fn scales(&self) -> Scales<'a> {
        self.scales
    }

    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    pub fn blocksize(&self) -> Blocksize {
        self.blocksize
    }

    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// `[rows, cols]` of a 2-D tensor, else [`QuantError::NotAMatrix`].
    pub fn matrix(&self) -> Result<(usize, usize)> {
        match *self.shape {
            [rows, cols] => Ok((rows, cols)),
            _ => Err(QuantError::NotAMatrix(self.shape.to_vec())),
        }
    }

    /// Dequantizes into `out` (length `numel`), as [`crate::dequantize_4bit`] does; nested
    /// scales are decoded inline ([`dequantize_4bit_scaled`]).
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        dequantize_4bit_scaled(
            self.codes,
            self.scales,
            self.quant_type,
            self.blocksize,
            out,
        )
    }
}

/// An owned packed 4-bit tensor (its shape is the flat `[numel]`).
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
        let absmax = Absmax::stored(absmax, double_quant)?;
        Ok(PackedTensor {
            quant_type,
            blocksize,
            numel: input.len(),
            packed,
            absmax,
        })
    }

    /// The tensor borrowed, with the given `shape` (its product must be `numel`).
    pub fn view<'a>(&'a self, shape: &'a [usize]) -> Result<PackedView<'a>> {
        let view = PackedView::new(
            &self.packed,
            self.absmax.view(),
            self.quant_type,
            self.blocksize,
            shape,
        )?;
        check_len("shape", self.numel, view.numel())?;
        Ok(view)
    }

    /// Dequantizes into `out` (length `numel`).
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<()> {
        let scales = self.absmax.view();
        dequantize_4bit_scaled(&self.packed, scales, self.quant_type, self.blocksize, out)
    }

    /// Dequantizes into a new vector.
    pub fn dequantize<T: Element + Default>(&self) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.numel];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }
}
