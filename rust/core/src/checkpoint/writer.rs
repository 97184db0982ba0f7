//! Writes one output safetensors shard with positional writes, so tensors can be written
//! in any order as soon as they are computed, and memory holds only the tensor at hand.
//!
//! Every entry's size is known when the shard is planned except the small quant_state
//! JSON tensors; fixed-size entries get their offsets up front (8-byte dtypes first, then
//! 4, 2 and 1, which keeps every tensor aligned), the JSON entries go in a tail after them,
//! and the header — padded with spaces to the space reserved for it, as the format allows
//! — is written last, with a CRC-32 of every tensor in its metadata.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::error::{CheckpointError, Result};
use super::safetensors::Dtype;

/// Metadata key holding the per-tensor CRC-32 checksums (a JSON object as a string).
pub const CHECKSUMS_KEY: &str = "qlorakit.checksums";

/// The checksum recorded for each tensor: CRC-32 (IEEE) of its bytes.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// A tensor the shard will hold, with its size known up front.
#[derive(Debug, Clone)]
pub struct EntrySpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl EntrySpec {
    pub(crate) fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

struct Placed {
    spec: EntrySpec,
    begin: usize,
    written: bool,
}

/// An output shard being written.
pub struct ShardWriter {
    path: PathBuf,
    file: File,
    data_start: usize,
    placed: Vec<Placed>,
    by_name: HashMap<String, usize>,
    tail_begin: usize,
    tail: Vec<(String, Vec<u8>)>,
    checksums: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
    durable: bool,
}

impl ShardWriter {
    /// Creates `path` for `fixed` entries plus up to `variable` JSON entries of at most
    /// `max_variable_len` bytes each; `metadata` goes into `__metadata__`. `durable`: the
    /// data goes to disk as it is written and [`Self::finish`] syncs it (otherwise it is left
    /// to the page cache, for a scratch output).
    pub fn create(
        path: &Path,
        fixed: Vec<EntrySpec>,
        variable: &[String],
        max_variable_len: usize,
        metadata: BTreeMap<String, String>,
        durable: bool,
    ) -> Result<ShardWriter> {
        let mut order: Vec<EntrySpec> = fixed;
        order.sort_by_key(|spec| std::cmp::Reverse(spec.dtype.size()));
        let mut offset = 0;
        let mut placed = Vec::with_capacity(order.len());
        let mut by_name = HashMap::new();
        for spec in order {
            let len = spec.byte_len();
            by_name.insert(spec.name.clone(), placed.len());
            placed.push(Placed {
                spec,
                begin: offset,
                written: false,
            });
            offset += len;
        }
        let file = File::create(path).map_err(CheckpointError::io(path))?;
        let mut writer = ShardWriter {
            path: path.to_path_buf(),
            file,
            data_start: 0,
            placed,
            by_name,
            tail_begin: offset,
            tail: Vec::new(),
            checksums: BTreeMap::new(),
            metadata,
            durable,
        };
        writer.data_start = 8 + writer.reserved_header_len(variable, max_variable_len);
        Ok(writer)
    }

    /// Header entries of the fixed-size tensors, in offset order.
    fn fixed_entries(&self) -> Vec<(String, Value)> {
        self.placed
            .iter()
            .map(|p| {
                let end = p.begin + p.spec.byte_len();
                (
                    p.spec.name.clone(),
                    entry_json(p.spec.dtype, &p.spec.shape, p.begin, end),
                )
            })
            .collect()
    }

    /// Header bytes to reserve: the header rendered with every unknown at its largest.
    fn reserved_header_len(&self, variable: &[String], max_variable_len: usize) -> usize {
        let worst_offset = usize::MAX / 2;
        let mut entries = self.fixed_entries();
        for name in variable {
            entries.push((
                name.clone(),
                entry_json(Dtype::U8, &[max_variable_len], worst_offset, worst_offset),
            ));
        }
        let mut checksums: BTreeMap<String, String> = BTreeMap::new();
        for (name, _) in &entries {
            checksums.insert(name.clone(), "ffffffff".into());
        }
        let header = render_header(&self.metadata, &checksums, entries);
        (header.len() + 64).div_ceil(8) * 8
    }

