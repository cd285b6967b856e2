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
use ds_precision::LossScalerOptions;
use ds_zero::optim::{AdamParams, LambParams, LionParams, OptimizerSpec, SgdParams};
use ds_zero::{
    GradPiece, GradStats, MemoryReport, StepReport, ZeroError, ZeroOptimizer, ZeroOptions,
    ZeroPrecision,
};
use rayon::prelude::*;

use crate::lr::{LrSchedule, LrScheduler};
use crate::traits::Model;
use crate::traits::{BlockEvent, FwdBwd};
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

/// Refuses what the engine does not run yet, by name (rather than ignoring it), on every
/// device.
pub fn check_supported(cfg: &ResolvedConfig) -> Result<(), EngineError> {
    let refuse = |what: &str, why: &str| Err(EngineError::Config(format!("{what}: {why}")));
    if cfg.fp16.enabled && cfg.bf16.enabled {
        return refuse(
            "fp16.enabled and bf16.enabled",
            "only one 16-bit model dtype can be on; enable fp16 or bf16, not both",
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
    let model_dtype = if cfg.fp16.enabled {
        "fp16"
    } else if cfg.bf16.enabled {
        "bf16"
    } else {
        "fp32"
    };
    if let Some(d) = cfg.communication_data_type.as_deref() {
        if d != model_dtype {
            return refuse(
                "communication_data_type",
                &format!("gradients are communicated in the model dtype here ({model_dtype}); allowed: \"{model_dtype}\" or null (got \"{d}\")"),
            );
        }
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

/// Most elements per swapped chunk of the NVMe-offloaded optimizer step: `sub_group_size`
/// (DeepSpeed's swap unit, 1e9 by default) capped so that `buffer_count` chunks of master
/// weights and state stay small (16M elements: 64 MiB per buffer).
pub const MAX_SWAP_CHUNK: u64 = 1 << 24;

/// ZeRO-Infinity placements of a config (`offload_optimizer` / `offload_param` with device
/// `nvme`, the `aio` section); everything in memory when neither is `nvme`.
pub fn nvme_options(cfg: &ResolvedConfig) -> ds_zero::NvmeOptions {
    let z = &cfg.zero_optimization;
    let nvme = |o: &Option<ds_config::OffloadConfig>| {
        o.as_ref()
            .filter(|o| o.device == "nvme")
            .and_then(|o| o.nvme_path.as_ref())
            .map(std::path::PathBuf::from)
    };
    let oo = z.offload_optimizer.as_ref().filter(|o| o.device == "nvme");
    let op = z.offload_param.as_ref().filter(|o| o.device == "nvme");
    let a = &cfg.aio;
    let us = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    ds_zero::NvmeOptions {
        optimizer_path: nvme(&z.offload_optimizer),
        param_path: nvme(&z.offload_param),
        buffer_count: oo.map_or(4, |o| us(o.buffer_count).max(1)),
        chunk_elems: us(z.sub_group_size.clamp(1, MAX_SWAP_CHUNK)),
        pipeline_read: oo.is_some_and(|o| o.pipeline_read),
        pipeline_write: oo.is_some_and(|o| o.pipeline_write),
        max_in_cpu: op.and_then(|o| o.max_in_cpu).map_or(1_000_000_000, us),
        aio: ds_zero::swap::AioOptions {
            block_size: us(a.block_size),
            queue_depth: us(a.queue_depth),
            thread_count: us(a.thread_count),
            single_submit: a.single_submit,
            direct: true,
        },
    }
}

/// The model dtype and loss-scaling rules of a config's `fp16`/`bf16` sections, mapped as
/// DeepSpeed maps them for the config's ZeRO stage.
pub fn zero_precision(cfg: &ResolvedConfig) -> ZeroPrecision {
    let z = &cfg.zero_optimization;
    if cfg.fp16.enabled {
        let f = &cfg.fp16;
        ZeroPrecision::deepspeed_fp16(
            z.stage,
            f.loss_scale,
            LossScalerOptions {
                init_scale_power: i32::try_from(f.initial_scale_power).unwrap_or(i32::MAX),
                window: f.loss_scale_window,
                hysteresis: u32::try_from(f.hysteresis).unwrap_or(u32::MAX),
                consecutive_hysteresis: f.consecutive_hysteresis,
                min_scale: f.min_loss_scale,
                ..LossScalerOptions::default()
            },
        )
    } else if cfg.bf16.enabled {
        ZeroPrecision::Bf16 {
            check_grad_overflow: cfg.bf16.check_grad_overflow,
        }
    } else {
        ZeroPrecision::F32
    }
}

/// Accepted settings that do nothing on this machine, said once.
fn engine_notes(cfg: &ResolvedConfig, comm_thread: bool, dev: &Device) -> Vec<String> {
    let ac = &cfg.activation_checkpointing;
    let mut notes = Vec::new();
    let on_cpu = dev.is_cpu();
    if !on_cpu {
        notes.push(format!("the model runs on {dev:?} (candle autograd); the ZeRO partitions (fp32 master weights, optimizer state, reduced gradients) live in host memory and are updated by the fused host optimizer: each step reads this rank's gradients back from the device and installs the updated weights on it (the ZeRO-Offload placement, whatever offload_optimizer says)"));
    }
    if (cfg.fp16.enabled || cfg.bf16.enabled) && on_cpu {
        let d = if cfg.fp16.enabled { "fp16" } else { "bf16" };
        notes.push(format!("{d}: fp32 master weights and optimizer state, {d} model weights (held as f32 numbers exactly representable in {d}: the CPU kernels compute in f32{}), gradients rounded to {d} and reduced in {d}{}", if cfg.fp16.enabled { "" } else { ", but for the GPT's matrix products where `ds train` finds bf16 units (see its bf16 compute note)" }, if cfg.fp16.enabled { ", dynamic or static loss scaling with DeepSpeed's rules (overflow skips the step on every rank; the LR schedule holds)" } else { "" }));
    }
    if cfg.fp16.enabled && cfg.fp16.auto_cast {
        notes.push(
            "fp16.auto_cast: the model's inputs are token ids, there is nothing to cast (no-op)"
                .to_string(),
        );
    }
    if cfg.bf16.enabled && cfg.bf16.immediate_grad_update {
        notes.push("bf16.immediate_grad_update: gradients are reduced and applied at the accumulation boundary, as with fp32 (no effect)".to_string());
    }
    if ac.cpu_checkpointing && on_cpu {
        notes.push("activation_checkpointing.cpu_checkpointing: the model runs on the CPU, so saved inputs already live in host memory (no-op)".to_string());
    }
    if ac.synchronize_checkpoint_boundary && on_cpu {
        notes.push("activation_checkpointing.synchronize_checkpoint_boundary: there is no device stream to synchronise on the CPU (no-op)".to_string());
    }
    let z = &cfg.zero_optimization;
    if z.overlap_comm && z.stage < 2 {
        notes.push(format!("zero_optimization.overlap_comm: at stage {} gradients are reduced once per accumulation step, after the backward pass (DeepSpeed overlaps only stages 2-3's per-bucket reductions; no effect)", z.stage));
    }
    if z.overlap_comm && z.stage >= 2 && !comm_thread {
        notes.push("zero_optimization.overlap_comm: no second communicator was given for a communication thread (Engine::initialize_overlapped; `ds train` gives one to local ranks, not under MPI), so gradient buckets are reduced on the compute thread during the backward pass, not overlapped".to_string());
    }
    if z.round_robin_gradients {
        notes.push(
            "zero_optimization.round_robin_gradients: partitions are contiguous here (no effect)"
                .to_string(),
        );
    }
    if z.offload_optimizer_to_cpu() && on_cpu {
        notes.push("zero_optimization.offload_optimizer.device = cpu: on a CPU-only run the optimizer state and master weights already live in host memory (the same code path)".to_string());
    }
    if z.offload_optimizer_to_nvme() {
        let o = z.offload_optimizer.as_ref();
        let (pr, pw) = o.map_or((false, false), |o| (o.pipeline_read, o.pipeline_write));
        notes.push(format!("ZeRO-Infinity: fp32 master weights and optimizer state in swap files under {} (removed at exit), stepped in chunks of {} elements through {} buffers{}{}; reduced gradients stay in memory", o.and_then(|o| o.nvme_path.as_deref()).unwrap_or("?"), z.sub_group_size.clamp(1, MAX_SWAP_CHUNK), o.map_or(4, |o| o.buffer_count), if pr { ", next chunk read during the update" } else { "" }, if pw { ", previous chunk written during the update" } else { "" }));
        if !(pr && pw) {
            notes.push("zero_optimization.offload_optimizer: pipeline_read/pipeline_write are false (DeepSpeed's default), so the step waits for each chunk's I/O; set both true to overlap it with the update".to_string());
        }
    }
    if z.offload_param_to_nvme() {
        let p = z.offload_param.as_ref();
        notes.push(format!("ZeRO-Infinity: stage-3 parameters in swap files under {} (the first max_in_cpu = {} elements of each rank's part stay in memory); each block is read before it runs, the next block's read started while the current one computes", p.and_then(|o| o.nvme_path.as_deref()).unwrap_or("?"), p.and_then(|o| o.max_in_cpu).unwrap_or(1_000_000_000)));
        if p.and_then(|o| o.buffer_size).is_some() {
            notes.push("zero_optimization.offload_param.buffer_size/buffer_count: a block's parameters are read into one buffer of their own size (the block is the swap unit here)".to_string());
        }
    }
    if cfg
        .zero_optimization
        .offload_optimizer
        .as_ref()
        .is_some_and(|o| o.device == "nvme" && o.pin_memory)
        || cfg
            .zero_optimization
            .offload_param
            .as_ref()
            .is_some_and(|o| o.device == "nvme" && o.pin_memory)
    {
        notes.push("pin_memory: the swap buffers are 4096-byte-aligned host buffers for O_DIRECT; there is no device to pin them for on the CPU".to_string());
    }
    if z.offload_param.as_ref().is_some_and(|o| o.device == "cpu") {
        notes.push(if on_cpu {
            "zero_optimization.offload_param.device = cpu: the parameters' partitions live in host memory on the CPU already (the same code path)".to_string()
        } else {
            "zero_optimization.offload_param.device = cpu: the parameters' partitions live in host memory; each block is copied to the device just before it runs and dropped after".to_string()
        });
    }
    if z.stage == 3 {
        let prefetch = if comm_thread && z.stage3_prefetch_bucket_size > 0 {
            "the next block is all-gathered on the communication thread while the current one computes when it has at most stage3_prefetch_bucket_size elements and both fit in stage3_max_live_parameters (two blocks live at a time)"
        } else if comm_thread {
            "stage3_prefetch_bucket_size is 0: no prefetch, one block live at a time"
        } else {
            "no second communicator was given (Engine::initialize_overlapped), so nothing is prefetched: one block live at a time"
        };
        notes.push(format!("zero_optimization stage 3: every transformer block is gathered before use and released after (blocks are the gather granularity; stage3_param_persistence_threshold has no effect: the parameters outside the blocks — embeddings, final LayerNorm — stay whole); {prefetch}"));
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

/// A job for the communication thread (run in issue order, identically on every rank).
enum Job {
    /// Reduce the gradients of these parameters (flat), times the factor.
    Reduce(std::ops::Range<usize>, Vec<f32>, f32),
    /// All-gather these parameters and send them back.
    Gather(
        std::ops::Range<usize>,
        crossbeam::channel::Sender<Result<Vec<f32>, ZeroError>>,
    ),
}

/// Where the communication thread sends a gathered block.
type GatherReply = crossbeam::channel::Receiver<Result<Vec<f32>, ZeroError>>;

/// Gradient groups waiting for their reduction, in the order the backward pass produced them
/// (descending, contiguous).
#[derive(Default)]
struct GradBucket {
    groups: Vec<(std::ops::Range<usize>, Vec<f32>)>,
    elems: usize,
}

impl GradBucket {
    fn len(&self) -> usize {
        self.elems
    }
    /// First parameter index covered (the last group pushed).
    fn start(&self) -> usize {
        self.groups.last().map_or(0, |g| g.0.start)
    }
    fn push(&mut self, params: std::ops::Range<usize>, data: Vec<f32>) {
        self.elems += data.len();
        self.groups.push((params, data));
    }
    /// The whole bucket as one parameter range and its flat gradients (ascending).
    fn take(&mut self) -> Option<(std::ops::Range<usize>, Vec<f32>)> {
        self.elems = 0;
        match self.groups.len() {
            0 => None,
            1 => self.groups.pop(),
            _ => {
                let lo = self.groups.last().map_or(0, |g| g.0.start);
                let hi = self.groups[0].0.end;
                let mut flat = Vec::with_capacity(self.groups.iter().map(|g| g.1.len()).sum());
                for (_, d) in self.groups.drain(..).rev() {
                    flat.extend_from_slice(&d);
                }
                Some((lo..hi, flat))
            }
        }
    }
}

/// Adds the time from its creation to its drop to a millisecond counter.
struct CallbackTimer<'a>(&'a std::cell::Cell<f64>, Instant);

impl<'a> CallbackTimer<'a> {
    fn start(c: &'a std::cell::Cell<f64>) -> Self {
        CallbackTimer(c, Instant::now())
    }
}

impl Drop for CallbackTimer<'_> {
    fn drop(&mut self) {
        self.0
            .set(self.0.get() + self.1.elapsed().as_secs_f64() * 1e3);
    }
}

/// `dst = s * g` (or `dst += s * g`), reading the gradient tensor's storage in place when it is
/// a contiguous f32 CPU tensor (the explicit kernels' gradients are), in parallel chunks; with
/// `stats`, the squared norm and finiteness of what was written, each chunk checked while it
/// is in cache (the accumulation pass before a step gives the step its gradient norm).
fn copy_grad(
    g: &Tensor,
    dst: &mut [f32],
    s: f32,
    accumulate: bool,
    stats: bool,
) -> Result<GradStats, EngineError> {
    if g.elem_count() != dst.len() {
        return Err(EngineError::Data(format!(
            "a gradient of {} elements for a parameter of {}",
            g.elem_count(),
            dst.len()
        )));
    }
    let (storage, layout) = g.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(apply_grad(&v[a..b], dst, s, accumulate, stats));
    }
    drop(storage);
    let v = g
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(apply_grad(&v, dst, s, accumulate, stats))
}

/// Elements per parallel work item of the engine's flat passes.
const CHUNK: usize = 1 << 15;

/// The arithmetic of [`copy_grad`].
fn apply_grad(src: &[f32], dst: &mut [f32], s: f32, accumulate: bool, stats: bool) -> GradStats {
    let one = |d: &mut [f32], x: &[f32]| {
        match (accumulate, s == 1.0) {
            (false, true) => d.copy_from_slice(x),
            (false, false) => d.iter_mut().zip(x).for_each(|(d, &v)| *d = v * s),
            (true, _) => d.iter_mut().zip(x).for_each(|(d, &v)| *d += v * s),
        }
        if stats {
            GradStats::of_serial(d)
        } else {
            GradStats::ZERO
        }
    };
    if dst.len() < 2 * CHUNK {
        return one(dst, src);
    }
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .map(|(d, x)| one(d, x))
        .reduce(|| GradStats::ZERO, GradStats::combine)
}

/// Writes flat parameter values straight into the model's variables (their CPU f32 storage,
/// in place): how updated weights reach the model without a gathered copy or new tensors.
/// Callable from several threads at once for disjoint ranges; the first error is kept.
struct VarWriter {
    vars: Vec<candle_core::Var>,
    /// Flat offset of each parameter (prefix sums of the sizes).
    offsets: Vec<usize>,
    /// Flat offset of what [`VarWriter::write_part`] calls offset 0 (this rank's part).
    base: usize,
    err: std::sync::Mutex<Option<String>>,
}

impl VarWriter {
    /// `vals` into flat elements `at ..`; parameters absent from the model (a released ZeRO-3
    /// block) and the padding past the last parameter are skipped.
    fn write(&self, at: usize, vals: &[f32]) {
        let end = at + vals.len();
        let np = self.vars.len();
        let mut i = self.offsets.partition_point(|&o| o <= at).saturating_sub(1);
        while i < np && self.offsets[i] < end {
            let (ps, pe) = (self.offsets[i], self.offsets[i + 1]);
            let (lo, hi) = (ps.max(at), pe.min(end));
            let v = &self.vars[i];
            if lo < hi && v.elem_count() == pe - ps {
                let src = &vals[lo - at..hi - at];
                let r =
                    ds_zero::zero::with_f32_mut(v, |d| d[lo - ps..hi - ps].copy_from_slice(src));
                if let Err(e) = r {
                    let mut g = self.err.lock().unwrap_or_else(|p| p.into_inner());
                    g.get_or_insert_with(|| e.to_string());
                }
            }
            i += 1;
        }
    }

    /// [`VarWriter::write`] at an offset into this rank's part.
    fn write_part(&self, at: usize, vals: &[f32]) {
        self.write(self.base + at, vals);
    }

    /// [`VarWriter::write`] of a long run, in parallel chunks.
    fn write_par(&self, at: usize, vals: &[f32]) {
        vals.par_chunks(CHUNK)
            .enumerate()
            .for_each(|(k, c)| self.write(at + k * CHUNK, c));
    }

    fn check(&self) -> Result<(), EngineError> {
        match self.err.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(EngineError::Data(format!(
                "installing the updated weights in the model: {e}"
            ))),
            None => Ok(()),
        }
    }
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
    /// The model's own forward + backward compute, ms (its pass minus the time the engine's
    /// callbacks took inside it: gradient hand-over, reductions, ZeRO-3 gathers).
    pub model_ms: f64,
    /// The optimizer step (global norm, clipping, the fused update on this rank's part;
    /// at stages 1-3 including the norm's all-reduce), ms.
    pub optimizer_ms: f64,
}

/// Per-block checkpoint timings of the last micro-batch: (block, forward ms, recompute +
/// backward ms), for `activation_checkpointing.profile`.
pub type SegmentTimes = Vec<(usize, f64, f64)>;

/// One rank's training engine, for any [`Model`] (the GPT by default).
pub struct Engine<'c, M: Model> {
    model: M,
    comm: &'c dyn Communicator,
    /// A second communicator of the same ranks for the communication thread.
    comm2: Option<&'c (dyn Communicator + Sync)>,
    /// `overlap_comm` in effect (stages 2-3 with a second communicator).
    overlap: bool,
    /// Stage-3 prefetch limits (`stage3_prefetch_bucket_size`, `stage3_max_live_parameters`)
    /// when the prefetch is on.
    prefetch: Option<(usize, usize)>,
    /// Flat offset of each parameter (prefix sums of `sizes`).
    offsets: Vec<usize>,
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
    /// The statistics (squared norm, finiteness) of `acc` as the boundary micro-batch left it,
    /// taken in its accumulation pass: the step needs no norm pass of its own.
    acc_stats: Option<GradStats>,
    last_segments: SegmentTimes,
    notes: Vec<String>,
    stage3: bool,
    /// Checkpoint settings and the decoupled save in flight.
    ckpt: ckpt::CkptState,
    /// The model's compute in the last micro-batch (its pass minus the engine's callbacks).
    last_model_ms: f64,
    /// The fused optimizer step's time in the last [`Engine::step`].
    last_optimizer_ms: f64,
    /// ZeRO-3: which blocks hold their weights now, and the most at once so far.
    live_blocks: std::cell::RefCell<(Vec<bool>, usize)>,
}

impl<'c, M: Model> Engine<'c, M> {
    /// Builds the engine for a resolved config, a model (identically initialised on every
    /// rank) and this rank's communicator.
    pub fn initialize(
        cfg: &ResolvedConfig,
        model: M,
        comm: &'c dyn Communicator,
    ) -> Result<Self, EngineError> {
        Self::build(cfg, model, comm, None)
    }

    /// [`Engine::initialize`] with a second communicator over the same ranks (e.g. another
    /// [`ds_comm::LocalComm`] group, or a `split` of the first) for a communication thread:
    /// with `overlap_comm` at stages 2-3 the gradient buckets are reduced on it while the
    /// backward pass goes on, and at stage 3 the next block's parameters are all-gathered on it
    /// while the current block computes (`stage3_prefetch_bucket_size`,
    /// `stage3_max_live_parameters`). `comm2` must have the same ranks in the same order and
    /// must not be used by anything else during training.
    pub fn initialize_overlapped(
        cfg: &ResolvedConfig,
        model: M,
        comm: &'c dyn Communicator,
        comm2: &'c (dyn Communicator + Sync),
    ) -> Result<Self, EngineError> {
        if comm2.world_size() != comm.world_size() || comm2.rank() != comm.rank() {
            return Err(EngineError::Config(format!(
                "the second communicator is rank {} of {} but the first is rank {} of {}: they must cover the same ranks in the same order",
                comm2.rank(),
                comm2.world_size(),
                comm.rank(),
                comm.world_size()
            )));
        }
        Self::build(cfg, model, comm, Some(comm2))
    }

    fn build(
        cfg: &ResolvedConfig,
        mut model: M,
        comm: &'c dyn Communicator,
        comm2: Option<&'c (dyn Communicator + Sync)>,
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
        let dev = model.device();
        let ac = &cfg.activation_checkpointing;
        if ac.cpu_checkpointing && !model.set_cpu_checkpointing(true) {
            return Err(EngineError::Config(format!(
                "activation_checkpointing.cpu_checkpointing: this model on {dev:?} cannot keep its checkpointed inputs in host memory (Model::set_cpu_checkpointing); set it false"
            )));
        }
        let timers = cfg.wall_clock_breakdown || ac.profile || ac.synchronize_checkpoint_boundary;
        model.set_sync_timers(timers && !dev.is_cpu());
        let sizes: Vec<usize> = model.params().iter().map(|p| p.var.elem_count()).collect();
        let precision = zero_precision(cfg);
        let half = precision != ZeroPrecision::F32;
        let stage3 = z.stage == 3;
        let block_ranges = model.block_param_ranges();
        let nblocks = block_ranges.len();
        let nvme = nvme_options(cfg);
        // The initial values go to the optimizer one parameter at a time (a large model never
        // exists twice in memory). As DeepSpeed does at initialisation, every rank starts from
        // rank 0's parameters (a model initialised from an unseeded random source differs
        // between ranks otherwise). At ZeRO-3 each block is released as soon as its parameters
        // are in the optimizer's shards: the model holds them only while a block runs.
        let ws = comm.world_size();
        let zero = {
            let model = &model;
            let mut fill =
                |i: usize| -> Result<std::borrow::Cow<'static, [f32]>, ds_zero::ZeroError> {
                    let v = {
                        let params = model.params();
                        let p = params.get(i).ok_or_else(|| {
                            ds_zero::ZeroError::Shape(format!("the model has no parameter {i}"))
                        })?;
                        let mut v = p
                            .var
                            .flatten_all()?
                            .to_dtype(candle_core::DType::F32)?
                            .to_vec1::<f32>()?;
                        if ws > 1 {
                            v = ds_zero::partitioned::broadcast_from_rank0(v, comm)?;
                            crate::traits::set_var(&p.var, &v)?;
                        }
                        v
                    };
                    if stage3 {
                        if let Some(b) = block_ranges
                            .iter()
                            .position(|r| r.end == i + 1 && !r.is_empty())
                        {
                            model.release_block(b)?;
                        }
                    }
                    Ok(std::borrow::Cow::Owned(v))
                };
            ZeroOptimizer::with_precision_streamed(
                &sizes, &mut fill, spec, opts, precision, nvme, comm,
            )?
        };
        if stage3 {
            // Blocks whose parameters are all empty (none) were not released above.
            for i in 0..nblocks {
                model.release_block(i)?;
            }
        }
        let sched = LrScheduler::new(LrSchedule::from_config(
            cfg.scheduler.as_ref(),
            cfg.optimizer.as_ref(),
        )?);
        let n: usize = sizes.iter().sum();
        let ckpt_ok = model.supports_checkpointing();
        let ckpt = ckpt::CkptState::from_config(cfg)?;
        let mut notes = engine_notes(cfg, comm2.is_some(), &dev);
        notes.extend(ckpt::CkptState::notes(cfg));
        if let Some((dir, false)) = zero.swap_dir() {
            notes.push(format!("ZeRO-Infinity: the filesystem of {} refused O_DIRECT, so the swap files go through the page cache (what is swapped out may stay in memory as cache; on tmpfs it never leaves memory)", dir.display()));
        }
        let mut offsets = Vec::with_capacity(sizes.len() + 1);
        offsets.push(0);
        for &s in &sizes {
            offsets.push(offsets[offsets.len() - 1] + s);
        }
        let overlap = z.overlap_comm && z.stage >= 2 && comm2.is_some();
        let prefetch =
            (stage3 && comm2.is_some() && z.stage3_prefetch_bucket_size > 0).then(|| {
                (
                    usize::try_from(z.stage3_prefetch_bucket_size).unwrap_or(usize::MAX),
                    usize::try_from(z.stage3_max_live_parameters).unwrap_or(usize::MAX),
                )
            });
        // Stages 2-3 reduce gradients during the backward pass into the optimizer's shard: no
        // full-size accumulation buffer.
        let acc = if zero.partitions_gradients() {
            Vec::new()
        } else {
            vec![0.0; n]
        };
        let mut engine = Engine {
            model,
            comm,
            comm2,
            overlap,
            prefetch,
            offsets,
            zero,
            sched,
            gas: cfg.gradient_accumulation_steps as usize,
            micro: cfg.train_micro_batch_size_per_gpu as usize,
            sizes,
            acc,
            global_steps: 0,
            skipped_steps: 0,
            micro_steps: 0,
            pending: 0,
            acc_fresh: true,
            acc_stats: None,
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
            last_model_ms: 0.0,
            last_optimizer_ms: 0.0,
            live_blocks: std::cell::RefCell::new((vec![false; nblocks], 0)),
        };
        if half {
            // The model's weights are the 16-bit copies of the masters from the start.
            engine.refresh_model_params()?;
        }
        Ok(engine)
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

    /// All parameters' current values, flat in [`Model::params`] order, at every stage (a
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
        // Stages 0-1: the full accumulation buffer; stages 2-3: none (gradients are reduced
        // into the shard during the backward pass).
        let full = 4 * self.acc.len();
        let part = 4 * self.zero.part_len();
        // ZeRO-Infinity: master weights and optimizer state on disk hold no memory between
        // steps; the model-dtype copy of the part kept in memory counts as parameters.
        let (master_mem, state_mem) = if self.zero.optimizer_on_disk() {
            (0, 0)
        } else {
            (part, self.zero.optimizer().state_bytes())
        };
        let resident = self.zero.resident_param_bytes().unwrap_or(0);
        // At stage 3 the model holds only its persistent parameters between passes (plus one
        // gathered block while it runs, not counted here).
        // In the parameters' own dtype (a bf16 model on a GPU holds 2 bytes a weight).
        let held: usize = self
            .model
            .params()
            .iter()
            .map(|p| p.var.elem_count() * p.var.dtype().size_in_bytes())
            .sum::<usize>();
        MemoryReport {
            params_bytes: held + resident,
            grads_bytes: full + part,
            optimizer_bytes: master_mem + state_mem,
        }
    }

    /// The loss scale of the next backward pass (1 without fp16 loss scaling).
    pub fn loss_scale(&self) -> f64 {
        self.zero.loss_scale()
    }

    /// The partitioned optimizer (precision, layout, scaler state).
    pub fn zero(&self) -> &ZeroOptimizer {
        &self.zero
    }

    /// ZeRO-3: the most blocks whose full weights were present at once in any pass so far
    /// (1 when every block is checkpointed and nothing is prefetched; 0 below stage 3, where
    /// the engine gathers nothing).
    pub fn peak_gathered_blocks(&self) -> usize {
        self.live_blocks.borrow().1
    }

    /// The learning rate the next step uses.
    pub fn current_lr(&self) -> f64 {
        self.sched.current_lr()
    }

    /// Forward and backward of one micro-batch (the model's [`Model::Batch`], or anything that
    /// converts into it: `(ids, targets)` for a [`crate::traits::Tokens`] model).
    /// At stages 0 and 1 the gradients are added into the accumulation buffer as the model
    /// hands them over; at stages 2 and 3 they are reduced during the backward pass, bucket by
    /// bucket (`reduce_bucket_size`), each rank keeping only its gradient shard — on the
    /// communication thread when `overlap_comm` is on and a second communicator was given
    /// ([`Engine::initialize_overlapped`]). At stage 3 with a second communicator the next
    /// block's parameters are all-gathered while the current block computes (prefetch). Returns
    /// the loss and the (forward, backward) milliseconds.
    pub fn forward_backward(
        &mut self,
        batch: impl Into<M::Batch>,
    ) -> Result<(f64, f64, f64), EngineError> {
        let batch: M::Batch = batch.into();
        // Dropout masks are keyed by the micro-step (identical in a checkpoint recompute).
        self.model.set_step(self.micro_steps);
        self.micro_steps += 1;
        self.pending += 1;
        // The last micro-batch before the step: its accumulation (or reduction) pass takes
        // the gradient norm on the way.
        let boundary = self.pending.is_multiple_of(self.gas);
        self.acc_stats = None;
        let stats = std::cell::Cell::new((GradStats::ZERO, 0usize));
        let stats_ref = &stats;
        let fresh = std::mem::replace(&mut self.acc_fresh, false);
        let stream = self.zero.partitions_gradients();
        if stream {
            self.zero.begin_streamed(fresh, self.comm.world_size())?;
        }
        let scale = 1.0 / self.gas as f32;
        // fp16: the backward pass is of `loss * scale` (the same scale for every micro-batch
        // of the step).
        let loss_scale = self.zero.loss_scale() as f32;
        let (policy, stage3) = (self.policy, self.stage3);
        // Stages 2-3: the gradient shard is taken out of the optimizer for the pass and each
        // bucket's reduced pieces are added into it as they arrive (holding a pass's pieces
        // until its end would double the gradient memory).
        let mut part = if stream {
            self.zero.take_grad_part()
        } else {
            Vec::new()
        };
        let part_ref = &mut part;
        let (model, zero, comm, comm2) = (&self.model, &self.zero, self.comm, self.comm2);
        let (offsets, acc) = (&self.offsets, &mut self.acc);
        let live = &self.live_blocks;
        let bucket_cap = zero.options().reduce_bucket_size.max(1);
        let ranges = model.block_param_ranges();
        let direct = stream && self.zero.direct_accumulation(comm.world_size());
        let overlap = self.overlap && stream && !direct;
        let prefetch = self.prefetch;
        let disk_params = self.zero.params_on_disk();
        // The communication thread runs when something is overlapped (gradient reduction with
        // overlap_comm, or the stage-3 prefetch): it executes jobs in the order the pass issues
        // them, identical on every rank, over the second communicator.
        let use_thread = comm2.is_some() && (overlap || (stage3 && prefetch.is_some()));
        let mut run = |jobs: Option<&crossbeam::channel::Sender<Job>>| -> Result<(FwdBwd, Vec<GradPiece>, f64), EngineError> {
            let pieces: Vec<GradPiece> = Vec::new();
            let mut bucket = GradBucket::default();
            // Milliseconds spent in the engine's callbacks inside the model's pass.
            let cb_ms = std::cell::Cell::new(0f64);
            let mut first_err: Option<EngineError> = None;
            // Sends a full bucket to the reduction (here, or on the communication thread).
            let flush = |bucket: &mut GradBucket,
                             part: &mut Vec<f32>|
             -> Result<(), EngineError> {
                let Some((range, data)) = bucket.take() else {
                    return Ok(());
                };
                match (overlap, jobs) {
                    (true, Some(tx)) => tx
                        .send(Job::Reduce(range, data, scale))
                        .map_err(|_| EngineError::Data("the communication thread stopped".into())),
                    _ => {
                        let got = zero.reduce_grad_range(range, &data, scale, comm)?;
                        if boundary {
                            let (st, c) = ZeroOptimizer::add_pieces_into_stats(part, &got)?;
                            let (a, n) = stats_ref.get();
                            stats_ref.set((a.combine(st), n + c));
                        } else {
                            ZeroOptimizer::add_pieces_into(part, &got)?;
                        }
                        Ok(())
                    }
                }
            };
            let mut sink = |params: std::ops::Range<usize>,
                            grads: Vec<Option<Tensor>>|
             -> candle_core::Result<()> {
                if first_err.is_some() {
                    return Ok(());
                }
                let _t = CallbackTimer::start(&cb_ms);
                let r: Result<(), EngineError> = (|| {
                    if direct {
                        // One rank, fp32: the gradients are added straight into the part
                        // (what the reduction would add, bit for bit, without its buffers).
                        for (i, g) in params.zip(&grads) {
                            let Some(dst) = part_ref.get_mut(offsets[i]..offsets[i + 1]) else {
                                return Err(EngineError::Data(format!(
                                    "parameter {i} outside the gradient part"
                                )));
                            };
                            let st = match g {
                                Some(g) => copy_grad(g, dst, scale, true, boundary)?,
                                None if boundary => GradStats::of(dst),
                                None => GradStats::ZERO,
                            };
                            if boundary {
                                let (a, n) = stats_ref.get();
                                stats_ref.set((a.combine(st), n + dst.len()));
                            }
                        }
                    } else if stream {
                        if bucket.len() > 0 && bucket.start() != params.end {
                            flush(&mut bucket, &mut *part_ref)?;
                        }
                        let mut flat = vec![0f32; offsets[params.end] - offsets[params.start]];
                        for (i, g) in params.clone().zip(&grads) {
                            if let Some(g) = g {
                                copy_grad(g, &mut flat[offsets[i] - offsets[params.start]..offsets[i + 1] - offsets[params.start]], 1.0, false, false)?;
                            }
                        }
                        bucket.push(params, flat);
                        if bucket.len() >= bucket_cap {
                            flush(&mut bucket, &mut *part_ref)?;
                        }
                    } else {
                        for (i, g) in params.zip(&grads) {
                            let dst = &mut acc[offsets[i]..offsets[i + 1]];
                            let st = match g {
                                Some(g) => copy_grad(g, dst, scale, !fresh, boundary)?,
                                None if fresh => {
                                    dst.iter_mut().for_each(|a| *a = 0.0);
                                    GradStats::ZERO
                                }
                                None if boundary => GradStats::of(dst),
                                None => GradStats::ZERO,
                            };
                            if boundary {
                                let (a, n) = stats_ref.get();
                                stats_ref.set((a.combine(st), n + dst.len()));
                            }
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    let msg = e.to_string();
                    first_err = Some(e);
                    candle_core::bail!("{msg}");
                }
                Ok(())
            };
            // ZeRO-3: gather each block before it runs (from the prefetch when it was
            // predicted), release it after; other stages keep every block present.
            let mut gathers = 0usize;
            let mut pending: Option<(usize, GatherReply)> = None;
            let nblocks = ranges.len();
            let mut hook = |ev: BlockEvent| -> candle_core::Result<()> {
                if !stage3 {
                    return Ok(());
                }
                let _t = CallbackTimer::start(&cb_ms);
                let err = |e: String| candle_core::Error::Msg(e);
                match ev {
                    BlockEvent::Gather(i) => {
                        let Some(r) = ranges.get(i) else {
                            candle_core::bail!("no block {i}");
                        };
                        let data = match (jobs, prefetch) {
                            (Some(tx), Some(_)) => {
                                let hit = match pending.take() {
                                    Some((j, rx)) => {
                                        let got = rx.recv().map_err(|_| err("the communication thread stopped".into()))?;
                                        (j == i).then_some(got)
                                    }
                                    None => None,
                                };
                                let got = match hit {
                                    Some(g) => g,
                                    None => {
                                        let (ttx, trx) = crossbeam::channel::bounded(1);
                                        tx.send(Job::Gather(r.clone(), ttx)).map_err(|_| err("the communication thread stopped".into()))?;
                                        trx.recv().map_err(|_| err("the communication thread stopped".into()))?
                                    }
                                };
                                got.map_err(|e| err(e.to_string()))?
                            }
                            _ => zero
                                .gather_param_range(r.clone(), comm)
                                .map_err(|e| err(e.to_string()))?,
                        };
                        model.gather_block(i, &data)?;
                        {
                            let mut lb = live.borrow_mut();
                            if let Some(l) = lb.0.get_mut(i) {
                                *l = true;
                            }
                            let now = lb.0.iter().filter(|&&x| x).count();
                            lb.1 = lb.1.max(now);
                        }
                        // Predict the next block: forward 0..n, then backward n-1..0.
                        gathers += 1;
                        let next = if gathers < nblocks {
                            Some(gathers)
                        } else {
                            (2 * nblocks).checked_sub(gathers + 1)
                        }
                        .filter(|&nx| nx < nblocks);
                        if let (Some(tx), Some((max_bucket, max_live))) = (jobs, prefetch) {
                            if let Some(nx) = next {
                                let nr = &ranges[nx];
                                let size = offsets[nr.end] - offsets[nr.start];
                                let live = offsets[r.end] - offsets[r.start] + size;
                                if size <= max_bucket && live <= max_live {
                                    let (ttx, trx) = crossbeam::channel::bounded(1);
                                    tx.send(Job::Gather(nr.clone(), ttx)).map_err(|_| err("the communication thread stopped".into()))?;
                                    pending = Some((nx, trx));
                                }
                            }
                        } else if let Some(nx) = next.filter(|_| disk_params) {
                            // ZeRO-Infinity: read the next block's parameters from disk
                            // while this one computes.
                            zero.prefetch_param_range(ranges[nx].clone())
                                .map_err(|e| err(e.to_string()))?;
                        }
                        Ok(())
                    }
                    BlockEvent::Release(i) => {
                        if let Some(l) = live.borrow_mut().0.get_mut(i) {
                            *l = false;
                        }
                        model.release_block(i)
                    }
                }
            };
            let fb = model.forward_backward_streamed(&batch, policy, loss_scale, &mut hook, &mut sink);
            // A prefetch nobody asked for (a model whose order differs) is drained.
            if let Some((_, rx)) = pending.take() {
                let _ = rx.recv();
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            let fb = fb?;
            flush(&mut bucket, &mut *part_ref)?;
            // The model's own compute: its pass minus the time in the engine's callbacks.
            let model_ms = (fb.fwd_ms + fb.bwd_ms - cb_ms.get()).max(0.0);
            Ok((fb, pieces, model_ms))
        };
        let result = if use_thread {
            let comm2 =
                comm2.ok_or_else(|| EngineError::Config("no second communicator".into()))?;
            std::thread::scope(|sc| -> Result<(FwdBwd, Vec<GradPiece>, f64), EngineError> {
                let (tx, rx) = crossbeam::channel::unbounded::<Job>();
                let worker = sc.spawn(move || -> Result<Vec<GradPiece>, EngineError> {
                    let mut out = Vec::new();
                    let mut failed: Option<EngineError> = None;
                    for job in rx {
                        match job {
                            Job::Reduce(range, data, s) => {
                                if failed.is_none() {
                                    match zero.reduce_grad_range(range, &data, s, comm2) {
                                        Ok(p) => out.extend(p),
                                        Err(e) => failed = Some(e.into()),
                                    }
                                }
                            }
                            Job::Gather(range, reply) => {
                                let _ = reply.send(zero.gather_param_range(range, comm2));
                            }
                        }
                    }
                    match failed {
                        Some(e) => Err(e),
                        None => Ok(out),
                    }
                });
                let main = run(Some(&tx));
                drop(tx);
                let reduced = worker
                    .join()
                    .map_err(|_| EngineError::Data("the communication thread panicked".into()))?;
                let (fb, mut pieces, model_ms) = main?;
                pieces.extend(reduced?);
                Ok((fb, pieces, model_ms))
            })
        } else {
            run(None)
        };
        if stream {
            // The shard goes back whatever happened (a failed pass leaves a partial gradient
            // that the next fresh micro-batch zeroes; a lost shard would break every later step).
            match &result {
                Ok((_, pieces, _)) if boundary => {
                    let (st, c) = ZeroOptimizer::add_pieces_into_stats(&mut part, pieces)?;
                    let (a, n) = stats.get();
                    self.zero
                        .restore_grad_part_with_stats(part, a.combine(st), n + c)?;
                }
                Ok((_, pieces, _)) => {
                    ZeroOptimizer::add_pieces_into(&mut part, pieces)?;
                    self.zero.restore_grad_part(part)?;
                }
                Err(_) => self.zero.restore_grad_part(part)?,
            }
        } else if boundary && result.is_ok() {
            // Every element of the accumulation buffer was written in this pass.
            let (a, n) = stats.get();
            self.acc_stats = (n == self.acc.len()).then_some(a);
        }
        let (fb, _, model_ms) = result?;
        self.last_model_ms = model_ms;
        self.last_segments = fb.segments;
        Ok((f64::from(fb.loss), fb.fwd_ms, fb.bwd_ms))
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
        if !self.zero.partitions_gradients() {
            let st = self.acc_stats.take();
            self.zero
                .reduce_gradients_swap_stats(&mut self.acc, st, self.comm)?;
        }
        // The next micro-batch writes its gradients instead of adding them: no zeroing pass.
        self.acc_fresh = true;
        let t = Instant::now();
        // fp32 on the CPU: the update pass writes the new weights straight into the model's
        // variables (this rank's part; at stages 1-2 the other ranks' shards follow from an
        // all-gather into a buffer kept across steps).
        let writer = self.var_writer();
        let report = match &writer {
            Some(w) => {
                let publish = |at: usize, v: &[f32]| w.write_part(at, v);
                let r = self.zero.step_with(lr, self.comm, Some(&publish))?;
                w.check()?;
                r
            }
            None => self.zero.step(lr, self.comm)?,
        };
        self.last_optimizer_ms = t.elapsed().as_secs_f64() * 1e3;
        if report.applied {
            match &writer {
                Some(w) => {
                    if self.zero.options().stage > 0 && self.comm.world_size() > 1 {
                        self.zero
                            .gather_params_visit(self.comm, true, &mut |at, v| {
                                w.write_par(at, v);
                                Ok(())
                            })?;
                        w.check()?;
                    }
                }
                None => self.refresh_model_params()?,
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

    /// The in-place writer of updated weights when this run can use it: fp32, master weights
    /// and parameters in memory, every present parameter a contiguous f32 CPU variable, and
    /// this rank's part a contiguous run of the flat parameters (stages 0-2; stage 3 on one
    /// rank, whose shard is every parameter whole).
    fn var_writer(&self) -> Option<VarWriter> {
        let z = &self.zero;
        if z.precision() != &ZeroPrecision::F32 || z.swap_dir().is_some() {
            return None;
        }
        let base = match z.flat_range() {
            Some(r) => r.start,
            None if self.comm.world_size() == 1 => 0,
            None => return None,
        };
        let vars: Vec<candle_core::Var> = self.model.params().into_iter().map(|p| p.var).collect();
        if vars.len() != self.sizes.len() {
            return None;
        }
        for (v, &n) in vars.iter().zip(&self.sizes) {
            if self.stage3 && v.elem_count() == 0 {
                // A released block: gathered again when it runs.
                continue;
            }
            let ok = v.device().is_cpu()
                && v.dtype() == candle_core::DType::F32
                && v.is_contiguous()
                && v.elem_count() == n;
            if !ok {
                return None;
            }
        }
        Some(VarWriter {
            vars,
            offsets: self.offsets.clone(),
            base,
            err: std::sync::Mutex::new(None),
        })
    }

    /// One global batch: `gas` micro-batches given by `batch(m)`, then the step.
    pub fn train_batch<B: Into<M::Batch>>(
        &mut self,
        mut batch: impl FnMut(usize) -> B,
    ) -> Result<TrainStep, EngineError> {
        let lr = self.sched.current_lr();
        let (mut loss, mut fwd, mut bwd, mut model_ms) = (0.0, 0.0, 0.0, 0.0);
        for m in 0..self.gas {
            let (l, f, b) = self.forward_backward(batch(m))?;
            loss += l / self.gas as f64;
            fwd += f;
            bwd += b;
            model_ms += self.last_model_ms;
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
            model_ms,
            optimizer_ms: self.last_optimizer_ms,
        })
    }
}
