//! The precision policy (model dtype, fp32 master weights, gradient-accumulation dtype, loss
//! scaling) and [`MixedPrecision`], the per-step driver that ties a scaler to the fused pass.

use candle_core::{DType, Device, Shape, Tensor, Var};
use half::{bf16, f16};

use crate::error::{PrecisionError, Result};
use crate::fused::{
    clip_coef, scale_in_place, unscale_check_norm_f32, unscale_into_f32, GradStats, CLIP_EPS,
};
use crate::scaler::{
    DynamicLossScaler, LossScaler, LossScalerOptions, NoLossScaler, StaticLossScaler, StepDecision,
};

/// How the loss is scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum LossScaling {
    /// No scaling (scale 1): bf16 and fp32.
    None,
    /// A fixed scale (DeepSpeed `fp16.loss_scale > 0`).
    Static(f64),
    /// DeepSpeed's dynamic scaler (`fp16.loss_scale == 0`).
    Dynamic(LossScalerOptions),
}

/// What is stored and computed in which dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionPolicy {
    /// The dtype of the model weights used in forward/backward (`F32`, `F16` or `BF16`).
    pub model_dtype: DType,
    /// The dtype gradients are accumulated in across micro-batches
    /// (`data_types.grad_accum_dtype`; DeepSpeed's default is fp32 with mixed precision).
    pub grad_accum_dtype: DType,
    /// Keep fp32 master weights (flat buffers) that the optimizer updates.
    pub fp32_master_weights: bool,
    /// Loss scaling.
    pub loss_scaling: LossScaling,
    /// Skip (and count) steps whose gradients hold inf/nan when there is no loss scaling
    /// (DeepSpeed `bf16.check_grad_overflow`, default true). Scaled fp16 always checks.
    pub check_grad_overflow: bool,
    /// Gradient clipping max norm (`gradient_clipping`); 0 disables it.
    pub clip_grad: f64,
}

impl PrecisionPolicy {
    /// Plain fp32 training (no master copy, no scaling, inf/nan still skip the step).
    pub fn fp32() -> Self {
        Self {
            model_dtype: DType::F32,
            grad_accum_dtype: DType::F32,
            fp32_master_weights: false,
            loss_scaling: LossScaling::None,
            check_grad_overflow: true,
            clip_grad: 0.0,
        }
    }
    /// fp16 weights, fp32 master weights and gradient accumulation, dynamic loss scaling.
    pub fn fp16(opts: LossScalerOptions) -> Self {
        Self {
            model_dtype: DType::F16,
            grad_accum_dtype: DType::F32,
            fp32_master_weights: true,
            loss_scaling: LossScaling::Dynamic(opts),
            check_grad_overflow: true,
            clip_grad: 0.0,
        }
    }
    /// bf16 weights, fp32 master weights and gradient accumulation, no scaling,
    /// `check_grad_overflow` on.
    pub fn bf16() -> Self {
        Self {
            model_dtype: DType::BF16,
            grad_accum_dtype: DType::F32,
            fp32_master_weights: true,
            loss_scaling: LossScaling::None,
            check_grad_overflow: true,
            clip_grad: 0.0,
        }
    }
    /// Set the clipping max norm.
    pub fn with_clip_grad(mut self, clip_grad: f64) -> Self {
        self.clip_grad = clip_grad;
        self
    }

    /// Check the dtypes, the clipping value and the scaler options.
    pub fn validate(&self) -> Result<()> {
        const FLOATS: &str = "F32, F16 or BF16";
        for (dt, what) in [
            (self.model_dtype, "model_dtype"),
            (self.grad_accum_dtype, "grad_accum_dtype"),
        ] {
            if !matches!(dt, DType::F32 | DType::F16 | DType::BF16) {
                return Err(PrecisionError::UnsupportedDType {
                    dtype: dt,
                    what,
                    allowed: FLOATS,
                });
            }
        }
        if !(self.clip_grad.is_finite() && self.clip_grad >= 0.0) {
            return Err(PrecisionError::InvalidOption {
                field: "clip_grad",
                value: self.clip_grad.to_string(),
                allowed: "a finite number >= 0 (0 disables clipping)",
            });
        }
        match &self.loss_scaling {
            LossScaling::Dynamic(o) => o.validate(),
            LossScaling::Static(s) => StaticLossScaler::new(*s).map(|_| ()),
            LossScaling::None => Ok(()),
        }
    }

