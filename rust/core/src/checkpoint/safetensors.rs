//! A strict safetensors reader over a memory-mapped file.
//!
//! Layout: 8 bytes little-endian header length N, N bytes of UTF-8 JSON (a map of tensor
//! name → {dtype, shape, data_offsets: [begin, end]} plus an optional `__metadata__` map of
//! strings), then the data buffer; offsets are relative to the buffer. Everything is
//! validated before any tensor is read: the header fits in the file, the JSON is an object,
//! dtypes are known, `end - begin` equals the shape's byte size, offsets lie inside the
//! buffer, and no two tensors overlap.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap};
use serde_json::Value;

use super::error::{CheckpointError, Result};

/// Largest header we accept (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Element types of the safetensors format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    /// Parses the format's dtype name.
    pub fn parse(name: &str) -> Option<Dtype> {
        Some(match name {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    /// The format's dtype name.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// The torch name bitsandbytes records in a quant_state (`"bfloat16"`, ...).
    pub fn torch_name(self) -> Option<&'static str> {
        match self {
            Dtype::F32 => Some("float32"),
            Dtype::BF16 => Some("bfloat16"),
            Dtype::F16 => Some("float16"),
            _ => None,
        }
    }
}

/// One tensor's entry in a header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range within the data buffer.
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed, validated safetensors file, memory-mapped.
pub struct SafetensorsFile {
    pub path: PathBuf,
    /// Tensors in data-offset order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    mmap: Mmap,
    data_start: usize,
}

impl SafetensorsFile {
    /// Opens, maps and validates `path`.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(CheckpointError::io(path))?;
        // SAFETY: the map is read-only; a concurrent writer truncating the file could
        // still fault, which is the documented hazard of every mmap-based reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(CheckpointError::io(path))?;
        let _ = mmap.advise(Advice::Sequential);
        let (tensors, metadata, data_start) = parse(path, &mmap)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            tensors,
            metadata,
            mmap,
            data_start,
        })
    }

    /// The bytes of a tensor (validated to lie inside the file).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.begin..self.data_start + info.end]
    }

    /// Tells the kernel this process is done with a tensor's pages, so they stop counting
    /// toward its resident memory (they stay in the page cache).
    pub fn release(&self, info: &TensorInfo) {
        let page = 4096;
        let start = (self.data_start + info.begin).div_ceil(page) * page;
        let end = (self.data_start + info.end) / page * page;
        if end > start {
            // SAFETY: DontNeed on a private read-only file mapping only drops our view of
            // the pages; later reads fault them in again from the file, unchanged.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// Size of the data buffer in bytes.
    pub fn data_len(&self) -> usize {
        self.mmap.len() - self.data_start
    }
}

type Parsed = (Vec<TensorInfo>, BTreeMap<String, String>, usize);

/// Parses and validates a whole file image (`bytes`), as read from `path`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let invalid = |reason: String| CheckpointError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    };
    let Some(length_bytes) = bytes.get(..8) else {
        return Err(invalid(format!(
            "{} bytes is too short for the 8-byte header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(
        length_bytes
            .try_into()
            .map_err(|_| invalid("header length".into()))?,
    );
    let available = bytes.len() as u64 - 8;
    if header_len > available || header_len > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "header length {header_len} exceeds the {available} bytes after it (truncated or corrupt file)"
        )));
    }
    let data_start = 8 + header_len as usize;
    let header = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| invalid(format!("header is not UTF-8: {e}")))?;
    let root: Value = serde_json::from_str(header)
        .map_err(|e| invalid(format!("header is not valid JSON: {e}")))?;
    let Value::Object(entries) = root else {
        return Err(invalid("header JSON is not an object".into()));
    };
    let data_len = bytes.len() - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == "__metadata__" {
            metadata = parse_metadata(path, &entry)?;
            continue;
        }
        tensors.push(parse_entry(path, name, &entry, data_len)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    for pair in tensors.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(CheckpointError::tensor(
                path,
                &pair[1].name,
                format!(
                    "data [{}, {}) overlaps tensor '{}' [{}, {})",
                    pair[1].begin, pair[1].end, pair[0].name, pair[0].begin, pair[0].end
                ),
            ));
        }
    }
    Ok((tensors, metadata, data_start))
}

fn parse_metadata(path: &Path, entry: &Value) -> Result<BTreeMap<String, String>> {
    let Value::Object(map) = entry else {
        return Err(CheckpointError::InvalidFile {
            path: path.to_path_buf(),
            reason: "__metadata__ is not an object".into(),
        });
    };
    map.iter()
        .map(|(key, value)| match value {
            Value::String(text) => Ok((key.clone(), text.clone())),
            _ => Err(CheckpointError::InvalidFile {
                path: path.to_path_buf(),
                reason: format!("__metadata__ value of '{key}' is not a string"),
            }),
        })
        .collect()
}

fn parse_entry(path: &Path, name: String, entry: &Value, data_len: usize) -> Result<TensorInfo> {
    let bad = |reason: String| CheckpointError::tensor(path, &name, reason);
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string 'dtype'".into()))?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| CheckpointError::UnsupportedDtype {
        path: path.to_path_buf(),
        tensor: name.clone(),
        dtype: dtype_name.to_string(),
    })?;
    let as_index = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array 'shape'".into()))?
        .iter()
        .map(|d| {
            as_index(d).ok_or_else(|| bad(format!("shape entry {d} is not a non-negative integer")))
        })
        .collect::<Result<Vec<usize>>>()?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("missing 'data_offsets' [begin, end]".into()))?;
    let (begin, end) = match (as_index(&offsets[0]), as_index(&offsets[1])) {
        (Some(begin), Some(end)) if begin <= end => (begin, end),
        _ => return Err(bad(format!("invalid data_offsets {offsets:?}"))),
    };
    if end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}) run past the {data_len}-byte data buffer (truncated file?)"
        )));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if expected != end - begin {
        return Err(bad(format!(
            "shape {shape:?} of {} needs {expected} bytes but data_offsets span {}",
            dtype.name(),
            end - begin
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}
