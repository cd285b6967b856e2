//! `ds-engine`: composes the `ds-*` component crates into a training harness.
//!
//! - [`engine::Engine`]: one rank of a data-parallel run, for any [`traits::Model`] on any
//!   candle device (gradient accumulation, ZeRO through `ds-zero`, mixed precision, clipping,
//!   LR schedules, activation checkpointing, ZeRO-3 block gathering and prefetch, overlapped
//!   reduction, checkpoints through `ds-checkpoint`);
//! - [`traits`]: the [`traits::Model`] trait a model implements to be trained;
//! - [`data`]: the embedded data sets and loaders; [`lr`]: DeepSpeed's LR schedulers;
//!   [`monitor`]: csv/TensorBoard monitors; [`cli`]: `ds check-config`.
//!
//! The model library (GPT, MLP) is the `ds-models` crate and the `ds` command is `ds-cli`;
//! this crate depends on neither.
//!
//! ```
//! let out = ds_engine::cli::check_config_str(r#"{"train_batch_size": 8}"#, false, 2, &[], false)
//!     .expect("valid config");
//! assert_eq!(out.resolved["train_micro_batch_size_per_gpu"], 4);
//! ```

#![warn(missing_docs)]

pub mod cli;
pub mod data;
pub mod engine;
pub mod gpu;
pub mod lr;
pub mod monitor;
pub mod plot;
pub mod traits;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A configuration the engine cannot run.
    #[error("config: {0}")]
    Config(String),
    /// A config file problem.
    #[error(transparent)]
    ConfigFile(#[from] ds_config::ConfigError),
    /// Bad training data.
    #[error("data: {0}")]
    Data(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The partitioned optimizer failed.
    #[error(transparent)]
    Zero(#[from] ds_zero::ZeroError),
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] ds_comm::CommError),
    /// Saving or loading a checkpoint failed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
