//! Loss scalers: DeepSpeed's dynamic rule (both variants), a static scale, and "no scaling".

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::{PrecisionError, Result};

/// Which of DeepSpeed's two dynamic loss-scale rules to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ScalerVariant {
    /// `deepspeed/runtime/fp16/loss_scaler.py::DynamicLossScaler` as used by ZeRO stages 1-3:
    /// hysteresis (`delayed_shift`), `consecutive_hysteresis`, and an error when an overflow
    /// happens with the scale already at `min_scale` (if `raise_error_at_min_scale`).
    #[default]
    Zero,
    /// `FP16_Optimizer` / `FP16_UnfusedOptimizer::_update_scale` (ZeRO stage 0 with fp16):
    /// every overflow halves the scale, clamped at `min_scale`; hysteresis is ignored and
    /// there is never an error at the minimum.
    Fp16Optimizer,
}

/// Options of [`DynamicLossScaler`], with DeepSpeed's defaults (`fp16` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScalerOptions {
    /// The initial scale is `2^init_scale_power` (`initial_scale_power`, default 16).
    pub init_scale_power: i32,
    /// Good steps between doublings (`loss_scale_window`, default 1000). Must be >= 1.
    pub window: u64,
    /// Overflows tolerated before the scale is halved (`hysteresis`, default 2). Must be >= 1.
    pub hysteresis: u32,
    /// Refill the hysteresis after every good step instead of only on growth
    /// (`consecutive_hysteresis`, default false).
    pub consecutive_hysteresis: bool,
    /// Smallest scale (`min_loss_scale`, default 1). Must be finite and > 0.
    pub min_scale: f64,
    /// Return [`PrecisionError::MinLossScale`] on an overflow at the minimum scale
    /// (default true, as DeepSpeed). Only used by [`ScalerVariant::Zero`].
    pub raise_error_at_min_scale: bool,
    /// Which DeepSpeed rule to follow (default [`ScalerVariant::Zero`]).
    pub variant: ScalerVariant,
}

impl Default for LossScalerOptions {
    fn default() -> Self {
        Self {
            init_scale_power: 16,
            window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_scale: 1.0,
            raise_error_at_min_scale: true,
            variant: ScalerVariant::Zero,
        }
    }
}

impl LossScalerOptions {
    /// Check every field; the error names the field, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if self.window == 0 {
            return Err(PrecisionError::InvalidOption {
                field: "window",
                value: self.window.to_string(),
                allowed: "an integer >= 1 (loss_scale_window)",
            });
        }
        if self.hysteresis == 0 {
            return Err(PrecisionError::InvalidOption {
                field: "hysteresis",
                value: self.hysteresis.to_string(),
                allowed: "an integer >= 1",
            });
        }
        if !(self.min_scale.is_finite() && self.min_scale > 0.0) {
            return Err(PrecisionError::InvalidOption {
                field: "min_scale",
                value: self.min_scale.to_string(),
                allowed: "a finite number > 0 (min_loss_scale)",
            });
        }
        let init = 2f64.powi(self.init_scale_power);
        if !(init.is_finite() && init > 0.0) {
            return Err(PrecisionError::InvalidOption {
                field: "init_scale_power",
                value: self.init_scale_power.to_string(),
                allowed: "a power p with 2^p finite and > 0 in f64 (-1074..=1023)",
            });
        }
        Ok(())
    }
}

/// Why a step was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum SkipReason {
    /// fp16 overflow: the scale was reduced (or clamped at the minimum).
    Overflow,
    /// fp16 overflow absorbed by hysteresis: the scale is unchanged, `hysteresis_left` more
    /// overflows are tolerated before it halves.
    OverflowHysteresis {
        /// Hysteresis left after this overflow.
        hysteresis_left: u32,
    },
    /// Overflow under a static loss scale (the scale never changes).
    OverflowStaticScale,
    /// inf/nan gradients without loss scaling (bf16/fp32 with `check_grad_overflow`).
    NonFiniteGradients,
}

/// What the caller must do with this step's gradients.
///
/// Every skip carries a reason and a [`fmt::Display`] message: log it, count it
/// (the scaler counts too, see [`LossScaler::skipped_steps`]); a skip is never silent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum StepDecision {
    /// Apply the optimizer step. Unscale the gradients with `scale_used`.
    Step {
        /// The scale the loss was multiplied by for this step's backward pass.
        scale_used: f64,
        /// The scale to use for the next backward pass.
        new_scale: f64,
    },
    /// Skip the optimizer step (and the LR-scheduler step); zero the gradients.
    Skip {
        /// Why.
        reason: SkipReason,
        /// The scale the loss was multiplied by for this step's backward pass.
        scale_used: f64,
        /// The scale to use for the next backward pass.
        new_scale: f64,
    },
}

