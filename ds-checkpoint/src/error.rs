//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while saving, loading or consolidating a checkpoint.
///
/// Every variant that concerns a file names it, and says what was expected.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An operating-system I/O error on a file or directory.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tag that is empty, contains a path separator, `..`, or is otherwise unsafe.
    #[error("invalid checkpoint tag {tag:?}: {reason}")]
    InvalidTag {
        /// The rejected tag.
        tag: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The requested tag does not exist in the store.
    #[error("checkpoint tag {tag:?} not found (expected directory {path})")]
    TagNotFound {
        /// The tag asked for.
        tag: String,
        /// Where it was expected.
        path: PathBuf,
    },
    /// No `latest` file: nothing was saved (completely) yet.
    #[error("no checkpoint in {dir}: file {dir}/latest does not exist")]
    NoLatest {
        /// The store's root directory.
        dir: PathBuf,
    },
    /// A file listed in the manifest is missing.
    #[error("missing checkpoint file {path} (listed in the manifest)")]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// A file's size differs from the manifest (truncated or overwritten).
    #[error("checkpoint file {path} has {actual} bytes, the manifest expects {expected} (truncated or replaced?)")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size recorded in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file's checksum differs from the manifest (corrupt).
    #[error("checkpoint file {path} is corrupt: {region} has crc32 {actual:08x}, the manifest expects {expected:08x}")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// Which part of the file (`whole file`, or a block and its byte range).
        region: String,
        /// Checksum recorded in the manifest.
        expected: u32,
        /// Checksum of the bytes on disk.
        actual: u32,
    },
    /// The manifest's content does not match the checksum it records of itself
    /// (`manifest_crc32`): it was edited or corrupted after it was written.
    #[error("manifest {path} was altered after it was written: its content has crc32 {actual:08x}, its manifest_crc32 field records {expected:08x}{}", detail_suffix(.detail))]
    ManifestChecksum {
        /// The manifest file.
        path: PathBuf,
        /// Checksum recorded in the manifest.
        expected: u32,
        /// Checksum of the manifest's content on disk.
        actual: u32,
        /// The first inconsistency found in the altered manifest, if any (what was edited).
        detail: Option<String>,
    },
    /// The manifest was written by another format version.
    #[error("manifest {path} has format version {found}, this library reads version {expected}")]
    VersionMismatch {
        /// The manifest file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this library supports.
        expected: u32,
    },
    /// A file could not be parsed (bad manifest JSON, bad safetensors header, ...).
    #[error("malformed checkpoint file {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The caller passed inconsistent data (wrong buffer length, unknown parameter, ...).
    #[error("invalid checkpoint input: {0}")]
    InvalidInput(String),
    /// A requested tensor or buffer is not in the checkpoint.
    #[error("{what} not found in checkpoint {tag:?}")]
    NotFound {
        /// The tag.
        tag: String,
        /// What was looked for.
        what: String,
    },
    /// Part of a requested flat range is held by no saved rank.
    #[error("flat buffer {buffer:?} of checkpoint {tag:?}: elements [{start}, {end}) are held by no saved rank")]
    RangeNotCovered {
        /// The tag.
        tag: String,
        /// The buffer name.
        buffer: String,
        /// First missing element.
        start: usize,
        /// One past the last missing element.
        end: usize,
    },
    /// A rank's files were not all present when rank 0 finalized the save.
    #[error("incomplete save of tag {tag:?}: {reason}")]
    IncompleteSave {
        /// The tag.
        tag: String,
        /// What was missing.
        reason: String,
    },
    /// The background writer of an [`crate::AsyncSaver`] failed or died.
    #[error("asynchronous checkpoint save failed: {0}")]
    Async(String),
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_deref()
        .map(|d| format!("; {d}"))
        .unwrap_or_default()
}

/// Result alias of this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.into();
    move |source| CheckpointError::Io { path, source }
}
