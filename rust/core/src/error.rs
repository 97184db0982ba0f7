//! Typed errors of the quantization core.

use thiserror::Error;

/// Everything that can go wrong in the core. Each variant carries enough context
/// (an element index, a length) for a caller to name the offending tensor entry.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum QuantError {
    /// Blocksize outside the set bitsandbytes accepts for 4-bit quantization (signed: a
    /// caller's negative size is reported as given).
    #[error(
        "unsupported blocksize {0}; expected one of [32, 64, 128, 256, 512, 1024, 2048, 4096]"
    )]
    UnsupportedBlocksize(i64),

    /// A quantization type name that is neither `nf4` nor `fp4`.
    #[error("unsupported quant_type '{0}'; expected 'nf4' or 'fp4'")]
    UnsupportedQuantType(String),

    /// A tensor with no elements cannot be quantized.
    #[error("cannot quantize an empty tensor")]
    Empty,

    /// NaN or +-Inf at a flat (row-major) element index.
    #[error("non-finite value {value} at flat element index {index}")]
    NonFinite { index: usize, value: f32 },

    /// The mean of the block scales overflows float32 (values near f32::MAX), so double
    /// quantization cannot represent them; quantize without it.
    #[error("the mean of the block absmax values overflows float32; use double_quant=False for values this large")]
    AbsmaxMeanOverflow,

    /// An importance vector that is empty, or holds a negative or non-finite weight.
    #[error("importance weights: {0}")]
    BadImportance(String),

    /// A calibration Hessian (`X^T X`) that GPTQ cannot use.
    #[error("hessian: {0}")]
    BadHessian(String),

    /// An operation on a matrix (gemv) given a tensor of another rank.
    #[error("expected a 2-D [rows, cols] weight, got shape {0:?}")]
    NotAMatrix(Vec<usize>),

    /// A gemv input holding more rows than the fused kernel takes (the caller dequantizes
    /// and multiplies instead).
    #[error("gemv takes 1 to {max} input rows, got {rows}")]
    GemvBatch { rows: usize, max: usize },

    /// `QLORAKIT_CPU_KERNEL` set to a name that is no CPU kernel.
    #[error("QLORAKIT_CPU_KERNEL={0:?} is not a CPU kernel; expected one of portable, avx2, avx2bf16, avx512, avx512bf16 (or unset it)")]
    UnknownCpuKernel(String),

    /// `QLORAKIT_CPU_KERNEL` names a kernel the running CPU cannot execute.
    #[error("QLORAKIT_CPU_KERNEL={0} but this CPU lacks the instructions it needs ({1})")]
    UnsupportedCpuKernel(&'static str, &'static str),

    /// An input or output buffer whose length does not match what the operation needs.
    #[error("{what} has {actual} elements, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
}

pub type Result<T> = std::result::Result<T, QuantError>;