impl StepDecision {
    /// True when the optimizer step must be applied.
    pub fn is_step(&self) -> bool {
        matches!(self, StepDecision::Step { .. })
    }
    /// True when the step must be skipped.
    pub fn is_skip(&self) -> bool {
        !self.is_step()
    }
    /// The scale used by this step's backward pass (divide gradients by it).
    pub fn scale_used(&self) -> f64 {
        match *self {
            StepDecision::Step { scale_used, .. } | StepDecision::Skip { scale_used, .. } => {
                scale_used
            }
        }
    }
    /// The scale for the next backward pass.
    pub fn new_scale(&self) -> f64 {
        match *self {
            StepDecision::Step { new_scale, .. } | StepDecision::Skip { new_scale, .. } => {
                new_scale
            }
        }
    }
    /// The skip reason, if skipped.
    pub fn skip_reason(&self) -> Option<SkipReason> {
        match *self {
            StepDecision::Step { .. } => None,
            StepDecision::Skip { reason, .. } => Some(reason),
        }
    }
}

impl fmt::Display for StepDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StepDecision::Step {
                scale_used,
                new_scale,
            } if scale_used != new_scale => write!(
                f,
                "step applied; no overflow for the whole loss-scale window, loss scale {scale_used} -> {new_scale}"
            ),
            StepDecision::Step { scale_used, .. } => {
                write!(f, "step applied (loss scale {scale_used})")
            }
            StepDecision::Skip {
                reason,
                scale_used,
                new_scale,
            } => match reason {
                SkipReason::Overflow => write!(
                    f,
                    "OVERFLOW! Skipping step. Attempted loss scale: {scale_used}, reducing to {new_scale}"
                ),
                SkipReason::OverflowHysteresis { hysteresis_left } => write!(
                    f,
                    "OVERFLOW! Skipping step. Attempted loss scale: {scale_used}, but hysteresis is {}. Reducing hysteresis to {hysteresis_left}",
                    hysteresis_left + 1
                ),
                SkipReason::OverflowStaticScale => write!(
                    f,
                    "OVERFLOW! Skipping step with static loss scale {scale_used}"
                ),
                SkipReason::NonFiniteGradients => {
                    write!(f, "inf/nan gradients detected: skipping step")
                }
            },
        }
    }
}

/// Serializable scaler state (for checkpoints). Field names follow DeepSpeed's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    /// Current scale.
    pub cur_scale: f64,
    /// Number of `update` calls so far.
    pub cur_iter: u64,
    /// Iteration of the last overflow, -1 for none.
    pub last_overflow_iter: i64,
    /// Hysteresis left (dynamic scaler only; equals the configured value otherwise).
    pub cur_hysteresis: u32,
    /// Number of skipped steps so far.
    pub skipped_steps: u64,
}

/// A loss scaler: multiplies the loss before backward and decides, from the (globally
/// reduced) overflow flag, whether the step is applied and what the next scale is.
///
/// Call order per optimizer step (gradient-accumulation boundary): read [`scale`](Self::scale)
/// before backward, then [`update`](Self::update) once with the overflow flag; unscale with
/// [`StepDecision::scale_used`] (the scale used in backward).
pub trait LossScaler {
    /// The scale to multiply the loss by for the next backward pass.
    fn scale(&self) -> f64;
    /// Record this step's overflow flag, update the scale and return the decision.
    ///
    /// An error (dynamic scaler at its minimum) leaves the state unchanged.
    fn update(&mut self, overflow: bool) -> Result<StepDecision>;
    /// Whether the scale can change.
    fn is_dynamic(&self) -> bool;
    /// Number of skipped steps so far.
    fn skipped_steps(&self) -> u64;
    /// The state to save in a checkpoint.
    fn state(&self) -> LossScalerState;
    /// Restore a state saved by [`state`](Self::state).
    fn load_state(&mut self, state: &LossScalerState) -> Result<()>;
}

/// DeepSpeed's dynamic loss scaler, step for step (see [`ScalerVariant`] for the two rules).
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicLossScaler {
    opts: LossScalerOptions,
    cur_scale: f64,
    cur_iter: u64,
    last_overflow_iter: i64,
    cur_hysteresis: u32,
    skipped_steps: u64,
}

