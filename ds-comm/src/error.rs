//! The error type shared by every backend.

use std::time::Duration;

/// Everything a collective can report instead of a result.
///
/// Errors never come from a panic: peer input (lengths, dtypes, call order) is checked and
/// reported here. After a [`CommError::Timeout`] or [`CommError::PeerFailed`] a communicator is
/// *poisoned*: every later call on it returns [`CommError::Poisoned`] naming the first failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// The operation did not complete within the communicator's timeout.
    #[error(
        "{op}{} on rank {rank} timed out after {timeout:?}: {}",
        bytes.map(|b| format!(" of {b} bytes")).unwrap_or_default(),
        if waiting_for.is_empty() {
            "no silent rank found (every peer answered afterwards: this rank may itself have been stopped or late)".to_string()
        } else {
            format!("still waiting for rank(s) {waiting_for:?}")
        }
    )]
    Timeout {
        /// The operation that timed out (e.g. `all_reduce`).
        op: String,
        /// The bytes this rank contributes to the operation, where the backend knows them.
        bytes: Option<usize>,
        /// The rank that reports the timeout.
        rank: usize,
        /// The ranks that had not reached the operation (empty if unknown).
        waiting_for: Vec<usize>,
        /// The configured timeout.
        timeout: Duration,
    },
    /// A peer panicked or dropped its communicator while this rank needed it.
    #[error("{op} on rank {rank} failed: rank {peer} {reason}")]
    PeerFailed {
        /// The operation that was pending or attempted.
        op: String,
        /// The rank that reports the failure.
        rank: usize,
        /// The rank that failed.
        peer: usize,
        /// What happened to the peer ("panicked", "exited", ...).
        reason: String,
    },
    /// The communicator failed earlier; later calls report this.
    #[error("{op} on rank {rank}: communicator unusable after an earlier failure: {cause}")]
    Poisoned {
        /// The operation attempted now.
        op: String,
        /// The rank that attempted it.
        rank: usize,
        /// The first failure.
        cause: Box<CommError>,
    },
    /// Ranks issued different calls (op, dtype, length, root) in the same slot.
    #[error("mismatched collective call #{seq}: {detail}")]
    Mismatch {
        /// The per-communicator call sequence number (0-based).
        seq: u64,
        /// Which ranks called what.
        detail: String,
    },
    /// The dtype is not supported by this backend or operation.
    #[error("{op}: unsupported dtype {dtype}")]
    UnsupportedDType {
        /// The operation.
        op: String,
        /// The dtype, as candle names it.
        dtype: String,
    },
    /// A bad argument (root or peer out of range, wrong device, ...).
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The operation.
        op: String,
        /// What is wrong.
        msg: String,
    },
    /// An error from candle while reading or building a tensor.
    #[error("tensor error: {0}")]
    Tensor(String),
    /// The backend (MPI, NCCL) reported an error or is not available on this machine.
    #[error("{backend} backend: {msg}")]
    Backend {
        /// `mpi`, `nccl`, ...
        backend: String,
        /// The reason.
        msg: String,
    },
}

impl From<candle_core::Error> for CommError {
    fn from(e: candle_core::Error) -> Self {
        CommError::Tensor(e.to_string())
    }
}

impl CommError {
    /// Shorthand for [`CommError::InvalidArgument`].
    pub fn invalid(op: &str, msg: impl Into<String>) -> Self {
        CommError::InvalidArgument {
            op: op.to_string(),
            msg: msg.into(),
        }
    }
}

/// `Result` with [`CommError`].
pub type Result<T> = std::result::Result<T, CommError>;
