//! The partitioned optimizer: ZeRO stages 0-3 over any [`Communicator`].
//!
//! The caller (an engine, or any candle training loop) hands over each step's local gradients
//! as one flat fp32 buffer in parameter order, and gets the updated full parameters back:
//!
//! - stage 0: gradients all-reduced (bucketed); every rank steps the whole model (plain data
//!   parallelism);
//! - stage 1: gradients reduce-scattered at the accumulation boundary; each rank keeps and steps only its shard of the fp32
//!   master weights and optimizer state; updated shards all-gathered;
//! - stage 2: gradients reduce-scattered (bucketed) so each rank keeps only its gradient shard;
//!   the rest as stage 1;
//! - stage 3: as stage 2 for optimizer state and gradients, and the full parameters exist only
//!   transiently: [`ZeroOptimizer::gather_params`] all-gathers them for the forward/backward
//!   pass and the caller releases them afterwards.
//!
//! Partitioning follows DeepSpeed (`reference/deepspeed.md` §1.3): one flat group padded to a
//! multiple of `2 * world_size`, split into equal contiguous shards. Gradient averaging follows
//! DeepSpeed's `allreduce_bucket`: `"mean"` divides by the world size, `"sum"` does not,
//! `prescale_gradients` divides by `gradient_predivide_factor` before the reduction and
//! multiplies by `factor / world_size` ("mean") or `factor` ("sum") after. Clipping uses DeepSpeed's
//! `clip_coef = max_norm / (norm + 1e-6)` when it is below 1; inf/nan gradients skip the step on
//! every rank (the flag is all-reduced).

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{DType, Device, Tensor, WithDType};
use ds_comm::{Communicator, ReduceOp};
use ds_precision::{
    DynamicLossScaler, LossScaler, LossScalerOptions, LossScalerState, LossScaling, NoLossScaler,
    ScalerVariant, SkipReason, StaticLossScaler,
};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::offload::{NvmeOptions, Offload, SwapStats};
use crate::optim::{FlatOptimizer, OptimizerSpec, OptimizerState, Publish};
use crate::partition::FlatLayout;
use crate::ZeroError;

/// Options of the partitioned optimizer (DeepSpeed's `zero_optimization` and gradient keys).
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroOptions {
    /// 0..=3.
    pub stage: u8,
    /// Elements per gradient reduction bucket (all ranks' parts together).
    pub reduce_bucket_size: usize,
    /// Elements per parameter all-gather bucket (a multiple of 2).
    pub allgather_bucket_size: usize,
    /// `true` = "mean" (divide by the world size), `false` = "sum".
    pub average_gradients: bool,
    /// Divide before the reduction instead of after.
    pub prescale_gradients: bool,
    /// Pre-division factor with `prescale_gradients`.
    pub gradient_predivide_factor: f64,
    /// Global L2-norm clip threshold (0 = off).
    pub gradient_clipping: f64,
}

impl Default for ZeroOptions {
    /// DeepSpeed's defaults (stage 0, 5e8-element buckets, mean, clipping 1.0).
    fn default() -> Self {
        ZeroOptions {
            stage: 0,
            reduce_bucket_size: 500_000_000,
            allgather_bucket_size: 500_000_000,
            average_gradients: true,
            prescale_gradients: false,
            gradient_predivide_factor: 1.0,
            gradient_clipping: 1.0,
        }
    }
}

/// Training precision of a [`ZeroOptimizer`] (DeepSpeed's `fp16` / `bf16` config sections).
///
/// With [`ZeroPrecision::Fp16`] or [`ZeroPrecision::Bf16`] the optimizer runs DeepSpeed's mixed
/// precision: fp32 master weights and optimizer state (partitioned as at fp32), 16-bit model
/// weights (what [`ZeroOptimizer::gather_params`] hands back), gradients that arrive multiplied
/// by the loss scale and are communicated in the model dtype (DeepSpeed's default
/// `communication_data_type`), an overflow check all-reduced across ranks that skips the step
/// everywhere, and unscaling fused into the single optimizer pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ZeroPrecision {
    /// Everything fp32 (the default; no loss scaling, inf/nan gradients skip the step).
    #[default]
    F32,
    /// fp16 model weights and gradient communication, with loss scaling (`fp16.loss_scale`:
    /// 0 = [`LossScaling::Dynamic`], > 0 = [`LossScaling::Static`]; see
    /// [`ZeroPrecision::deepspeed_fp16`]).
    Fp16 {
        /// How the loss is scaled.
        loss_scaling: LossScaling,
    },
    /// bf16 model weights and gradient communication, no loss scaling.
    Bf16 {
        /// Skip (and count) steps whose gradients hold inf/nan (`bf16.check_grad_overflow`,
        /// DeepSpeed's default true). Without it such steps are applied, as in DeepSpeed.
        check_grad_overflow: bool,
    },
}

impl ZeroPrecision {
    /// fp16 with DeepSpeed's dynamic loss scaler and these options.
    pub fn fp16_dynamic(opts: LossScalerOptions) -> Self {
        ZeroPrecision::Fp16 {
            loss_scaling: LossScaling::Dynamic(opts),
        }
    }

    /// bf16 with `check_grad_overflow` on (DeepSpeed's default).
    pub fn bf16() -> Self {
        ZeroPrecision::Bf16 {
            check_grad_overflow: true,
        }
    }

    /// DeepSpeed's `fp16` section mapped as DeepSpeed does for a ZeRO `stage`: `loss_scale`
    /// 0 means dynamic scaling with `opts`, following the `FP16_Optimizer` rule at stage 0
    /// (no hysteresis, no error at the minimum) and the ZeRO `DynamicLossScaler` rule at
    /// stages 1-3 (`opts.variant` is overwritten accordingly); `loss_scale > 0` is a static
    /// scale.
    pub fn deepspeed_fp16(stage: u8, loss_scale: f64, opts: LossScalerOptions) -> Self {
        let loss_scaling = if loss_scale == 0.0 {
            LossScaling::Dynamic(LossScalerOptions {
                variant: if stage == 0 {
                    ScalerVariant::Fp16Optimizer
                } else {
                    ScalerVariant::Zero
                },
                ..opts
            })
        } else {
            LossScaling::Static(loss_scale)
        };
        ZeroPrecision::Fp16 { loss_scaling }
    }

    /// The model (and gradient communication) dtype: `F32`, `F16` or `BF16`.
    pub fn model_dtype(&self) -> DType {
        match self {
            ZeroPrecision::F32 => DType::F32,
            ZeroPrecision::Fp16 { .. } => DType::F16,
            ZeroPrecision::Bf16 { .. } => DType::BF16,
        }
    }

    /// Bytes per element of the model weights and communicated gradients (4 or 2).
    pub fn model_bytes(&self) -> usize {
        self.model_dtype().size_in_bytes()
    }

    /// A fresh loss scaler for this precision (what [`ZeroOptimizer`] uses; for engines that
    /// run the optimizer elsewhere, e.g. on a GPU).
    pub fn loss_scaler(&self) -> Result<Box<dyn ds_precision::LossScaler + Send>, ZeroError> {
        Ok(match self.build_scaler()? {
            Scaler::None(s) => Box::new(s),
            Scaler::Static(s) => Box::new(s),
            Scaler::Dynamic(s) => Box::new(s),
        })
    }

    fn build_scaler(&self) -> Result<Scaler, ZeroError> {
        Ok(match self {
            ZeroPrecision::F32 => Scaler::None(NoLossScaler::new(true)),
            ZeroPrecision::Bf16 {
                check_grad_overflow,
            } => Scaler::None(NoLossScaler::new(*check_grad_overflow)),
            ZeroPrecision::Fp16 { loss_scaling } => match loss_scaling {
                LossScaling::None => Scaler::None(NoLossScaler::new(true)),
                LossScaling::Static(s) => Scaler::Static(StaticLossScaler::new(*s)?),
                LossScaling::Dynamic(o) => Scaler::Dynamic(DynamicLossScaler::new(o.clone())?),
            },
        })
    }
}

/// The loss scaler of a [`ZeroOptimizer`] (an enum so the optimizer stays `Debug + Clone`).
#[derive(Debug, Clone)]
enum Scaler {
    None(NoLossScaler),
    Static(StaticLossScaler),
    Dynamic(DynamicLossScaler),
}

impl Scaler {
    fn get(&self) -> &dyn LossScaler {
        match self {
            Scaler::None(s) => s,
            Scaler::Static(s) => s,
            Scaler::Dynamic(s) => s,
        }
    }

    fn get_mut(&mut self) -> &mut dyn LossScaler {
        match self {
            Scaler::None(s) => s,
            Scaler::Static(s) => s,
            Scaler::Dynamic(s) => s,
        }
    }
}

