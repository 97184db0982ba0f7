//! The 16-entry 4-bit code tables (NF4, FP4) — the one definition the Python package
//! and the CUDA sources take theirs from — and the decision bounds derived from them.

use crate::error::QuantError;

/// NF4 (bitsandbytes `get_4bit_type("nf4")`), index = nibble, as float32 bit patterns.
/// Normal-distribution quantiles scaled to [-1, 1]; sorted, so nibble order = value order.
pub const NF4_CODE_BITS: [u32; 16] = [
    0xbf80_0000,
    0xbf32_39b1,
    0xbf06_6b30,
    0xbeca_32a0,
    0xbe91_a24d,
    0xbe3d_353f,
    0xbdba_7871,
    0x0000_0000,
    0x3da2_faff,
    0x3e24_cae3,
    0x3e7c_04dd,
    0x3ead_033a,
    0x3ee1_a4b8,
    0x3f10_07ab,
    0x3f39_13b3,
    0x3f80_0000,
];

/// FP4 (e2m1, bias 2; bitsandbytes `get_4bit_type("fp4")`), index = nibble. Bit 3 is the
/// sign; index 8 is +0.0 as in bitsandbytes' serialized `quant_map`.
pub const FP4_CODE_BITS: [u32; 16] = [
    0x0000_0000,
    0x3baa_aaab,
    0x3f2a_aaab,
    0x3f80_0000,
    0x3eaa_aaab,
    0x3f00_0000,
    0x3e2a_aaab,
    0x3e80_0000,
    0x0000_0000,
    0xbbaa_aaab,
    0xbf2a_aaab,
    0xbf80_0000,
    0xbeaa_aaab,
    0xbf00_0000,
    0xbe2a_aaab,
    0xbe80_0000,
];

/// The 4-bit data types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    /// Every 4-bit data type, in the order of their codes in the kernels (`nf4` = 0, `fp4` = 1).
    pub const ALL: [QuantType; 2] = [QuantType::Nf4, QuantType::Fp4];

    /// The name bitsandbytes uses (`"nf4"`, `"fp4"`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The code table with its decision bounds.
    pub fn codebook(self) -> &'static Codebook {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = QuantError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(QuantError::UnsupportedQuantType(other.to_string())),
        }
    }
}

/// A 16-entry code table and what quantizing to it needs.
///
/// A scaled value `s` is given the code of the sorted rank `count(bounds < s)`, i.e.
/// `torch.bucketize(s, bounds, right=False)` on the float32 midpoints of the sorted
/// table, so a value exactly on a bound goes to the lower code (bitsandbytes' tie rule).
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    /// Code values indexed by nibble.
    pub values: [f32; 16],
    /// Float32 midpoints `(v[r] + v[r+1]) / 2` between consecutive sorted values.
    pub bounds: [f32; 15],
    /// Nibble of the value with sorted rank r (a stable argsort of `values`).
    pub rank_to_code: [u8; 16],
    /// `rank_to_code[r + 1] - rank_to_code[r]` mod 16: the code of rank r is
    /// `rank_to_code[0] + sum(code_steps[..r])` mod 16, which lets the hot loop build
    /// the code from the comparisons alone, without a table lookup per element.
    pub code_steps: [u8; 15],
    /// The bounds padded to 16 with +inf (never below a value), for register lookups.
    pub padded_bounds: [f32; 16],
    /// `rank_to_code` widened to 32-bit lanes, for register lookups.
    pub rank_codes: [i32; 16],
    /// Code values by sorted rank, and their squares (scale search's sums).
    pub sorted_values: [f32; 16],
    pub sorted_squares: [f32; 16],
}

