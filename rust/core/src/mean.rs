//! A deterministic float32 mean that reproduces torch's single-threaded CPU `mean()`.
//!
//! bitsandbytes computes the double-quantization offset as `absmax.mean()`. torch sums
//! a contiguous float32 vector with a cascade: 8-wide vector lanes, 4 independent
//! accumulators (ILP), and 4 levels of partial sums that flush every 2^k steps; the
//! remainder is added in scalar, then the lanes, then the sum is divided by n. Doing the
//! same here gives torch's result bit for bit when torch runs on one thread (and always
//! when there are at most 32768 blocks), and the same result on any thread count.

/// Lanes of torch's float32 vector type in the build that runs its sum kernel.
const LANES: usize = 8;
/// Independent accumulators in torch's `row_sum`.
const ILP: usize = 4;
/// Levels of torch's `multi_row_sum` cascade.
const LEVELS: usize = 4;

fn add_lanes<const W: usize>(acc: &mut [f32; W], values: &[f32]) {
    for (a, v) in acc.iter_mut().zip(values) {
        *a += *v;
    }
}

fn ceil_log2(x: usize) -> u32 {
    if x <= 1 {
        0
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// torch's `multi_row_sum`: sums `rows` groups of `ILP` vectors of `W` lanes into
/// `ILP` accumulators, flushing partial sums up `LEVELS` levels every 2^k rows.
fn multi_row_sum<const W: usize>(values: &[f32], rows: usize) -> [[f32; W]; ILP] {
    let level_power = 4.max(ceil_log2(rows) / LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; ILP]; LEVELS];
    let row = |i: usize, k: usize| {
        let start = (i * ILP + k) * W;
        &values[start..start + W]
    };
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for (k, lanes) in acc[0].iter_mut().enumerate() {
                add_lanes(lanes, row(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower_levels, upper_levels) = acc.split_at_mut(j);
            for (lower, upper) in lower_levels[j - 1].iter_mut().zip(&mut upper_levels[0]) {
                add_lanes(upper, lower);
                *lower = [0.0; W];
            }
            if i & (level_mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for (k, lanes) in acc[0].iter_mut().enumerate() {
            add_lanes(lanes, row(i, k));
        }
        i += 1;
    }
    let mut total = acc[0];
    for level in &acc[1..] {
        for (lanes, level_lanes) in total.iter_mut().zip(level) {
            add_lanes(lanes, level_lanes);
        }
    }
    total
}

/// torch's `row_sum` over `values.len() / W` vectors of `W` lanes.
fn row_sum<const W: usize>(values: &[f32]) -> [f32; W] {
    let vectors = values.len() / W;
    let rows = vectors / ILP;
    let mut partial = multi_row_sum::<W>(values, rows);
    for v in rows * ILP..vectors {
        add_lanes(&mut partial[0], &values[v * W..(v + 1) * W]);
    }
    for k in 1..ILP {
        let lanes = partial[k];
        add_lanes(&mut partial[0], &lanes);
    }
    partial[0]
}

/// Float32 sum in torch's single-thread CPU order: the vectorized inner sum when there
/// is at least one full vector, else the scalar `row_sum` (ILP over single elements).
pub fn torch_sum(values: &[f32]) -> f32 {
    if values.len() < LANES {
        return row_sum::<1>(values)[0];
    }
    let vectors = values.len() / LANES;
    let lanes = row_sum::<LANES>(&values[..vectors * LANES]);
    let mut total = 0.0f32;
    for &v in &values[vectors * LANES..] {
        total += v;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// Float32 mean in torch's single-thread CPU order: the cascade sum divided by `n` as f32.
pub fn torch_mean(values: &[f32]) -> f32 {
    torch_sum(values) / values.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_sums_are_exact() {
        let values: Vec<f32> = (1..=1000).map(|i| i as f32).collect();
        assert_eq!(torch_sum(&values), 500_500.0);
        assert_eq!(torch_mean(&[2.0, 4.0]), 3.0);
        assert_eq!(torch_sum(&[]), 0.0);
    }
}
