//! Block layout of the packed format: allowed blocksizes and buffer lengths.

use crate::error::{QuantError, Result};

/// 4-bit blocksizes bitsandbytes accepts.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Default 4-bit blocksize (transformers' `BitsAndBytesConfig` always uses it).
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// Blocksize of the second-level (double) quantization of the block scales; fixed.
pub const NESTED_BLOCKSIZE: usize = 256;
/// Floor applied to a block's absmax before taking its reciprocal (bitsandbytes'
/// `absmax.clamp(min=1e-38)`): an all-zero block scales by 1e38 and codes as 0.0.
pub const ABSMAX_FLOOR: f32 = 1e-38;

/// A validated 4-bit blocksize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blocksize(usize);

impl Blocksize {
    /// Accepts only the sizes in [`BLOCKSIZES`].
    pub fn new(size: usize) -> Result<Self> {
        Self::from_signed(i64::try_from(size).unwrap_or(i64::MAX))
    }

    /// [`Blocksize::new`] of a signed size (as a binding receives it).
    pub fn from_signed(size: i64) -> Result<Self> {
        match usize::try_from(size) {
            Ok(size) if BLOCKSIZES.contains(&size) => Ok(Blocksize(size)),
            _ => Err(QuantError::UnsupportedBlocksize(size)),
        }
    }

    /// Number of elements per block.
    pub fn get(self) -> usize {
        self.0
    }

    /// Number of blocks (the last may be partial) covering `numel` elements.
    pub fn blocks(self, numel: usize) -> usize {
        numel.div_ceil(self.0)
    }
}

impl Default for Blocksize {
    fn default() -> Self {
        Blocksize(DEFAULT_BLOCKSIZE)
    }
}

/// Bytes of packed 4-bit codes for `numel` elements (two per byte, an odd count padded).
pub fn packed_len(numel: usize) -> usize {
    numel.div_ceil(2)
}

/// Number of second-level scales for `blocks` first-level blocks.
pub fn nested_blocks(blocks: usize) -> usize {
    blocks.div_ceil(NESTED_BLOCKSIZE)
}

pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(QuantError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Elements per parallel task: a whole number of blocks, about 32K elements, so tasks
/// are large enough to amortize scheduling and small enough to balance across threads.
pub(crate) fn task_blocks(blocksize: usize) -> usize {
    (32_768 / blocksize).max(1)
}
