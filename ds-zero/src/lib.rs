//! `ds-zero`: ZeRO (stages 0-3) and the fused optimizers that step a rank's shard.
//!
//! - [`optim`]: fused, flat, multithreaded fp32 Adam/AdamW, SGD, Lion and Lamb with exportable
//!   state ([`optim::FlatOptimizer`]).
//! - [`partition`]: DeepSpeed's partition layout (stage 1/2: flat group padded to a multiple of
//!   `2 * world_size` and split into equal contiguous shards; stage 3: per parameter,
//!   `ceil(numel / world_size)` per rank).
//! - [`partitioned`]: [`PartitionedOptimizer`], ZeRO driven with a candle program's own `Var`s
//!   and gradients on any device (`ZeroOptimizer::for_vars`, `step_vars`).
//! - [`estimate`]: model-state memory per rank for each stage (the ZeRO paper's formulas and
//!   DeepSpeed's estimators), and its placement on memory and disk ([`estimate::place`]).
//! - [`swap`] and [`offload`]: ZeRO-Infinity. Swap files under `nvme_path` (`O_DIRECT`,
//!   `aio`-style request queue on I/O threads) holding the master weights and optimizer state,
//!   streamed through the fused optimizer chunk by chunk with reads and writes overlapped, and
//!   the stage-3 parameters, read per block with the next block prefetched
//!   ([`ZeroOptimizer::with_precision_streamed`] with [`NvmeOptions`]).
//! - [`zero`]: [`ZeroOptimizer`], the partitioned optimizer, in fp32 or DeepSpeed-style mixed
//!   precision ([`ZeroPrecision`]: fp16 with ds-precision's loss scalers, or bf16; fp32 master
//!   weights and optimizer state, 16-bit model weights and gradient communication).
//!
//! ```
//! use ds_zero::optim::{AdamParams, FlatOptimizer, OptimizerSpec};
//!
//! let mut opt = FlatOptimizer::new(OptimizerSpec::Adam(AdamParams::default()), 3);
//! let mut p = vec![1.0f32, -2.0, 0.5];
//! opt.step(&mut p, &[0.1, -0.1, 0.0], 1e-3)?;
//! // Adam's first step moves each parameter by about lr * sign(g).
//! assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-6);
//! assert!((p[1] - (-2.0 + 1e-3)).abs() < 1e-6);
//! assert_eq!(p[2], 0.5);
//! # Ok::<(), ds_zero::ZeroError>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod estimate;
pub mod offload;
pub mod optim;
pub mod partition;
pub mod partitioned;
pub mod stream;
pub mod swap;
pub mod zero;

pub use offload::{NvmeOptions, SwapStats};
pub use partitioned::PartitionedOptimizer;
pub use stream::GradPiece;
pub use zero::{GradStats, MemoryReport, StepReport, ZeroOptimizer, ZeroOptions, ZeroPrecision};

/// Errors of the ZeRO crate.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    /// Buffer lengths or shapes that do not match.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Optimizer state that does not fit this optimizer.
    #[error("optimizer state: {0}")]
    State(String),
    /// Swap-file I/O (NVMe offload): the file, the transfer and the system's error.
    #[error("swap I/O: {0}")]
    Io(String),
    /// An option outside its allowed range.
    #[error("invalid option: {0}")]
    Option(String),
    /// A collective failed (a peer died, timed out, or called differently).
    #[error(transparent)]
    Comm(#[from] ds_comm::CommError),
    /// Mixed precision: an invalid loss-scaler option or state, or an fp16 overflow with the
    /// dynamic loss scale already at its minimum (DeepSpeed's "Current loss scale already at
    /// minimum" error).
    #[error(transparent)]
    Precision(#[from] ds_precision::PrecisionError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
