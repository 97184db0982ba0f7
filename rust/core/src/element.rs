//! The floating-point element types a tensor may hold (float32, bfloat16, float16):
//! exact widening to float32 and round-to-nearest-even narrowing from it.

use half::{bf16, f16};

/// A floating-point element the core reads and writes.
///
/// The conversions are written without branches or runtime feature checks so the
/// hot loops stay vectorizable.
pub trait Element: Copy + Send + Sync + 'static {
    /// Name as torch/numpy spell it (`"float32"`, `"bfloat16"`, `"float16"`).
    const NAME: &'static str;
    /// `abs_bits` at or above this value means NaN or +-Inf.
    const NON_FINITE_ABS_BITS: u32;

    /// The bit pattern of `|self|`, as an unsigned integer. For non-negative floats the
    /// integer order equals the float order, so a maximum over these bits is `max |x|`.
    fn abs_bits(self) -> u32;
    /// The float32 value of an `abs_bits` pattern.
    fn from_abs_bits(bits: u32) -> f32;
    /// Exact conversion to float32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even conversion from float32.
    fn from_f32(value: f32) -> Self;

    /// `values` as float32: widened into `scratch` (at least as long), or borrowed
    /// as they are when they already are float32.
    #[inline(always)]
    fn widen<'a>(values: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32] {
        let scratch = &mut scratch[..values.len()];
        for (wide, value) in scratch.iter_mut().zip(values) {
            *wide = value.to_f32();
        }
        scratch
    }
}

impl Element for f32 {
    const NAME: &'static str = "float32";
    const NON_FINITE_ABS_BITS: u32 = 0x7f80_0000;

    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
    #[inline(always)]
    fn from_abs_bits(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
    #[inline(always)]
    fn widen<'a>(values: &'a [Self], _scratch: &'a mut [f32]) -> &'a [f32] {
        values
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bfloat16";
    const NON_FINITE_ABS_BITS: u32 = 0x7f80;

    #[inline(always)]
    fn abs_bits(self) -> u32 {
        u32::from(self.to_bits() & 0x7fff)
    }
    #[inline(always)]
    fn from_abs_bits(bits: u32) -> f32 {
        f32::from_bits(bits << 16)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

/// 2^112: rescales a float16 exponent/mantissa placed in float32 bit positions.
const F16_TO_F32_SCALE: f32 = f32::from_bits(0x7780_0000);

impl Element for f16 {
    const NAME: &'static str = "float16";
    const NON_FINITE_ABS_BITS: u32 = 0x7c00;

    #[inline(always)]
    fn abs_bits(self) -> u32 {
        u32::from(self.to_bits() & 0x7fff)
    }
    #[inline(always)]
    fn from_abs_bits(bits: u32) -> f32 {
        f32::from_bits(bits << 13) * F16_TO_F32_SCALE
    }
    /// Exact for every value, bit for bit what `half` gives. Finite values (normals and
    /// subnormals): the magnitude bits shifted into float32 position and scaled by 2^112.
    /// Inf/NaN (all-ones exponent, which the scaling alone would turn into 65536 and up):
    /// the float32 all-ones exponent with the mantissa shifted over, a NaN made quiet.
    /// The choice is a select, not a branch, so loops over it still vectorize.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        let bits = u32::from(self.to_bits());
        let abs = bits & 0x7fff;
        let finite = Self::from_abs_bits(abs).to_bits();
        let non_finite = 0x7f80_0000 | (abs << 13) | (u32::from(abs > 0x7c00) << 22);
        let magnitude = if abs >= Self::NON_FINITE_ABS_BITS {
            non_finite
        } else {
            finite
        };
        f32::from_bits(magnitude | ((bits & 0x8000) << 16))
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_matches_half_for_every_value() {
        // Inf and NaN included: quantize's reference check and its error value go
        // through `to_f32`, so it must not turn them into finite numbers.
        for bits in 0u16..=u16::MAX {
            let h = f16::from_bits(bits);
            let widened = Element::to_f32(h);
            assert_eq!(widened.to_bits(), h.to_f32().to_bits(), "{bits:#x}");
            assert_eq!(widened.is_finite(), h.is_finite(), "{bits:#x}");
        }
    }

    #[test]
    fn bf16_widening_is_exact() {
        for bits in 0u16..=u16::MAX {
            let b = bf16::from_bits(bits);
            if b.is_finite() {
                assert_eq!(Element::to_f32(b).to_bits(), b.to_f32().to_bits());
            }
        }
    }

    #[test]
    fn abs_bits_order_matches_float_order() {
        assert!(Element::abs_bits(-2.0f32) > Element::abs_bits(1.5f32));
        assert!(Element::abs_bits(bf16::INFINITY) >= bf16::NON_FINITE_ABS_BITS);
        assert!(Element::abs_bits(f16::NAN) >= f16::NON_FINITE_ABS_BITS);
        assert!(Element::abs_bits(f16::MAX) < f16::NON_FINITE_ABS_BITS);
    }
}
