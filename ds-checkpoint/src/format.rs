//! Minimal, validating safetensors writer and reader.
//!
//! The writer streams tensors straight to disk while computing the CRC32 of every
//! [`BLOCK_BYTES`] block of the file (and of the whole file, combined from the blocks), so a
//! checkpoint is written in one pass. The reader checks the size against the manifest,
//! verifies the header's blocks and validates the header (offsets, dtypes, sizes) when it
//! opens a file; tensor data is read with positioned `read`s straight into the caller's
//! buffer, each block checksummed right after it arrives (while it is still in the CPU cache),
//! so a load makes one pass over the bytes and never returns a byte that was not verified.
//! Files recorded without block checksums (format version 1) are verified whole when opened.

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

/// Size of the checksummed blocks of a file written by this library (4 MiB).
pub const BLOCK_BYTES: u64 = 4 << 20;

/// Size and checksums of one written file, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File size in bytes.
    pub bytes: u64,
    /// CRC32 (IEEE) of the whole file (checked when the file is opened: against the
    /// combination of `block_crc32`, or, without those, against the file's bytes).
    pub crc32: u32,
    /// Size of the checksummed blocks (format version 2; 0 = no block checksums, as in
    /// version 1 manifests).
    #[serde(default)]
    pub block_bytes: u64,
    /// CRC32 of each `block_bytes` block of the file, in order (the last block may be
    /// shorter); empty when `block_bytes` is 0.
    #[serde(default)]
    pub block_crc32: Vec<u32>,
}

/// One tensor to write: fp32 data (the concatenation of `parts`), written as `dtype`.
pub(crate) struct TensorOut<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub parts: Vec<&'a [f32]>,
}

const CHUNK: usize = 4 << 20; // elements per conversion/write chunk (16 MiB of f32)

struct CrcWriter {
    file: File,
    /// Hash of the whole file up to the current block.
    hasher: crc32fast::Hasher,
    /// Hash of the current block.
    block: crc32fast::Hasher,
    blocks: Vec<u32>,
    bytes: u64,
    path: PathBuf,
}

impl CrcWriter {
    fn write(&mut self, mut buf: &[u8]) -> Result<()> {
        self.file.write_all(buf).map_err(io_err(&self.path))?;
        while !buf.is_empty() {
            let room = (BLOCK_BYTES - self.bytes % BLOCK_BYTES) as usize;
            let n = room.min(buf.len());
            self.block.update(&buf[..n]);
            self.bytes += n as u64;
            buf = &buf[n..];
            if self.bytes.is_multiple_of(BLOCK_BYTES) {
                self.end_block();
            }
        }
        Ok(())
    }

    fn end_block(&mut self) {
        let b = std::mem::take(&mut self.block);
        self.hasher.combine(&b);
        self.blocks.push(b.finalize());
    }

    fn finish(mut self) -> Result<FileRecord> {
        if !self.bytes.is_multiple_of(BLOCK_BYTES) {
            self.end_block();
        }
        self.file.sync_all().map_err(io_err(&self.path))?;
        Ok(FileRecord {
            bytes: self.bytes,
            crc32: self.hasher.finalize(),
            block_bytes: BLOCK_BYTES,
            block_crc32: self.blocks,
        })
    }
}