    /// Build the scaler this policy asks for.
    pub fn build_scaler(&self) -> Result<Box<dyn LossScaler + Send>> {
        Ok(match &self.loss_scaling {
            LossScaling::None => Box::new(NoLossScaler::new(self.check_grad_overflow)),
            LossScaling::Static(s) => Box::new(StaticLossScaler::new(*s)?),
            LossScaling::Dynamic(o) => Box::new(DynamicLossScaler::new(o.clone())?),
        })
    }
}

/// fp32 master weights: one flat fp32 buffer holding every parameter, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterWeights {
    flat: Vec<f32>,
    shapes: Vec<Shape>,
    offsets: Vec<usize>,
}

impl MasterWeights {
    /// Copy (and widen to fp32) the given parameters into one flat buffer.
    pub fn from_tensors(params: &[&Tensor]) -> Result<Self> {
        let mut flat = Vec::new();
        let mut shapes = Vec::with_capacity(params.len());
        let mut offsets = Vec::with_capacity(params.len() + 1);
        for p in params {
            offsets.push(flat.len());
            shapes.push(p.shape().clone());
            flat.extend(p.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        offsets.push(flat.len());
        Ok(Self {
            flat,
            shapes,
            offsets,
        })
    }
    /// The whole flat buffer.
    pub fn flat(&self) -> &[f32] {
        &self.flat
    }
    /// The whole flat buffer, mutable (what the optimizer updates).
    pub fn flat_mut(&mut self) -> &mut [f32] {
        &mut self.flat
    }
    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.flat.len()
    }
    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.shapes.len()
    }
    /// Parameter `i`'s range in the flat buffer.
    pub fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        Some(*self.offsets.get(i)?..*self.offsets.get(i + 1)?)
    }
    /// Parameter `i`'s shape.
    pub fn shape(&self, i: usize) -> Option<&Shape> {
        self.shapes.get(i)
    }
    /// The parameters cast to `dtype` on `device` (master -> model weights after a step).
    pub fn to_model_tensors(&self, dtype: DType, device: &Device) -> Result<Vec<Tensor>> {
        (0..self.shapes.len())
            .map(|i| {
                let r = self.offsets[i]..self.offsets[i + 1];
                let t = Tensor::from_slice(&self.flat[r], self.shapes[i].clone(), device)?;
                Ok(t.to_dtype(dtype)?)
            })
            .collect()
    }
    /// Cast the master weights into the model's variables (each in its own dtype).
    pub fn copy_to_vars(&self, vars: &[Var]) -> Result<()> {
        if vars.len() != self.shapes.len() {
            return Err(PrecisionError::LengthMismatch {
                what: "copy_to_vars (number of vars)",
                expected: self.shapes.len(),
                got: vars.len(),
            });
        }
        for (i, v) in vars.iter().enumerate() {
            let r = self.offsets[i]..self.offsets[i + 1];
            let t = Tensor::from_slice(&self.flat[r], self.shapes[i].clone(), v.device())?
                .to_dtype(v.dtype())?;
            v.set(&t)?;
        }
        Ok(())
    }
}

/// What [`MixedPrecision::finish_step`] decided and measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Step or skip (with the reason and the scales).
    pub decision: StepDecision,
    /// The global L2 norm of the unscaled gradients, before clipping (inf on overflow).
    pub grad_norm: f64,
    /// The clipping coefficient applied (1 when clipping is off, does not bind, or skipped).
    pub clip_coef: f64,
}

/// The per-step driver: owns the scaler, unscales with the scale used for backward, checks,
/// clips, and counts skipped steps.
pub struct MixedPrecision {
    policy: PrecisionPolicy,
    scaler: Box<dyn LossScaler + Send>,
}

impl std::fmt::Debug for MixedPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MixedPrecision")
            .field("policy", &self.policy)
            .field("scale", &self.scaler.scale())
            .field("skipped_steps", &self.scaler.skipped_steps())
            .finish()
    }
}

