//! Minimal, validating safetensors writer and memory-mapped reader.
//!
//! The writer streams tensors straight to disk while computing the file's CRC32, so a
//! checkpoint is written in one pass; the reader maps the file with memmap2, checks size
//! and checksum against the manifest, and validates the header (offsets, dtypes, sizes).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, CheckpointError, Result};

/// Element type of a tensor stored in a safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    /// IEEE fp32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE fp16.
    F16,
}

impl Dtype {
    /// The safetensors name (`"F32"`, `"BF16"`, `"F16"`).
    pub fn st_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
        }
    }
    fn from_st_name(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Dtype::F32),
            "BF16" => Some(Dtype::BF16),
            "F16" => Some(Dtype::F16),
            _ => None,
        }
    }
}

/// Size and CRC32 of one written file, as recorded in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File size in bytes.
    pub bytes: u64,
    /// CRC32 (IEEE) of the whole file.
    pub crc32: u32,
}

/// One tensor to write: fp32 data, written as `dtype`.
pub(crate) struct TensorOut<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

const CHUNK: usize = 4 << 20; // elements per conversion/write chunk (16 MiB of f32)

struct CrcWriter {
    file: File,
    hasher: crc32fast::Hasher,
    bytes: u64,
    path: PathBuf,
}

impl CrcWriter {
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        self.file.write_all(buf).map_err(io_err(&self.path))
    }
}

/// Writes `tensors` (in order) as a safetensors file cast to `dtype`, fsyncs it, and
/// returns its size and checksum.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut<'_>],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> Result<FileRecord> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata)
                .map_err(|e| CheckpointError::InvalidInput(e.to_string()))?,
        );
    }
    let mut offset = 0usize;
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        if numel != t.data.len() {
            return Err(CheckpointError::InvalidInput(format!(
                "tensor {:?}: shape {:?} has {} elements but {} were given",
                t.name,
                t.shape,
                numel,
                t.data.len()
            )));
        }
        if t.name == "__metadata__" || header.contains_key(t.name) {
            return Err(CheckpointError::InvalidInput(format!(
                "duplicate or reserved tensor name {:?}",
                t.name
            )));
        }
        let end = offset + numel * dtype.size();
        header.insert(
            t.name.to_string(),
            serde_json::json!({"dtype": dtype.st_name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| CheckpointError::InvalidInput(e.to_string()))?;
    while (8 + hbytes.len()) % 8 != 0 {
        hbytes.push(b' ');
    }
    let file = File::create(path).map_err(io_err(path))?;
    let mut w = CrcWriter {
        file,
        hasher: crc32fast::Hasher::new(),
        bytes: 0,
        path: path.to_path_buf(),
    };
    w.write(&(hbytes.len() as u64).to_le_bytes())?;
    w.write(&hbytes)?;
    let mut conv: Vec<u8> = Vec::new();
    for t in tensors {
        for chunk in t.data.chunks(CHUNK) {
            match dtype {
                Dtype::F32 if cfg!(target_endian = "little") => {
                    w.write(bytemuck::cast_slice(chunk))?
                }
                Dtype::F32 => {
                    conv.clear();
                    conv.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                    w.write(&conv)?;
                }
                Dtype::BF16 => {
                    conv.clear();
                    conv.extend(
                        chunk
                            .iter()
                            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
                    );
                    w.write(&conv)?;
                }
                Dtype::F16 => {
                    conv.clear();
                    conv.extend(
                        chunk
                            .iter()
                            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes()),
                    );
                    w.write(&conv)?;
                }
            }
        }
    }
    w.file.sync_all().map_err(io_err(path))?;
    Ok(FileRecord {
        bytes: w.bytes,
        crc32: w.hasher.finalize(),
    })
}

/// Location of one tensor inside a mapped file.
#[derive(Debug, Clone)]
pub(crate) struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the file.
    pub start: usize,
    pub end: usize,
}

/// A verified, memory-mapped safetensors file.
pub(crate) struct MappedFile {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
    pub tensors: BTreeMap<String, TensorEntry>,
}

