//! The `ds` command's jobs as a library: [`train`] (`ds train`, `ds profile`) and [`mod@bench`]
//! (`ds bench kernels`, `ds bench ckpt-act`), [`gemm`] (`ds bench gemm`), over [`ds_engine`]'s one engine and
//! [`ds_models`]' model library.
//!
//! ```no_run
//! let args = ds_cli::train::TrainArgs { steps: 10, ..Default::default() };
//! let report = ds_cli::train::train(&args)?;
//! println!("final loss {}", report.final_loss);
//! # Ok::<(), ds_engine::EngineError>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod comm;
pub mod gemm;
pub mod train;

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
