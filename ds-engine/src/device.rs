//! [`DeviceEngine`]: data-parallel ZeRO training with the model on a candle device (a GPU with
//! the `cuda` feature; the CPU device runs the same code, which is how it is tested here).
//!
//! The model runs candle's generic ops on the device and candle autograd gives the gradients.
//! Gradients, optimizer state and master weights stay on the device, or the optimizer runs on
//! the host (ZeRO-Offload). Every collective goes through the [`Communicator`]: `NcclComm`
//! works in place on CUDA tensors, `LocalComm` on CPU tensors.
//!
//! The step, per ZeRO stage (`n` ranks, `Ψ` parameters, flat in [`Gpt::params`] order):
//! - **0**: gradients are accumulated in f32 over the micro-batches, all-reduced in the model
//!   dtype at the boundary, and every rank updates all `Ψ` master weights.
//! - **1**: the same reduction, but each rank updates only its partition (`Ψ/n` master weights
//!   and Adam moments), then the new weights are all-gathered in the model dtype.
//! - **2**: each micro-batch's gradients are reduce-scattered (model dtype) and only this rank's
//!   partition is accumulated (f32).
//! - **3**: as 2, and the transformer blocks' weights are released between uses (the
//!   embeddings and the final LayerNorm stay, as persistent parameters). With activation
//!   checkpointing, a checkpointed block's 16-bit weights are gathered (broadcast from the ranks
//!   whose partitions hold its slice) just before its forward and again before its recompute,
//!   and released after each: one block at a time when every block is checkpointed
//!   ([`DeviceEngine::peak_gathered_blocks`]). Without checkpointing, autograd keeps every
//!   block's weights in the graph until the backward pass, so each micro-step all-gathers all
//!   of them first and drops them after.
//!
//! Mixed precision: with `bf16` or `fp16` the model's weights, activations and communicated
//! gradients are 16-bit; master weights, moments and gradient accumulation are f32. fp16 uses
//! DeepSpeed's loss scalers (the same `ds-precision` rules as the host engine), and a step whose
//! gradients overflow on any rank is skipped on every rank.
//!
//! Activation checkpointing (`activation_checkpointing.number_checkpoints`, or
//! [`DeviceEngine::set_checkpoint_policy`]): checkpointed blocks keep only their input and are
//! recomputed in the backward pass; with `cpu_checkpointing` those inputs are kept in host
//! memory and copied back for the recompute.
//!
//! Optimizer offload (`zero_optimization.offload_optimizer.device = "cpu"`, stages 1-3): the
//! reduced gradient partition is copied to host memory, the fused host optimizer
//! ([`FlatOptimizer`]: Adam/AdamW, SGD, Lion) updates host master weights, and the new partition
//! goes back to the device in the model dtype for the all-gather.

use crate::engine::{check_supported, optimizer_spec, zero_precision};
use crate::lr::{LrSchedule, LrScheduler};
use crate::model::{BlockEvent, Gpt, BLOCK_PARAMS};
use crate::EngineError;
use candle_core::{DType, Device, Tensor};
use ds_ckpt_act::Policy;
use ds_comm::{partition_range, Communicator, ReduceOp};
use ds_config::ResolvedConfig;
use ds_precision::LossScaler;
use ds_zero::device::{has_inf_or_nan, DeviceAdam};
use ds_zero::optim::{FlatOptimizer, OptimizerSpec};

/// Where the master weights and the optimizer run.
enum Optim {
    /// f32 master partition and Adam moments on the device.
    Device { master: Tensor, adam: DeviceAdam },
    /// ZeRO-Offload: f32 master partition and the fused optimizer in host memory.
    Host {
        master: Vec<f32>,
        opt: FlatOptimizer,
    },
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStepReport {
    /// Whether the update was skipped (inf/nan gradients on some rank).
    pub skipped: bool,
    /// Global gradient L2 norm, unscaled (NaN when skipped).
    pub grad_norm: f64,
    /// The loss scale this step's gradients carried (1 without fp16).
    pub loss_scale: f64,
    /// The learning rate used.
    pub lr: f64,
    /// Milliseconds of forward passes this step, all micro-batches (the ZeRO-3 weight gather
    /// included; the loss is read back, so the device has finished them).
    pub fwd_ms: f64,
    /// Milliseconds of backward passes and gradient reductions this step, all micro-batches. Exact
    /// only with [`DeviceEngine::set_wall_clock_breakdown`] on (the device is synchronised
    /// after each backward); otherwise it can miss queued device work.
    pub bwd_ms: f64,
    /// Milliseconds of the optimizer step (reduction, overflow check, update, all-gather);
    /// synchronised as `bwd_ms`.
    pub step_ms: f64,
}

/// Per-rank bytes held by a [`DeviceEngine`], by kind and place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceMemory {
    /// Model weights resident on the device between steps (model dtype).
    pub model_bytes: usize,
    /// f32 master weights (device, or host with offload).
    pub master_bytes: usize,
    /// Optimizer state (device, or host with offload).
    pub optimizer_bytes: usize,
    /// f32 gradient accumulation buffer on the device (full at stages 0-1, a partition at 2-3).
    pub grad_bytes: usize,
    /// Whether master weights and optimizer state are in host memory (offload).
    pub offloaded: bool,
}

