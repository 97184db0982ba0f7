//! Calibration Hessians for GPTQ (see [`crate::gptq`]), read from a safetensors file:
//! for a weight `X.weight` of shape `[out, in]`, a float32 or float64 tensor of shape
//! `[in, in]` holding `X^T X` of the layer's inputs. Layers that read the same input
//! (a transformer's q/k/v projections, its gate/up projections) share one matrix: the
//! file stores it once, under one weight's name, and the metadata maps every other
//! weight name to that name (`"Y.weight": "X.weight"`).
//!
//! The factor of the matrix last used is kept, with the one before it, so the weights
//! that share an input are factored once when they come close together in the source.

use std::path::Path;
use std::sync::Arc;

use super::error::{CheckpointError, Result};
use super::safetensors::{Dtype, SafetensorsFile};
use crate::gptq::HessianFactor;

/// Factors kept at once: q/k/v and o interleave in a name-sorted checkpoint.
const CACHED_FACTORS: usize = 2;

/// An opened Hessian file with its factor cache.
pub struct HessianFile {
    file: SafetensorsFile,
    damp: f64,
    cache: Vec<(String, Arc<HessianFactor>)>,
}

impl HessianFile {
    /// Opens `path`; `damp` is GPTQ's relative damping (see [`HessianFactor::new`]).
    pub fn open(path: &Path, damp: f64) -> Result<HessianFile> {
        Ok(HessianFile {
            file: SafetensorsFile::open(path)?,
            damp,
            cache: Vec::new(),
        })
    }

    /// The factor for `tensor` with `columns` input features; `None` when the file has
    /// no entry for it (that tensor is then quantized without calibration).
    pub fn factor(&mut self, tensor: &str, columns: usize) -> Result<Option<Arc<HessianFactor>>> {
        let key = self
            .file
            .metadata
            .get(tensor)
            .map_or(tensor, String::as_str)
            .to_string();
        if let Some((_, factor)) = self.cache.iter().find(|(k, _)| *k == key) {
            return Ok(Some(Arc::clone(factor)));
        }
        let Some(info) = self.file.tensors.iter().find(|t| t.name == key) else {
            return Ok(None);
        };
        let bad = |reason: String| CheckpointError::InvalidTensor {
            path: self.file.path.clone(),
            tensor: tensor.to_string(),
            reason,
        };
        if !matches!(info.dtype, Dtype::F32 | Dtype::F64) || info.shape != [columns, columns] {
            return Err(bad(format!(
                "a Hessian must be F32 or F64 of shape [{columns}, {columns}] (the weight's input features), found {} {:?} under '{key}'",
                info.dtype.name(),
                info.shape
            )));
        }
        let bytes = self.file.bytes(info);
        let factor = if info.dtype == Dtype::F64 {
            let values: Vec<f64> = bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect();
            HessianFactor::new(&values, columns, self.damp)
        } else {
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            HessianFactor::new(&values, columns, self.damp)
        }
        .map_err(|source| CheckpointError::Quantization {
            path: self.file.path.clone(),
            tensor: key.clone(),
            source,
        })?;
        let factor = Arc::new(factor);
        if self.cache.len() == CACHED_FACTORS {
            self.cache.remove(0);
        }
        self.cache.push((key, Arc::clone(&factor)));
        Ok(Some(factor))
    }
}
