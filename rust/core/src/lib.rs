//! qlorakit-core: NF4/FP4 blockwise 4-bit quantization with double quantization of the
//! block scales, bit-exact with bitsandbytes' CPU backend. Plain Rust, no Python.
//!
//! The slice functions ([`quantize_4bit`], [`dequantize_4bit`], [`double_quantize`],
//! [`dequantize_absmax`]) write into caller-provided buffers so hot callers can reuse
//! memory. [`PackedView`] is one packed tensor borrowed (codes, plain or double-quantized
//! [`Scales`], format, shape): what [`gemv_4bit`], the checkpoint writer and
//! [`PackedView::dequantize_into`] take; [`PackedTensor`] is its owned counterpart.

mod block_scale;
pub mod checkpoint;
mod dispatch;

pub mod codebook;
pub mod dequantize;
pub mod double_quant;
pub mod dynamic_map;
pub mod element;
pub mod encode;
pub mod error;
pub mod gemv;
pub mod gptq;
mod lanes;
pub mod layout;
pub mod mean;
pub mod packed;
pub mod parallel;
pub mod quantize;
pub mod scale_search;

pub use codebook::{Codebook, QuantType, FP4, FP4_CODE_BITS, NF4, NF4_CODE_BITS};
pub use dequantize::{dequantize_4bit, dequantize_4bit_reference, dequantize_4bit_scaled};
pub use double_quant::{dequantize_absmax, double_quantize};
pub use dynamic_map::{dynamic_map, DYNAMIC_MAP_BITS};
pub use element::Element;
pub use encode::Encoder;
pub use error::{QuantError, Result};
pub use gemv::{gemv_4bit, gemv_4bit_with, GemvKernel, CPU_KERNEL_ENV, GEMV_MAX_BATCH};
pub use layout::{Blocksize, BLOCKSIZES, DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE};
pub use packed::{Absmax, BlockScales, PackedTensor, PackedView, Scales, ScalesMut};
pub use quantize::{quantize_4bit, quantize_4bit_reference, quantize_4bit_with};
