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
            Encoder::Avx512 => crate::dispatch::has_avx512(),
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

/// Lanes of the canonical summation order of [`Moments`]: element `i` of a block adds to
/// lane `i % MOMENT_LANES`; lanes are then folded in a fixed tree. Every encoder follows
/// it (AVX-512: one register, AVX2: two, portable: an array), so the sums — and every
/// decision taken from them — do not depend on the CPU.
pub const MOMENT_LANES: usize = 16;

/// A block's reconstruction statistics for codes `c` chosen for some scale, with optional
/// per-element weights `w` (1 without): `cross = sum w x c`, `energy = sum w c^2`,
/// `norm = sum w x^2` (float32 sums in the canonical order; products not fused).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Moments {
    pub cross: f32,
    pub energy: f32,
    pub norm: f32,
}

impl Moments {
    /// Folds per-lane partial sums in the canonical tree: lanes `i` and `i + 8`, then
    /// `i + 4`, `i + 2`, `i + 1`.
    pub(crate) fn fold(lanes: [[f32; MOMENT_LANES]; 3]) -> Moments {
        let [cross, energy, norm] = lanes.map(crate::lanes::tree_sum);
        Moments {
            cross,
            energy,
            norm,
        }
    }

    /// Squared (weighted) error of the block decoded as `code * scale`.
    pub fn error_at(self, scale: f32) -> f64 {
        let s = f64::from(scale);
        f64::from(self.norm) - 2.0 * s * f64::from(self.cross) + s * s * f64::from(self.energy)
    }

    /// The least-squares scale for these codes, `cross / energy`, and how much it lowers
    /// the error below `norm` (`cross^2 / energy`); `None` when the codes carry no energy.
    pub fn best_scale(self) -> Option<(f32, f64)> {
        let scale = self.cross / self.energy;
        (self.energy > 0.0 && scale > 0.0 && scale.is_finite()).then(|| {
            let cross = f64::from(self.cross);
            (scale, cross * cross / f64::from(self.energy))
        })
    }
}

impl Encoder {
    /// Like [`Encoder::encode`] (writing the codes only when `packed` is given), and also
    /// returns the block's [`Moments`] for those codes; `weights`, if given, has one
    /// weight per value. Every encoder returns bit-identical sums.
    #[inline]
    pub fn encode_moments(
        self,
        values: &[f32],
        weights: Option<&[f32]>,
        inverse: f32,
        book: &Codebook,
        packed: Option<&mut [u8]>,
    ) -> Moments {
        let mut groups = values.len() / GROUP;
        if let Some(w) = weights {
            groups = groups.min(w.len() / GROUP);
        }
        let mut no_codes = [0u8; 0];
        let (packed, pack) = match packed {
            Some(p) => {
                groups = groups.min(p.len() / (GROUP / 2));
                (&mut p[..groups * GROUP / 2], true)
            }
            None => (&mut no_codes[..], false),
        };
        let values = &values[..groups * GROUP];
        let weighted = weights.is_some();
        let weights = weights.map_or(&[][..], |w| &w[..groups * GROUP]);
        macro_rules! run {
            ($($f:tt)*) => {
                match (weighted, pack) {
                    (false, false) => $($f)*::<false, false>(values, weights, inverse, book, packed),
                    (false, true) => $($f)*::<false, true>(values, weights, inverse, book, packed),
                    (true, false) => $($f)*::<true, false>(values, weights, inverse, book, packed),
                    (true, true) => $($f)*::<true, true>(values, weights, inverse, book, packed),
                }
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F/BW/VL checked; slices hold whole groups (two values per
            // output byte when packing, one weight per value when weighted).
            Encoder::Avx512 if self.is_supported() => unsafe { run!(avx512::encode_moments) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 checked; slices as above.
            Encoder::Avx2 if self.is_supported() => unsafe { run!(avx2::encode_moments) },
            _ => Moments::fold(run!(encode_moments_portable)),
        }
    }
}

/// Portable [`Encoder::encode_moments`]: per-element rank by comparison with every bound,
/// partial sums in the canonical lanes.
#[inline(always)]
pub fn encode_moments_portable<const WEIGHTED: bool, const PACK: bool>(
    values: &[f32],
    weights: &[f32],
    inverse: f32,
    book: &Codebook,
    packed: &mut [u8],
) -> [[f32; MOMENT_LANES]; 3] {
    let (sorted, squares) = (&book.sorted_values, &book.sorted_squares);
    let mut sums = [[0.0f32; MOMENT_LANES]; 3];
    for (g, group) in values.chunks_exact(GROUP).enumerate() {
        let mut ranks = [0usize; GROUP];
        for (lane, &x) in group.iter().enumerate() {
            let s = (x * inverse).clamp(-1.0, 1.0);
            let rank = book.bounds.iter().filter(|&&bound| s > bound).count();
            let (wx, wc2) = if WEIGHTED {
                let w = weights[g * GROUP + lane];
                (w * x, w * squares[rank])
            } else {
                (x, squares[rank])
            };
            sums[0][lane] += wx * sorted[rank];
            sums[1][lane] += wc2;
            sums[2][lane] += wx * x;
            ranks[lane] = rank;
        }
        if PACK {
            for (byte, pair) in packed[g * GROUP / 2..][..GROUP / 2]
                .iter_mut()
                .zip(ranks.chunks_exact(2))
            {
                *byte = (book.rank_to_code[pair[0]] << 4) | book.rank_to_code[pair[1]];
            }
        }
    }
    sums
}