impl MixedPrecision {
    /// Validate the policy and build its scaler.
    pub fn new(policy: PrecisionPolicy) -> Result<Self> {
        policy.validate()?;
        let scaler = policy.build_scaler()?;
        Ok(Self { policy, scaler })
    }
    /// The policy.
    pub fn policy(&self) -> &PrecisionPolicy {
        &self.policy
    }
    /// The scaler.
    pub fn scaler(&self) -> &(dyn LossScaler + Send) {
        self.scaler.as_ref()
    }
    /// The scaler, mutable (e.g. to load a checkpointed state).
    pub fn scaler_mut(&mut self) -> &mut (dyn LossScaler + Send) {
        self.scaler.as_mut()
    }
    /// The loss scale for the next backward pass.
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }
    /// Skipped steps so far.
    pub fn skipped_steps(&self) -> u64 {
        self.scaler.skipped_steps()
    }
    /// `loss * loss_scale`, for the backward pass.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.affine(self.loss_scale(), 0.0)?)
    }
    /// The fused pass over a flat fp32 gradient buffer (or this rank's part of it), with
    /// `1 / loss_scale()`: call it BEFORE [`finish_step`](Self::finish_step).
    pub fn unscale_grads(&self, grads: &mut [f32]) -> GradStats {
        unscale_check_norm_f32(grads, (1.0 / self.loss_scale()) as f32)
    }
    /// The fused pass from candle gradient tensors (f32, f16 or bf16) into a flat fp32
    /// buffer (`dst.len()` must equal the total element count).
    pub fn unscale_grad_tensors(&self, grads: &[&Tensor], dst: &mut [f32]) -> Result<GradStats> {
        let total: usize = grads.iter().map(|g| g.elem_count()).sum();
        if total != dst.len() {
            return Err(PrecisionError::LengthMismatch {
                what: "unscale_grad_tensors (gradient elements vs dst)",
                expected: total,
                got: dst.len(),
            });
        }
        let inv = (1.0 / self.loss_scale()) as f32;
        let mut stats = GradStats::default();
        let mut off = 0;
        for g in grads {
            let n = g.elem_count();
            let d = &mut dst[off..off + n];
            let flat = g.flatten_all()?;
            let s = match g.dtype() {
                DType::F32 => unscale_into_f32(&flat.to_vec1::<f32>()?, d, inv)?,
                DType::F16 => unscale_into_f32(&flat.to_vec1::<f16>()?, d, inv)?,
                DType::BF16 => unscale_into_f32(&flat.to_vec1::<bf16>()?, d, inv)?,
                dt => {
                    return Err(PrecisionError::UnsupportedDType {
                        dtype: dt,
                        what: "gradient",
                        allowed: "F32, F16 or BF16",
                    })
                }
            };
            stats = stats.merge(s);
            off += n;
        }
        Ok(stats)
    }
    /// End of the step: `stats` are the (globally merged) stats of the fused pass over the
    /// gradients, `grads` this rank's unscaled gradients. Updates the scaler; on a step,
    /// applies the clipping rule in place. On a skip the caller must not step the optimizer
    /// or the LR scheduler, must zero the gradients, and should log
    /// `report.decision` (its `Display` is DeepSpeed's message).
    pub fn finish_step(&mut self, stats: GradStats, grads: &mut [f32]) -> Result<StepReport> {
        let overflow = stats.has_inf_or_nan;
        let decision = self.scaler.update(overflow)?;
        let grad_norm = stats.norm();
        let mut coef = 1.0;
        if decision.is_step() && self.policy.clip_grad > 0.0 {
            // DeepSpeed: clip = (norm + 1e-6) / clip_grad; grads /= clip when clip > 1.
            let clip = (grad_norm + CLIP_EPS) / self.policy.clip_grad;
            if clip > 1.0 {
                coef = clip_coef(grad_norm, self.policy.clip_grad);
                scale_in_place(grads, coef as f32);
            }
        }
        Ok(StepReport {
            decision,
            grad_norm,
            clip_coef: coef,
        })
    }
    /// Single-rank convenience: [`unscale_grads`](Self::unscale_grads) then
    /// [`finish_step`](Self::finish_step).
    pub fn step(&mut self, grads: &mut [f32]) -> Result<StepReport> {
        let stats = self.unscale_grads(grads);
        self.finish_step(stats, grads)
    }
}