/// Data-parallel ZeRO training of a [`Gpt`] on a candle device. See the module docs.
pub struct DeviceEngine<'c> {
    model: Gpt,
    dev: Device,
    dtype: DType,
    comm: &'c dyn Communicator,
    stage: u8,
    gas: usize,
    micro: usize,
    micro_batch: usize,
    clip: f64,
    reduce_op: ReduceOp,
    shapes: Vec<Vec<usize>>,
    numel: usize,
    lo: usize,
    hi: usize,
    chunk: usize,
    optim: Optim,
    /// Stage 3: this rank's partition of the weights in the model dtype (what is gathered).
    shard16: Option<Tensor>,
    acc: Option<Tensor>,
    scaler: Box<dyn LossScaler + Send>,
    policy: Policy,
    sched: LrScheduler,
    global_steps: u64,
    skipped: u64,
    notes: Vec<String>,
    /// Optimizer state buffer names (checkpoints): `exp_avg`, `exp_avg_sq`, ...
    state_names: &'static [&'static str],
    /// `wall_clock_breakdown`: synchronise the device at the timers' ends.
    timers: bool,
    /// Forward / backward milliseconds since the last step.
    fwd_ms: f64,
    bwd_ms: f64,
    /// The last micro-batch's checkpointed blocks: (block, forward ms, recompute+backward ms).
    segments: Vec<(usize, f64, f64)>,
    /// ZeRO-3: the most blocks holding their weights at once, over the run.
    peak_blocks: usize,
}

impl std::fmt::Debug for DeviceEngine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEngine")
            .field("device", &self.dev)
            .field("dtype", &self.dtype)
            .field("stage", &self.stage)
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .finish()
    }
}

fn refuse(what: &str, why: &str) -> EngineError {
    EngineError::Config(format!("{what}: {why}"))
}

/// Settings the device engine does not run, refused with the reason.
fn check_device_config(cfg: &ResolvedConfig) -> Result<(), EngineError> {
    if cfg.prescale_gradients || cfg.gradient_predivide_factor != 1.0 {
        return Err(refuse(
            "prescale_gradients / gradient_predivide_factor",
            "the device engine divides once, after the reduction; allowed: prescale_gradients false and gradient_predivide_factor 1.0",
        ));
    }
    if cfg
        .zero_optimization
        .offload_param
        .as_ref()
        .is_some_and(|o| o.device == "cpu")
    {
        return Err(refuse(
            "zero_optimization.offload_param",
            "parameter offload is not run by the device engine (the weights stay on the GPU); allowed: device \"none\"",
        ));
    }
    check_supported(cfg)?;
    Ok(())
}

/// What the device engine does with accepted keys that it does not run as the host engine does.
fn device_notes(cfg: &ResolvedConfig) -> Vec<String> {
    let z = &cfg.zero_optimization;
    let mut notes = vec![];
    if z.stage >= 2 {
        notes.push("zero_optimization.reduce_bucket_size / allgather_bucket_size: the device engine reduces each micro-batch's gradients in one collective (one bucket) and gathers the weights in one".to_string());
    }
    if z.overlap_comm {
        notes.push("zero_optimization.overlap_comm: the device engine queues its collectives on candle's stream after the backward pass (no overlap yet)".to_string());
    }
    if z.stage == 3 {
        notes.push("zero_optimization.stage3_prefetch_bucket_size / stage3_max_live_parameters / stage3_param_persistence_threshold: the device engine gathers each checkpointed block just before it runs and releases it after (without activation checkpointing, all blocks for a micro-step: autograd holds their weights until the backward pass), does not prefetch, and keeps the embeddings and final LayerNorm persistent".to_string());
    }
    notes
}

