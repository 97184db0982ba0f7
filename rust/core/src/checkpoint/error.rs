//! Errors of the checkpoint pipeline; each names the file and, where there is one, the tensor.

use std::path::PathBuf;

use thiserror::Error;

use crate::error::QuantError;

/// What can go wrong reading, quantizing or writing a checkpoint.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: tensor '{tensor}': cannot write: {source}")]
    WriteTensor {
        path: PathBuf,
        tensor: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a safetensors file: {reason}")]
    InvalidFile { path: PathBuf, reason: String },

    #[error("{path}: tensor '{tensor}': {reason}")]
    InvalidTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error("{path}: tensor '{tensor}': unsupported dtype {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{path}: tensor '{tensor}': {source}")]
    Quantization {
        path: PathBuf,
        tensor: String,
        #[source]
        source: QuantError,
    },

    #[error("{path}: {reason}")]
    InvalidIndex { path: PathBuf, reason: String },

    #[error("{index}: names shard '{shard}', which does not exist")]
    MissingShard { index: PathBuf, shard: String },

    #[error("{path}: tensor '{tensor}' also appears in {other}")]
    DuplicateTensor {
        path: PathBuf,
        tensor: String,
        other: PathBuf,
    },

    #[error("{path}: no safetensors checkpoint here (expected model.safetensors or model.safetensors.index.json)")]
    NoCheckpoint { path: PathBuf },

    #[error("cancelled")]
    Cancelled,

    /// A bug: a worker thread panicked. Reported as an error rather than aborting.
    #[error("internal error: {0}")]
    Internal(String),

    #[error("tensor '{tensor}' was selected for quantization but {reason}")]
    BadSelection { tensor: String, reason: String },

    /// Memory given to quantize a tensor into that does not fit it (a caller's bug).
    #[error("tensor '{tensor}': output memory {reason}")]
    BadOutput { tensor: String, reason: String },
}

impl CheckpointError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let path = path.into();
        move |source| CheckpointError::Io { path, source }
    }

    pub(crate) fn tensor(
        path: &std::path::Path,
        tensor: &str,
        reason: impl Into<String>,
    ) -> CheckpointError {
        CheckpointError::InvalidTensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, CheckpointError>;
