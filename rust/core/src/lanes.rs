//! The fixed summation order of SIMD lane partials, shared by every kernel that must give
//! the same bits on every CPU (the encoders' moments, the gemv row sums).

/// Sums `N` (a power of two) lane partials as a halving tree: lanes `i` and `i + N/2`, then
/// `i + N/4`, ..., `i + 1`; the result is lane 0.
#[inline]
pub(crate) fn tree_sum<const N: usize>(mut lanes: [f32; N]) -> f32 {
    let mut width = N / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}
