//! The training engine: one rank's view of a data-parallel run.
//!
//! `Engine::initialize(config, model, comm)` maps the resolved DeepSpeed config onto the
//! components: the ZeRO partitioned optimizer (`ds-zero`), the LR scheduler, gradient
//! accumulation and clipping. Per micro-batch: forward and backward (candle autograd), the
//! gradients detached right away and added into one flat fp32 accumulation buffer (divided by
//! the accumulation steps, as DeepSpeed does); at the accumulation boundary: reduction
//! (all-reduce or reduce-scatter by stage), global-norm clipping, overflow check, the fused
//! optimizer step on this rank's shard, the all-gather of updated parameters, and the LR
//! schedule (not stepped on a skipped step).

use std::time::Instant;

use candle_core::{Device, Tensor};
use ds_comm::Communicator;
use ds_config::ResolvedConfig;
use ds_zero::optim::{AdamParams, LambParams, LionParams, OptimizerSpec, SgdParams};
use ds_zero::{MemoryReport, StepReport, ZeroOptimizer, ZeroOptions};

use crate::lr::{LrSchedule, LrScheduler};
use crate::model::{BlockEvent, Gpt};
use crate::traits::Model;
use crate::EngineError;
use ds_ckpt_act::Policy;

mod ckpt;
pub use ckpt::{validate_tag_across_ranks, TagValidation};

/// Maps the config's optimizer section onto a fused optimizer.
pub fn optimizer_spec(cfg: &ResolvedConfig) -> Result<OptimizerSpec, EngineError> {
    let Some(o) = &cfg.optimizer else {
        return Err(EngineError::Config(
            "the config has no `optimizer` section; the engine needs one (e.g. {\"type\": \"AdamW\", \"params\": {\"lr\": 3e-4}})".into(),
        ));
    };
    let lr = o.param_f64("lr").unwrap_or(1e-3);
    let wd = o.param_f64("weight_decay").unwrap_or(0.0);
    let betas = o.betas().unwrap_or((0.9, 0.999));
    Ok(match o.kind.as_str() {
        "Adam" | "AdamW" => OptimizerSpec::Adam(AdamParams {
            lr,
            betas,
            eps: o.param_f64("eps").unwrap_or(1e-8),
            weight_decay: wd,
            bias_correction: o.param_bool("bias_correction").unwrap_or(true),
            adam_w_mode: o.kind == "AdamW" || o.param_bool("adam_w_mode").unwrap_or(true),
        }),
        "SGD" => OptimizerSpec::Sgd(SgdParams {
            lr,
            momentum: o.param_f64("momentum").unwrap_or(0.0),
            dampening: o.param_f64("dampening").unwrap_or(0.0),
            weight_decay: wd,
            nesterov: o.param_bool("nesterov").unwrap_or(false),
        }),
        "Lion" => OptimizerSpec::Lion(LionParams {
            lr,
            betas,
            weight_decay: wd,
        }),
        "Lamb" => OptimizerSpec::Lamb(LambParams {
            lr,
            betas,
            eps: o.param_f64("eps").unwrap_or(1e-8),
            weight_decay: wd,
            bias_correction: o.param_bool("bias_correction").unwrap_or(true),
            max_coeff: o.param_f64("max_coeff").unwrap_or(10.0),
            min_coeff: o.param_f64("min_coeff").unwrap_or(0.01),
        }),
        other => {
            return Err(EngineError::Config(format!(
            "optimizer `{other}` is not run by the engine; allowed: Adam, AdamW, SGD, Lion, Lamb"
        )))
        }
    })
}

/// Refuses what the engine does not run yet, by name (rather than ignoring it).
fn check_supported(cfg: &ResolvedConfig) -> Result<(), EngineError> {
    let refuse = |what: &str, why: &str| Err(EngineError::Config(format!("{what}: {why}")));
    if cfg.fp16.enabled || cfg.bf16.enabled {
        return refuse(
            if cfg.fp16.enabled { "fp16.enabled" } else { "bf16.enabled" },
            "mixed-precision training is not wired into the engine yet (f32 is the CPU default); set enabled false",
        );
    }
    if cfg.json()["sparse_gradients"] == serde_json::Value::Bool(true) {
        return refuse(
            "sparse_gradients",
            "sparse gradient all-reduce is not implemented (the model library has no sparse embeddings); set false",
        );
    }
    if cfg.grad_accum_dtype.as_deref().is_some_and(|d| d != "fp32") {
        return refuse(
            "data_types.grad_accum_dtype",
            "gradients accumulate in fp32 in this engine; allowed: \"fp32\" or null",
        );
    }
    if cfg
        .communication_data_type
        .as_deref()
        .is_some_and(|d| d != "fp32")
    {
        return refuse(
            "communication_data_type",
            "collectives run in fp32 in this engine; allowed: \"fp32\" or null",
        );
    }
    let ac = &cfg.activation_checkpointing;
    if ac.partition_activations || ac.contiguous_memory_optimization {
        return refuse(
            "activation_checkpointing.partition_activations",
            "partitioning activations splits them across model-parallel ranks, and this runtime has no model parallelism; set partition_activations and contiguous_memory_optimization false",
        );
    }
    Ok(())
}

