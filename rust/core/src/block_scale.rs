//! Per-block scale lookup for the decoding loops: plain float32 absmax read as they are,
//! double-quantized scales decoded inline, one block at a time, with the same float32
//! operations as [`crate::dequantize_absmax`] (`map[code] * scale` rounded, then
//! `+ offset` rounded; never a fused multiply-add), so a kernel that decodes inline is
//! bit-identical to one that decodes the whole absmax first, without allocating it.

use crate::dynamic_map::DYNAMIC_MAP_BITS;
use crate::layout::NESTED_BLOCKSIZE;
use crate::packed::{BlockScales, Scales};

/// The signed dynamic map as float32, built at compile time.
static DYNAMIC_MAP: [f32; 256] = {
    let mut map = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        map[i] = f32::from_bits(DYNAMIC_MAP_BITS[i]);
        i += 1;
    }
    map
};

/// `log2(NESTED_BLOCKSIZE)`: the nested scale of block `b` is `scales[b >> NESTED_SHIFT]`.
const NESTED_SHIFT: u32 = NESTED_BLOCKSIZE.trailing_zeros();

/// Reads the float32 scale of a block. Built from [`Scales`] whose lengths were checked
/// against the block count (as [`crate::PackedView::new`] does); a block index past them
/// panics (an indexing bug, not an input error).
#[derive(Debug, Clone, Copy)]
pub(crate) enum BlockScale<'a> {
    Plain(&'a [f32]),
    Nested {
        codes: &'a [u8],
        scales: &'a [f32],
        offset: f32,
    },
}

impl<'a> BlockScale<'a> {
    pub(crate) fn new(scales: Scales<'a>) -> Self {
        match scales {
            BlockScales::Plain(absmax) => BlockScale::Plain(absmax),
            BlockScales::Nested {
                codes,
                scales,
                offset,
            } => BlockScale::Nested {
                codes,
                scales,
                offset,
            },
        }
    }

    /// The decoded float32 absmax of block `block`.
    #[inline(always)]
    pub(crate) fn get(&self, block: usize) -> f32 {
        match *self {
            BlockScale::Plain(absmax) => absmax[block],
            BlockScale::Nested {
                codes,
                scales,
                offset,
            } => {
                let product =
                    DYNAMIC_MAP[usize::from(codes[block])] * scales[block >> NESTED_SHIFT];
                product + offset
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::double_quant::dequantize_absmax;
    use crate::dynamic_map::dynamic_map;

    #[test]
    fn inline_decoding_equals_dequantize_absmax() {
        assert_eq!(DYNAMIC_MAP, dynamic_map());
        let blocks = 3 * NESTED_BLOCKSIZE + 17;
        let codes: Vec<u8> = (0..blocks).map(|i| (i * 37 % 256) as u8).collect();
        let scales = [0.37f32, 1.0e-3, 17.5, 3.0e-7];
        for offset in [0.0f32, 0.125, -3.3e-3, 1.0e5] {
            let mut decoded = vec![0.0f32; blocks];
            dequantize_absmax(&codes, &scales, offset, &mut decoded).unwrap();
            let reader = BlockScale::new(BlockScales::Nested {
                codes: &codes,
                scales: &scales,
                offset,
            });
            for (block, want) in decoded.iter().enumerate() {
                assert_eq!(reader.get(block).to_bits(), want.to_bits(), "block {block}");
            }
        }
    }
}
