//! Portable lane-order kernel: plain Rust, any CPU, the summation order of the module
//! documentation; each group of 16 weights is decoded once for all input rows.

use super::{Lanes, Weight, XRows, GEMV_ACCUMULATORS, GEMV_LANES, LANE_ELEMENT};
use crate::element::Element;

/// Adds weight elements `start..start + len` (`start` even; `len` the length of every row
/// of `xs`) times each of `lanes.len()` input rows to that row's lanes.
pub(super) fn row_lanes<T: Element>(
    weight: &Weight<'_>,
    start: usize,
    xs: XRows<'_, f32>,
    lanes: &mut [Lanes],
) {
    let len = xs.row(0).len();
    let mut done = 0;
    while done < len {
        let first = start + done;
        let (block, piece) = weight.piece(first, len - done);
        let scale = weight.scales.get(block);
        let table: [f32; 16] =
            std::array::from_fn(|q| T::from_f32(weight.values[q] * scale).to_f32());
        // Pieces start on a high nibble (even element), so byte k of the piece holds its
        // elements 2k and 2k + 1.
        let bytes = &weight.packed[first / 2..(first + piece).div_ceil(2)];
        for (g, codes) in bytes.chunks(GEMV_LANES / 2).enumerate() {
            let offset = g * GEMV_LANES;
            let present = (piece - offset).min(GEMV_LANES);
            let w: [f32; GEMV_LANES] = std::array::from_fn(|lane| {
                let element = LANE_ELEMENT[lane];
                let byte = codes.get(element / 2).copied().unwrap_or(0);
                let code = if element.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0xf
                };
                table[usize::from(code)]
            });
            for (b, lanes) in lanes.iter_mut().enumerate() {
                let x = &xs.row(b)[done + offset..done + offset + present];
                let acc = &mut lanes[g % GEMV_ACCUMULATORS];
                for (lane, &element) in LANE_ELEMENT.iter().enumerate() {
                    // Absent elements add nothing (not even a zero: -0.0 + 0.0 is +0.0).
                    if let Some(&xj) = x.get(element) {
                        acc[lane] += w[lane] * xj;
                    }
                }
            }
        }
        done += piece;
    }
}