/// Accepted settings that do nothing on this machine, said once.
fn engine_notes(cfg: &ResolvedConfig) -> Vec<String> {
    let ac = &cfg.activation_checkpointing;
    let mut notes = Vec::new();
    if ac.cpu_checkpointing {
        notes.push("activation_checkpointing.cpu_checkpointing: the model runs on the CPU, so saved inputs already live in host memory (no-op)".to_string());
    }
    if ac.synchronize_checkpoint_boundary {
        notes.push("activation_checkpointing.synchronize_checkpoint_boundary: there is no device stream to synchronise on the CPU (no-op)".to_string());
    }
    let z = &cfg.zero_optimization;
    if z.overlap_comm && z.stage < 3 {
        notes.push("zero_optimization.overlap_comm: gradients are reduced after the backward pass, not overlapped with it (no effect yet)".to_string());
    }
    if z.round_robin_gradients {
        notes.push(
            "zero_optimization.round_robin_gradients: partitions are contiguous here (no effect)"
                .to_string(),
        );
    }
    if z.offload_optimizer_to_cpu() {
        notes.push("zero_optimization.offload_optimizer.device = cpu: on a CPU-only run the optimizer state and master weights already live in host memory (the same code path)".to_string());
    }
    if z.stage == 3 {
        notes.push("zero_optimization stage 3: every transformer block is gathered before use and released after (blocks are the gather granularity; stage3_prefetch_bucket_size, stage3_max_live_parameters and stage3_param_persistence_threshold have no effect: embeddings and the final LayerNorm stay whole, one block is live at a time, nothing is prefetched)".to_string());
    }
    if cfg.json()["dataloader_drop_last"] == serde_json::Value::Bool(true) {
        notes.push(
            "dataloader_drop_last: the built-in loaders never produce a partial batch (no-op)"
                .to_string(),
        );
    }
    notes
}

/// The parameter index ranges outside every block (in order, non-empty).
fn persistent_ranges(
    nparams: usize,
    blocks: &[std::ops::Range<usize>],
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for b in blocks {
        if b.start > start {
            out.push(start..b.start);
        }
        start = start.max(b.end);
    }
    if nparams > start {
        out.push(start..nparams);
    }
    out
}

/// What one optimizer step (one global batch) did on this rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainStep {
    /// Mean loss over this rank's micro-batches.
    pub loss: f64,
    /// The optimizer step's report (norm, overflow, clipping).
    pub step: StepReport,
    /// Learning rate used.
    pub lr: f64,
    /// Milliseconds in forward, backward and the optimizer step (DeepSpeed's wall-clock
    /// breakdown: `fwd`, `bwd`, `step`).
    pub fwd_ms: f64,
    /// Backward milliseconds (including copying gradients out).
    pub bwd_ms: f64,
    /// Reduction + optimizer + all-gather milliseconds.
    pub step_ms: f64,
}

/// Per-block checkpoint timings of the last micro-batch: (block, forward ms, recompute +
/// backward ms), for `activation_checkpointing.profile`.
pub type SegmentTimes = Vec<(usize, f64, f64)>;

/// One rank's training engine, for any [`Model`] (the GPT by default).
pub struct Engine<'c, M: Model = Gpt> {
    model: M,
    comm: &'c dyn Communicator,
    zero: ZeroOptimizer,
    sched: LrScheduler,
    gas: usize,
    micro: usize,
    sizes: Vec<usize>,
    acc: Vec<f32>,
    global_steps: u64,
    skipped_steps: u64,
    micro_steps: u64,
    /// Micro-batches accumulated since the last optimizer step.
    pending: usize,
    policy: Policy,
    /// `acc` holds stale values: the next micro-batch overwrites instead of accumulating.
    acc_fresh: bool,
    last_segments: SegmentTimes,
    notes: Vec<String>,
    stage3: bool,
    /// Checkpoint settings and the decoupled save in flight.
    ckpt: ckpt::CkptState,
}