impl DynamicLossScaler {
    /// A scaler at `2^init_scale_power`, fresh state; validates the options.
    pub fn new(opts: LossScalerOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            cur_scale: 2f64.powi(opts.init_scale_power),
            cur_iter: 0,
            last_overflow_iter: -1,
            cur_hysteresis: opts.hysteresis,
            skipped_steps: 0,
            opts,
        })
    }
    /// The options this scaler was built with.
    pub fn options(&self) -> &LossScalerOptions {
        &self.opts
    }
    /// Hysteresis left.
    pub fn cur_hysteresis(&self) -> u32 {
        self.cur_hysteresis
    }
    /// Number of `update` calls so far (DeepSpeed's `cur_iter`).
    pub fn cur_iter(&self) -> u64 {
        self.cur_iter
    }
}

impl LossScaler for DynamicLossScaler {
    fn scale(&self) -> f64 {
        self.cur_scale
    }

    fn update(&mut self, overflow: bool) -> Result<StepDecision> {
        let o = &self.opts;
        let scale_used = self.cur_scale;
        let decision = if overflow {
            let reason = match o.variant {
                ScalerVariant::Fp16Optimizer => {
                    self.cur_scale = (self.cur_scale / 2.0).max(o.min_scale);
                    SkipReason::Overflow
                }
                ScalerVariant::Zero => {
                    if o.hysteresis == 1 || self.cur_hysteresis == 1 {
                        if self.cur_scale == o.min_scale && o.raise_error_at_min_scale {
                            return Err(PrecisionError::MinLossScale {
                                min_scale: o.min_scale,
                                iteration: self.cur_iter,
                            });
                        }
                        self.cur_scale = (self.cur_scale / 2.0).max(o.min_scale);
                        SkipReason::Overflow
                    } else {
                        self.cur_hysteresis -= 1;
                        SkipReason::OverflowHysteresis {
                            hysteresis_left: self.cur_hysteresis,
                        }
                    }
                }
            };
            self.last_overflow_iter = self.cur_iter as i64;
            self.skipped_steps += 1;
            StepDecision::Skip {
                reason,
                scale_used,
                new_scale: self.cur_scale,
            }
        } else {
            let zero = o.variant == ScalerVariant::Zero;
            if zero && o.consecutive_hysteresis {
                self.cur_hysteresis = o.hysteresis;
            }
            let stable = self.cur_iter as i64 - self.last_overflow_iter - 1;
            if stable > 0 && (stable as u64).is_multiple_of(o.window) {
                if zero && !o.consecutive_hysteresis {
                    self.cur_hysteresis = o.hysteresis;
                }
                self.cur_scale *= 2.0;
            }
            StepDecision::Step {
                scale_used,
                new_scale: self.cur_scale,
            }
        };
        self.cur_iter += 1;
        Ok(decision)
    }

    fn is_dynamic(&self) -> bool {
        true
    }

    fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    fn state(&self) -> LossScalerState {
        LossScalerState {
            cur_scale: self.cur_scale,
            cur_iter: self.cur_iter,
            last_overflow_iter: self.last_overflow_iter,
            cur_hysteresis: self.cur_hysteresis,
            skipped_steps: self.skipped_steps,
        }
    }

    fn load_state(&mut self, s: &LossScalerState) -> Result<()> {
        if !(s.cur_scale.is_finite() && s.cur_scale > 0.0) {
            return Err(PrecisionError::BadState(format!(
                "cur_scale {} is not a finite number > 0",
                s.cur_scale
            )));
        }
        if s.last_overflow_iter < -1 || s.last_overflow_iter >= s.cur_iter as i64 {
            return Err(PrecisionError::BadState(format!(
                "last_overflow_iter {} is not in -1..cur_iter ({})",
                s.last_overflow_iter, s.cur_iter
            )));
        }
        if s.cur_hysteresis == 0 || s.cur_hysteresis > self.opts.hysteresis {
            return Err(PrecisionError::BadState(format!(
                "cur_hysteresis {} is not in 1..={} (the configured hysteresis)",
                s.cur_hysteresis, self.opts.hysteresis
            )));
        }
        self.cur_scale = s.cur_scale;
        self.cur_iter = s.cur_iter;
        self.last_overflow_iter = s.last_overflow_iter;
        self.cur_hysteresis = s.cur_hysteresis;
        self.skipped_steps = s.skipped_steps;
        Ok(())
    }
}

/// A fixed loss scale (DeepSpeed `fp16.loss_scale > 0`): the scale never changes, but an
/// overflow still skips the step.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticLossScaler {
    scale: f64,
    cur_iter: u64,
    skipped_steps: u64,
}

