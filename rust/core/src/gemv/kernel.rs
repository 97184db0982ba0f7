//! Which fused kernel runs: the CPU's best, or the one `QLORAKIT_CPU_KERNEL` forces.

use std::sync::OnceLock;

use crate::error::{QuantError, Result};

/// The environment variable that forces a CPU kernel (read once per process).
pub const CPU_KERNEL_ENV: &str = "QLORAKIT_CPU_KERNEL";

/// An implementation of the fused kernel. `Portable`, `Avx2` and `Avx512` share one
/// summation order and return bit-identical results; `Avx2Bf16` and `Avx512Bf16` each have
/// their own (see the module documentation of [`crate::gemv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 + F16C: the 16-entry table of a block in two registers, looked up per
    /// lane by `permutevar8x32` and a blend. For rows of whole groups of 16 and blocks of
    /// at least 16 (every packed layout bitsandbytes writes with such rows); other
    /// layouts take [`GemvKernel::Portable`].
    Avx2,
    /// AVX2 plus FMA and F16C, for bfloat16 inputs where the layout allows (blocksize at
    /// least 64, columns a multiple of 64): the bf16 weights of a block looked up 32 at a
    /// time by `pshufb` in byte tables, widened to float32 and fused-multiply-added.
    /// Other inputs take [`GemvKernel::Avx2`].
    Avx2Bf16,
    /// x86-64 AVX-512 F/BW/VL: the 16-entry table of a block held in one register,
    /// looked up per lane by `permutexvar`.
    Avx512,
    /// AVX-512 plus AVX512-BF16, for bfloat16 inputs where the layout allows (blocksize
    /// at least 64, columns a multiple of 64): bf16 weights looked up 32 at a time and
    /// multiplied by `vdpbf16ps`. Other inputs take [`GemvKernel::Avx512`].
    Avx512Bf16,
}

impl GemvKernel {
    /// Every kernel, slowest first.
    pub const ALL: [GemvKernel; 5] = [
        GemvKernel::Portable,
        GemvKernel::Avx2,
        GemvKernel::Avx2Bf16,
        GemvKernel::Avx512,
        GemvKernel::Avx512Bf16,
    ];

    /// The name `QLORAKIT_CPU_KERNEL` takes: `portable`, `avx2`, `avx2bf16`, `avx512`
    /// or `avx512bf16`.
    pub fn name(self) -> &'static str {
        match self {
            GemvKernel::Portable => "portable",
            GemvKernel::Avx2 => "avx2",
            GemvKernel::Avx2Bf16 => "avx2bf16",
            GemvKernel::Avx512 => "avx512",
            GemvKernel::Avx512Bf16 => "avx512bf16",
        }
    }

    /// The kernel of a name ([`GemvKernel::name`]), else [`QuantError::UnknownCpuKernel`].
    pub fn from_name(name: &str) -> Result<GemvKernel> {
        GemvKernel::ALL
            .into_iter()
            .find(|kernel| kernel.name() == name)
            .ok_or_else(|| QuantError::UnknownCpuKernel(name.to_owned()))
    }

    /// The fastest kernel the running CPU supports.
    pub fn best() -> GemvKernel {
        GemvKernel::ALL
            .into_iter()
            .rev()
            .find(|kernel| kernel.is_supported())
            .unwrap_or(GemvKernel::Portable)
    }

    /// Whether the running CPU can use this kernel.
    pub fn is_supported(self) -> bool {
        match self {
            GemvKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            GemvKernel::Avx2 => crate::dispatch::has_avx2_f16c(),
            #[cfg(target_arch = "x86_64")]
            GemvKernel::Avx2Bf16 => crate::dispatch::has_avx2_fma_f16c(),
            #[cfg(target_arch = "x86_64")]
            GemvKernel::Avx512 => crate::dispatch::has_avx512(),
            #[cfg(target_arch = "x86_64")]
            GemvKernel::Avx512Bf16 => crate::dispatch::has_avx512_bf16(),
            #[cfg(not(target_arch = "x86_64"))]
            GemvKernel::Avx2
            | GemvKernel::Avx2Bf16
            | GemvKernel::Avx512
            | GemvKernel::Avx512Bf16 => false,
        }
    }

    /// The instructions the kernel needs, for errors.
    fn needs(self) -> &'static str {
        match self {
            GemvKernel::Portable => "none",
            GemvKernel::Avx2 => "x86-64 AVX2 and F16C",
            GemvKernel::Avx2Bf16 => "x86-64 AVX2, FMA and F16C",
            GemvKernel::Avx512 => "x86-64 AVX-512 F/BW/VL",
            GemvKernel::Avx512Bf16 => "x86-64 AVX-512 F/BW/VL and AVX512-BF16",
        }
    }

    /// The kernel [`crate::gemv_4bit`] uses: the one `QLORAKIT_CPU_KERNEL` names, else
    /// [`GemvKernel::best`]. The variable is read once per process; an unknown name
    /// ([`QuantError::UnknownCpuKernel`]) or a kernel this CPU lacks
    /// ([`QuantError::UnsupportedCpuKernel`]) is an error on every call, never ignored.
    /// Set but empty counts as unset.
    pub fn selected() -> Result<GemvKernel> {
        static SELECTED: OnceLock<Result<GemvKernel>> = OnceLock::new();
        SELECTED
            .get_or_init(|| {
                let value = std::env::var_os(CPU_KERNEL_ENV);
                GemvKernel::from_setting(value.as_ref().map(|v| v.to_string_lossy()).as_deref())
            })
            .clone()
    }

    /// [`GemvKernel::selected`] for a given value of the variable.
    pub fn from_setting(value: Option<&str>) -> Result<GemvKernel> {
        let name = match value.map(str::trim) {
            None | Some("") => return Ok(GemvKernel::best()),
            Some(name) => name,
        };
        let kernel = GemvKernel::from_name(name)?;
        if kernel.is_supported() {
            Ok(kernel)
        } else {
            Err(QuantError::UnsupportedCpuKernel(
                kernel.name(),
                kernel.needs(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_or_fail_loudly() {
        assert_eq!(GemvKernel::from_setting(None), Ok(GemvKernel::best()));
        assert_eq!(GemvKernel::from_setting(Some(" ")), Ok(GemvKernel::best()));
        assert_eq!(
            GemvKernel::from_setting(Some("portable")),
            Ok(GemvKernel::Portable)
        );
        assert_eq!(
            GemvKernel::from_setting(Some("sse2")),
            Err(QuantError::UnknownCpuKernel("sse2".into()))
        );
        for kernel in GemvKernel::ALL {
            assert_eq!(GemvKernel::from_name(kernel.name()), Ok(kernel));
            let forced = GemvKernel::from_setting(Some(kernel.name()));
            assert_eq!(forced.is_ok(), kernel.is_supported(), "{forced:?}");
        }
    }
}
