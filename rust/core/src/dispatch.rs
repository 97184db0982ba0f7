//! Runtime CPU-feature dispatch for the hot loops.
//!
//! The loops are plain Rust written so the compiler vectorizes them; this macro compiles
//! one copy per instruction set (AVX-512, AVX2, baseline) and picks the best the running
//! CPU supports, so one portable binary (a manylinux wheel) uses wide vectors where it can.

/// Whether the running CPU has AVX-512 F/BW/VL, the subset every AVX-512 path here uses.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Whether the running CPU has AVX2 and F16C (the AVX2 gemv kernel's float16 rounding).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_f16c() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
}

/// Whether the running CPU also has FMA (the AVX2 bf16 gemv kernel's multiply-adds).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma_f16c() -> bool {
    has_avx2_f16c() && std::arch::is_x86_feature_detected!("fma")
}

/// Whether the running CPU also has AVX512-BF16 (`vdpbf16ps`, `vcvtneps2bf16`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_bf16() -> bool {
    has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// Defines `$name(args) -> ret` that calls `$body_fn(args)` compiled for the best
/// available x86-64 feature level. `$body_fn` must be `#[inline(always)]`.
macro_rules! multiversion {
    (
        $vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty
        => $body_fn:ident
    ) => {
        $vis fn $name<$t: $bound>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi2")]
                fn with_avx512<$t: $bound>($($arg: $ty),*) -> $ret {
                    $body_fn::<$t>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,bmi2")]
                fn with_avx2<$t: $bound>($($arg: $ty),*) -> $ret {
                    $body_fn::<$t>($($arg),*)
                }
                let avx2 = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("bmi2");
                if avx2 && $crate::dispatch::has_avx512() {
                    // SAFETY: the CPU supports every feature the function was compiled for.
                    return unsafe { with_avx512::<$t>($($arg),*) };
                }
                if avx2 {
                    // SAFETY: as above.
                    return unsafe { with_avx2::<$t>($($arg),*) };
                }
            }
            $body_fn::<$t>($($arg),*)
        }
    };
}

pub(crate) use multiversion;