impl StaticLossScaler {
    /// A static scaler; `scale` must be finite and > 0.
    pub fn new(scale: f64) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(PrecisionError::InvalidOption {
                field: "loss_scale",
                value: scale.to_string(),
                allowed: "a finite number > 0 for a static scale",
            });
        }
        Ok(Self {
            scale,
            cur_iter: 0,
            skipped_steps: 0,
        })
    }
}

impl LossScaler for StaticLossScaler {
    fn scale(&self) -> f64 {
        self.scale
    }
    fn update(&mut self, overflow: bool) -> Result<StepDecision> {
        self.cur_iter += 1;
        if overflow {
            self.skipped_steps += 1;
            Ok(StepDecision::Skip {
                reason: SkipReason::OverflowStaticScale,
                scale_used: self.scale,
                new_scale: self.scale,
            })
        } else {
            Ok(StepDecision::Step {
                scale_used: self.scale,
                new_scale: self.scale,
            })
        }
    }
    fn is_dynamic(&self) -> bool {
        false
    }
    fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }
    fn state(&self) -> LossScalerState {
        LossScalerState {
            cur_scale: self.scale,
            cur_iter: self.cur_iter,
            last_overflow_iter: -1,
            cur_hysteresis: 1,
            skipped_steps: self.skipped_steps,
        }
    }
    fn load_state(&mut self, s: &LossScalerState) -> Result<()> {
        if s.cur_scale != self.scale {
            return Err(PrecisionError::BadState(format!(
                "saved static scale {} differs from the configured {}",
                s.cur_scale, self.scale
            )));
        }
        self.cur_iter = s.cur_iter;
        self.skipped_steps = s.skipped_steps;
        Ok(())
    }
}

/// No loss scaling (bf16 and fp32): the scale is 1. With `check_grad_overflow` (DeepSpeed's
/// bf16 default) a non-finite gradient skips the step and is counted; without it every step
/// is applied (and inf/nan reach the weights, as in DeepSpeed).
#[derive(Debug, Clone, PartialEq)]
pub struct NoLossScaler {
    check_grad_overflow: bool,
    cur_iter: u64,
    skipped_steps: u64,
}

impl NoLossScaler {
    /// A unit scaler.
    pub fn new(check_grad_overflow: bool) -> Self {
        Self {
            check_grad_overflow,
            cur_iter: 0,
            skipped_steps: 0,
        }
    }
}

impl LossScaler for NoLossScaler {
    fn scale(&self) -> f64 {
        1.0
    }
    fn update(&mut self, overflow: bool) -> Result<StepDecision> {
        self.cur_iter += 1;
        if overflow && self.check_grad_overflow {
            self.skipped_steps += 1;
            Ok(StepDecision::Skip {
                reason: SkipReason::NonFiniteGradients,
                scale_used: 1.0,
                new_scale: 1.0,
            })
        } else {
            Ok(StepDecision::Step {
                scale_used: 1.0,
                new_scale: 1.0,
            })
        }
    }
    fn is_dynamic(&self) -> bool {
        false
    }
    fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }
    fn state(&self) -> LossScalerState {
        LossScalerState {
            cur_scale: 1.0,
            cur_iter: self.cur_iter,
            last_overflow_iter: -1,
            cur_hysteresis: 1,
            skipped_steps: self.skipped_steps,
        }
    }
    fn load_state(&mut self, s: &LossScalerState) -> Result<()> {
        if s.cur_scale != 1.0 {
            return Err(PrecisionError::BadState(format!(
                "saved scale {} but this run uses no loss scaling (scale 1)",
                s.cur_scale
            )));
        }
        self.cur_iter = s.cur_iter;
        self.skipped_steps = s.skipped_steps;
        Ok(())
    }
}

/// Run a dynamic scaler over an overflow pattern and return the scale after each update,
/// stopping at the first error (returned alongside the scales so far). This is what the
/// `loss_scale_trace` example prints.
pub fn trace_scales(
    opts: &LossScalerOptions,
    overflows: &[bool],
) -> Result<(Vec<f64>, Option<PrecisionError>)> {
    let mut s = DynamicLossScaler::new(opts.clone())?;
    let mut scales = Vec::with_capacity(overflows.len());
    for &o in overflows {
        match s.update(o) {
            Ok(d) => scales.push(d.new_scale()),
            Err(e) => return Ok((scales, Some(e))),
        }
    }
    Ok((scales, None))
}