/// An element type that travels through the collectives: f32, or a 16-bit model dtype.
pub(crate) trait Wire: WithDType + Default + bytemuck::Pod {
    /// Rounds an f32 to this type (round to nearest even; beyond the range: inf).
    fn narrow(x: f32) -> Self;
    /// The exact f32 value.
    fn widen(self) -> f32;
    /// `src` in this type (borrowed when it already is f32).
    fn narrow_slice(src: &[f32]) -> Cow<'_, [Self]> {
        Cow::Owned(
            src.par_iter()
                .with_min_len(1 << 14)
                .map(|&x| Self::narrow(x))
                .collect(),
        )
    }
    /// `v` as f32 (moved when it already is f32).
    fn widen_vec(v: Vec<Self>) -> Vec<f32> {
        v.par_iter()
            .with_min_len(1 << 14)
            .map(|&x| x.widen())
            .collect()
    }
}

impl Wire for f32 {
    fn narrow(x: f32) -> Self {
        x
    }
    fn widen(self) -> f32 {
        self
    }
    fn narrow_slice(src: &[f32]) -> Cow<'_, [Self]> {
        Cow::Borrowed(src)
    }
    fn widen_vec(v: Vec<Self>) -> Vec<f32> {
        v
    }
}

impl Wire for f16 {
    fn narrow(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Wire for bf16 {
    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `dst[i] = T(T(src[i]) * s)`, in parallel: the gradient as the 16-bit model would hold it
/// (an fp16 value beyond 65504 is inf before any pre-division), then the pre-reduction factor
/// applied in the wire dtype, as DeepSpeed divides its 16-bit gradient buckets.
pub(crate) fn narrow_scaled_into<T: Wire>(dst: &mut [T], src: &[f32], s: f32) {
    dst.par_chunks_mut(1 << 15)
        .zip(src.par_chunks(1 << 15))
        .for_each(|(d, x)| {
            if s == 1.0 {
                for (a, &b) in d.iter_mut().zip(x) {
                    *a = T::narrow(b);
                }
            } else {
                for (a, &b) in d.iter_mut().zip(x) {
                    *a = T::narrow(T::narrow(b).widen() * s);
                }
            }
        });
}

/// `dst[i] = f32(src[i])`, in parallel, with the squared norm and finiteness of what was
/// written (each chunk checked while it is in cache).
fn widen_into<T: Wire>(dst: &mut [f32], src: &[T]) -> GradStats {
    dst.par_chunks_mut(1 << 15)
        .zip(src.par_chunks(1 << 15))
        .map(|(d, x)| {
            for (a, &b) in d.iter_mut().zip(x) {
                *a = b.widen();
            }
            GradStats::of_serial(d)
        })
        .reduce(|| GradStats::ZERO, GradStats::combine)
}

/// The squared L2 norm (accumulated in f64) and finiteness of a gradient buffer, computed in
/// the pass that wrote it (accumulation, reduction) so that [`ZeroOptimizer::step`] needs no
/// pass of its own over the gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradStats {
    /// Sum of the squares (of the finite elements, as ds-precision's fused check counts them).
    pub sq_norm: f64,
    /// No element is inf or nan.
    pub finite: bool,
}

impl GradStats {
    /// The statistics of an empty (or all-zero) buffer.
    pub const ZERO: GradStats = GradStats {
        sq_norm: 0.0,
        finite: true,
    };

    /// The statistics of `s`, in parallel chunks (ds-precision's fused check per chunk).
    pub fn of(s: &[f32]) -> GradStats {
        s.par_chunks(1 << 15)
            .map(GradStats::of_serial)
            .reduce(|| GradStats::ZERO, GradStats::combine)
    }

    /// The statistics of `s` on the calling thread.
    pub fn of_serial(s: &[f32]) -> GradStats {
        let st = ds_precision::check_norm_f32(s);
        GradStats {
            sq_norm: st.sq_norm,
            finite: !st.has_inf_or_nan,
        }
    }

    /// The statistics of two disjoint buffers together.
    pub fn combine(self, o: GradStats) -> GradStats {
        GradStats {
            sq_norm: self.sq_norm + o.sq_norm,
            finite: self.finite && o.finite,
        }
    }
}

/// Calls `f` with the elements of a contiguous f32 CPU tensor, writable in place (its storage
/// locked for writing meanwhile): how the persistent communication buffers and the model's
/// variables are overwritten without building new tensors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let t = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu)?;
/// ds_zero::zero::with_f32_mut(&t.narrow(0, 1, 2)?, |s| s.fill(1.0))?;
/// assert_eq!(t.to_vec1::<f32>()?, vec![0.0, 1.0, 1.0, 0.0]);
/// # Ok::<(), ds_zero::ZeroError>(())
/// ```
pub fn with_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Result<R, ZeroError> {
    type Write<'f, R> = Box<dyn FnOnce(&mut [f32]) -> R + 'f>;
    struct Op<'f, R> {
        f: std::cell::RefCell<Option<Write<'f, R>>>,
        out: std::cell::RefCell<Option<R>>,
    }
    impl<R> candle_core::InplaceOp1 for Op<'_, R> {
        fn name(&self) -> &'static str {
            "ds-zero-write-in-place"
        }
        fn cpu_fwd(
            &self,
            storage: &mut candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("writing in place needs a contiguous tensor");
            };
            let candle_core::CpuStorage::F32(v) = storage else {
                candle_core::bail!("writing in place needs an f32 tensor");
            };
            let Some(f) = self.f.borrow_mut().take() else {
                candle_core::bail!("in-place write ran twice");
            };
            *self.out.borrow_mut() = Some(f(&mut v[a..b]));
            Ok(())
        }
    }
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return Err(ZeroError::Shape(format!(
            "writing in place needs an f32 CPU tensor, got {:?} on {:?}",
            t.dtype(),
            t.device()
        )));
    }
    let op = Op {
        f: std::cell::RefCell::new(Some(Box::new(f))),
        out: std::cell::RefCell::new(None),
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .ok_or_else(|| ZeroError::Shape("the in-place write did not run".into()))
}

/// Calls `f` with the elements of a contiguous f32 CPU tensor, read in place.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ZeroError> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            Ok(f(&v[a..b]))
        }
        _ => Err(ZeroError::Shape(
            "reading in place needs a contiguous f32 CPU tensor".into(),
        )),
    }
}

/// The f32 CPU buffer of `len` elements kept in `slot` (allocated, zeroed, on first use).
fn persistent(slot: &mut Option<Tensor>, len: usize) -> Result<Tensor, ZeroError> {
    match slot {
        Some(t) if t.elem_count() == len => Ok(t.clone()),
        _ => {
            let t = Tensor::zeros(len, DType::F32, &Device::Cpu)?;
            *slot = Some(t.clone());
            Ok(t)
        }
    }
}

/// `dst = src`, in parallel, with the statistics of what was written.
fn copy_stats(dst: &mut [f32], src: &[f32]) -> GradStats {
    scale_into_stats(dst, src, 1.0)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the reduced gradients (before clipping); NaN/inf on overflow.
    pub grad_norm: f64,
    /// Some gradient was inf/nan on some rank: the step was skipped everywhere.
    pub overflow: bool,
    /// The factor gradients were multiplied by (1 = no clipping).
    pub clip_coef: f64,
    /// The update was applied.
    pub applied: bool,
    /// The loss scale this step's gradients carried (the scale the loss was multiplied by
    /// for the backward pass; 1 without loss scaling). Gradients were divided by it.
    pub loss_scale: f64,
    /// The loss scale for the next backward pass (after the scaler's update).
    pub next_loss_scale: f64,
    /// Why the step was skipped (`None` when applied).
    pub skip_reason: Option<SkipReason>,
}

/// Bytes this rank holds persistently for the model states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// Model parameters (full for stages 0-2, the shard for stage 3) in fp32.
    pub params_bytes: usize,
    /// Reduced gradients kept for the step (full for stages 0-1, the shard for 2-3).
    pub grads_bytes: usize,
    /// Optimizer state (plus fp32 master weights where they are a separate copy).
    pub optimizer_bytes: usize,
}

/// ZeRO over a flat fp32 parameter group.
#[derive(Debug)]
pub struct ZeroOptimizer {
    pub(crate) opts: ZeroOptions,
    pub(crate) layout: FlatLayout,
    pub(crate) rank: usize,
    /// fp32 master weights: the whole padded buffer (stage 0) or this rank's shard.
    pub(crate) master: Vec<f32>,
    /// Reduced gradients matching `master`.
    pub(crate) grads: Vec<f32>,
    /// Factor still to apply to `grads` (the post-reduction averaging), fused into the step.
    pub(crate) grad_scale: f32,
    pub(crate) opt: FlatOptimizer,
    /// Stage 3: DeepSpeed's per-parameter partition.
    pub(crate) s3: Option<Stage3Layout>,
    /// Model dtype, gradient communication dtype and loss scaling.
    pub(crate) precision: ZeroPrecision,
    /// Decides from the all-reduced overflow flag whether a step is applied.
    scaler: Scaler,
    /// ZeRO-Infinity: master weights, optimizer state and/or parameters on disk.
    pub(crate) offload: Option<Offload>,
    /// The statistics of `grads` when the pass that wrote them computed them (consumed by the
    /// next step; any other change of `grads` clears them).
    pub(crate) grad_stats: Option<GradStats>,
    /// Stages 0-2 over several ranks: a padded flat buffer (the gradients reduced in place,
    /// then at stages 1-2 the all-gathered parameters), allocated once: a fresh buffer per
    /// step costs its page faults every step.
    full_buf: Option<Tensor>,
    /// Stages 1-2 over several ranks: a shard-sized buffer (the reduce-scatter's output, then
    /// the all-gather's input), allocated once.
    shard_buf: Option<Tensor>,
}