fn malformed(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl MappedFile {
    /// Maps `path`, checks it against `expected` (size, then CRC32) and parses the header.
    pub fn open(path: &Path, expected: Option<&FileRecord>) -> Result<Self> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingFile {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let len = file.metadata().map_err(io_err(path))?.len();
        if let Some(exp) = expected {
            if exp.bytes != len {
                return Err(CheckpointError::SizeMismatch {
                    path: path.to_path_buf(),
                    expected: exp.bytes,
                    actual: len,
                });
            }
        }
        if len < 8 {
            return Err(malformed(
                path,
                format!("{len} bytes, shorter than the 8-byte safetensors header length"),
            ));
        }
        // SAFETY: the file is opened read-only; checkpoint files are immutable once written
        // (a tag directory is only ever replaced by rename, never modified in place).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        // The checksum pass reads the file front to back: ask for aggressive readahead (a
        // hint only; failure is harmless).
        #[cfg(unix)]
        {
            let _ = mmap.advise(memmap2::Advice::Sequential);
            let _ = mmap.advise(memmap2::Advice::WillNeed);
        }
        if let Some(exp) = expected {
            let actual = crc32fast::hash(&mmap);
            if actual != exp.crc32 {
                return Err(CheckpointError::ChecksumMismatch {
                    path: path.to_path_buf(),
                    expected: exp.crc32,
                    actual,
                });
            }
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&mmap[..8]);
        let hlen = u64::from_le_bytes(n);
        if hlen > len - 8 {
            return Err(malformed(
                path,
                format!("header length {hlen} exceeds the file size {len}"),
            ));
        }
        let data_start = 8 + hlen as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..data_start]).map_err(|e| {
                malformed(
                    path,
                    format!("safetensors header is not a JSON object: {e}"),
                )
            })?;
        let data_len = mmap.len() - data_start;
        let mut tensors = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| malformed(path, format!("tensor {name:?}: {what}"));
            let dtype = v
                .get("dtype")
                .and_then(|d| d.as_str())
                .and_then(Dtype::from_st_name)
                .ok_or_else(|| bad("dtype missing or not one of F32, BF16, F16"))?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .ok_or_else(|| bad("shape missing or not a list of sizes"))?;
            let offs: [usize; 2] = v
                .get("data_offsets")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .ok_or_else(|| bad("data_offsets missing or not [begin, end]"))?;
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b))
                .ok_or_else(|| bad("shape overflows"))?;
            if offs[0] > offs[1] || offs[1] > data_len {
                return Err(bad(&format!(
                    "data_offsets {offs:?} outside the {data_len}-byte data section"
                )));
            }
            if offs[1] - offs[0] != numel.saturating_mul(dtype.size()) {
                return Err(bad(&format!(
                    "{} bytes for shape {shape:?} of {dtype:?}",
                    offs[1] - offs[0]
                )));
            }
            tensors.insert(
                name,
                TensorEntry {
                    dtype,
                    shape,
                    start: data_start + offs[0],
                    end: data_start + offs[1],
                },
            );
        }
        Ok(MappedFile {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    /// The entry for tensor `name`.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Converts elements `[lo, hi)` of tensor `name` to f32 and appends them to `out`.
    pub fn read_f32(&self, name: &str, lo: usize, hi: usize, out: &mut Vec<f32>) -> Result<()> {
        let e = self.tensors.get(name).ok_or_else(|| {
            malformed(
                &self.path,
                format!("tensor {name:?} listed in the manifest is not in the file"),
            )
        })?;
        let sz = e.dtype.size();
        let numel = (e.end - e.start) / sz;
        if lo > hi || hi > numel {
            return Err(malformed(
                &self.path,
                format!("tensor {name:?} has {numel} elements, [{lo}, {hi}) was asked"),
            ));
        }
        let bytes = &self.mmap[e.start + lo * sz..e.start + hi * sz];
        match e.dtype {
            Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                Ok(s) if cfg!(target_endian = "little") => out.extend_from_slice(s),
                _ => out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
            },
            Dtype::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            Dtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
        Ok(())
    }
}
