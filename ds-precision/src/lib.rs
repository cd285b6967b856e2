//! # ds-precision: fp16/bf16 mixed precision for candle training loops
//!
//! * [`LossScaler`] with [`DynamicLossScaler`] (DeepSpeed's rule step for step: the ZeRO
//!   variant with hysteresis, `consecutive_hysteresis`, window doubling and the min-scale
//!   error; or the stage-0 `FP16_Optimizer` variant, see [`ScalerVariant`]),
//!   [`StaticLossScaler`] and [`NoLossScaler`] (bf16/fp32, with `check_grad_overflow`).
//!   `update(overflow)` returns a [`StepDecision`]: step, or skip with a [`SkipReason`] and a
//!   printable message, so a skipped step is never silent (the scaler also counts them).
//! * [`PrecisionPolicy`]: model dtype, fp32 master weights ([`MasterWeights`], one flat fp32
//!   buffer), gradient-accumulation dtype, loss scaling, clipping; [`MixedPrecision`] drives a
//!   step with them.
//! * One fused pass over a gradient buffer ([`unscale_check_norm_f32`],
//!   [`unscale_check_norm`] for f16/bf16 slices, [`unscale_into_f32`]): unscale, inf/nan
//!   check and squared L2 norm in a single sweep; DeepSpeed's combined unscale-and-clip
//!   rule ([`deepspeed_combined_scale`]) and the plain `clip_grad_norm` rule ([`clip_coef`]).
//!
//! The crate depends only on candle and `half`; it has its own options
//! ([`LossScalerOptions`], DeepSpeed's defaults via `Default`).
//!
//! ## Deliberate difference from DeepSpeed: unscale with the scale used in backward
//!
//! DeepSpeed updates the loss scale *before* unscaling the gradients (DeepSpeed issue #2686,
//! PR #2695, PR #8588), so on a step where the scale doubles the gradients are divided by
//! twice the scale that multiplied the loss: the applied gradient is halved. Here the
//! gradients are always unscaled with the scale used for the backward pass
//! ([`StepDecision::scale_used`]; [`MixedPrecision`] unscales before it updates the scaler),
//! so the applied gradient equals the fp32 gradient on every step, growth steps included.
//! The scale *sequence* is DeepSpeed's exactly.
//!
//! ## Example
//!
//! ```
//! use ds_precision::{LossScaler, LossScalerOptions, MixedPrecision, PrecisionPolicy};
//!
//! # fn main() -> Result<(), ds_precision::PrecisionError> {
//! let opts = LossScalerOptions { init_scale_power: 8, window: 2, ..Default::default() };
//! let mut mp = MixedPrecision::new(PrecisionPolicy::fp16(opts).with_clip_grad(1.0))?;
//! assert_eq!(mp.loss_scale(), 256.0);
//!
//! // Gradients of (loss * 256): unscale, check and norm in one pass, then decide.
//! let mut grads = vec![0.3f32 * 256.0, -0.4 * 256.0];
//! let report = mp.step(&mut grads)?;
//! assert!(report.decision.is_step());
//! assert!((report.grad_norm - 0.5).abs() < 1e-6);
//! assert_eq!(grads, vec![0.3f32, -0.4]); // norm 0.5 < clip 1: not clipped
//!
//! // An overflow skips the step; hysteresis 2 absorbs the first one.
//! let mut bad = vec![f32::INFINITY, 1.0];
//! let report = mp.step(&mut bad)?;
//! assert!(report.decision.is_skip());
//! assert_eq!(mp.skipped_steps(), 1);
//! println!("{}", report.decision); // "OVERFLOW! Skipping step. Attempted loss scale: 256, but hysteresis is 2. ..."
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod error;
pub mod fused;
pub mod policy;
pub mod scaler;

pub use error::{PrecisionError, Result};
pub use fused::{
    check_norm_f32, clip_coef, deepspeed_combined_scale, scale_in_place, unscale_check_norm,
    unscale_check_norm_f32, unscale_into_f32, GradElement, GradStats,
};
pub use policy::{LossScaling, MasterWeights, MixedPrecision, PrecisionPolicy, StepReport};
pub use scaler::{
    trace_scales, DynamicLossScaler, LossScaler, LossScalerOptions, LossScalerState, NoLossScaler,
    ScalerVariant, SkipReason, StaticLossScaler, StepDecision,
};

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