/// Stage 3 partitions every parameter on its own (DeepSpeed's `partition_parameters.py`):
/// parameter `i` of `n_i` elements is cut into `c_i = ceil(n_i / world_size)` chunks, rank `r`
/// holding elements `r*c_i ..` (the last chunks zero-padded), and a rank's shard is the
/// concatenation of its chunk of every parameter. Gathering any run of parameters (a block's)
/// is one all-gather of equal-length pieces.
#[derive(Debug, Clone)]
pub(crate) struct Stage3Layout {
    /// `c_i` per parameter.
    pub(crate) chunks: Vec<usize>,
    /// Offset of each parameter's chunk in the shard (prefix sums of `chunks`).
    pub(crate) offsets: Vec<usize>,
    /// Shard length (sum of `chunks`).
    pub(crate) shard: usize,
    pub(crate) ws: usize,
}

impl Stage3Layout {
    fn new(layout: &FlatLayout, ws: usize) -> Self {
        let chunks: Vec<usize> = layout
            .param_ranges
            .iter()
            .map(|r| r.len().div_ceil(ws))
            .collect();
        let mut offsets = Vec::with_capacity(chunks.len() + 1);
        let mut o = 0;
        for &c in &chunks {
            offsets.push(o);
            o += c;
        }
        offsets.push(o);
        Stage3Layout {
            chunks,
            offsets,
            shard: o,
            ws,
        }
    }

    /// This rank's shard of a full flat buffer (parameter order, unpadded).
    fn shard_of<T: Copy + Default>(&self, layout: &FlatLayout, full: &[T], rank: usize) -> Vec<T> {
        let mut out = vec![T::default(); self.shard];
        for (i, r) in layout.param_ranges.iter().enumerate() {
            let c = self.chunks[i];
            let lo = (rank * c).min(r.len());
            let hi = ((rank + 1) * c).min(r.len());
            out[self.offsets[i]..self.offsets[i] + (hi - lo)]
                .copy_from_slice(&full[r.start + lo..r.start + hi]);
        }
        out
    }

    /// The rank-major buffer (`ws * shard`) of a full flat buffer.
    fn rank_major<T: Copy + Default>(&self, layout: &FlatLayout, full: &[T]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.ws * self.shard);
        for r in 0..self.ws {
            out.extend(self.shard_of(layout, full, r));
        }
        out
    }

    /// Reassembles parameters `params` from the all-gathered pieces `g` (`ws` pieces of the
    /// shard range of those parameters, rank-major) into their flat concatenation.
    fn assemble<T: Copy>(&self, layout: &FlatLayout, params: Range<usize>, g: &[T]) -> Vec<T> {
        let base = self.offsets[params.start];
        let piece = self.offsets[params.end] - base;
        let mut out = Vec::with_capacity(
            layout.param_ranges[params.clone()]
                .iter()
                .map(|r| r.len())
                .sum(),
        );
        for i in params {
            let n = layout.param_ranges[i].len();
            let c = self.chunks[i];
            for r in 0..self.ws {
                let lo = (r * c).min(n);
                let hi = ((r + 1) * c).min(n);
                let at = r * piece + self.offsets[i] - base;
                out.extend_from_slice(&g[at..at + (hi - lo)]);
            }
        }
        out
    }

    /// (parameter index, range in the shard holding real elements) for Lamb's norms.
    fn pieces(&self, layout: &FlatLayout, rank: usize) -> Vec<(usize, Range<usize>)> {
        layout
            .param_ranges
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let c = self.chunks[i];
                let lo = (rank * c).min(r.len());
                let hi = ((rank + 1) * c).min(r.len());
                (lo < hi).then(|| (i, self.offsets[i]..self.offsets[i] + (hi - lo)))
            })
            .collect()
    }
}

pub(crate) fn to_tensor<T: WithDType>(v: Vec<T>) -> Result<Tensor, ZeroError> {
    let n = v.len();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
}