/// Writes `tensors` (in order) as a safetensors file cast to `dtype`, fsyncs it, and
/// returns its size and checksums.
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
        let given: usize = t.parts.iter().map(|p| p.len()).sum();
        if numel != given {
            return Err(CheckpointError::InvalidInput(format!(
                "tensor {:?}: shape {:?} has {} elements but {} were given",
                t.name, t.shape, numel, given
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
        block: crc32fast::Hasher::new(),
        blocks: Vec::new(),
        bytes: 0,
        path: path.to_path_buf(),
    };
    w.write(&(hbytes.len() as u64).to_le_bytes())?;
    w.write(&hbytes)?;
    let mut conv: Vec<u8> = Vec::new();
    for t in tensors {
        for chunk in t.parts.iter().flat_map(|p| p.chunks(CHUNK)) {
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
    w.finish()
}

/// Location of one tensor inside a file.
#[derive(Debug, Clone)]
pub(crate) struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the file.
    pub start: u64,
    pub end: u64,
}

/// Largest safetensors header accepted (the limit of the reference implementation).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The CRC32 of a `len`-byte file from the CRC32s of its `bs`-byte blocks (the last one may
/// be shorter), without reading it.
fn combine_blocks(bs: u64, crcs: &[u32], len: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (k, &c) in crcs.iter().enumerate() {
        let n = bs.min(len.saturating_sub(k as u64 * bs));
        h.combine(&crc32fast::Hasher::new_with_initial_len(c, n));
    }
    h.finalize()
}

/// The rules of the safetensors format for the tensors' `data_offsets` (`claims`: begin, end
/// and name of every tensor, relative to the data section of `data_len` bytes): ordered by
/// offset they must follow one another with neither overlap nor hole, from 0 to the end of the
/// data section (every byte belongs to exactly one tensor).
fn check_claims(path: &Path, claims: &mut [(u64, u64, String)], data_len: u64) -> Result<()> {
    claims.sort();
    let mut expected = 0u64;
    let mut prev: Option<&(u64, u64, String)> = None;
    for c in claims.iter() {
        let (begin, end, name) = c;
        if let (true, Some((pb, pe, pn))) = (*begin < expected, prev) {
            return Err(malformed(
                path,
                format!(
                    "tensors {pn:?} (data_offsets [{pb}, {pe}]) and {name:?} (data_offsets [{begin}, {end}]) overlap; every byte of the data section belongs to one tensor"
                ),
            ));
        }
        if *begin > expected {
            let after = prev.map_or(
                "the start of the data section".to_string(),
                |(pb, pe, pn)| format!("tensor {pn:?} (data_offsets [{pb}, {pe}])"),
            );
            return Err(malformed(
                path,
                format!(
                    "bytes [{expected}, {begin}) of the data section, between {after} and tensor {name:?} (data_offsets [{begin}, {end}]), belong to no tensor"
                ),
            ));
        }
        expected = *end;
        prev = Some(c);
    }
    if expected != data_len {
        let after = prev.map_or("no tensor at all".to_string(), |(pb, pe, pn)| {
            format!("the last tensor {pn:?} (data_offsets [{pb}, {pe}])")
        });
        return Err(malformed(
            path,
            format!(
                "bytes [{expected}, {data_len}) of the data section, after {after}, belong to no tensor"
            ),
        ));
    }
    Ok(())
}

/// Bytes per conversion piece and per whole-file checksum read.
const READ_PIECE: usize = 1 << 20;
/// Most bytes of whole blocks read by one request: large enough to keep the disk busy,
/// small enough that the blocks are still in the last-level cache when they are checksummed.
const READ_GROUP: u64 = 16 << 20;
/// Bytes the kernel is asked to read ahead of the reads (a window of outstanding I/O).
const READ_AHEAD: u64 = 64 << 20;

/// An opened safetensors file whose size and header were checked against the manifest; data
/// reads verify the block checksums of what they read.
pub(crate) struct TensorFile {
    pub path: PathBuf,
    file: File,
    len: u64,
    /// Block size and checksums; `None` when the file was verified whole at open (format
    /// version 1) or nothing is known about it.
    blocks: Option<(u64, Vec<u32>)>,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The header's `__metadata__` (string to string).
    pub metadata: BTreeMap<String, String>,
}

fn malformed(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Positioned read of exactly `buf.len()` bytes at `offset`; a short file is reported as
/// truncated (naming the file).
fn read_exact_at(file: &File, path: &Path, mut buf: &mut [u8], mut offset: u64) -> Result<()> {
    while !buf.is_empty() {
        #[cfg(unix)]
        let r = std::os::unix::fs::FileExt::read_at(file, buf, offset);
        #[cfg(windows)]
        let r = std::os::windows::fs::FileExt::seek_read(file, buf, offset);
        match r {
            Ok(0) => {
                return Err(malformed(
                    path,
                    format!("file ended at byte {offset} (truncated while being read?)"),
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(())
}

/// Errors unless `path` is a regular file (after following symbolic links): a missing file is
/// [`CheckpointError::MissingFile`], a FIFO, socket, device or directory is
/// [`CheckpointError::Malformed`] (reading a FIFO would block forever).
pub fn check_regular_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(CheckpointError::Malformed {
            path: path.to_path_buf(),
            reason: "not a regular file (a FIFO, socket, device or directory); checkpoint files are regular files".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CheckpointError::MissingFile {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err(path)(e)),
    }
}

impl TensorFile {
    /// Opens `path`, checks it against `expected` (size; then the checksums of the blocks
    /// holding the header, or of the whole file for records without block checksums) and
    /// parses the header.
    pub fn open(path: &Path, expected: Option<&FileRecord>) -> Result<Self> {
        // Opening a FIFO (or a device) for reading would block until a writer comes.
        check_regular_file(path)?;
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
        let blocks = match expected {
            Some(exp) if exp.block_bytes > 0 => {
                let n = len.div_ceil(exp.block_bytes);
                if exp.block_crc32.len() as u64 != n {
                    return Err(malformed(
                        path,
                        format!(
                            "the manifest lists {} block checksums for {n} blocks of {} bytes",
                            exp.block_crc32.len(),
                            exp.block_bytes
                        ),
                    ));
                }
                Some((exp.block_bytes, exp.block_crc32.clone()))
            }
            _ => None,
        };
        let mut f = TensorFile {
            path: path.to_path_buf(),
            file,
            len,
            blocks,
            tensors: BTreeMap::new(),
            metadata: BTreeMap::new(),
        };
        if let (Some(exp), Some((bs, crcs))) = (expected, &f.blocks) {
            // The whole-file CRC32 is not read back block by block: it must at least be the
            // combination of the block CRCs (else the manifest's record of the file was
            // altered).
            let combined = combine_blocks(*bs, crcs, len);
            if combined != exp.crc32 {
                return Err(malformed(
                    path,
                    format!(
                        "the manifest records crc32 {:08x} for this file, but its block checksums combine to {combined:08x} (the manifest's record of the file was altered)",
                        exp.crc32
                    ),
                ));
            }
        }
        if let (Some(exp), None) = (expected, &f.blocks) {
            // No block checksums (format version 1): verify the whole file now.
            let actual = f.crc_whole()?;
            if actual != exp.crc32 {
                return Err(CheckpointError::ChecksumMismatch {
                    path: path.to_path_buf(),
                    expected: exp.crc32,
                    actual,
                    region: "whole file".into(),
                });
            }
        }
        let mut n = [0u8; 8];
        f.read_verified(0, &mut n)?;
        let hlen = u64::from_le_bytes(n);
        if hlen > len - 8 {
            return Err(malformed(
                path,
                format!("header length {hlen} exceeds the file size {len}"),
            ));
        }
        if hlen > MAX_HEADER_BYTES {
            return Err(malformed(
                path,
                format!(
                    "header length {hlen} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes"
                ),
            ));
        }
        let mut hbytes = vec![0u8; hlen as usize];
        f.read_verified(8, &mut hbytes)?;
        let data_start = 8 + hlen;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&hbytes)
            .map_err(|e| {
                malformed(
                    path,
                    format!("safetensors header is not a JSON object: {e}"),
                )
            })?;
        let data_len = len - data_start;
        let mut claims: Vec<(u64, u64, String)> = Vec::with_capacity(header.len());
        for (name, v) in header {
            if name == "__metadata__" {
                let map = v
                    .as_object()
                    .and_then(|m| {
                        m.iter()
                            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect::<Option<BTreeMap<String, String>>>()
                    })
                    .ok_or_else(|| malformed(path, "__metadata__ is not an object of strings"))?;
                f.metadata = map;
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
            let offs: [u64; 2] = v
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
            if (offs[1] - offs[0]) as u128 != numel as u128 * dtype.size() as u128 {
                return Err(bad(&format!(
                    "data_offsets {offs:?} span {} bytes, shape {shape:?} of {dtype:?} needs {}",
                    offs[1] - offs[0],
                    numel as u128 * dtype.size() as u128
                )));
            }
            claims.push((offs[0], offs[1], name.clone()));
            f.tensors.insert(
                name,
                TensorEntry {
                    dtype,
                    shape,
                    start: data_start + offs[0],
                    end: data_start + offs[1],
                },
            );
        }
        check_claims(path, &mut claims, data_len)?;
        Ok(f)
    }

    /// CRC32 of the whole file, read in pieces.
    fn crc_whole(&self) -> Result<u32> {
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; READ_PIECE.min(self.len as usize)];
        let mut off = 0u64;
        while off < self.len {
            let n = buf.len().min((self.len - off) as usize);
            read_exact_at(&self.file, &self.path, &mut buf[..n], off)?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        Ok(h.finalize())
    }

    /// Reads `dst.len()` bytes at `offset` into `dst`, checking the checksum of every block
    /// they touch. Whole blocks are read straight into `dst` in cache-sized pieces, each
    /// checksummed right after it arrives; the partial blocks at either end are read whole
    /// into a scratch buffer, verified, and the needed part copied.
    pub fn read_verified(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let end = offset + dst.len() as u64;
        if end > self.len {
            return Err(malformed(
                &self.path,
                format!("bytes {offset}..{end} asked of a {}-byte file", self.len),
            ));
        }
        let Some((bs, _)) = &self.blocks else {
            return read_exact_at(&self.file, &self.path, dst, offset);
        };
        let bs = *bs;
        let mut scratch = Vec::new();
        let mut pos = offset;
        let mut advised = offset;
        while pos < end {
            // Keep the disk busy: ask the kernel to read a window ahead of the synchronous,
            // cache-sized reads below (many requests in flight instead of one).
            if advised < end && advised < pos + READ_AHEAD / 2 {
                let to = (pos + READ_AHEAD).min(end);
                self.will_need(advised, to);
                advised = to;
            }
            let k = pos / bs;
            let (blo, bhi) = (k * bs, ((k + 1) * bs).min(self.len));
            if pos == blo && bhi <= end {
                // A run of whole blocks (up to READ_GROUP bytes) straight into `dst` with one
                // read (large requests keep the disk busy), then each block checksummed while
                // it is still in the last-level cache.
                let mut ghi = bhi;
                while ghi < end && ghi - blo < READ_GROUP && (ghi + bs).min(self.len) <= end {
                    ghi = (ghi + bs).min(self.len);
                }
                let d = &mut dst[(pos - offset) as usize..(ghi - offset) as usize];
                read_exact_at(&self.file, &self.path, d, blo)?;
                for (i, block) in d.chunks(bs as usize).enumerate() {
                    self.check_block(k + i as u64, block)?;
                }
                pos = ghi;
            } else {
                scratch.resize((bhi - blo) as usize, 0u8);
                read_exact_at(&self.file, &self.path, &mut scratch, blo)?;
                self.check_block(k, &scratch)?;
                let hi = bhi.min(end);
                dst[(pos - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&scratch[(pos - blo) as usize..(hi - blo) as usize]);
                pos = hi;
            }
        }
        Ok(())
    }

    /// Checks the CRC32 of block `k` (`bytes`, already read) against the manifest.
    fn check_block(&self, k: u64, bytes: &[u8]) -> Result<()> {
        let Some((bs, crcs)) = &self.blocks else {
            return Ok(());
        };
        let actual = crc32fast::hash(bytes);
        let expected = crcs[k as usize];
        if actual != expected {
            let blo = k * bs;
            return Err(CheckpointError::ChecksumMismatch {
                path: self.path.clone(),
                expected,
                actual,
                region: format!("block {k} (bytes {blo}..{})", blo + bytes.len() as u64),
            });
        }
        Ok(())
    }

    /// Hints that bytes `from..to` will be read soon (asynchronous readahead; a hint only).
    fn will_need(&self, from: u64, to: u64) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on a descriptor this struct owns; it has no memory
            // effects and its failure is harmless.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    from as libc::off_t,
                    (to - from) as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (from, to);
    }

    /// Reads every byte once, verifying every checksum.
    pub fn verify_all(&self) -> Result<()> {
        let mut buf = vec![0u8; (4 * BLOCK_BYTES).min(self.len) as usize];
        let mut off = 0u64;
        while off < self.len {
            let n = buf.len().min((self.len - off) as usize);
            self.read_verified(off, &mut buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// The entry for tensor `name`.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Converts elements `[lo, lo + out.len())` of tensor `name` to f32 into `out`.
    pub fn read_f32_into(&self, name: &str, lo: usize, out: &mut [f32]) -> Result<()> {
        let e = self.tensors.get(name).ok_or_else(|| {
            malformed(
                &self.path,
                format!("tensor {name:?} listed in the manifest is not in the file"),
            )
        })?;
        let sz = e.dtype.size();
        let numel = ((e.end - e.start) / sz as u64) as usize;
        let hi = lo + out.len();
        if hi > numel {
            return Err(malformed(
                &self.path,
                format!("tensor {name:?} has {numel} elements, [{lo}, {hi}) was asked"),
            ));
        }
        let start = e.start + (lo * sz) as u64;
        match e.dtype {
            Dtype::F32 if cfg!(target_endian = "little") => {
                self.read_verified(start, bytemuck::cast_slice_mut(out))
            }
            dtype => {
                // Convert through a scratch buffer, a cache-sized piece at a time.
                let per = READ_PIECE / sz;
                let mut raw = vec![0u8; per.min(out.len()) * sz];
                let mut at = start;
                for chunk in out.chunks_mut(per) {
                    let bytes = &mut raw[..chunk.len() * sz];
                    self.read_verified(at, bytes)?;
                    at += bytes.len() as u64;
                    for (o, c) in chunk.iter_mut().zip(bytes.chunks_exact(sz)) {
                        *o = match dtype {
                            Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                            Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                            Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                        };
                    }
                }
                Ok(())
            }
        }
    }
}
