//! Importance vectors for scale search, read from a safetensors file: for a weight
//! `X.weight` of shape `[out, in]`, a float32 tensor named `X.weight` of shape `[in]`
//! (e.g. mean squared activations of the layer's input, as llama.cpp's imatrix).

use std::path::Path;

use super::error::{CheckpointError, Result};
use super::safetensors::{Dtype, SafetensorsFile};

/// An opened, validated importance file.
pub struct ImportanceFile {
    file: SafetensorsFile,
}

impl ImportanceFile {
    pub fn open(path: &Path) -> Result<ImportanceFile> {
        Ok(ImportanceFile {
            file: SafetensorsFile::open(path)?,
        })
    }

    /// The weights for `tensor` with `columns` input features; `None` when the file has
    /// no entry for it (the search is then unweighted for that tensor).
    pub fn vector(&self, tensor: &str, columns: usize) -> Result<Option<Vec<f32>>> {
        let Some(info) = self.file.tensors.iter().find(|t| t.name == tensor) else {
            return Ok(None);
        };
        let bad = |reason: String| CheckpointError::InvalidTensor {
            path: self.file.path.clone(),
            tensor: tensor.to_string(),
            reason,
        };
        if info.dtype != Dtype::F32 || info.shape != [columns] {
            return Err(bad(format!(
                "an importance vector must be F32 of shape [{columns}] (the weight's input features), found {} {:?}",
                info.dtype.name(),
                info.shape
            )));
        }
        let weights: Vec<f32> = self
            .file
            .bytes(info)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(i) = weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(bad(format!(
                "importance weight {i} is {}; weights must be finite and >= 0",
                weights[i]
            )));
        }
        Ok(Some(weights))
    }
}