pub(crate) fn to_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>, ZeroError> {
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

impl ZeroOptimizer {
    /// Partitions parameters of the given sizes (in order) whose initial values are `init`
    /// (flat, unpadded; identical on every rank), in fp32 ([`ZeroPrecision::F32`]).
    pub fn new(
        param_sizes: &[usize],
        init: &[f32],
        spec: OptimizerSpec,
        opts: ZeroOptions,
        comm: &dyn Communicator,
    ) -> Result<Self, ZeroError> {
        Self::with_precision(param_sizes, init, spec, opts, ZeroPrecision::F32, comm)
    }

    /// [`ZeroOptimizer::new`] with a training precision: with [`ZeroPrecision::Fp16`] or
    /// [`ZeroPrecision::Bf16`], `init` (fp32) becomes the fp32 master weights, the model
    /// weights handed back are those masters rounded to the 16-bit dtype, gradients passed to
    /// [`ZeroOptimizer::reduce_gradients`] must carry the loss scale
    /// ([`ZeroOptimizer::loss_scale`]) and are communicated in the 16-bit dtype.
    ///
    /// ```
    /// use ds_comm::LocalComm;
    /// use ds_precision::LossScalerOptions;
    /// use ds_zero::optim::{OptimizerSpec, SgdParams};
    /// use ds_zero::{ZeroOptimizer, ZeroOptions, ZeroPrecision};
    ///
    /// let comm = LocalComm::create(1).remove(0);
    /// let opts = ZeroOptions { stage: 2, gradient_clipping: 0.0, ..Default::default() };
    /// let fp16 = ZeroPrecision::deepspeed_fp16(2, 0.0, LossScalerOptions::default());
    /// let spec = OptimizerSpec::Sgd(SgdParams { lr: 0.5, ..Default::default() });
    /// let mut z = ZeroOptimizer::with_precision(&[2], &[1.0, 0.1], spec, opts, fp16, &comm)?;
    /// // The model weights are fp16: 0.1 rounds to 0.0999755859375.
    /// assert_eq!(z.gather_params(&comm)?, vec![1.0, 0.0999755859375]);
    /// // Backward of (loss * loss_scale) gives gradients times the scale (2^16 here).
    /// let s = z.loss_scale() as f32;
    /// z.reduce_gradients(&[0.5 * s, 0.25 * s], &comm)?;
    /// let r = z.step(0.5, &comm)?;
    /// assert!(r.applied && r.loss_scale == 65536.0);
    /// // Unscaled inside the step: masters 1 - 0.5*0.5 and 0.1 - 0.5*0.25 (fp32).
    /// assert_eq!(z.master()[..2], [0.75, 0.1 - 0.125]);
    /// // An fp16 overflow (beyond 65504 after scaling) skips the step; hysteresis 2 keeps
    /// // the scale this time.
    /// z.reduce_gradients(&[1.0 * s, 0.0], &comm)?;
    /// let r = z.step(0.5, &comm)?;
    /// assert!(!r.applied && r.overflow);
    /// assert_eq!((z.loss_scale(), z.skipped_steps()), (65536.0, 1));
    /// # Ok::<(), ds_zero::ZeroError>(())
    /// ```
    pub fn with_precision(
        param_sizes: &[usize],
        init: &[f32],
        spec: OptimizerSpec,
        opts: ZeroOptions,
        precision: ZeroPrecision,
        comm: &dyn Communicator,
    ) -> Result<Self, ZeroError> {
        let layout = FlatLayout::new(param_sizes, comm.world_size())?;
        if init.len() != layout.numel {
            return Err(ZeroError::Shape(format!(
                "initial parameters have {} elements but the sizes add up to {}",
                init.len(),
                layout.numel
            )));
        }
        let ranges = layout.param_ranges.clone();
        Self::with_precision_streamed(
            param_sizes,
            &mut |i| Ok(Cow::Borrowed(&init[ranges[i].clone()])),
            spec,
            opts,
            precision,
            NvmeOptions::default(),
            comm,
        )
    }

    /// [`ZeroOptimizer::with_precision`] with the initial values handed over one parameter at
    /// a time (`init(i)`: parameter `i`'s values, called in order 0, 1, ...), so a large model
    /// never exists twice in memory, and with ZeRO-Infinity's placements (`nvme`: the master
    /// weights and optimizer state, and at stage 3 the parameters, in swap files under the
    /// given paths; [`NvmeOptions::default`] keeps everything in memory). With the optimizer
    /// on disk, Lamb is refused (it needs whole-parameter norms) and stage 0 too.
    ///
    /// ```
    /// use std::borrow::Cow;
    /// use ds_comm::LocalComm;
    /// use ds_zero::optim::{AdamParams, OptimizerSpec};
    /// use ds_zero::{NvmeOptions, ZeroOptimizer, ZeroOptions, ZeroPrecision};
    ///
    /// let comm = LocalComm::create(1).remove(0);
    /// let dir = std::env::temp_dir().join(format!("ds-zero-doc-nvme-{}", std::process::id()));
    /// let nvme = NvmeOptions { optimizer_path: Some(dir.clone()), param_path: Some(dir.clone()),
    ///                          chunk_elems: 2048, ..Default::default() };
    /// let opts = ZeroOptions { stage: 3, gradient_clipping: 0.0, ..Default::default() };
    /// let spec = OptimizerSpec::Adam(AdamParams { lr: 0.1, ..Default::default() });
    /// let init = |i: usize| Ok(Cow::Owned(vec![1.0f32 + i as f32; 3000]));
    /// let mut z = ZeroOptimizer::with_precision_streamed(
    ///     &[3000, 3000], &mut { init }, spec, opts, ZeroPrecision::F32, nvme, &comm)?;
    /// z.reduce_gradients(&vec![0.5; 6000], &comm)?;
    /// z.step(0.1, &comm)?;
    /// // Adam's first step moves every weight by lr against the gradient's sign.
    /// let p = z.gather_params(&comm)?;
    /// assert!((p[0] - 0.9).abs() < 1e-6 && (p[5999] - 1.9).abs() < 1e-6);
    /// assert!(z.swap_stats().unwrap().bytes_written > 0);
    /// drop(z); // removes the swap files
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), ds_zero::ZeroError>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn with_precision_streamed<'a>(
        param_sizes: &[usize],
        init: &mut dyn FnMut(usize) -> Result<Cow<'a, [f32]>, ZeroError>,
        spec: OptimizerSpec,
        opts: ZeroOptions,
        precision: ZeroPrecision,
        nvme: NvmeOptions,
        comm: &dyn Communicator,
    ) -> Result<Self, ZeroError> {
        let scaler = precision.build_scaler()?;
        if opts.stage > 3 {
            return Err(ZeroError::Option(format!(
                "ZeRO stage {} does not exist; allowed: 0, 1, 2 or 3",
                opts.stage
            )));
        }
        if !opts.allgather_bucket_size.is_multiple_of(2) {
            return Err(ZeroError::Option(format!(
                "allgather_bucket_size ({}) must be a multiple of 2 (the partition alignment factor)",
                opts.allgather_bucket_size
            )));
        }
        if !(opts.gradient_predivide_factor > 0.0 && opts.gradient_predivide_factor.is_finite()) {
            return Err(ZeroError::Option(format!(
                "gradient_predivide_factor must be a finite number > 0, got {}",
                opts.gradient_predivide_factor
            )));
        }
        let ws = comm.world_size();
        let layout = FlatLayout::new(param_sizes, ws)?;
        let rank = comm.rank();
        let s3 = (opts.stage == 3).then(|| Stage3Layout::new(&layout, ws));
        let part_len = match (&s3, opts.stage) {
            (Some(l3), _) => l3.shard,
            (None, 0) => layout.padded,
            (None, _) => layout.shard_len(),
        };
        let mut offload = None;
        if nvme.any() {
            if opts.stage == 0 {
                return Err(ZeroError::Option(
                    "NVMe offload needs ZeRO stage 1, 2 or 3 (stage 0 keeps no partition to swap)"
                        .into(),
                ));
            }
            if nvme.optimizer_path.is_some() && matches!(spec, OptimizerSpec::Lamb(_)) {
                return Err(ZeroError::Option(
                    "optimizer offload to NVMe steps the state in chunks: Lamb needs whole-parameter norms; allowed: Adam, AdamW, SGD or Lion".into(),
                ));
            }
            let mb = precision.model_bytes();
            let bf = precision.model_dtype() == DType::BF16;
            offload = Some(Offload::new(
                nvme,
                rank,
                part_len,
                spec.state_names().len(),
                mb,
                bf,
                opts.stage,
            )?);
        }
        let on_disk = offload.as_ref().is_some_and(|o| o.optimizer_on_disk());
        // This rank's part, built parameter by parameter; with the optimizer on disk it goes
        // out in chunks and only one chunk is held.
        let chunk = offload.as_ref().map_or(usize::MAX, |o| o.opts.chunk());
        let mut master: Vec<f32> = Vec::new();
        let mut pending: Vec<f32> = Vec::new();
        let mut written = 0usize;
        let flush = |pending: &mut Vec<f32>,
                     master: &mut Vec<f32>,
                     written: &mut usize,
                     all: bool,
                     offload: &mut Option<Offload>|
         -> Result<(), ZeroError> {
            match offload.as_mut() {
                Some(o) if o.optimizer_on_disk() => {
                    while pending.len() >= chunk || (all && !pending.is_empty()) {
                        let n = pending.len().min(chunk);
                        o.put_chunk(*written, &pending[..n], None)?;
                        pending.drain(..n);
                        *written += n;
                    }
                }
                _ => master.append(pending),
            }
            Ok(())
        };
        if !on_disk {
            master.reserve_exact(part_len);
        }
        let mut flat = 0usize;
        for (i, r) in layout.param_ranges.iter().enumerate() {
            let v = init(i)?;
            if v.len() != r.len() {
                return Err(ZeroError::Shape(format!(
                    "initial values of parameter {i}: {} elements, its size is {}",
                    v.len(),
                    r.len()
                )));
            }
            match (&s3, opts.stage) {
                (Some(l3), _) => {
                    let c = l3.chunks[i];
                    let lo = (rank * c).min(r.len());
                    let hi = ((rank + 1) * c).min(r.len());
                    pending.extend_from_slice(&v[lo..hi]);
                    pending.resize(pending.len() + c - (hi - lo), 0.0);
                }
                (None, 0) => pending.extend_from_slice(&v),
                (None, _) => {
                    let sh = layout.shard(rank);
                    let lo = sh.start.max(flat).min(flat + v.len());
                    let hi = sh.end.min(flat + v.len()).max(lo);
                    pending.extend_from_slice(&v[lo - flat..hi - flat]);
                }
            }
            flat += v.len();
            drop(v);
            flush(&mut pending, &mut master, &mut written, false, &mut offload)?;
        }
        // Padding of the flat group (stages 0-2).
        let have = if on_disk {
            written + pending.len()
        } else {
            master.len() + pending.len()
        };
        pending.resize(pending.len() + part_len.saturating_sub(have), 0.0);
        flush(&mut pending, &mut master, &mut written, true, &mut offload)?;
        let opt = if on_disk {
            FlatOptimizer::without_state(spec, part_len)
        } else {
            FlatOptimizer::new(spec, part_len)
        };
        if let Some(o) = offload.as_mut() {
            if !o.optimizer_on_disk() {
                // Parameters on disk, masters in memory: publish the model-dtype copy.
                o.load_part(&master, &[])?;
            }
        }
        Ok(ZeroOptimizer {
            precision,
            scaler,
            s3,
            opt,
            grad_scale: 1.0,
            grad_stats: None,
            full_buf: None,
            shard_buf: None,
            grads: vec![0.0; part_len],
            master,
            layout,
            rank,
            opts,
            offload,
        })
    }

    /// Disk traffic and I/O time of NVMe offload so far (`None` without it).
    pub fn swap_stats(&self) -> Option<SwapStats> {
        self.offload
            .as_ref()
            .map(|o| *o.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Bytes of model-dtype parameters of this rank's part held in memory under NVMe offload
    /// (all of them, or `max_in_cpu` with parameter offload); `None` without offload.
    pub fn resident_param_bytes(&self) -> Option<usize> {
        self.offload.as_ref().map(|o| o.resident_param_bytes())
    }

    /// Whether the master weights and optimizer state live in swap files.
    pub fn optimizer_on_disk(&self) -> bool {
        self.offload.as_ref().is_some_and(|o| o.optimizer_on_disk())
    }

    /// Whether (stage 3) the parameters live in swap files.
    pub fn params_on_disk(&self) -> bool {
        self.offload.as_ref().is_some_and(|o| o.params_on_disk())
    }

    /// This rank's swap directory (NVMe offload), and whether its files use `O_DIRECT`.
    pub fn swap_dir(&self) -> Option<(&std::path::Path, bool)> {
        self.offload
            .as_ref()
            .map(|o| (o.dir(), o.direct().unwrap_or(false)))
    }

    /// Elements of this rank's part (the master weights it steps).
    pub fn part_len(&self) -> usize {
        self.opt.len()
    }

    /// Starts reading parameters `params` (stage 3, parameters on disk) so that the
    /// [`ZeroOptimizer::gather_param_range`] of the same range that follows finds them read:
    /// the engine calls it for the next block while the current one computes. A no-op where
    /// parameters are in memory.
    pub fn prefetch_param_range(&self, params: Range<usize>) -> Result<(), ZeroError> {
        match (&self.offload, &self.s3) {
            (Some(o), Some(l3)) if o.params_on_disk() => {
                let np = self.layout.param_ranges.len();
                if params.start > params.end || params.end > np {
                    return Err(ZeroError::Shape(format!(
                        "parameter range {params:?} outside the {np} parameters"
                    )));
                }
                o.prefetch(l3.offsets[params.start], l3.offsets[params.end])
            }
            _ => Ok(()),
        }
    }

    /// Drops the pages that a checkpoint save read from the swap files (through
    /// [`ZeroOptimizer::master`] and [`ZeroOptimizer::optimizer_state_views`]) from this
    /// process's memory. A no-op without NVMe offload.
    pub fn release_swap_views(&self) {
        if let Some(o) = &self.offload {
            o.release_views();
        }
    }

    /// The model-dtype values of elements `a..b` of this rank's part.
    pub(crate) fn part_piece<T: Wire>(
        &self,
        a: usize,
        b: usize,
    ) -> Result<Cow<'_, [T]>, ZeroError> {
        match &self.offload {
            Some(o) => o.piece::<T>(a, b),
            None => Ok(T::narrow_slice(&self.master[a..b])),
        }
    }

    /// The layout (sizes, padding, shards).
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The options.
    pub fn options(&self) -> &ZeroOptions {
        &self.opts
    }

    /// The fused optimizer stepping this rank's part.
    pub fn optimizer(&self) -> &FlatOptimizer {
        &self.opt
    }

    /// This rank's fp32 master weights (the whole padded buffer at stage 0). With the
    /// optimizer offloaded to NVMe, a read-only map of the swap file (read as it is used;
    /// [`ZeroOptimizer::release_swap_views`] drops the pages again).
    pub fn master(&self) -> &[f32] {
        match &self.offload {
            Some(o) if o.optimizer_on_disk() => o.view(0),
            _ => &self.master,
        }
    }

    /// The training precision.
    pub fn precision(&self) -> &ZeroPrecision {
        &self.precision
    }

    /// The dtype of the model weights and of the gradient communication.
    pub fn model_dtype(&self) -> DType {
        self.precision.model_dtype()
    }

    /// The loss scale for the next backward pass: multiply the loss (or the gradients) by it
    /// before handing the gradients to [`ZeroOptimizer::reduce_gradients`]. 1 for fp32, bf16
    /// and unscaled fp16.
    pub fn loss_scale(&self) -> f64 {
        self.scaler.get().scale()
    }

    /// Steps skipped so far (overflow, or inf/nan gradients), as DeepSpeed's `skipped_steps`.
    pub fn skipped_steps(&self) -> u64 {
        self.scaler.get().skipped_steps()
    }

    /// The loss scaler's state, for checkpoints (the same on every rank).
    pub fn scaler_state(&self) -> LossScalerState {
        self.scaler.get().state()
    }

    /// Restores a state saved by [`ZeroOptimizer::scaler_state`] (a static scale must match
    /// the configured one; a run without scaling accepts only scale 1).
    pub fn load_scaler_state(&mut self, state: &LossScalerState) -> Result<(), ZeroError> {
        Ok(self.scaler.get_mut().load_state(state)?)
    }

    /// Bytes held for model states on this rank.
    ///
    /// In fp32 these are the bytes held. With 16-bit precision they follow the ZeRO paper's
    /// mixed-precision accounting (and [`crate::estimate::estimate`] with
    /// [`crate::estimate::Precision::Mixed`]): parameters 2 bytes per element (the full model
    /// at stages 0-2, this rank's shard at stage 3), gradients 2 bytes per element (full at
    /// stages 0-1, the shard at 2-3), optimizer = the fp32 master copy (4 bytes per element of
    /// this rank's part, at every stage) + the optimizer state. This CPU implementation keeps
    /// the reduced gradient part in an f32 buffer (as DeepSpeed upcasts a partition's
    /// gradients to fp32 for the step, which its estimators count as 4 more bytes), so its
    /// resident gradient bytes are twice `grads_bytes` for that part.
    pub fn memory(&self) -> MemoryReport {
        if self.precision != ZeroPrecision::F32 {
            let b = self.precision.model_bytes();
            let params = if self.s3.is_some() {
                self.part_len()
            } else {
                self.layout.numel
            };
            let grads = if self.opts.stage >= 2 {
                self.grads.len()
            } else {
                self.layout.numel
            };
            return MemoryReport {
                params_bytes: b * params,
                grads_bytes: b * grads,
                optimizer_bytes: self.opt.state_bytes() + 4 * self.master.len(),
            };
        }
        let full = 4 * self.layout.numel;
        let params_bytes = if self.opts.stage == 3 {
            4 * self.part_len()
        } else {
            full
        };
        let grads_bytes = if self.opts.stage >= 2 {
            4 * self.grads.len()
        } else {
            full
        };
        // In fp32 the master weights are the model weights at stage 0; from stage 1 on the
        // rank's shard is a separate fp32 copy that the optimizer owns.
        let master_copy = if self.opts.stage == 0 {
            0
        } else {
            4 * self.master.len()
        };
        MemoryReport {
            params_bytes,
            grads_bytes,
            optimizer_bytes: self.opt.state_bytes() + master_copy,
        }
    }

    pub(crate) fn pre_scale(&self, ws: usize) -> (f32, f32) {
        // (factor before the reduction, factor after), as DeepSpeed's allreduce_bucket.
        let ws = ws as f64;
        if self.opts.prescale_gradients {
            let f = self.opts.gradient_predivide_factor;
            let after = if self.opts.average_gradients {
                f / ws
            } else {
                f
            };
            ((1.0 / f) as f32, after as f32)
        } else if self.opts.average_gradients {
            ((1.0 / ws) as f32, 1.0)
        } else {
            (1.0, 1.0)
        }
    }

    /// Reduces this step's local gradients (flat, unpadded, parameter order) across ranks into
    /// the part this rank keeps.
    ///
    /// With 16-bit precision the gradients must carry the loss scale
    /// ([`ZeroOptimizer::loss_scale`]); they are rounded to the model dtype (an fp16 value
    /// beyond 65504 becomes inf: an overflow that skips the step) and reduced in that dtype,
    /// half the bytes of fp32 (the backends accumulate in f32 and round once).
    pub fn reduce_gradients(
        &mut self,
        local: &[f32],
        comm: &dyn Communicator,
    ) -> Result<(), ZeroError> {
        if local.len() != self.layout.numel {
            return Err(ZeroError::Shape(format!(
                "got {} gradient elements for {} parameter elements",
                local.len(),
                self.layout.numel
            )));
        }
        match self.precision.model_dtype() {
            DType::F16 => return self.reduce_gradients_wire::<f16>(local, comm),
            DType::BF16 => return self.reduce_gradients_wire::<bf16>(local, comm),
            _ => {}
        }
        let ws = comm.world_size();
        let (before, after) = self.pre_scale(ws);
        // The post-reduction factor is applied inside the optimizer pass, not here.
        self.grad_scale = after;
        self.grad_stats = None;
        if let Some(l3) = &self.s3 {
            let mut buf = l3.rank_major(&self.layout, local);
            if before != 1.0 {
                buf.iter_mut().for_each(|g| *g *= before);
            }
            let part = if ws == 1 {
                buf
            } else {
                bucketed_reduce_scatter(&buf, l3.shard, self.opts.reduce_bucket_size, comm)?
            };
            self.grad_stats = Some(copy_stats(&mut self.grads, &part));
            return Ok(());
        }
        let n = local.len();
        if ws == 1 {
            // Nothing to reduce: one parallel copy into the persistent gradient buffer, the
            // norm taken on the way.
            let st = scale_into_stats(&mut self.grads[..n], local, before);
            self.grads[n..].iter_mut().for_each(|g| *g = 0.0);
            self.grad_stats = Some(st);
            return Ok(());
        }
        let padded = self.layout.padded;
        let shard = self.layout.shard_len();
        let bucket = self.opts.reduce_bucket_size.max(1);
        // One bucket (DeepSpeed's default 5e8 elements covers most models): reduce in a
        // buffer allocated once, in place, and take the norm while copying the result out.
        let one_bucket = if self.opts.stage == 0 {
            padded <= bucket
        } else {
            bucket / ws >= shard
        };
        if one_bucket {
            let buf = persistent(&mut self.full_buf, padded)?;
            with_f32_mut(&buf, |b| {
                scale_into(&mut b[..n], local, before);
                b[n..].iter_mut().for_each(|g| *g = 0.0);
            })?;
            let st = if self.opts.stage == 0 {
                comm.all_reduce_inplace(&buf, ReduceOp::Sum)?;
                let grads = &mut self.grads;
                with_f32(&buf, |b| copy_stats(grads, b))?
            } else {
                // Stages 1-2 keep only their shard of the reduced gradient: a reduce-scatter
                // moves half the data of an all-reduce (DeepSpeed's stage 1/2 with
                // reduce_scatter on); the result lands in the buffer's own shard.
                let out = persistent(&mut self.shard_buf, shard)?;
                comm.reduce_scatter_into(&buf, &out, ReduceOp::Sum)?;
                let grads = &mut self.grads;
                with_f32(&out, |b| copy_stats(grads, b))?
            };
            self.grad_stats = Some(st);
            return Ok(());
        }
        let mut buf: Vec<f32> = vec![0.0; padded];
        scale_into(&mut buf[..n], local, before);
        let reduced = if self.opts.stage == 0 {
            bucketed_all_reduce(buf, self.opts.reduce_bucket_size, comm)?
        } else {
            bucketed_reduce_scatter(&buf, shard, self.opts.reduce_bucket_size, comm)?
        };
        self.grad_stats = Some(copy_stats(&mut self.grads, &reduced));
        Ok(())
    }

    /// The 16-bit gradient reduction: round to `T`, reduce in `T`, widen into `self.grads`.
    fn reduce_gradients_wire<T: Wire>(
        &mut self,
        local: &[f32],
        comm: &dyn Communicator,
    ) -> Result<(), ZeroError> {
        let ws = comm.world_size();
        let (before, after) = self.pre_scale(ws);
        self.grad_scale = after;
        let n = local.len();
        if let Some(l3) = &self.s3 {
            let mut narrow = vec![T::default(); n];
            narrow_scaled_into(&mut narrow, local, before);
            let buf = l3.rank_major(&self.layout, &narrow);
            let part = if ws == 1 {
                buf
            } else {
                bucketed_reduce_scatter(&buf, l3.shard, self.opts.reduce_bucket_size, comm)?
            };
            self.grad_stats = Some(widen_into(&mut self.grads, &part));
            return Ok(());
        }
        let mut buf = vec![T::default(); self.layout.padded];
        narrow_scaled_into(&mut buf[..n], local, before);
        let reduced = if ws == 1 {
            buf
        } else if self.opts.stage == 0 {
            bucketed_all_reduce(buf, self.opts.reduce_bucket_size, comm)?
        } else {
            bucketed_reduce_scatter(
                &buf,
                self.layout.shard_len(),
                self.opts.reduce_bucket_size,
                comm,
            )?
        };
        self.grad_stats = Some(widen_into(&mut self.grads, &reduced));
        Ok(())
    }

    /// [`ZeroOptimizer::reduce_gradients`] that may take `local`'s storage instead of copying
    /// it (one rank, no pre-scaling): `local` then holds stale values of the same length,
    /// which the caller overwrites with the next step's gradients.
    pub fn reduce_gradients_swap(
        &mut self,
        local: &mut Vec<f32>,
        comm: &dyn Communicator,
    ) -> Result<(), ZeroError> {
        self.reduce_gradients_swap_stats(local, None, comm)
    }

    /// [`ZeroOptimizer::reduce_gradients_swap`] given the statistics of `local`
    /// ([`GradStats::of`] of exactly these values, e.g. taken by the accumulation pass that
    /// wrote them): when the storage is taken over, the step uses them instead of a norm pass
    /// of its own. Otherwise they are ignored (the reduction takes the norm of its result on
    /// the way).
    pub fn reduce_gradients_swap_stats(
        &mut self,
        local: &mut Vec<f32>,
        stats: Option<GradStats>,
        comm: &dyn Communicator,
    ) -> Result<(), ZeroError> {
        let (before, after) = self.pre_scale(comm.world_size());
        if self.s3.is_none()
            && self.precision == ZeroPrecision::F32
            && comm.world_size() == 1
            && before == 1.0
            && local.len() == self.layout.numel
        {
            let n = local.len();
            local.resize(self.layout.padded, 0.0);
            std::mem::swap(&mut self.grads, local);
            local.truncate(n);
            self.grad_scale = after;
            self.grad_stats = stats;
            return Ok(());
        }
        self.reduce_gradients(local, comm)
    }

    /// Clips and applies one optimizer step with learning rate `lr` to this rank's part.
    ///
    /// The inf/nan flag and the squared norm are all-reduced, so every rank takes the same
    /// decision. The loss scaler is updated once per call with that flag (DeepSpeed's rules:
    /// see [`ds_precision::DynamicLossScaler`]); a skipped step leaves the master weights and
    /// the optimizer state (its step count included) untouched and zeroes the gradients. On an
    /// applied step the gradients are divided by the scale they carried (the scale used in
    /// backward, not the updated one: ds-precision's documented fix of DeepSpeed issue #2686),
    /// the norm is reported and clipped unscaled, and unscaling, averaging and clipping are one
    /// factor inside the single optimizer pass. An overflow at the dynamic scaler's minimum
    /// scale is [`ZeroError::Precision`] on every rank.
    pub fn step(&mut self, lr: f64, comm: &dyn Communicator) -> Result<StepReport, ZeroError> {
        self.step_with(lr, comm, None)
    }

    /// [`ZeroOptimizer::step`] that hands the updated fp32 master weights of this rank's part
    /// to `publish(offset, values)` (offsets into the part: see [`Publish`]) inside the
    /// update pass, while each piece is still in cache, so that installing the new weights in
    /// the model costs their write only; the engine writes them straight into the model's
    /// variables. Not called on a skipped step. With Lamb or an NVMe-offloaded optimizer the
    /// whole part is handed over once after the update. The values are the fp32 masters: with
    /// 16-bit precision the model's weights are their rounding
    /// ([`ZeroOptimizer::gather_params`]).
    ///
    /// The step's gradient norm comes from the pass that wrote the gradients when it took it
    /// ([`ZeroOptimizer::reduce_gradients`], [`ZeroOptimizer::reduce_gradients_swap_stats`],
    /// [`ZeroOptimizer::restore_grad_part_with_stats`]); otherwise from a pass of its own.
    pub fn step_with(
        &mut self,
        lr: f64,
        comm: &dyn Communicator,
        publish: Option<&Publish<'_>>,
    ) -> Result<StepReport, ZeroError> {
        // Squared norm and finiteness of this rank's gradients: taken when they were written,
        // or one parallel pass (ds-precision's fused check, f64 accumulation per block).
        let st = match self.grad_stats.take() {
            Some(st) => st,
            None => GradStats::of(&self.grads),
        };
        let (sq, finite) = (st.sq_norm, st.finite);
        let (sq, finite) = if self.opts.stage == 0 {
            // Every rank holds the identical full reduced gradient.
            (sq, finite)
        } else {
            let t = Tensor::from_vec(vec![sq, if finite { 0.0 } else { 1.0 }], 2, &Device::Cpu)?;
            let v = comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?;
            (v[0], v[1] == 0.0)
        };
        let scaled_norm = sq.sqrt() * f64::from(self.grad_scale.abs());
        let overflow = !finite || !scaled_norm.is_finite();
        let decision = self.scaler.get_mut().update(overflow)?;
        let loss_scale = decision.scale_used();
        let norm = scaled_norm / loss_scale;
        if decision.is_skip() {
            self.grads.iter_mut().for_each(|g| *g = 0.0);
            return Ok(StepReport {
                grad_norm: if finite { norm } else { f64::NAN },
                overflow: true,
                clip_coef: 1.0,
                applied: false,
                loss_scale,
                next_loss_scale: decision.new_scale(),
                skip_reason: decision.skip_reason(),
            });
        }
        let max_norm = self.opts.gradient_clipping;
        let clip_coef = if max_norm > 0.0 {
            (max_norm / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        // One pass: unscaling, averaging factor and clipping applied inside the update.
        let scale = self.grad_scale * (clip_coef / loss_scale) as f32;
        if self.optimizer_on_disk() {
            let t = self.opt.next_step();
            let (opt, grads) = (&self.opt, &self.grads);
            let mut err = None;
            let mut update = |m: &mut [f32], g: &[f32], st: &mut [&mut [f32]]| {
                if let Err(e) = opt.apply_external(t, m, g, st, lr, scale) {
                    err.get_or_insert(e);
                }
            };
            if let Some(o) = self.offload.as_mut() {
                o.step(grads, &mut update)?;
            }
            if let Some(e) = err {
                return Err(e);
            }
            if let Some(pb) = publish {
                pb(0, self.master());
                self.release_swap_views();
            }
        } else if let OptimizerSpec::Lamb(_) = self.opt.spec() {
            if scale != 1.0 {
                self.grads.iter_mut().for_each(|g| *g *= scale);
            }
            self.lamb_step(lr, comm)?;
            if let Some(pb) = publish {
                pb(0, &self.master);
            }
        } else {
            self.opt
                .step_scaled_publish(&mut self.master, &self.grads, lr, scale, publish)?;
        }
        if let Some(o) = self.offload.as_mut() {
            if !o.optimizer_on_disk() {
                // Parameters on disk: publish the updated model-dtype copy.
                o.load_part(&self.master, &[])?;
            }
        }
        Ok(StepReport {
            grad_norm: norm,
            overflow,
            clip_coef,
            applied: true,
            loss_scale,
            next_loss_scale: decision.new_scale(),
            skip_reason: None,
        })
    }

    fn lamb_step(&mut self, lr: f64, comm: &dyn Communicator) -> Result<(), ZeroError> {
        let nparams = self.layout.param_ranges.len();
        let (offset, pieces) = if let Some(l3) = &self.s3 {
            (0, l3.pieces(&self.layout, self.rank))
        } else if self.opts.stage == 0 {
            (
                0,
                self.layout
                    .param_ranges
                    .iter()
                    .cloned()
                    .enumerate()
                    .collect::<Vec<_>>(),
            )
        } else {
            (
                self.layout.shard(self.rank).start,
                self.layout.params_in_shard(self.rank),
            )
        };
        let segments: Vec<_> = pieces
            .iter()
            .map(|(_, r)| (r.start - offset)..(r.end - offset))
            .collect();
        let index: Vec<usize> = pieces.iter().map(|(i, _)| *i).collect();
        let stage = self.opts.stage;
        let mut reduce = |partial: &mut [f64]| -> Result<(), ZeroError> {
            if stage == 0 {
                return Ok(());
            }
            // Partial squared norms per global parameter index, summed over ranks.
            let mut global = vec![0f64; 2 * nparams];
            for (k, &i) in index.iter().enumerate() {
                global[2 * i] = partial[2 * k];
                global[2 * i + 1] = partial[2 * k + 1];
            }
            let t = Tensor::from_vec(global, 2 * nparams, &Device::Cpu)?;
            let g = comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?;
            for (k, &i) in index.iter().enumerate() {
                partial[2 * k] = g[2 * i];
                partial[2 * k + 1] = g[2 * i + 1];
            }
            Ok(())
        };
        self.opt
            .step_lamb(&mut self.master, &self.grads, &segments, lr, &mut reduce)
    }

    /// The full updated parameters (flat, unpadded), all-gathered from the shards at stages
    /// 1-3 (at stage 3 call it before each forward pass and drop the result after backward).
    ///
    /// With 16-bit precision these are the model weights: the fp32 masters rounded to the
    /// model dtype (round to nearest even), all-gathered in that dtype (half the bytes), and
    /// returned as f32 numbers that are exactly representable in it (the CPU kernels compute
    /// in f32). [`ZeroOptimizer::gather_params_tensor`] gives the real 16-bit tensor.
    pub fn gather_params(&self, comm: &dyn Communicator) -> Result<Vec<f32>, ZeroError> {
        match self.precision.model_dtype() {
            DType::F16 => Ok(f16::widen_vec(self.gather_params_t::<f16>(comm)?)),
            DType::BF16 => Ok(bf16::widen_vec(self.gather_params_t::<bf16>(comm)?)),
            _ => self.gather_params_t::<f32>(comm),
        }
    }

    /// The updated parameters, handed to `visit(flat_offset, values)` in unpadded pieces
    /// instead of one new buffer: at stages 1-2 over several ranks in fp32 with the parameters
    /// in memory and one all-gather bucket, the shards are all-gathered into a buffer
    /// allocated once and visited rank by rank (this rank's own shard left out with
    /// `skip_own`, e.g. when [`ZeroOptimizer::step_with`] published it already); otherwise
    /// [`ZeroOptimizer::gather_params`] in one piece. A collective, as `gather_params`.
    ///
    /// ```
    /// use ds_comm::LocalComm;
    /// use ds_zero::optim::{OptimizerSpec, SgdParams};
    /// use ds_zero::{ZeroOptimizer, ZeroOptions};
    ///
    /// let comm = LocalComm::create(1).remove(0);
    /// let opts = ZeroOptions { stage: 1, gradient_clipping: 0.0, ..Default::default() };
    /// let spec = OptimizerSpec::Sgd(SgdParams { lr: 1.0, ..Default::default() });
    /// let mut z = ZeroOptimizer::new(&[3], &[1.0, 2.0, 3.0], spec, opts, &comm)?;
    /// let mut model = vec![0f32; 3];
    /// z.gather_params_visit(&comm, false, &mut |at, v| {
    ///     model[at..at + v.len()].copy_from_slice(v);
    ///     Ok(())
    /// })?;
    /// assert_eq!(model, vec![1.0, 2.0, 3.0]);
    /// # Ok::<(), ds_zero::ZeroError>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn gather_params_visit(
        &mut self,
        comm: &dyn Communicator,
        skip_own: bool,
        visit: &mut dyn FnMut(usize, &[f32]) -> Result<(), ZeroError>,
    ) -> Result<(), ZeroError> {
        let ws = comm.world_size();
        let s = self.part_len();
        let numel = self.layout.numel;
        let fast = self.s3.is_none()
            && self.opts.stage > 0
            && ws > 1
            && self.precision == ZeroPrecision::F32
            && self.offload.is_none()
            && self.opts.allgather_bucket_size / ws >= s;
        if !fast {
            let full = self.gather_params(comm)?;
            return visit(0, &full);
        }
        let inp = persistent(&mut self.shard_buf, s)?;
        let out = persistent(&mut self.full_buf, ws * s)?;
        let master = &self.master;
        with_f32_mut(&inp, |b| scale_into(b, master, 1.0))?;
        comm.all_gather_into(&inp, &out)?;
        let rank = self.rank;
        with_f32(&out, |o| -> Result<(), ZeroError> {
            for r in 0..ws {
                if skip_own && r == rank {
                    continue;
                }
                let lo = (r * s).min(numel);
                let hi = ((r + 1) * s).min(numel);
                if lo < hi {
                    visit(lo, &o[lo..hi])?;
                }
            }
            Ok(())
        })?
    }

    /// [`ZeroOptimizer::gather_params`] as a 1-D tensor of the model dtype (`F16`/`BF16`
    /// values as stored, or `F32`).
    pub fn gather_params_tensor(&self, comm: &dyn Communicator) -> Result<Tensor, ZeroError> {
        match self.precision.model_dtype() {
            DType::F16 => to_tensor(self.gather_params_t::<f16>(comm)?),
            DType::BF16 => to_tensor(self.gather_params_t::<bf16>(comm)?),
            _ => to_tensor(self.gather_params_t::<f32>(comm)?),
        }
    }

    fn gather_params_t<T: Wire>(&self, comm: &dyn Communicator) -> Result<Vec<T>, ZeroError> {
        if self.s3.is_some() {
            return self.gather_param_range_t(0..self.layout.param_ranges.len(), comm);
        }
        let mine = self.part_piece::<T>(0, self.part_len())?;
        let mut full = if self.opts.stage == 0 {
            mine.into_owned()
        } else {
            bucketed_all_gather(&mine, self.opts.allgather_bucket_size, comm)?
        };
        full.truncate(self.layout.numel);
        Ok(full)
    }

    /// The current values of parameters `params` (indices in the order given to
    /// [`ZeroOptimizer::new`]), flat and concatenated. At stage 3 this all-gathers only those
    /// parameters' chunks (what a block needs before its forward or backward pass); at other
    /// stages it slices the gathered whole. With 16-bit precision the values are rounded to
    /// the model dtype, as [`ZeroOptimizer::gather_params`].
    pub fn gather_param_range(
        &self,
        params: Range<usize>,
        comm: &dyn Communicator,
    ) -> Result<Vec<f32>, ZeroError> {
        match self.precision.model_dtype() {
            DType::F16 => Ok(f16::widen_vec(
                self.gather_param_range_t::<f16>(params, comm)?,
            )),
            DType::BF16 => Ok(bf16::widen_vec(
                self.gather_param_range_t::<bf16>(params, comm)?,
            )),
            _ => self.gather_param_range_t::<f32>(params, comm),
        }
    }

    /// [`ZeroOptimizer::gather_param_range`] as a 1-D tensor of the model dtype.
    pub fn gather_param_range_tensor(
        &self,
        params: Range<usize>,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ZeroError> {
        match self.precision.model_dtype() {
            DType::F16 => to_tensor(self.gather_param_range_t::<f16>(params, comm)?),
            DType::BF16 => to_tensor(self.gather_param_range_t::<bf16>(params, comm)?),
            _ => to_tensor(self.gather_param_range_t::<f32>(params, comm)?),
        }
    }

    fn gather_param_range_t<T: Wire>(
        &self,
        params: Range<usize>,
        comm: &dyn Communicator,
    ) -> Result<Vec<T>, ZeroError> {
        let np = self.layout.param_ranges.len();
        if params.start > params.end || params.end > np {
            return Err(ZeroError::Shape(format!(
                "parameter range {params:?} outside the {np} parameters"
            )));
        }
        match &self.s3 {
            Some(l3) => {
                let piece =
                    self.part_piece::<T>(l3.offsets[params.start], l3.offsets[params.end])?;
                let g = if comm.world_size() == 1 {
                    piece.into_owned()
                } else {
                    bucketed_all_gather(&piece, self.opts.allgather_bucket_size, comm)?
                };
                Ok(l3.assemble(&self.layout, params, &g))
            }
            None => {
                let full = self.gather_params_t::<T>(comm)?;
                let lo = self
                    .layout
                    .param_ranges
                    .get(params.start)
                    .map_or(self.layout.numel, |r| r.start);
                let hi = if params.end == 0 {
                    0
                } else {
                    self.layout.param_ranges[params.end - 1].end
                };
                Ok(full[lo..hi.max(lo)].to_vec())
            }
        }
    }

    /// The contiguous range of the flat parameter space this rank's master part covers (stage
    /// 0: all of it; stages 1-2: its shard, which may run into the padding past `numel`), or
    /// `None` at stage 3, where a rank holds one chunk of every parameter.
    pub fn flat_range(&self) -> Option<Range<usize>> {
        match (&self.s3, self.opts.stage) {
            (Some(_), _) => None,
            (None, 0) => Some(0..self.layout.padded),
            (None, _) => Some(self.layout.shard(self.rank)),
        }
    }

    /// The optimizer state of this rank's part (for checkpoints).
    pub fn optimizer_state(&self) -> OptimizerState {
        let (step, views) = self.optimizer_state_views();
        OptimizerState {
            step,
            buffers: views
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
        }
    }

    /// The optimizer state of this rank's part without copying it: (applied steps, named
    /// buffers). With the optimizer offloaded to NVMe the buffers are maps of the swap files.
    pub fn optimizer_state_views(&self) -> (u64, Vec<(&'static str, &[f32])>) {
        let names = self.opt.spec().state_names();
        let step = self.opt.step_count();
        match &self.offload {
            Some(o) if o.optimizer_on_disk() => (
                step,
                names
                    .iter()
                    .enumerate()
                    .map(|(k, n)| (*n, o.view(k + 1)))
                    .collect(),
            ),
            _ => {
                let st = self.opt.state_slices();
                (step, names.iter().copied().zip(st).collect())
            }
        }
    }

    /// Restores this rank's master weights and optimizer state piece by piece:
    /// `read(k, lo, out)` fills elements `lo..lo + out.len()` of buffer `k` of this rank's part
    /// (0: the fp32 masters; `1 + i`: optimizer state `i` of [`OptimizerSpec::state_names`]).
    /// With the optimizer on disk the pieces are chunks written straight to the swap files, so
    /// a part larger than memory loads; otherwise whole buffers, as
    /// [`ZeroOptimizer::load_state`]. `step`: the optimizer's applied steps.
    #[allow(clippy::type_complexity)]
    pub fn load_state_with(
        &mut self,
        step: u64,
        read: &mut dyn FnMut(usize, usize, &mut [f32]) -> Result<(), ZeroError>,
    ) -> Result<(), ZeroError> {
        let names = self.opt.spec().state_names();
        let n = self.part_len();
        if !self.optimizer_on_disk() {
            let mut master = vec![0f32; n];
            read(0, 0, &mut master)?;
            let mut buffers = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let mut b = vec![0f32; n];
                read(1 + i, 0, &mut b)?;
                buffers.push((name.to_string(), b));
            }
            return self.load_state(&master, &OptimizerState { step, buffers });
        }
        let Some(o) = self.offload.as_mut() else {
            return Err(ZeroError::State("no swapped part".into()));
        };
        let c = o.opts.chunk();
        let mut m = vec![0f32; c.min(n)];
        let mut st: Vec<Vec<f32>> = names.iter().map(|_| vec![0f32; c.min(n)]).collect();
        let mut lo = 0;
        while lo < n {
            let hi = (lo + c).min(n);
            let k = hi - lo;
            m[..k].iter_mut().for_each(|x| *x = 0.0);
            read(0, lo, &mut m[..k])?;
            for (i, b) in st.iter_mut().enumerate() {
                b[..k].iter_mut().for_each(|x| *x = 0.0);
                read(1 + i, lo, &mut b[..k])?;
            }
            let views: Vec<&[f32]> = st.iter().map(|b| &b[..k]).collect();
            o.put_chunk(lo, &m[..k], Some(&views))?;
            lo = hi;
        }
        self.opt.set_step(step);
        Ok(())
    }

    /// Restores this rank's master weights and optimizer state.
    pub fn load_state(&mut self, master: &[f32], state: &OptimizerState) -> Result<(), ZeroError> {
        if master.len() != self.part_len() {
            return Err(ZeroError::State(format!(
                "master shard of {} elements does not match this rank's {}",
                master.len(),
                self.part_len()
            )));
        }
        if self.optimizer_on_disk() {
            let names = self.opt.spec().state_names();
            let ok = state.buffers.len() == names.len()
                && state
                    .buffers
                    .iter()
                    .zip(names)
                    .all(|((n, b), w)| n == w && b.len() == master.len());
            if !ok {
                return Err(ZeroError::State(format!(
                    "expected state buffers {names:?} of {} elements, got {:?}",
                    master.len(),
                    state
                        .buffers
                        .iter()
                        .map(|(n, b)| format!("{n} ({})", b.len()))
                        .collect::<Vec<_>>()
                )));
            }
            let st: Vec<&[f32]> = state.buffers.iter().map(|(_, b)| b.as_slice()).collect();
            if let Some(o) = self.offload.as_mut() {
                o.load_part(master, &st)?;
            }
            self.opt.set_step(state.step);
            return Ok(());
        }
        self.opt.load_state(state)?;
        self.master.copy_from_slice(master);
        if let Some(o) = self.offload.as_mut() {
            o.load_part(&self.master, &[])?;
        }
        Ok(())
    }
}

/// `dst = src * s`, in parallel.
fn scale_into(dst: &mut [f32], src: &[f32], s: f32) {
    scale_into_impl(dst, src, s, false);
}

/// [`scale_into`] with the statistics of what was written (each chunk checked in cache).
fn scale_into_stats(dst: &mut [f32], src: &[f32], s: f32) -> GradStats {
    scale_into_impl(dst, src, s, true)
}

fn scale_into_impl(dst: &mut [f32], src: &[f32], s: f32, stats: bool) -> GradStats {
    dst.par_chunks_mut(1 << 15)
        .zip(src.par_chunks(1 << 15))
        .map(|(d, x)| {
            if s == 1.0 {
                d.copy_from_slice(x);
            } else {
                for (a, b) in d.iter_mut().zip(x) {
                    *a = b * s;
                }
            }
            if stats {
                GradStats::of_serial(d)
            } else {
                GradStats::ZERO
            }
        })
        .reduce(|| GradStats::ZERO, GradStats::combine)
}

/// All-reduce (sum) of a padded buffer in buckets.
fn bucketed_all_reduce<T: Wire>(
    mut buf: Vec<T>,
    bucket: usize,
    comm: &dyn Communicator,
) -> Result<Vec<T>, ZeroError> {
    if comm.world_size() == 1 {
        return Ok(buf);
    }
    let bucket = bucket.max(1);
    if buf.len() <= bucket {
        return to_vec(&comm.all_reduce(&to_tensor(buf)?, ReduceOp::Sum)?);
    }
    for chunk in buf.chunks_mut(bucket) {
        let r = comm.all_reduce(&to_tensor(chunk.to_vec())?, ReduceOp::Sum)?;
        chunk.copy_from_slice(&to_vec(&r)?);
    }
    Ok(buf)
}

/// Reduce-scatter (sum) of a padded buffer of `n * shard` elements: rank r receives elements
/// `r*shard .. (r+1)*shard` summed over ranks. Each bucket carries a `c`-element piece of every
/// rank's shard, so shards stay contiguous whatever the bucket size.
pub(crate) fn bucketed_reduce_scatter<T: Wire>(
    buf: &[T],
    shard: usize,
    bucket: usize,
    comm: &dyn Communicator,
) -> Result<Vec<T>, ZeroError> {
    let n = comm.world_size();
    if n == 1 {
        return Ok(buf.to_vec());
    }
    let c = (bucket / n).max(1).min(shard.max(1));
    let mut out = Vec::with_capacity(shard);
    let mut k = 0;
    while k < shard {
        let len = c.min(shard - k);
        let mut b = Vec::with_capacity(n * len);
        for r in 0..n {
            b.extend_from_slice(&buf[r * shard + k..r * shard + k + len]);
        }
        let part = comm.reduce_scatter(&to_tensor(b)?, ReduceOp::Sum)?;
        out.extend(to_vec::<T>(&part)?);
        k += len;
    }
    Ok(out)
}

/// All-gather of equal shards into the full padded buffer, in buckets.
fn bucketed_all_gather<T: Wire>(
    shard: &[T],
    bucket: usize,
    comm: &dyn Communicator,
) -> Result<Vec<T>, ZeroError> {
    let n = comm.world_size();
    if n == 1 {
        return Ok(shard.to_vec());
    }
    let s = shard.len();
    let c = (bucket / n).max(1).min(s.max(1));
    let mut full = vec![T::default(); n * s];
    let mut k = 0;
    while k < s {
        let len = c.min(s - k);
        let g = to_vec(&comm.all_gather(&to_tensor(shard[k..k + len].to_vec())?)?)?;
        for r in 0..n {
            full[r * s + k..r * s + k + len].copy_from_slice(&g[r * len..(r + 1) * len]);
        }
        k += len;
    }
    Ok(full)
}
