//! Whole-checkpoint quantization: safetensors in, bitsandbytes-format safetensors out.

pub mod error;
pub mod hessian;
pub mod importance;
pub mod pipeline;
pub mod quant_state;
pub mod safetensors;
pub mod source;
pub mod writer;

pub use error::CheckpointError;
pub use pipeline::{
    quantize_checkpoint, quantize_in_memory, MemoryReport, Options, Orientation, Progress, Report,
    Selection, TensorReport, WeightOut, ERROR_SAMPLE_STRIDE,
};
pub use source::Source;