const fn build_codebook(bits: [u32; 16]) -> Codebook {
    let mut values = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        values[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    // Stable insertion sort of the indices by value (ties keep index order).
    let mut order = [0u8; 16];
    i = 0;
    while i < 16 {
        order[i] = i as u8;
        i += 1;
    }
    i = 1;
    while i < 16 {
        let mut j = i;
        while j > 0 && values[order[j - 1] as usize] > values[order[j] as usize] {
            let held = order[j - 1];
            order[j - 1] = order[j];
            order[j] = held;
            j -= 1;
        }
        i += 1;
    }
    let mut bounds = [0.0f32; 15];
    let mut code_steps = [0u8; 15];
    i = 0;
    while i < 15 {
        bounds[i] = (values[order[i] as usize] + values[order[i + 1] as usize]) / 2.0;
        code_steps[i] = order[i + 1].wrapping_sub(order[i]) & 0xf;
        i += 1;
    }
    let mut padded_bounds = [f32::INFINITY; 16];
    let mut rank_codes = [0i32; 16];
    let mut sorted_values = [0.0f32; 16];
    let mut sorted_squares = [0.0f32; 16];
    i = 0;
    while i < 16 {
        if i < 15 {
            padded_bounds[i] = bounds[i];
        }
        rank_codes[i] = order[i] as i32;
        sorted_values[i] = values[order[i] as usize];
        sorted_squares[i] = sorted_values[i] * sorted_values[i];
        i += 1;
    }
    Codebook {
        values,
        bounds,
        rank_to_code: order,
        code_steps,
        padded_bounds,
        rank_codes,
        sorted_values,
        sorted_squares,
    }
}

/// NF4 codebook.
pub static NF4: Codebook = build_codebook(NF4_CODE_BITS);
/// FP4 codebook.
pub static FP4: Codebook = build_codebook(FP4_CODE_BITS);

impl Codebook {
    /// Code (nibble) of a scaled value in [-1, 1] — the plain definition the fast path
    /// is tested against.
    pub fn code_of(&self, scaled: f32) -> u8 {
        let rank = self.bounds.iter().filter(|&&bound| bound < scaled).count();
        self.rank_to_code[rank]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_sorted_and_identity_ordered() {
        for r in 0..16 {
            assert_eq!(NF4.rank_to_code[r], r as u8);
        }
        assert!(NF4.code_steps.iter().all(|&s| s == 1));
        assert_eq!(NF4.values[7], 0.0);
        assert_eq!(NF4.values[0], -1.0);
        assert_eq!(NF4.values[15], 1.0);
    }

    #[test]
    fn bounds_are_float32_midpoints_of_sorted_neighbours() {
        // bitsandbytes computes `(code[a] + code[b]) / 2` in float32: the sum is rounded
        // first, so a bound may sit one ulp away from the exact midpoint.
        for book in [&NF4, &FP4] {
            for r in 0..15 {
                let low = book.values[usize::from(book.rank_to_code[r])];
                let high = book.values[usize::from(book.rank_to_code[r + 1])];
                let exact = (f64::from(low) + f64::from(high)) / 2.0;
                let bound = book.bounds[r];
                assert!(low <= bound && bound <= high);
                let ulp = f64::from(f32::from_bits(bound.abs().to_bits() + 1) - bound.abs());
                assert!((f64::from(bound) - exact).abs() <= ulp, "rank {r}");
            }
        }
    }

    #[test]
    fn fp4_order_puts_positive_zero_first() {
        // Both index 0 and 8 hold 0.0; a stable argsort keeps 0 before 8, so small
        // positive values land on code 8 (as bitsandbytes' CPU path does).
        let zero_rank = 7; // seven negative codes sort below the two zeros
        assert_eq!(FP4.rank_to_code[zero_rank], 0);
        assert_eq!(FP4.rank_to_code[zero_rank + 1], 8);
        assert_eq!(FP4.code_of(0.0), 0);
        assert_eq!(FP4.code_of(0.002), 8);
        assert_eq!(FP4.code_of(-1.0), 11);
        assert_eq!(FP4.code_of(1.0), 3);
    }

    #[test]
    fn code_steps_rebuild_rank_to_code() {
        for book in [&NF4, &FP4] {
            let mut code = book.rank_to_code[0];
            for r in 0..15 {
                code = code.wrapping_add(book.code_steps[r]) & 0xf;
                assert_eq!(code, book.rank_to_code[r + 1]);
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_code() {
        for book in [&NF4, &FP4] {
            for r in 0..15 {
                assert_eq!(book.code_of(book.bounds[r]), book.rank_to_code[r]);
            }
        }
    }
}
