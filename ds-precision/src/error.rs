//! The crate's error type.

use thiserror::Error;

/// Everything that can go wrong in `ds-precision`.
#[derive(Debug, Error)]
pub enum PrecisionError {
    /// The dynamic loss scaler overflowed while already at its minimum scale, with
    /// hysteresis exhausted and `raise_error_at_min_scale` set (DeepSpeed's
    /// "Current loss scale already at minimum" exception, made actionable).
    #[error(
        "Current loss scale already at minimum ({min_scale}) - cannot decrease scale anymore \
         (overflow at iteration {iteration}). The fp16 gradients overflow even at the smallest \
         allowed loss scale. What to do: train in bf16 instead of fp16 (no loss scaling needed), \
         or set a larger min_loss_scale, or lower the learning rate (or add/tighten gradient \
         clipping or warmup); set raise_error_at_min_scale = false to keep skipping steps instead \
         of stopping."
    )]
    MinLossScale {
        /// The configured minimum scale that was reached.
        min_scale: f64,
        /// The scaler iteration (number of previous `update` calls) of the failing overflow.
        iteration: u64,
    },
    /// An option value is out of range (the field name, the value and what is allowed).
    #[error("invalid option `{field}` = {value}: {allowed}")]
    InvalidOption {
        /// Option name.
        field: &'static str,
        /// The offending value, as text.
        value: String,
        /// What is allowed.
        allowed: &'static str,
    },
    /// Two buffers that must have the same length do not.
    #[error("length mismatch in {what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// What was being matched.
        what: &'static str,
        /// Expected element count.
        expected: usize,
        /// Actual element count.
        got: usize,
    },
    /// A dtype that this operation does not support.
    #[error("unsupported dtype {dtype:?} for {what} (allowed: {allowed})")]
    UnsupportedDType {
        /// The dtype given.
        dtype: candle_core::DType,
        /// The operation.
        what: &'static str,
        /// What is allowed.
        allowed: &'static str,
    },
    /// A saved scaler state that cannot be loaded into this scaler.
    #[error("cannot load loss-scaler state: {0}")]
    BadState(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, PrecisionError>;
