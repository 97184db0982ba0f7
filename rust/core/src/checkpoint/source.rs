//! A source checkpoint: one `model.safetensors`, or shards named by
//! `model.safetensors.index.json`, or a single `.safetensors` file given directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::{CheckpointError, Result};
use super::safetensors::{SafetensorsFile, TensorInfo};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// All files of a checkpoint, opened and validated, with every tensor name unique.
pub struct Source {
    pub files: Vec<SafetensorsFile>,
}

impl Source {
    /// Opens a checkpoint directory (or a single safetensors file).
    pub fn open(path: &Path) -> Result<Source> {
        let files = if path.is_file() {
            vec![SafetensorsFile::open(path)?]
        } else if path.join(INDEX_FILE).is_file() {
            shard_paths(&path.join(INDEX_FILE))?
                .iter()
                .map(|shard| SafetensorsFile::open(shard))
                .collect::<Result<Vec<_>>>()?
        } else if path.join(SINGLE_FILE).is_file() {
            vec![SafetensorsFile::open(&path.join(SINGLE_FILE))?]
        } else {
            return Err(CheckpointError::NoCheckpoint {
                path: path.to_path_buf(),
            });
        };
        let mut seen: HashMap<&str, &Path> = HashMap::new();
        for file in &files {
            for tensor in &file.tensors {
                if let Some(other) = seen.insert(&tensor.name, &file.path) {
                    return Err(CheckpointError::DuplicateTensor {
                        path: file.path.clone(),
                        tensor: tensor.name.clone(),
                        other: other.to_path_buf(),
                    });
                }
            }
        }
        Ok(Source { files })
    }

    /// Every tensor with the file it lives in, in file and offset order.
    pub fn tensors(&self) -> impl Iterator<Item = (&SafetensorsFile, &TensorInfo)> {
        self.files
            .iter()
            .flat_map(|file| file.tensors.iter().map(move |t| (file, t)))
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors().map(|(_, t)| (t.end - t.begin) as u64).sum()
    }
}

/// The shard files an index names, in order of first appearance, each checked to exist.
fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let invalid = |reason: String| CheckpointError::InvalidIndex {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(CheckpointError::io(index))?;
    let root: Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let weight_map = root
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("no 'weight_map' object".into()))?;
    let directory = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (tensor, shard) in weight_map {
        let shard = shard
            .as_str()
            .ok_or_else(|| invalid(format!("weight_map entry '{tensor}' is not a file name")))?;
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(invalid(format!(
                "shard name '{shard}' is not a plain file name"
            )));
        }
        let shard_path = directory.join(shard);
        if !shards.contains(&shard_path) {
            if !shard_path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index.to_path_buf(),
                    shard: shard.to_string(),
                });
            }
            shards.push(shard_path);
        }
    }
    if shards.is_empty() {
        return Err(invalid("weight_map is empty".into()));
    }
    Ok(shards)
}
