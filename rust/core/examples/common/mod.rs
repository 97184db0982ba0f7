//! What the examples share: a seeded random stream and a best-of timer.

use std::time::Instant;

/// A xorshift64 stream (fixed seed): uniform values, the same on every run.
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new() -> Self {
        Xorshift(0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The shortest of `runs` timed calls of `f`, in seconds.
pub fn best_secs(runs: usize, f: &mut dyn FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