impl<'c> DeviceEngine<'c> {
    /// Builds the engine: `model` (identically initialised on every rank, f32) is moved to
    /// `dev` and cast to the config's model dtype.
    pub fn initialize(
        cfg: &ResolvedConfig,
        model: Gpt,
        dev: &Device,
        comm: &'c dyn Communicator,
    ) -> Result<Self, EngineError> {
        if cfg.world_size != comm.world_size() {
            return Err(EngineError::Config(format!(
                "the config was resolved for world size {} but the communicator has {} ranks",
                cfg.world_size,
                comm.world_size()
            )));
        }
        let z = &cfg.zero_optimization;
        let offload = z.offload_optimizer_to_cpu();
        check_device_config(cfg)?;
        let prec = zero_precision(cfg);
        let dtype = prec.model_dtype();
        let spec = optimizer_spec(cfg)?;
        if matches!(spec, OptimizerSpec::Lamb(_)) {
            return Err(refuse(
                "optimizer.type",
                "Lamb needs per-parameter norms, which the device engine does not compute; allowed here: Adam, AdamW, SGD, Lion (the last two with offload)",
            ));
        }
        let (n, r) = (comm.world_size(), comm.rank());
        let stage = z.stage;
        let shapes = model.param_shapes();
        let numel: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let (lo, hi) = if stage == 0 {
            (0, numel)
        } else {
            partition_range(numel, n, r)
        };
        let chunk = numel.div_ceil(n).max(1);
        // f32 master of this rank's part, read from the host model before it moves.
        let mut flat = Vec::with_capacity(numel);
        for p in model.params() {
            flat.extend(p.var.flatten_all()?.to_vec1::<f32>()?);
        }
        let part = flat[lo..hi].to_vec();
        let optim = match spec {
            _ if offload => Optim::Host {
                master: part,
                opt: FlatOptimizer::new(spec, hi - lo),
            },
            OptimizerSpec::Adam(a) => Optim::Device {
                master: Tensor::from_vec(part, hi - lo, dev)?,
                adam: DeviceAdam::new(a, hi - lo, dev)?,
            },
            _ => {
                return Err(refuse(
                    "optimizer.type",
                    "the device engine runs Adam/AdamW on the device; other optimizers run on the host with zero_optimization.offload_optimizer.device = \"cpu\"",
                ))
            }
        };
        // The model's weights: the f32 values rounded to the model dtype, on the device.
        let mut model = model;
        let tensors = model
            .params()
            .iter()
            .map(|p| p.var.as_tensor().to_device(dev)?.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        model.set_explicit_kernels(false);
        model.set_cpu_checkpointing(cfg.activation_checkpointing.cpu_checkpointing);
        model.install_all(&tensors)?;
        let shard16 = if stage == 3 {
            let s = Tensor::from_slice(&flat[lo..hi], hi - lo, dev)?.to_dtype(dtype)?;
            model.release_blocks_on_device()?;
            Some(s)
        } else {
            None
        };
        let sched = LrScheduler::new(LrSchedule::from_config(
            cfg.scheduler.as_ref(),
            cfg.optimizer.as_ref(),
        )?);
        Ok(DeviceEngine {
            model,
            dev: dev.clone(),
            dtype,
            comm,
            stage,
            gas: cfg.gradient_accumulation_steps.max(1) as usize,
            micro: 0,
            micro_batch: cfg.train_micro_batch_size_per_gpu.max(1) as usize,
            clip: cfg.gradient_clipping,
            reduce_op: if cfg.gradient_allreduce_op == "mean" {
                ReduceOp::Avg
            } else {
                ReduceOp::Sum
            },
            shapes,
            numel,
            lo,
            hi,
            chunk,
            optim,
            shard16,
            acc: None,
            scaler: prec.loss_scaler()?,
            policy: match cfg.activation_checkpointing.number_checkpoints {
                Some(k) => Policy::Count(usize::try_from(k).unwrap_or(usize::MAX)),
                None => Policy::None,
            },
            sched,
            global_steps: 0,
            skipped: 0,
            notes: device_notes(cfg),
            state_names: spec.state_names(),
            timers: cfg.wall_clock_breakdown,
            fwd_ms: 0.0,
            bwd_ms: 0.0,
            segments: Vec::new(),
            peak_blocks: 0,
        })
    }

    /// Accepted settings that work differently (or not at all) on the device engine, said once.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The model (on the device, in the model dtype; at stage 3 its blocks are released
    /// between steps).
    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The model dtype (F32, BF16 or F16).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Optimizer steps taken (skipped ones included, as DeepSpeed counts `global_steps`).
    pub fn global_steps(&self) -> u64 {
        self.global_steps
    }

    /// Steps skipped for inf/nan gradients.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// The current loss scale (1 without fp16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }

    /// Which blocks are checkpointed (`activation_checkpointing.number_checkpoints`; the host
    /// engine's [`crate::engine::Engine::set_checkpoint_policy`] counterpart).
    pub fn set_checkpoint_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Whether the step's timers are exact (`wall_clock_breakdown`, on by the config): the
    /// device is synchronised after each backward pass and each optimizer step, as DeepSpeed's
    /// timers synchronise CUDA. Costs a little on a GPU; nothing on the CPU device.
    pub fn set_wall_clock_breakdown(&mut self, on: bool) {
        self.timers = on;
    }

    /// The last micro-batch's checkpointed blocks (`activation_checkpointing.profile`): block
    /// index, forward milliseconds and recompute+backward milliseconds, in backward order. The
    /// device is synchronised before each timer is read when the timers are on
    /// ([`DeviceEngine::set_wall_clock_breakdown`]).
    pub fn segment_times(&self) -> &[(usize, f64, f64)] {
        &self.segments
    }

    /// ZeRO-3: the most transformer blocks that held their weights at the same time during a
    /// micro-step, over the run so far (all of them without activation checkpointing; one when
    /// every block is checkpointed). 0 at stages 0-2, where the weights stay whole.
    pub fn peak_gathered_blocks(&self) -> usize {
        self.peak_blocks
    }

    /// ZeRO-3: the flat range `[a, b)` of the weights in the model dtype, gathered from the
    /// ranks whose partitions hold a slice of it (one broadcast per owner, in rank order; every
    /// rank calls this for the same ranges in the same order).
    fn gather_range(&self, a: usize, b: usize) -> Result<Tensor, EngineError> {
        let Some(shard) = &self.shard16 else {
            return Err(EngineError::Config(
                "gather_range: only at ZeRO stage 3".into(),
            ));
        };
        let (n, me) = (self.comm.world_size(), self.comm.rank());
        let mut pieces = Vec::with_capacity(2);
        for r in 0..n {
            let (lo, hi) = partition_range(self.numel, n, r);
            let (x, y) = (a.max(lo), b.min(hi));
            if x >= y {
                continue;
            }
            let piece = if r == me {
                shard.narrow(0, x - lo, y - x)?
            } else {
                Tensor::zeros(y - x, self.dtype, &self.dev)?
            };
            pieces.push(self.comm.broadcast(&piece, r)?);
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    /// The parameters `first..first + count` ([`Gpt::params`] order), gathered
    /// ([`DeviceEngine::gather_range`]) and shaped.
    fn gather_params(&self, first: usize, count: usize) -> Result<Vec<Tensor>, EngineError> {
        let size = |sh: &Vec<usize>| sh.iter().product::<usize>();
        let a: usize = self.shapes[..first].iter().map(size).sum();
        let shapes = &self.shapes[first..first + count];
        let flat = self.gather_range(a, a + shapes.iter().map(size).sum::<usize>())?;
        let mut off = 0;
        let mut out = Vec::with_capacity(count);
        for sh in shapes {
            out.push(flat.narrow(0, off, size(sh))?.reshape(sh.as_slice())?);
            off += size(sh);
        }
        Ok(out)
    }

    /// Micro-batches per optimizer step.
    pub fn gradient_accumulation_steps(&self) -> usize {
        self.gas
    }

    /// Bytes this rank holds, by kind.
    pub fn memory(&self) -> DeviceMemory {
        let part = self.hi - self.lo;
        let resident: usize = self.model.params().iter().map(|p| p.var.elem_count()).sum();
        let (master_bytes, optimizer_bytes, offloaded) = match &self.optim {
            Optim::Device { adam, .. } => (4 * part, adam.state_bytes(), false),
            Optim::Host { opt, .. } => (4 * part, opt.state_bytes(), true),
        };
        DeviceMemory {
            model_bytes: (resident + self.shard16.as_ref().map_or(0, |s| s.elem_count()))
                * self.dtype.size_in_bytes(),
            master_bytes,
            optimizer_bytes,
            grad_bytes: self.acc.as_ref().map_or(0, |a| 4 * a.elem_count()),
            offloaded,
        }
    }

    /// The f32 master weights of every rank, gathered (flat, [`Gpt::params`] order).
    pub fn gather_master(&self) -> Result<Vec<f32>, EngineError> {
        let part = match &self.optim {
            Optim::Device { master, .. } => master.clone(),
            Optim::Host { master, .. } => Tensor::from_slice(master, master.len(), &self.dev)?,
        };
        if self.stage == 0 {
            return Ok(part.to_device(&Device::Cpu)?.to_vec1::<f32>()?);
        }
        let full = self.gather_padded(&part)?;
        Ok(full.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
    }

    /// All-gathers every rank's partition (padded to `chunk`) and trims to `numel`.
    fn gather_padded(&self, part: &Tensor) -> Result<Tensor, EngineError> {
        let len = part.elem_count();
        let padded = if len < self.chunk {
            let pad = Tensor::zeros(self.chunk - len, part.dtype(), part.device())?;
            Tensor::cat(&[part, &pad], 0)?
        } else {
            part.clone()
        };
        let all = self.comm.all_gather(&padded)?;
        Ok(all.narrow(0, 0, self.numel)?)
    }

    /// Splits a flat tensor into the parameters' shapes.
    fn split(&self, flat: &Tensor) -> Result<Vec<Tensor>, EngineError> {
        let mut off = 0;
        let mut out = Vec::with_capacity(self.shapes.len());
        for sh in &self.shapes {
            let k: usize = sh.iter().product();
            out.push(flat.narrow(0, off, k)?.reshape(sh.as_slice())?);
            off += k;
        }
        Ok(out)
    }

    /// One micro-batch: forward, backward (of `loss * loss_scale / gas`) and the gradient
    /// reduction the stage does per micro-batch. `ids`/`targets` hold `B` sequences of the
    /// model's length, row-major (as the data loaders give them). Returns the (unscaled) loss.
    pub fn forward_backward(&mut self, ids: &[u32], targets: &[u32]) -> Result<f32, EngineError> {
        let t = self.model.shape().seq;
        if ids.is_empty() || !ids.len().is_multiple_of(t) || targets.len() != ids.len() {
            return Err(EngineError::Data(format!(
                "a micro-batch is B sequences of {t} token ids and as many targets; got {} ids and {} targets",
                ids.len(),
                targets.len()
            )));
        }
        let b = ids.len() / t;
        let t0 = std::time::Instant::now();
        // ZeRO-3 without activation checkpointing: autograd keeps every block's weights in
        // its graph until the backward pass, so all of them are gathered for the micro-step.
        // With checkpointing, each block is gathered just before it runs (below).
        let per_block = self.shard16.is_some() && self.policy != Policy::None;
        if let Some(s) = self.shard16.as_ref().filter(|_| !per_block) {
            let full = self.gather_padded(s)?;
            let t = self.split(&full)?;
            self.model.install_all(&t)?;
            self.peak_blocks = self.peak_blocks.max(self.model.gathered_blocks());
        }
        let ids = Tensor::from_slice(ids, (b, t), &self.dev)?;
        let targets = Tensor::from_slice(targets, (b, t), &self.dev)?;
        let k = self.scaler.scale() / self.gas as f64;
        self.model.set_sync_timers(self.timers);
        let fb = if per_block {
            // ZeRO-3 with checkpointing: a checkpointed block is gathered before its forward
            // and before its recompute, and released after each; a block that keeps its graph
            // stays gathered until the end of the micro-step.
            let mut peak = self.peak_blocks;
            let this = &*self;
            let mut hook = |ev: BlockEvent| -> candle_core::Result<()> {
                match ev {
                    BlockEvent::Gather(i) => {
                        let t = this
                            .gather_params(Gpt::block_param_start(i), BLOCK_PARAMS)
                            .map_err(|e| {
                                candle_core::Error::Msg(format!("ZeRO-3 gather of block {i}: {e}"))
                            })?;
                        this.model.install_block(i, &t)?;
                        peak = peak.max(this.model.gathered_blocks());
                    }
                    BlockEvent::Release(i) => this.model.release_block_on_device(i)?,
                }
                Ok(())
            };
            let fb = this.model.forward_backward_scaled_hooked(
                &ids,
                &targets,
                self.policy,
                k,
                &mut hook,
            )?;
            self.peak_blocks = peak;
            fb
        } else {
            self.model
                .forward_backward_scaled(&ids, &targets, self.policy, k)?
        };
        self.segments = fb.segments;
        let value = fb.loss;
        // Up to here: the gather and the forward pass (the loss was read back: synchronised).
        let fwd_ms = t0.elapsed().as_secs_f64() * 1e3 - fb.bwd_ms;
        let mut flat = Vec::with_capacity(self.shapes.len());
        for (g, sh) in fb.grads.into_iter().zip(&self.shapes) {
            let g = match g {
                Some(g) => g.flatten_all()?,
                None => Tensor::zeros(sh.iter().product::<usize>(), self.dtype, &self.dev)?,
            };
            flat.push(g.to_dtype(self.dtype)?);
        }
        let flat = Tensor::cat(&flat, 0)?;
        if self.shard16.is_some() {
            self.model.release_blocks_on_device()?;
        }
        // Stages 2-3 reduce each micro-batch's gradients onto the owners (model dtype);
        // stages 0-1 accumulate locally and reduce at the boundary.
        let part = if self.stage >= 2 {
            self.comm
                .reduce_scatter(&flat, self.reduce_op)?
                .to_dtype(DType::F32)?
        } else {
            flat.to_dtype(DType::F32)?
        };
        self.acc = Some(match self.acc.take() {
            Some(a) => (a + part)?,
            None => part,
        });
        self.micro += 1;
        if self.timers {
            self.dev.synchronize()?;
        }
        self.fwd_ms += fwd_ms;
        self.bwd_ms += t0.elapsed().as_secs_f64() * 1e3 - fwd_ms;
        Ok(value)
    }

    /// Whether the next [`DeviceEngine::step`] is due (`gas` micro-batches accumulated).
    pub fn is_gradient_accumulation_boundary(&self) -> bool {
        self.micro >= self.gas
    }

    /// The optimizer step at the accumulation boundary: reduction (stages 0-1), overflow check,
    /// unscaling and clipping, the update of this rank's partition, and the weights' all-gather.
    pub fn step(&mut self) -> Result<DeviceStepReport, EngineError> {
        let Some(acc) = self.acc.take() else {
            return Err(EngineError::Config(
                "step() before any forward_backward(): no gradients to apply".into(),
            ));
        };
        self.micro = 0;
        let t0 = std::time::Instant::now();
        let (fwd_ms, bwd_ms) = (self.fwd_ms, self.bwd_ms);
        (self.fwd_ms, self.bwd_ms) = (0.0, 0.0);
        let lr = self.sched.current_lr();
        let loss_scale = self.scaler.scale();
        // Stages 0-1: one reduction of the accumulated gradients, in the model dtype.
        let g = if self.stage <= 1 {
            let full = self
                .comm
                .all_reduce(&acc.to_dtype(self.dtype)?, self.reduce_op)?
                .to_dtype(DType::F32)?;
            full.narrow(0, self.lo, self.hi - self.lo)?
        } else {
            acc
        };
        // Overflow anywhere skips the step everywhere.
        let local = if has_inf_or_nan(&g)? { 1f32 } else { 0f32 };
        let flag = self
            .comm
            .all_reduce(&Tensor::new(&[local], &self.dev)?, ReduceOp::Max)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?[0];
        let decision = self
            .scaler
            .update(flag > 0.0)
            .map_err(ds_zero::ZeroError::from)?;
        self.global_steps += 1;
        if decision.is_skip() {
            self.skipped += 1;
            return Ok(DeviceStepReport {
                skipped: true,
                grad_norm: f64::NAN,
                loss_scale,
                lr,
                fwd_ms,
                bwd_ms,
                step_ms: t0.elapsed().as_secs_f64() * 1e3,
            });
        }
        // Global norm: at stage 0 `g` is every gradient; at stages 1-3 it is this rank's
        // partition, and the partitions' squares are summed over the ranks.
        let sq = g.sqr()?.sum_all()?.reshape(1)?;
        let sq = if self.stage >= 1 {
            self.comm.all_reduce(&sq, ReduceOp::Sum)?
        } else {
            sq
        };
        let sq = sq.to_device(&Device::Cpu)?.to_vec1::<f32>()?[0] as f64;
        let norm = sq.sqrt() / loss_scale;
        let clip_coef = if self.clip > 0.0 {
            (self.clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let gs = clip_coef / loss_scale;
        let new_part16 = match &mut self.optim {
            Optim::Device { master, adam } => {
                *master = adam.step(master, &g, lr, gs)?;
                master.to_dtype(self.dtype)?
            }
            Optim::Host { master, opt } => {
                let host_g = g.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
                opt.step_scaled(master, &host_g, lr, gs as f32)?;
                Tensor::from_slice(master, master.len(), &self.dev)?.to_dtype(self.dtype)?
            }
        };
        self.install_part(new_part16)?;
        self.sched.step();
        if self.timers {
            self.dev.synchronize()?;
        }
        Ok(DeviceStepReport {
            skipped: false,
            grad_norm: norm,
            loss_scale,
            lr,
            fwd_ms,
            bwd_ms,
            step_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// `gas` micro-batches from `batch(m)` (ids, targets), then the step; returns the mean loss
    /// and the step's report.
    pub fn train_batch(
        &mut self,
        mut batch: impl FnMut(usize) -> (Vec<u32>, Vec<u32>),
    ) -> Result<(f32, DeviceStepReport), EngineError> {
        let mut sum = 0.0;
        for m in 0..self.gas {
            let (x, y) = batch(m);
            sum += self.forward_backward(&x, &y)?;
        }
        let rep = self.step()?;
        Ok((sum / self.gas as f32, rep))
    }

    /// Sequences per micro-batch on this rank (`train_micro_batch_size_per_gpu`).
    pub fn micro_batch_size(&self) -> usize {
        self.micro_batch
    }
}

/// Checkpoints: the same format as the host [`crate::engine::Engine`] (`ds-checkpoint`: fp32
/// master weights and optimizer state as ranges of the flat parameter space, the training
/// state, the loss scaler), so a run saved by either engine at any world size and ZeRO stage
/// resumes on the other.
impl DeviceEngine<'_> {
    /// This rank's range of the flat space in a checkpoint: its partition (stage 0 too, where
    /// every rank holds everything: each writes its slice).
    fn ckpt_range(&self) -> std::ops::Range<usize> {
        let (lo, hi) = partition_range(self.numel, self.comm.world_size(), self.comm.rank());
        lo..hi
    }

    /// Master weights and optimizer state of this rank's part, on the host.
    fn host_state(&self) -> Result<(Vec<f32>, ds_zero::optim::OptimizerState), EngineError> {
        let host = |t: &Tensor| -> Result<Vec<f32>, EngineError> {
            Ok(t.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
        };
        Ok(match &self.optim {
            Optim::Device { master, adam } => {
                let (m, v) = adam.moments();
                let names = self.state_names;
                let state = ds_zero::optim::OptimizerState {
                    step: adam.step_count(),
                    buffers: vec![
                        (names[0].to_string(), host(m)?),
                        (names[1].to_string(), host(v)?),
                    ],
                };
                (host(master)?, state)
            }
            Optim::Host { master, opt } => (master.clone(), opt.state()),
        })
    }

    /// Saves a checkpoint (a collective: every rank calls it with the same tag) into `store`:
    /// each rank its fp32 master part and optimizer state, rank 0 the manifest and `latest`.
    pub fn save_checkpoint(
        &self,
        store: &ds_checkpoint::FsCheckpointStore,
        tag: &str,
        samples_per_step: u64,
    ) -> Result<(), EngineError> {
        let ck = |e: ds_checkpoint::CheckpointError| EngineError::Checkpoint(e.to_string());
        ds_checkpoint::validate_tag(tag).map_err(ck)?;
        let names = self.model.params().into_iter().map(|p| p.name);
        let meta = ds_checkpoint::CheckpointMeta {
            world_size: self.comm.world_size(),
            zero_stage: self.stage,
            dtype: "fp32".into(),
            params: ds_checkpoint::contiguous_params(names.zip(self.shapes.iter().cloned())),
            training: ds_checkpoint::TrainingState {
                global_step: self.global_steps,
                skipped_steps: self.skipped,
                global_samples: self.global_steps * samples_per_step,
                lr_scheduler: serde_json::json!({"last_batch_iteration": self.sched.last_batch_iteration()}),
                data_sampler: serde_json::json!({"next_step": self.global_steps}),
                loss_scaler: serde_json::to_value(self.scaler.state())
                    .unwrap_or(serde_json::Value::Null),
                ..Default::default()
            },
        };
        let (master, state) = self.host_state()?;
        // Stage 0 holds everything on every rank: write this rank's slice of it.
        let range = self.ckpt_range();
        let off = range.start - self.lo;
        let slice = |v: &[f32]| v[off..off + range.len()].to_vec();
        let mut shard = ds_checkpoint::RankShard::new(self.comm.rank(), range.clone(), state.step)
            .with_buffer(
                ds_checkpoint::MASTER_BUFFER,
                &master[off..off + range.len()],
            );
        for (n, b) in &state.buffers {
            shard
                .buffers
                .push((n.clone(), std::borrow::Cow::Owned(slice(b))));
        }
        let comm = self.comm;
        let mut barrier = || {
            comm.barrier()
                .map_err(|e| ds_checkpoint::CheckpointError::InvalidInput(format!("barrier: {e}")))
        };
        store
            .save_collective(tag, &meta, &shard, None, true, &mut barrier)
            .map_err(ck)
    }

    /// Loads a checkpoint saved by either engine at any world size and ZeRO stage: this rank's
    /// master part and optimizer state are read from the saved ranks' files, the weights
    /// rebuilt from them on the device, and the step counters, LR schedule and loss scaler
    /// restored. Returns the saved training state.
    pub fn load_checkpoint(
        &mut self,
        ckpt: &ds_checkpoint::Checkpoint,
    ) -> Result<ds_checkpoint::TrainingState, EngineError> {
        let ck = |e: ds_checkpoint::CheckpointError| EngineError::Checkpoint(e.to_string());
        let saved = &ckpt.meta().params;
        let params = self.model.params();
        if saved.len() != params.len()
            || saved
                .iter()
                .zip(params.iter().zip(&self.shapes))
                .any(|(s, (p, sh))| s.name != p.name || &s.shape != sh)
        {
            return Err(EngineError::Checkpoint(format!(
                "checkpoint {} holds a different model (parameter names or shapes differ)",
                ckpt.dir().display()
            )));
        }
        drop(params);
        let range = self.lo..self.hi;
        let master = ckpt
            .load_flat_range(ds_checkpoint::MASTER_BUFFER, range.clone())
            .map_err(ck)?;
        let mut buffers = Vec::with_capacity(self.state_names.len());
        for n in self.state_names {
            buffers.push((
                n.to_string(),
                ckpt.load_flat_range(n, range.clone()).map_err(ck)?,
            ));
        }
        let t = ckpt.training().clone();
        let step = t.global_step.saturating_sub(t.skipped_steps);
        let len = range.len();
        match &mut self.optim {
            Optim::Device { master: m, adam } => {
                *m = Tensor::from_vec(master, len, &self.dev)?;
                let mv = |i: usize| Tensor::from_slice(&buffers[i].1, len, &self.dev);
                adam.set_state(&mv(0)?, &mv(1)?, step)?;
            }
            Optim::Host { master: m, opt } => {
                *m = master;
                opt.load_state(&ds_zero::optim::OptimizerState { step, buffers })?;
            }
        }
        if !t.loss_scaler.is_null() {
            let st = serde_json::from_value::<ds_precision::LossScalerState>(t.loss_scaler.clone())
                .map_err(|e| {
                    EngineError::Data(format!(
                        "the checkpoint's loss_scaler state is malformed: {e}"
                    ))
                })?;
            self.scaler
                .load_state(&st)
                .map_err(ds_zero::ZeroError::from)?;
        }
        self.global_steps = t.global_step;
        self.skipped = t.skipped_steps;
        let last = t.lr_scheduler["last_batch_iteration"]
            .as_i64()
            .unwrap_or(t.global_step as i64 - 1);
        self.sched.set_last_batch_iteration(last);
        self.acc = None;
        self.micro = 0;
        // The weights in the model dtype, from the loaded masters.
        let part16 = match &self.optim {
            Optim::Device { master, .. } => master.to_dtype(self.dtype)?,
            Optim::Host { master, .. } => {
                Tensor::from_slice(master, master.len(), &self.dev)?.to_dtype(self.dtype)?
            }
        };
        self.install_part(part16)?;
        Ok(t)
    }

    /// Installs this rank's updated part of the weights (model dtype): stage 0 directly,
    /// stages 1-2 after an all-gather, stage 3 kept as the partition gathered at each
    /// micro-step.
    fn install_part(&mut self, part16: Tensor) -> Result<(), EngineError> {
        if self.stage == 3 {
            // The blocks are gathered when used; the persistent parameters (embeddings, final
            // LayerNorm) are refreshed now, from their owners.
            self.shard16 = Some(part16);
            let np = self.shapes.len();
            let mut t = self.gather_params(0, 2)?;
            t.extend(self.gather_params(np - 2, 2)?);
            self.model.install_persistent(&t)?;
            return Ok(());
        }
        let full = if self.stage == 0 {
            part16
        } else {
            self.gather_padded(&part16)?
        };
        let t = self.split(&full)?;
        self.model.install_all(&t)?;
        Ok(())
    }
}

/// Where this process sits in a GPU job (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`; one GPU when none
/// is set).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuEnv {
    /// This process's rank.
    pub rank: usize,
    /// Processes (GPUs) in the job.
    pub world_size: usize,
    /// The CUDA device ordinal this process uses.
    pub local_rank: usize,
}

/// Reads the launcher's environment: all of `RANK`/`WORLD_SIZE` (and `MASTER_ADDR`/`MASTER_PORT`
/// for the rendezvous) or none of them (one GPU, rank 0).
#[cfg(feature = "cuda")]
pub fn gpu_env() -> Result<GpuEnv, EngineError> {
    let get = |k: &str| -> Result<Option<usize>, EngineError> {
        match std::env::var(k) {
            Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                EngineError::Config(format!("{k}={v}: expected a non-negative integer"))
            }),
            Err(_) => Ok(None),
        }
    };
    let (rank, ws, local) = (get("RANK")?, get("WORLD_SIZE")?, get("LOCAL_RANK")?);
    match (rank, ws) {
        (None, None) => Ok(GpuEnv {
            rank: 0,
            world_size: 1,
            local_rank: local.unwrap_or(0),
        }),
        (Some(rank), Some(world_size)) if rank < world_size => Ok(GpuEnv {
            rank,
            world_size,
            local_rank: local.unwrap_or(rank),
        }),
        _ => Err(EngineError::Config(
            "--backend nccl: set RANK and WORLD_SIZE together (RANK < WORLD_SIZE), with MASTER_ADDR and MASTER_PORT, or none of them for one GPU".into(),
        )),
    }
}

/// Opens this process's GPU and an NCCL communicator on candle's stream of it. Library
/// problems are reported as errors (probed before cudarc is called).
#[cfg(feature = "cuda")]
pub fn open_gpu(env: &GpuEnv) -> Result<(Device, ds_comm::NcclComm), EngineError> {
    use ds_comm::{NcclComm, NcclCommOptions};
    ds_comm::nccl::probe_libraries()?;
    let dev = Device::new_cuda(env.local_rank).map_err(|e| {
        // candle appends a backtrace to driver errors: keep the message.
        let e = e.to_string();
        EngineError::Config(format!(
            "--backend nccl: cannot open CUDA device {} (LOCAL_RANK): {}",
            env.local_rank,
            e.lines().next().unwrap_or("")
        ))
    })?;
    let Device::Cuda(cuda) = &dev else {
        return Err(EngineError::Config(
            "--backend nccl: candle did not return a CUDA device".into(),
        ));
    };
    let opts = NcclCommOptions {
        device: Some(env.local_rank),
        ..NcclCommOptions::default()
    };
    let comm = if env.world_size == 1 && std::env::var("RANK").is_err() {
        NcclComm::with_id_on_stream(0, 1, cuda.cuda_stream(), NcclComm::new_id()?, opts)?
    } else {
        NcclComm::from_env_on_device(cuda, opts)?
    };
    Ok((dev, comm))
}