    /// Writes the bytes of a fixed-size entry.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let index = *self.by_name.get(name).ok_or_else(|| {
            CheckpointError::tensor(&self.path, name, "not planned in this shard")
        })?;
        let placed = &mut self.placed[index];
        if bytes.len() != placed.spec.byte_len() || placed.written {
            return Err(CheckpointError::tensor(
                &self.path,
                name,
                format!(
                    "{} bytes written, {} planned",
                    bytes.len(),
                    placed.spec.byte_len()
                ),
            ));
        }
        let position = (self.data_start + placed.begin) as u64;
        self.file
            .write_all_at(bytes, position)
            .map_err(|source| CheckpointError::WriteTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                source,
            })?;
        if self.durable {
            start_writeback(&self.file, position, bytes.len());
        }
        placed.written = true;
        self.checksums
            .insert(name.to_string(), format!("{:08x}", checksum(bytes)));
        Ok(())
    }

    /// Adds a variable-size uint8 entry (a quant_state JSON), written by [`Self::finish`].
    pub fn push_variable(&mut self, name: String, bytes: Vec<u8>) {
        self.checksums
            .insert(name.clone(), format!("{:08x}", checksum(&bytes)));
        self.tail.push((name, bytes));
    }

    /// Writes the tail and the header, checks every planned entry was written, syncs the
    /// file to disk (when durable); returns the shard's size in bytes.
    pub fn finish(self) -> Result<u64> {
        if let Some(missing) = self.placed.iter().find(|p| !p.written) {
            return Err(CheckpointError::tensor(
                &self.path,
                &missing.spec.name,
                "planned but never written",
            ));
        }
        let mut entries = self.fixed_entries();
        let mut offset = self.tail_begin;
        for (name, bytes) in &self.tail {
            self.file
                .write_all_at(bytes, (self.data_start + offset) as u64)
                .map_err(CheckpointError::io(&self.path))?;
            entries.push((
                name.clone(),
                entry_json(Dtype::U8, &[bytes.len()], offset, offset + bytes.len()),
            ));
            offset += bytes.len();
        }
        let header = render_header(&self.metadata, &self.checksums, entries);
        let reserved = self.data_start - 8;
        if header.len() > reserved {
            return Err(CheckpointError::InvalidFile {
                path: self.path.clone(),
                reason: format!(
                    "header of {} bytes exceeds the {reserved} reserved (a bug)",
                    header.len()
                ),
            });
        }
        let mut head = Vec::with_capacity(self.data_start);
        head.extend_from_slice(&(reserved as u64).to_le_bytes());
        head.extend_from_slice(header.as_bytes());
        head.resize(self.data_start, b' ');
        let io = CheckpointError::io(&self.path);
        let total = (self.data_start + offset) as u64;
        self.file
            .write_all_at(&head, 0)
            .and_then(|_| self.file.set_len(total))
            .and_then(|_| {
                if self.durable {
                    self.file.sync_all()
                } else {
                    Ok(())
                }
            })
            .map_err(io)?;
        Ok(total)
    }
}

/// Starts writing a large range to disk now, in the background, so the final fsync has
/// little left to wait for (Linux `sync_file_range`; elsewhere the fsync does it all).
fn start_writeback(file: &File, position: u64, len: usize) {
    #[cfg(target_os = "linux")]
    if len >= 1 << 20 {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(count)) = (i64::try_from(position), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a valid open descriptor; the call only schedules writeback of the range
        // and its failure is harmless (the fsync in `finish` still makes the data durable).
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, count, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, position, len);
}

fn entry_json(dtype: Dtype, shape: &[usize], begin: usize, end: usize) -> Value {
    json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [begin, end]})
}

fn render_header(
    metadata: &BTreeMap<String, String>,
    checksums: &BTreeMap<String, String>,
    entries: Vec<(String, Value)>,
) -> String {
    let mut meta: Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let checksum_map: Map<String, Value> = checksums
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    meta.insert(
        CHECKSUMS_KEY.into(),
        Value::String(Value::Object(checksum_map).to_string()),
    );
    let mut root = Map::new();
    root.insert("__metadata__".into(), Value::Object(meta));
    for (name, entry) in entries {
        root.insert(name, entry);
    }
    Value::Object(root).to_string()
}