impl<'c, M: Model> Engine<'c, M> {
    /// Builds the engine for a resolved config, a model (identically initialised on every
    /// rank) and this rank's communicator.
    pub fn initialize(
        cfg: &ResolvedConfig,
        model: M,
        comm: &'c dyn Communicator,
    ) -> Result<Self, EngineError> {
        check_supported(cfg)?;
        if !model.supports_checkpointing()
            && cfg.activation_checkpointing.number_checkpoints.is_some()
        {
            return Err(EngineError::Config(
                "activation_checkpointing.number_checkpoints: this model does not implement activation checkpointing (Model::supports_checkpointing is false); remove the key".into(),
            ));
        }
        if cfg.world_size != comm.world_size() {
            return Err(EngineError::Config(format!(
                "the config was resolved for world size {} but the communicator has {} ranks",
                cfg.world_size,
                comm.world_size()
            )));
        }
        let spec = optimizer_spec(cfg)?;
        let z = &cfg.zero_optimization;
        let opts = ZeroOptions {
            stage: z.stage,
            reduce_bucket_size: usize::try_from(z.reduce_bucket_size).unwrap_or(usize::MAX),
            allgather_bucket_size: usize::try_from(z.allgather_bucket_size).unwrap_or(usize::MAX),
            average_gradients: cfg.gradient_allreduce_op == "mean",
            prescale_gradients: cfg.prescale_gradients,
            gradient_predivide_factor: cfg.gradient_predivide_factor,
            gradient_clipping: cfg.gradient_clipping,
        };
        let sizes: Vec<usize> = model.params().iter().map(|p| p.var.elem_count()).collect();
        let mut init = Vec::with_capacity(sizes.iter().sum());
        for p in model.params() {
            init.extend(p.var.flatten_all()?.to_vec1::<f32>()?);
        }
        let zero = ZeroOptimizer::new(&sizes, &init, spec, opts, comm)?;
        let stage3 = z.stage == 3;
        if stage3 {
            // ZeRO-3: block parameters live in the optimizer's shards; the model holds them only
            // while a block runs (gathered before, released after).
            for i in 0..model.block_param_ranges().len() {
                model.release_block(i)?;
            }
        }
        let sched = LrScheduler::new(LrSchedule::from_config(
            cfg.scheduler.as_ref(),
            cfg.optimizer.as_ref(),
        )?);
        let n = init.len();
        let ckpt_ok = model.supports_checkpointing();
        let ckpt = ckpt::CkptState::from_config(cfg)?;
        let mut notes = engine_notes(cfg);
        notes.extend(ckpt::CkptState::notes(cfg));
        Ok(Engine {
            model,
            comm,
            zero,
            sched,
            gas: cfg.gradient_accumulation_steps as usize,
            micro: cfg.train_micro_batch_size_per_gpu as usize,
            sizes,
            acc: vec![0.0; n],
            global_steps: 0,
            skipped_steps: 0,
            micro_steps: 0,
            pending: 0,
            acc_fresh: true,
            last_segments: Vec::new(),
            notes,
            // ZeRO-3 releases a block's parameters after its forward pass, so every block is
            // recomputed in the backward pass (with its parameters gathered again).
            policy: if stage3 && ckpt_ok {
                Policy::Every
            } else {
                match cfg.activation_checkpointing.number_checkpoints {
                    Some(k) => Policy::Count(k as usize),
                    None => Policy::None,
                }
            },
            stage3,
            ckpt,
        })
    }

    /// Which blocks are checkpointed (from `activation_checkpointing.number_checkpoints`, or set
    /// here, e.g. [`Policy::Every`]).
    /// Refused for a model without activation checkpointing
    /// ([`Model::supports_checkpointing`]).
    pub fn set_checkpoint_policy(&mut self, policy: Policy) -> Result<(), EngineError> {
        if !self.model.supports_checkpointing() && policy != Policy::None {
            return Err(EngineError::Config(
                "this model does not implement activation checkpointing".into(),
            ));
        }
        // ZeRO-3 needs every block recomputed (its parameters are released after the forward).
        if !self.stage3 {
            self.policy = policy;
        }
        Ok(())
    }

