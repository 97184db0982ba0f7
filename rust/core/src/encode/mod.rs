//! Encoders: turn a block of float32 values into packed 4-bit codes given the block's
//! reciprocal scale — the innermost loop of quantization.
//!
//! Each encoder computes, for every value `x`, the code of `clamp(x * inverse, -1, 1)`
//! (see [`Codebook::code_of`]) and packs two codes per byte, first in the high nibble.
//! The portable encoder is plain Rust; the x86-64 ones use explicit AVX-512 / AVX2:
//! a branch-free 4-step binary search over the 15 bounds held in one vector register
//! (`permutexvar`), then a register lookup from sorted rank to code.

use crate::codebook::Codebook;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// Values an encoder consumes per step; every full block is a multiple of it.
pub const GROUP: usize = 16;

/// An implementation of the block encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoder {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 (8 lanes).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL (16 lanes).
    Avx512,
}

impl Encoder {
    /// The fastest encoder the running CPU supports.
    pub fn best() -> Encoder {
        Self::available()
            .last()
            .copied()
            .unwrap_or(Encoder::Portable)
    }

    /// Every encoder the running CPU supports, slowest first.
    pub fn available() -> Vec<Encoder> {
        [Encoder::Portable, Encoder::Avx2, Encoder::Avx512]
            .into_iter()
            .filter(|encoder| encoder.is_supported())
            .collect()
    }

    /// Whether the running CPU can use this encoder.
    pub fn is_supported(self) -> bool {
        match self {
            Encoder::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Encoder::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Encoder::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Encodes `values` (length a multiple of [`GROUP`]) into `packed` (half as long).
    ///
    /// An encoder the CPU lacks falls back to the portable one, so this is always safe.
    /// Extra values past the last whole group (there are none in a full block) are not
    /// encoded.
    #[inline]
    pub fn encode(self, values: &[f32], inverse: f32, book: &Codebook, packed: &mut [u8]) {
        let groups = (values.len() / GROUP).min(packed.len() / (GROUP / 2));
        let values = &values[..groups * GROUP];
        let packed = &mut packed[..groups * GROUP / 2];
        match self {
            #[cfg(target_arch = "x86_64")]
            Encoder::Avx512 if self.is_supported() => {
                // SAFETY: the CPU has AVX-512 F/BW/VL (checked) and the slices hold
                // whole groups with two values per output byte.
                unsafe { avx512::encode(values, inverse, book, packed) }
            }
            #[cfg(target_arch = "x86_64")]
            Encoder::Avx2 if self.is_supported() => {
                // SAFETY: the CPU has AVX2 (checked); slices as above.
                unsafe { avx2::encode(values, inverse, book, packed) }
            }
            _ => encode_portable(values, inverse, book, packed),
        }
    }
}

/// Portable encoder: the comparisons against all 15 bounds, summed into the code.
#[inline(always)]
pub fn encode_portable(values: &[f32], inverse: f32, book: &Codebook, packed: &mut [u8]) {
    let first_code = u32::from(book.rank_to_code[0]);
    let steps = book.code_steps.map(u32::from);
    for (group, bytes) in values
        .chunks_exact(GROUP)
        .zip(packed.chunks_exact_mut(GROUP / 2))
    {
        let mut scaled = [0.0f32; GROUP];
        for (s, &x) in scaled.iter_mut().zip(group) {
            *s = (x * inverse).clamp(-1.0, 1.0);
        }
        // code = first code + the steps of every bound below s (mod 16): the bounds are
        // ascending, so this walks the sorted table without a lookup per element.
        let mut codes = [first_code; GROUP];
        for (&bound, &step) in book.bounds.iter().zip(&steps) {
            for (code, &s) in codes.iter_mut().zip(&scaled) {
                *code += if s > bound { step } else { 0 };
            }
        }
        for (byte, pair) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
            *byte = (((pair[0] & 0xf) << 4) | (pair[1] & 0xf)) as u8;
        }
    }
}

/// The 15 bounds padded to 16 with +inf (never below a value), for register lookups.
#[cfg(target_arch = "x86_64")]
fn padded_bounds(book: &Codebook) -> [f32; 16] {
    std::array::from_fn(|r| book.bounds.get(r).copied().unwrap_or(f32::INFINITY))
}

/// The rank-to-code table widened to 32-bit lanes.
#[cfg(target_arch = "x86_64")]
fn rank_codes(book: &Codebook) -> [i32; 16] {
    book.rank_to_code.map(i32::from)
}
