//! `ds-profiler`: DeepSpeed's flops profiler, wall-clock breakdown, throughput timer and memory
//! helpers for candle programs.
//!
//! candle's graph cannot be inspected, so FLOPs are counted by instrumented layers: each layer
//! opens a named scope on a shared [`FlopsProfiler`], reports its own parameter count, and calls
//! one `record_*` function per op with the op's shapes. The profiler sums the costs per module,
//! times each scope, and renders DeepSpeed's `print_model_profile` report
//! ([`FlopsProfiler::model_profile_report`]) or a JSON [`Profile`] ([`FlopsProfiler::to_json`]).
//! When disabled, every call is one relaxed atomic load and a return.
//!
//! # Counted ops (DeepSpeed's rules, `counts` module)
//!
//! | op | MACs | FLOPs |
//! |---|---|---|
//! | linear ([`FlopsProfiler::record_linear`]) | input numel x out_features | 2 x MACs (bias not counted) |
//! | matmul/mm/bmm ([`FlopsProfiler::record_matmul`]) | prod(A.shape) x B.shape\[-1\] | 2 x MACs |
//! | addmm/baddbmm ([`FlopsProfiler::record_addmm`]) | as matmul | 2 x MACs + input numel |
//! | conv ([`FlopsProfiler::record_conv`]) | prod(kernel) x C_in x C_out/groups x N x prod(out spatial) | 2 x MACs + C_out x N x prod(out spatial) with bias |
//! | conv transpose ([`FlopsProfiler::record_conv_transpose`]) | as conv with input spatial | as conv |
//! | scaled-dot-product attention ([`FlopsProfiler::record_sdpa`]) | prod(q) x L_k + prod(q\[:-1\]) x L_k x d_v | 2 x MACs |
//! | relu, prelu, elu, leaky_relu, relu6, silu, gelu ([`FlopsProfiler::record_activation`]) | 0 | numel |
//! | tanh, sigmoid | 0 | 0 (unpatched in DeepSpeed; its LeNet-5 numbers rely on it) |
//! | softmax ([`FlopsProfiler::record_softmax`]) | 0 | numel |
//! | layer/group/instance norm ([`FlopsProfiler::record_layer_norm`]) | 0 | numel x 5 (affine) or 4 |
//! | batch norm ([`FlopsProfiler::record_batch_norm`]) | 0 | training numel x 5/4, eval numel x 2/1 |
//! | avg/max/adaptive pooling ([`FlopsProfiler::record_pool`]) | 0 | input numel |
//! | upsample/interpolate ([`FlopsProfiler::record_upsample`]) | 0 | output numel |
//! | elementwise add/mul ([`FlopsProfiler::record_elementwise`]) | 0 | numel of broadcast shape |
//! | embedding, dropout | 0 | 0 |
//! | anything else ([`FlopsProfiler::record_uncounted`]) | listed as "uncounted" | listed as "uncounted" |
//! | custom ([`FlopsProfiler::record`]) | caller's | caller's |
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ds_profiler::{FlopsProfiler, ProfilerOptions, ReportContext};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let prof = FlopsProfiler::new();
//! prof.start_profile();
//! let x = Tensor::ones((1, 10), candle_core::DType::F32, &Device::Cpu)?;
//! let w = Tensor::ones((10, 10), candle_core::DType::F32, &Device::Cpu)?;
//! let b = Tensor::zeros(10, candle_core::DType::F32, &Device::Cpu)?;
//! let y = {
//!     let _g = prof.scope("linear", "Linear");
//!     prof.set_params(110);
//!     prof.record_linear(x.dims(), 10);
//!     x.matmul(&w.t()?)?.broadcast_add(&b)?
//! };
//! prof.stop_profile();
//! assert_eq!(y.dims(), &[1, 10]);
//! assert_eq!(prof.total_flops(), 200);
//! assert_eq!(prof.total_params(), 110);
//! let report = prof.model_profile_report(&ProfilerOptions::default(), &ReportContext::default())?;
//! assert!(report.contains("DeepSpeed Flops Profiler"));
//! let json = prof.to_json()?;
//! assert!(json.contains("\"flops\": 200"));
//! # Ok(())
//! # }
//! ```
//!
//! Wall-clock timers ([`Timers`]), the throughput timer ([`ThroughputTimer`]), the matmul peak
//! probe ([`measure_matmul_peak_gflops`]) and memory helpers ([`CountingAlloc`],
//! [`vm_hwm_bytes`]) are independent of the flops profiler.

pub mod counts;
mod memory;
mod profiler;
mod report;
mod timers;

use std::path::PathBuf;

pub use counts::{Activation, OpCost};
pub use memory::{mem_available_bytes, vm_hwm_bytes, vm_rss_bytes, CountingAlloc};
pub use profiler::{FlopsProfiler, ScopeGuard};
pub use report::{
    duration_to_string, flops_rate_to_string, flops_to_string, macs_to_string, number_to_string,
    params_to_string, render, ModuleProfile, Profile, ProfilerOptions, ReportContext,
};
pub use timers::{
    measure_matmul_peak_gflops, ThroughputTimer, Timer, Timers, BACKWARD_ALLREDUCE_GLOBAL_TIMER,
    BACKWARD_ALLREDUCE_MICRO_TIMER, BACKWARD_GLOBAL_TIMER, BACKWARD_INNER_GLOBAL_TIMER,
    BACKWARD_INNER_MICRO_TIMER, BACKWARD_MICRO_TIMER, FORWARD_GLOBAL_TIMER, FORWARD_MICRO_TIMER,
    STEP_GLOBAL_TIMER, STEP_MICRO_TIMER,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    /// Writing the report to `output_file` failed.
    #[error("cannot write the profile to {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// JSON serialization failed.
    #[error("cannot serialize the profile: {0}")]
    Json(#[from] serde_json::Error),
    /// A candle op failed (matmul peak probe).
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