    /// All parameters' current values, flat in [`Gpt::params`] order, at every stage (a
    /// collective: every rank must call it). This is DeepSpeed's `GatheredParameters` /
    /// `stage3_gather_16bit_weights_on_model_save` as one explicit call that always works.
    pub fn gather_full_params(&self) -> Result<Vec<f32>, EngineError> {
        Ok(self.zero.gather_params(self.comm)?)
    }

    /// Per-block checkpoint timings of the last micro-batch (empty without checkpointing).
    pub fn segment_times(&self) -> &SegmentTimes {
        &self.last_segments
    }

    /// Notes about accepted settings that are no-ops here (show them once).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The activation-checkpointing policy.
    pub fn checkpoint_policy(&self) -> Policy {
        self.policy
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Optimizer steps taken (including skipped ones, as DeepSpeed counts).
    pub fn global_steps(&self) -> u64 {
        self.global_steps
    }

    /// Steps skipped because of inf/nan gradients.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Micro-batches per optimizer step.
    pub fn gradient_accumulation_steps(&self) -> usize {
        self.gas
    }

    /// Samples per micro-batch on this rank.
    pub fn micro_batch_size(&self) -> usize {
        self.micro
    }

    /// Model-state bytes this rank holds between steps: the model weights present (all of them
    /// at stages 0-2; at stage 3 only the persistent embeddings and final LayerNorm, the blocks
    /// being gathered one at a time while they run), the gradient accumulation buffer (full
    /// size at every stage) plus the optimizer's reduced-gradient part, and the optimizer's
    /// fp32 master part plus its state.
    pub fn memory(&self) -> MemoryReport {
        let full = 4 * self.acc.len();
        let part = 4 * self.zero.master().len();
        // At stage 3 the model holds only its persistent parameters between passes (plus one
        // gathered block while it runs, not counted here).
        let held: usize = 4 * self
            .model
            .params()
            .iter()
            .map(|p| p.var.elem_count())
            .sum::<usize>();
        MemoryReport {
            params_bytes: held,
            grads_bytes: full + part,
            optimizer_bytes: part + self.zero.optimizer().state_bytes(),
        }
    }

    /// The learning rate the next step uses.
    pub fn current_lr(&self) -> f64 {
        self.sched.current_lr()
    }

    /// Forward and backward of one micro-batch (`ids`, `targets`: `micro * seq` tokens each);
    /// the gradients are added into the accumulation buffer. Returns the loss and the
    /// (forward, backward) milliseconds.
    pub fn forward_backward(
        &mut self,
        ids: &[u32],
        targets: &[u32],
    ) -> Result<(f64, f64, f64), EngineError> {
        let seq = self.model.seq_len();
        if ids.len() != targets.len() || ids.is_empty() || !ids.len().is_multiple_of(seq) {
            return Err(EngineError::Data(format!(
                "a micro-batch needs inputs and targets of equal length, a multiple of seq ({seq}); got {} and {}",
                ids.len(),
                targets.len()
            )));
        }
        let b = ids.len() / seq;
        let t0 = Instant::now();
        let x = Tensor::from_slice(ids, (b, seq), &Device::Cpu)?;
        let y = Tensor::from_slice(targets, (b, seq), &Device::Cpu)?;
        // Dropout masks are keyed by the micro-step (identical in a checkpoint recompute).
        self.model.set_step(self.micro_steps);
        self.micro_steps += 1;
        self.pending += 1;
        let fb = if self.stage3 {
            let (model, zero, comm) = (&self.model, &self.zero, self.comm);
            let ranges = model.block_param_ranges();
            let mut hook = |ev: BlockEvent| -> candle_core::Result<()> {
                match ev {
                    BlockEvent::Gather(i) => {
                        let Some(r) = ranges.get(i) else {
                            candle_core::bail!("no block {i}");
                        };
                        let data = zero
                            .gather_param_range(r.clone(), comm)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        model.gather_block(i, &data)
                    }
                    BlockEvent::Release(i) => model.release_block(i),
                }
            };
            self.model
                .forward_backward_hooked(&x, &y, self.policy, &mut hook)?
        } else {
            self.model
                .forward_backward_hooked(&x, &y, self.policy, &mut |_| Ok(()))?
        };
        self.last_segments = fb.segments.clone();
        let t1 = Instant::now();
        let scale = 1.0 / self.gas as f32;
        let mut off = 0;
        let fresh = std::mem::replace(&mut self.acc_fresh, false);
        for (g, &n) in fb.grads.into_iter().zip(&self.sizes) {
            let dst = &mut self.acc[off..off + n];
            match g {
                Some(g) => {
                    let g = g.flatten_all()?.to_vec1::<f32>()?;
                    if fresh {
                        for (a, v) in dst.iter_mut().zip(g) {
                            *a = v * scale;
                        }
                    } else {
                        for (a, v) in dst.iter_mut().zip(g) {
                            *a += v * scale;
                        }
                    }
                }
                None if fresh => dst.iter_mut().for_each(|a| *a = 0.0),
                None => {}
            }
            off += n;
        }
        let copy_ms = t1.elapsed().as_secs_f64() * 1e3;
        let _ = t0;
        Ok((f64::from(fb.loss), fb.fwd_ms, fb.bwd_ms + copy_ms))
    }

    /// Whether the micro-batches accumulated since the last optimizer step complete a global
    /// batch (`gradient_accumulation_steps` of them), i.e. whether [`Engine::step_micro`]
    /// will update the parameters now (DeepSpeed's `is_gradient_accumulation_boundary()`,
    /// asked after the backward pass).
    pub fn is_gradient_accumulation_boundary(&self) -> bool {
        self.pending > 0 && self.pending.is_multiple_of(self.gas)
    }

    /// DeepSpeed's `engine.step()` for custom loops: call it after every micro-batch's
    /// [`Engine::forward_backward`]. Between boundaries it only counts (the gradients stay in
    /// the accumulation buffer) and returns `None`; at the boundary it runs [`Engine::step`]
    /// and returns its report.
    pub fn step_micro(&mut self) -> Result<Option<StepReport>, EngineError> {
        if self.pending == 0 {
            return Err(EngineError::Data(
                "step_micro without a forward_backward since the last step: nothing to accumulate"
                    .into(),
            ));
        }
        if self.is_gradient_accumulation_boundary() {
            self.step().map(Some)
        } else {
            Ok(None)
        }
    }

    /// The accumulation boundary: reduce, clip, step, all-gather, schedule. Gradients are
    /// accumulated divided by `gradient_accumulation_steps`, so call it after that many
    /// micro-batches ([`Engine::train_batch`] and [`Engine::step_micro`] do).
    pub fn step(&mut self) -> Result<StepReport, EngineError> {
        self.pending = 0;
        let lr = self.sched.current_lr();
        self.zero.reduce_gradients_swap(&mut self.acc, self.comm)?;
        // The next micro-batch writes its gradients instead of adding them: no zeroing pass.
        self.acc_fresh = true;
        let report = self.zero.step(lr, self.comm)?;
        if report.applied {
            if self.stage3 {
                // Only the persistent parameters (outside every block: the GPT's embeddings
                // and final LayerNorm) are refreshed; blocks are gathered when they next run.
                for range in persistent_ranges(self.sizes.len(), &self.model.block_param_ranges()) {
                    let data = self.zero.gather_param_range(range.clone(), self.comm)?;
                    let mut off = 0;
                    for i in range {
                        let n = self.sizes[i];
                        self.model.set_param(i, &data[off..off + n])?;
                        off += n;
                    }
                }
            } else {
                let full = self.zero.gather_params(self.comm)?;
                let mut off = 0;
                for (p, &n) in self.model.params().iter().zip(&self.sizes) {
                    let t = Tensor::from_slice(&full[off..off + n], p.var.shape(), &Device::Cpu)?;
                    p.var.set(&t)?;
                    off += n;
                }
            }
            self.sched.step();
        } else {
            self.skipped_steps += 1;
        }
        self.global_steps += 1;
        // A decoupled checkpoint is committed at the first boundary after it is written.
        self.poll_checkpoint()?;
        Ok(report)
    }

    /// One global batch: `gas` micro-batches given by `batch(m)`, then the step.
    pub fn train_batch(
        &mut self,
        mut batch: impl FnMut(usize) -> (Vec<u32>, Vec<u32>),
    ) -> Result<TrainStep, EngineError> {
        let lr = self.sched.current_lr();
        let (mut loss, mut fwd, mut bwd) = (0.0, 0.0, 0.0);
        for m in 0..self.gas {
            let (x, y) = batch(m);
            let (l, f, b) = self.forward_backward(&x, &y)?;
            loss += l / self.gas as f64;
            fwd += f;
            bwd += b;
        }
        let t = Instant::now();
        let step = self.step()?;
        Ok(TrainStep {
            loss,
            step,
            lr,
            fwd_ms: fwd,
            bwd_ms: bwd,
            step_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}
