//! The `quant_state.bitsandbytes__nf4|fp4` JSON bitsandbytes stores beside each weight,
//! byte-for-byte as Python's `json.dumps` writes it.

use crate::codebook::QuantType;
use crate::layout::{Blocksize, NESTED_BLOCKSIZE};

/// What a weight's key is followed by in the key of its quant_state tensor (then `nf4`/`fp4`):
/// `X.weight.quant_state.bitsandbytes__nf4`. Python reads it as `qlorakit.formats.QUANT_STATE_MARKER`.
pub const QUANT_STATE_MARKER: &str = ".quant_state.bitsandbytes__";

/// The key of the quant_state tensor of the weight `weight` (e.g. `X.weight`).
pub fn quant_state_key(weight: &str, quant_type: QuantType) -> String {
    format!("{weight}{QUANT_STATE_MARKER}{}", quant_type.name())
}

/// What a quant_state records about one quantized weight.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState<'a> {
    pub quant_type: QuantType,
    pub blocksize: Blocksize,
    /// Torch name of the original dtype (`"bfloat16"`, ...).
    pub dtype: &'a str,
    pub shape: &'a [usize],
    /// Offset of double quantization, if used.
    pub nested_offset: Option<f32>,
    /// Torch name of the dtype the nested level decodes to (`"float32"`; bitsandbytes
    /// records `"bfloat16"` after a CPU inference pass).
    pub nested_dtype: &'a str,
}

impl QuantState<'_> {
    /// The JSON, keys in bitsandbytes' order, separators `", "` and `": "`.
    pub fn to_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut json = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.name(),
            self.blocksize.get(),
            self.dtype,
            shape
        );
        if let Some(offset) = self.nested_offset {
            json.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"{}\", \"nested_offset\": {}",
                self.nested_dtype,
                python_float_repr(f64::from(offset))
            ));
        }
        json.push('}');
        json
    }

    /// The key of this state's tensor beside the weight `weight` (e.g. `X.weight`).
    pub fn key(&self, weight: &str) -> String {
        quant_state_key(weight, self.quant_type)
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation when
/// the decimal exponent is in [-4, 16), else as `d.ddde±XX`; integral values keep `.0`.
pub fn python_float_repr(value: f64) -> String {
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    if !value.is_finite() {
        return if value.is_nan() {
            "NaN".into()
        } else if value > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-d.ddde-X".
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        return format!(
            "{sign}{first}{fraction}e{exponent_sign}{:02}",
            exponent.abs()
        );
    }
    let point = exponent + 1; // digits before the decimal point
    if point <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!(
            "{sign}{digits}{}.0",
            "0".repeat(point as usize - digits.len())
        )
    } else {
        let (integer, fraction) = digits.split_at(point as usize);
        format!("{sign}{integer}.{fraction}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases: [(f64, &str); 14] = [
            (0.05133247375488281, "0.05133247375488281"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (1.0, "1.0"),
            (2.5, "2.5"),
            (123456.0, "123456.0"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-0.375, "-0.375"),
            (f64::from(0.1f32), "0.10000000149011612"),
            (3.4028234663852886e38, "3.4028234663852886e+38"),
            (-2.5e-5, "-2.5e-05"),
            (0.0, "0.0"),
        ];
        for (value, expected) in cases {
            assert_eq!(python_float_repr(value), expected, "{value:e}");
        }
    }

    #[test]
    fn json_matches_bitsandbytes_bytes() {
        let state = QuantState {
            quant_type: QuantType::Nf4,
            blocksize: Blocksize::default(),
            dtype: "bfloat16",
            shape: &[64, 128],
            nested_offset: Some(0.051_332_474),
            nested_dtype: "float32",
        };
        assert_eq!(
            state.to_json(),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 128], \
             \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.05133247375488281}"
        );
    }
}
