//! `ds train`: the main job. Resolves a DeepSpeed config (or the embedded default), starts the
//! ranks, trains the GPT on the embedded addition task (or the bigram language, a byte-level
//! text file, or a nanoGPT token directory), evaluates it on held-out data and reports.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use ds_comm::{CommsLogger, Communicator, LocalComm};
use ds_config::{DeepSpeedConfig, ResolveOptions, ResolvedConfig};
use serde::Serialize;
use serde_json::Value;

use ds_engine::data::Rng;
use ds_engine::data::{AdditionTask, BigramLanguage, DataLoader, EvalBatch, TokenDataset};
use ds_engine::engine::{Engine, TrainStep};
use ds_engine::traits::Model;
use ds_engine::EngineError;
use ds_models::gpt::{gpt_param_count, Gpt, ModelShape};
use ds_models::{Mlp, MlpShape};

/// The embedded default configuration (`examples/configs/gpt_zero2.json`, linked as
/// `ds-cli/configs/gpt_zero2.json` so that the packaged crate carries it).
pub const DEFAULT_CONFIG: &str = include_str!("../configs/gpt_zero2.json");

/// The main job's defaults: a small GPT that learns 3-digit addition in about a minute on 2
/// cores.
pub const DEFAULT_SHAPE: ModelShape = ModelShape {
    layers: 2,
    hidden: 128,
    heads: 4,
    seq: 64,
    vocab: 512,
};

/// The embedded data of `ds train` when no `--data` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Multi-digit addition ([`AdditionTask`]) with operands of this many digits; evaluated
    /// by exact-match accuracy on held-out problems.
    Addition {
        /// Digits per operand.
        digits: usize,
    },
    /// The seeded sparse bigram language ([`BigramLanguage`]); its entropy is the loss floor.
    Bigram,
}

/// Held-out sequences evaluated at the end of `ds train` (addition: 5 problems each at the
/// default shape; token files: windows of `val.bin`).
pub const EVAL_SEQUENCES: usize = 128;

/// The default embedded task: 3-digit addition.
pub const DEFAULT_TASK: Task = Task::Addition { digits: 3 };

/// Optimizer steps of `ds train` with no `--steps`.
pub const DEFAULT_STEPS: u64 = 6000;

/// The model `ds train` builds from the model flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// The GPT ([`Gpt`]).
    Gpt,
    /// The token-wise MLP ([`Mlp`]; `--heads` unused, no activation checkpointing or dropout).
    Mlp,
}

/// Options of `ds train`.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// The model family.
    pub model: ModelKind,
    /// Embedded data when `data` is `None`.
    pub task: Task,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Where to write the loss-curve PNG (`None`: `<out>/loss_curve.png` with `--out`, else
    /// no plot).
    pub plot: Option<PathBuf>,
    /// DeepSpeed config file (JSON or TOML); `None` = the embedded default.
    pub config: Option<PathBuf>,
    /// Data-parallel ranks.
    pub world_size: usize,
    /// `local` (threads sharing memory).
    pub backend: String,
    /// `world_size` was asked for (`--world-size`): with `--backend mpi` it must equal the
    /// MPI job's size (else the job's size is taken).
    pub world_size_given: bool,
    /// `--comm-timeout` seconds (0 = forever); `None`: `DS_COMM_TIMEOUT`, else the config's
    /// `comm_timeout` (see [`crate::comm`]).
    pub comm_timeout: Option<f64>,
    /// The total optimizer step count: a fresh run trains this many steps, a resumed run
    /// (`resume`) trains from the checkpoint's step up to it (as `max_steps` does elsewhere,
    /// so re-running an interrupted job's own command line ends where it was meant to).
    pub steps: u64,
    /// Training data instead of the embedded task: a byte-level text file, or a nanoGPT
    /// directory holding `train.bin` and `val.bin` (uint16 little-endian tokens).
    pub data: Option<PathBuf>,
    /// Seed of initialisation and data.
    pub seed: u64,
    /// Model shape.
    pub shape: ModelShape,
    /// Micro-batch per rank (overrides the config's batch keys, keeping its accumulation).
    pub batch: Option<usize>,
    /// Checkpoint every block's activations (overrides `number_checkpoints`).
    pub ckpt: bool,
    /// Residual dropout probability (0 = off).
    pub dropout: f32,
    /// Checkpoint directory: a checkpoint is saved there at the end (tag `global_step<N>`).
    pub out: Option<PathBuf>,
    /// Resume from the latest checkpoint in `out` before training.
    pub resume: bool,
    /// Replace a run already in `out` (without it, `out` holding a run needs `resume`).
    pub overwrite: bool,
    /// Keep only the newest N checkpoints in `out` (overrides `checkpoint.keep_last`).
    pub keep_last: Option<u64>,
    /// Also save a checkpoint every this many steps (needs `out`; `None`: only at the end).
    pub save_interval: Option<u64>,
    /// Print DeepSpeed's flops profile of step 2 (as `flops_profiler.enabled` with
    /// `profile_step: 2`, without the detailed tree), whatever the config says.
    pub flops_profile: bool,
    /// Where the model runs: `cpu` (the default), `cuda` or `cuda:N` (a CUDA build; with
    /// `--backend nccl` each process takes the GPU of its `LOCAL_RANK`).
    pub device: String,
    /// Train the GPT on candle autograd (the path every non-CPU device runs) instead of its
    /// explicit CPU kernels: the GPU code path on a machine without a GPU.
    pub autograd: bool,
    /// Held-out sequences evaluated at the end (`None`: 128; 0 skips the evaluation, e.g.
    /// for a model whose full weights should never be gathered into memory).
    pub eval_samples: Option<usize>,
    /// Held-out evaluation every N steps during training (`Some(0)`: never; `None`: at the
    /// log lines of `steps_per_print`, on rank 0 at ZeRO stages 0-2 only, and skipped where it
    /// would take the evaluation past 10% of the run's time). At ZeRO-3 a periodic
    /// evaluation gathers the full weights (a collective on every rank).
    pub eval_interval: Option<u64>,
}

impl Default for TrainArgs {
    /// `ds train` with no flags: the embedded config, 2 ranks, the addition task.
    fn default() -> Self {
        TrainArgs {
            model: ModelKind::Gpt,
            task: DEFAULT_TASK,
            progress: false,
            plot: None,
            config: None,
            world_size: 2,
            backend: "local".into(),
            world_size_given: false,
            comm_timeout: None,
            steps: DEFAULT_STEPS,
            data: None,
            seed: 0,
            shape: DEFAULT_SHAPE,
            batch: None,
            ckpt: false,
            dropout: 0.0,
            out: None,
            resume: false,
            overwrite: false,
            keep_last: None,
            save_interval: None,
            flops_profile: false,
            device: "cpu".into(),
            autograd: false,
            eval_samples: None,
            eval_interval: None,
        }
    }
}

/// What `ds train --json` prints (the keys are a contract).
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Optimizer steps run.
    pub steps: u64,
    /// Mean loss of the last step (averaged over ranks).
    pub final_loss: f64,
    /// Median wall time of a step, ms.
    pub median_step_ms: f64,
    /// Global-batch tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Steps skipped on inf/nan gradients.
    pub skipped_steps: u64,
    /// Peak resident memory of the process divided by the ranks it hosts (threads of one
    /// process share it).
    pub peak_bytes_per_rank: u64,
    /// Where checkpoints went (`--out`; `null` without it).
    pub checkpoint_dir: Option<String>,
    /// Loss per step (rank mean).
    pub losses: Vec<f64>,
    /// Ranks.
    pub world_size: usize,
    /// ZeRO stage.
    pub zero_stage: u8,
    /// Model parameters.
    pub params: usize,
    /// Model-state bytes per rank held by the ZeRO optimizer (params, grads, optimizer).
    pub model_state_bytes_per_rank: usize,
    /// Best achievable loss on the embedded data (entropy rate), if that is the data.
    pub data_entropy: Option<f64>,
    /// The data: `addition`, `bigram`, `bytes` or `tokens`.
    pub task: String,
    /// Mean next-token loss on held-out data (addition: held-out problems; token files:
    /// `val.bin`), `null` for data without a held-out part.
    pub val_loss: Option<f64>,
    /// Addition: the fraction of held-out problems whose answer digits are all predicted
    /// (argmax, teacher-forced; equal to greedy decoding's exact match).
    pub val_accuracy: Option<f64>,
    /// Addition: the held-out problems evaluated.
    pub val_problems: Option<usize>,
    /// The held-out losses of the evaluations during training, as `[step, loss]` pairs
    /// (`--eval-interval`; the final evaluation is `val_loss`).
    pub val_curve: Vec<(u64, f64)>,
    /// Wall seconds spent in held-out evaluation (during training and at the end).
    pub eval_seconds: f64,
    /// The loss-curve PNG written, if any.
    pub loss_curve_png: Option<String>,
    /// The TensorBoard event file written, if any.
    pub tensorboard_file: Option<String>,
    /// Median over steps of the fraction of a step's wall time spent outside the model's
    /// forward/backward compute and the optimizer step: the engine's own overhead (batch
    /// tensors, gradient hand-over and accumulation, parameter refresh, scheduling), plus the
    /// communication at world size > 1.
    pub engine_overhead_fraction: f64,
    /// Median wall time of the steps that ran while a decoupled checkpoint was being written
    /// (`null` when none did).
    pub median_step_ms_during_save: Option<f64>,
    /// Median wall time of the `save_checkpoint` calls (with a decoupled writer: the copy to
    /// host buffers and the collectives; else the whole save), `null` without saves.
    pub median_save_call_ms: Option<f64>,
    /// ZeRO-Infinity (rank 0): bytes read from and written to the swap files, seconds of the
    /// optimizer steps not hidden behind the update, and of parameter reads (all of them, and
    /// the part the gathers waited for); `null` without NVMe offload.
    pub swap: Option<ds_zero::SwapStats>,
    /// The rank that made this report (only rank 0 prints it).
    #[serde(skip)]
    pub rank: usize,
    /// Steps done before this run (a resumed run's starting step).
    #[serde(skip)]
    pub steps_before: u64,
}

enum Source {
    Addition(AdditionTask),
    Tokens(TokenDataset),
    Bigram(DataLoader),
    Bytes {
        toks: Vec<u32>,
        seed: u64,
        seq: usize,
    },
}

impl Source {
    fn micro_batch(
        &self,
        step: u64,
        m: usize,
        rank: usize,
        ws: usize,
        micro: usize,
    ) -> (Vec<u32>, Vec<u32>) {
        match self {
            Source::Bigram(dl) => dl.micro_batch(step, m, rank, ws, micro),
            Source::Addition(t) => t.micro_batch(step, m, rank, ws, micro),
            Source::Tokens(t) => t.micro_batch(step, m, rank, ws, micro),
            &Source::Bytes {
                ref toks,
                seed,
                seq,
            } => {
                let first = ((m * ws + rank) * micro) as u64;
                let mut x = Vec::with_capacity(micro * seq);
                let mut y = Vec::with_capacity(micro * seq);
                let span = (toks.len() - seq - 1) as u64;
                for i in 0..micro as u64 {
                    let mut r = Rng::new(
                        seed ^ step.wrapping_mul(0x9E37) ^ (first + i).wrapping_mul(0x85EB_CA6B),
                    );
                    let off = (r.next_u64() % (span + 1)) as usize;
                    x.extend_from_slice(&toks[off..off + seq]);
                    y.extend_from_slice(&toks[off + 1..off + seq + 1]);
                }
                (x, y)
            }
        }
    }
}

/// Resolves the config for `ds train` (the file or the embedded default; `--batch` overrides).
pub fn resolve_config(args: &TrainArgs) -> Result<ResolvedConfig, EngineError> {
    let cfg = match &args.config {
        Some(p) => DeepSpeedConfig::from_path(p)?,
        None => DeepSpeedConfig::from_json_str(DEFAULT_CONFIG)?,
    };
    let mut doc = cfg.as_value().clone();
    if let (Some(b), Value::Object(m)) = (args.batch, &mut doc) {
        m.remove("train_batch_size");
        m.insert(
            "train_micro_batch_size_per_gpu".into(),
            Value::from(b as u64),
        );
    }
    let opts = ResolveOptions::world_size(args.world_size);
    Ok(DeepSpeedConfig::from_value(doc).resolve_with(&opts)?)
}

fn peak_rss_bytes() -> u64 {
    ds_profiler::vm_hwm_bytes().unwrap_or(0)
}

/// A language model `ds train` can train and evaluate: token batches, a fixed sequence length
/// and a forward for the held-out evaluation (the GPT and the MLP of `ds-models`).
pub trait LanguageModel: Model<Batch = ds_engine::traits::Tokens> {
    /// Tokens per sequence.
    fn seq_len(&self) -> usize;
    /// Logits (B*T, V) of `ids` (B, T) on the CPU device.
    fn logits(&self, ids: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>;
    /// The summed next-token loss of `batch` sequences and each position's argmax token,
    /// without dropout. The default runs [`LanguageModel::logits`]; the GPT runs its explicit
    /// kernels' forward.
    fn eval_batch(
        &self,
        ids: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> candle_core::Result<(f64, Vec<u32>)> {
        let seq = ids.len() / batch.max(1);
        let x = candle_core::Tensor::from_slice(ids, (batch, seq), &Device::Cpu)?;
        let y = candle_core::Tensor::from_slice(targets, ids.len(), &Device::Cpu)?;
        let logits = self.logits(&x)?.detach();
        let l = ds_models::kernels::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        let preds = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        Ok((f64::from(l) * ids.len() as f64, preds))
    }
}

impl LanguageModel for Gpt {
    fn seq_len(&self) -> usize {
        self.shape().seq
    }
    fn logits(&self, ids: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        Gpt::logits(self, ids)
    }
    fn eval_batch(
        &self,
        ids: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> candle_core::Result<(f64, Vec<u32>)> {
        self.evaluate_tokens(ids, targets, batch)
    }
}

impl LanguageModel for Mlp {
    fn seq_len(&self) -> usize {
        self.shape().seq
    }
    fn logits(&self, ids: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        Mlp::logits(self, ids)
    }
}

/// Held-out evaluation of `model` on `inputs`/`targets` (whole sequences of the model's
/// `seq`) in micro-batches of `micro` sequences (the training micro-batch: the evaluation
/// never holds more than a training step does): the mean next-token loss (per sequence
/// position, averaged), and with `answers` (groups of target indices) the fraction of groups
/// whose every position's argmax equals its target.
pub fn evaluate<M: LanguageModel + ?Sized>(
    model: &M,
    inputs: &[u32],
    targets: &[u32],
    answers: &[Vec<usize>],
    micro: usize,
) -> Result<(f64, Option<f64>), EngineError> {
    let seq = model.seq_len();
    if inputs.len() != targets.len() || inputs.is_empty() || !inputs.len().is_multiple_of(seq) {
        return Err(EngineError::Data(format!(
            "evaluation needs inputs and targets of equal length, a multiple of seq ({seq}); got {} and {}",
            inputs.len(),
            targets.len()
        )));
    }
    let n = inputs.len() / seq;
    let chunk = micro.max(1);
    let mut loss = 0.0;
    let mut preds = Vec::with_capacity(targets.len());
    for c in (0..n).step_by(chunk) {
        let b = chunk.min(n - c);
        let (l, p) = model.eval_batch(
            &inputs[c * seq..(c + b) * seq],
            &targets[c * seq..(c + b) * seq],
            b,
        )?;
        loss += l;
        preds.extend(p);
    }
    let mut right = 0usize;
    for a in answers {
        if a.iter().any(|&i| i >= preds.len()) {
            return Err(EngineError::Data(
                "an answer index is outside the evaluated targets".into(),
            ));
        }
        right += usize::from(a.iter().all(|&i| preds[i] == targets[i]));
    }
    let acc = (!answers.is_empty()).then(|| right as f64 / answers.len() as f64);
    Ok((loss / targets.len() as f64, acc))
}

/// The checkpoint store of `--out`, after checking `--save-interval` and `--resume` against it.
fn checkpoint_store(
    args: &TrainArgs,
) -> Result<Option<ds_checkpoint::FsCheckpointStore>, EngineError> {
    if args.save_interval == Some(0) {
        return Err(EngineError::Config("--save-interval must be >= 1".into()));
    }
    if args.out.is_none()
        && (args.save_interval.is_some() || args.resume || args.keep_last.is_some())
    {
        return Err(EngineError::Config(
            "--save-interval, --resume and --keep-last need --out DIR (where the checkpoints are)"
                .into(),
        ));
    }
    if args.keep_last == Some(0) {
        return Err(EngineError::Config(
            "--keep-last must be >= 1 (0 would delete the checkpoint just saved)".into(),
        ));
    }
    args.out
        .as_ref()
        .map(|dir| {
            ds_checkpoint::FsCheckpointStore::new(dir)
                .map_err(|e| EngineError::Checkpoint(e.to_string()))
        })
        .transpose()
}

/// Retention (`--keep-last`, `checkpoint.keep_last`), on rank 0 after a save: the newest
/// `keep` complete checkpoints stay (and the one `latest` names), older ones are deleted.
fn retain(
    store: &ds_checkpoint::FsCheckpointStore,
    keep: Option<u64>,
    rank: usize,
) -> Result<(), EngineError> {
    let Some(k) = keep.filter(|_| rank == 0) else {
        return Ok(());
    };
    let removed = store
        .retain_newest(usize::try_from(k).unwrap_or(usize::MAX))
        .map_err(|e| EngineError::Checkpoint(e.to_string()))?;
    if !removed.is_empty() {
        eprintln!("keep_last {k}: removed {}", removed.join(", "));
    }
    Ok(())
}

/// With `--resume`: the latest checkpoint of the store.
fn resume_point(
    args: &TrainArgs,
    store: Option<&ds_checkpoint::FsCheckpointStore>,
) -> Result<Option<ds_checkpoint::Checkpoint>, EngineError> {
    match store {
        Some(store) if args.resume => store
            .open(None)
            .map(Some)
            .map_err(|e| EngineError::Checkpoint(e.to_string())),
        _ => Ok(None),
    }
}

/// Held-out evaluation of a run: every rank calls `gather` (a collective) when the data has a
/// held-out part; rank 0 evaluates `model()` with the gathered parameters on the host.
fn held_out<M: LanguageModel>(
    source: &Source,
    samples: usize,
    rank: usize,
    micro: usize,
    gather: impl FnOnce() -> Result<Vec<f32>, EngineError>,
    model: impl FnOnce() -> Result<M, EngineError>,
) -> Result<EvalResult, EngineError> {
    let Some(EvalBatch {
        inputs,
        targets,
        answers,
    }) = eval_data(source, samples)
    else {
        return Ok(EvalResult::default());
    };
    let full = gather()?;
    if rank != 0 {
        return Ok(EvalResult::default());
    }
    let (loss, acc) = evaluate_flat(&model()?, &full, &inputs, &targets, &answers, micro)?;
    Ok(EvalResult {
        loss: Some(loss),
        accuracy: acc,
        problems: (!answers.is_empty()).then_some(answers.len()),
    })
}

/// [`evaluate`] of `model` with its parameters set from `full` (flat, `params()` order).
fn evaluate_flat<M: LanguageModel>(
    model: &M,
    full: &[f32],
    inputs: &[u32],
    targets: &[u32],
    answers: &[Vec<usize>],
    micro: usize,
) -> Result<(f64, Option<f64>), EngineError> {
    let mut off = 0;
    for (i, p) in model.params().iter().enumerate() {
        let n = p.var.elem_count();
        let Some(v) = full.get(off..off + n) else {
            return Err(EngineError::Data(format!(
                "evaluation: {} parameter values for a model of more",
                full.len()
            )));
        };
        model.set_param(i, v)?;
        off += n;
    }
    evaluate(model, inputs, targets, answers, micro)
}

/// Held-out data of a source: (inputs, targets, answer groups).
fn eval_data(source: &Source, n: usize) -> Option<EvalBatch> {
    if n == 0 {
        return None;
    }
    match source {
        Source::Addition(t) => Some(t.eval_batch(n)),
        Source::Tokens(t) => {
            let (inputs, targets) = t.val_batch(n);
            Some(EvalBatch {
                inputs,
                targets,
                answers: Vec::new(),
            })
        }
        Source::Bigram(_) | Source::Bytes { .. } => None,
    }
}

/// Held-out results of rank 0.
#[derive(Debug, Clone, Default)]
struct EvalResult {
    loss: Option<f64>,
    accuracy: Option<f64>,
    problems: Option<usize>,
}

struct RankResult {
    start: u64,
    eval: EvalResult,
    /// Periodic held-out losses: (step, loss).
    val_curve: Vec<(u64, f64)>,
    eval_seconds: f64,
    tensorboard: Option<String>,
    losses: Vec<f64>,
    /// The learning rate of each step.
    lrs: Vec<f64>,
    step_ms: Vec<f64>,
    /// Per step: the fraction of its wall time outside the model's compute and the optimizer
    /// step (engine overhead, plus communication at world size > 1).
    overhead: Vec<f64>,
    step_ms_during_save: Vec<f64>,
    save_ms: Vec<f64>,
    skipped: u64,
    state_bytes: usize,
    comm_table: Option<String>,
    swap: Option<ds_zero::SwapStats>,
}

/// Threads for one rank's kernels: `DS_NUM_THREADS` when set, else the machine's cores shared
/// by the ranks on this machine: the processes a launcher started here
/// (`OMPI_COMM_WORLD_LOCAL_SIZE`, `MPI_LOCALNRANKS`, `LOCAL_WORLD_SIZE`), or the `ws` threads of
/// this process.
pub fn kernel_threads(ws: usize) -> usize {
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    if let Some(n) = env("DS_NUM_THREADS") {
        return n;
    }
    let local = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "LOCAL_WORLD_SIZE",
    ]
    .iter()
    .find_map(|k| env(k))
    .unwrap_or(ws.max(1));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local).max(1)
}

/// Prints the flops profile of one training step (`flops_profiler`).
type FlopsReport<'a> = dyn Fn(&TrainStep) -> Result<String, EngineError> + 'a;

/// DeepSpeed's flops-profiler report for a training step of the GPT (`flops_profiler.enabled`,
/// printed once at `profile_step`): the module tree's FLOPs, MACs and parameters come from an
/// instrumented forward pass of a GPT of the same shape (they depend on the shape only, not on
/// the weights); the summary's forward, backward and optimizer-step latencies (and so its
/// FLOPS) are those of the profiled training step itself, while the module tree shows the
/// instrumented pass's per-module latencies.
fn flops_report(
    cfg: &ResolvedConfig,
    shape: ModelShape,
    micro: usize,
    ws: usize,
    (fwd_ms, bwd_ms, step_ms): (f64, f64, f64),
) -> Result<String, EngineError> {
    let fp = &cfg.flops_profiler;
    let opts = ds_profiler::ProfilerOptions {
        enabled: true,
        recompute_fwd_factor: fp.recompute_fwd_factor,
        profile_step: fp.profile_step,
        module_depth: fp.module_depth,
        top_modules: fp.top_modules as usize,
        detailed: fp.detailed,
        output_file: fp.output_file.clone().map(PathBuf::from),
    };
    let model = Gpt::new(shape, 0, &Device::Cpu)?;
    let ids =
        candle_core::Tensor::zeros((micro, shape.seq), candle_core::DType::U32, &Device::Cpu)?;
    let prof = ds_profiler::FlopsProfiler::new();
    prof.start_profile();
    model.profile_forward(&ids, &prof)?;
    prof.stop_profile();
    let ms = |v: f64| std::time::Duration::from_secs_f64(v.max(0.0) / 1e3);
    let ctx = ds_profiler::ReportContext {
        step: fp.profile_step,
        world_size: ws,
        batch_size_per_gpu: Some(micro),
        fwd_latency: Some(ms(fwd_ms)),
        bwd_latency: Some(ms(bwd_ms)),
        step_latency: Some(ms(step_ms)),
        ..Default::default()
    };
    prof.model_profile_report(&opts, &ctx)
        .map_err(|e| EngineError::Data(format!("flops profiler: {e}")))
}

/// One rank's training loop (any backend).
#[allow(clippy::too_many_arguments)]
fn run_rank(
    comm: &dyn Communicator,
    comm2: Option<&(dyn Communicator + Sync)>,
    dev: &Device,
    cfg: &ResolvedConfig,
    source: &Source,
    args: &TrainArgs,
    log_every: u64,
) -> Result<RankResult, EngineError> {
    if args.model == ModelKind::Mlp {
        return run_rank_mlp(comm, comm2, dev, cfg, source, args, log_every);
    }
    let (shape, ws, rank) = (args.shape, comm.world_size(), comm.rank());
    let mut model = Gpt::new(shape, args.seed, &Device::Cpu)?;
    model.set_threads(kernel_threads(ws));
    if args.autograd {
        model.set_explicit_kernels(false);
    }
    if !dev.is_cpu() {
        // Off the CPU the model holds its weights in the model dtype (bf16/fp16 with mixed
        // precision) and trains on candle autograd.
        model.to_device(dev, ds_engine::engine::zero_precision(cfg).model_dtype())?;
    }
    if args.dropout > 0.0 {
        // Each rank draws its own masks (its own data), reproducibly.
        model.set_dropout(
            args.dropout,
            args.seed ^ (rank as u64).wrapping_mul(0x9E37_79B9),
        );
    }
    // bf16 on the CPU: the explicit kernels' matrix products run on the CPU's bf16 units when
    // it has them (f32 accumulation), in f32 otherwise.
    let bf16_units = if cfg.bf16.enabled && dev.is_cpu() && !args.autograd {
        Some(ds_models::bf16mm::units())
    } else {
        None
    };
    if let Some(units) = bf16_units {
        model.set_bf16_compute(units)?;
    }
    let bf16_note = bf16_units.map(bf16_compute_note);
    let engine = match comm2 {
        Some(c2) => Engine::initialize_overlapped(cfg, model, comm, c2)?,
        None => Engine::initialize(cfg, model, comm)?,
    };
    if let (Some(note), 0) = (bf16_note, rank) {
        eprintln!("note: {note}");
    }
    // The final evaluation's model computes as the trained one.
    let fresh = || {
        let mut g = Gpt::new(shape, 0, &Device::Cpu)?;
        if let Some(units) = bf16_units {
            g.set_bf16_compute(units)?;
        }
        Ok(g)
    };
    let micro = cfg.train_micro_batch_size_per_gpu as usize;
    let flops =
        |r: &TrainStep| flops_report(cfg, shape, micro, ws, (r.fwd_ms, r.bwd_ms, r.step_ms));
    drive(
        engine,
        &fresh,
        Some(&flops),
        comm,
        cfg,
        source,
        args,
        log_every,
    )
}

/// The MLP's shape from the model flags.
pub fn mlp_shape(s: &ModelShape) -> MlpShape {
    MlpShape {
        layers: s.layers,
        hidden: s.hidden,
        seq: s.seq,
        vocab: s.vocab,
    }
}

/// Parameters of the model `ds train` builds.
pub fn param_count(kind: ModelKind, s: &ModelShape) -> usize {
    match kind {
        ModelKind::Gpt => gpt_param_count(s),
        ModelKind::Mlp => Mlp::param_count(&mlp_shape(s)),
    }
}

/// One rank's MLP run.
fn run_rank_mlp(
    comm: &dyn Communicator,
    comm2: Option<&(dyn Communicator + Sync)>,
    dev: &Device,
    cfg: &ResolvedConfig,
    source: &Source,
    args: &TrainArgs,
    log_every: u64,
) -> Result<RankResult, EngineError> {
    let shape = mlp_shape(&args.shape);
    if !dev.is_cpu() && (cfg.fp16.enabled || cfg.bf16.enabled) {
        return Err(EngineError::Config(
            "fp16/bf16: the MLP holds f32 weights; on a GPU use --model gpt for mixed precision, or disable fp16/bf16".into(),
        ));
    }
    let fresh = || Ok(Mlp::new(shape, args.seed)?);
    if cfg.flops_profiler.enabled {
        return Err(EngineError::Config(
            "flops_profiler.enabled: the flops profiler counts the GPT's modules; the MLP has no profile (set enabled false)".into(),
        ));
    }
    let model = Mlp::new_on(shape, args.seed, dev)?;
    let engine = match comm2 {
        Some(c2) => Engine::initialize_overlapped(cfg, model, comm, c2)?,
        None => Engine::initialize(cfg, model, comm)?,
    };
    drive(engine, &fresh, None, comm, cfg, source, args, log_every)
}

/// Rank 0's training monitors (`csv_monitor`, `tensorboard`), DeepSpeed's event names.
struct Monitors {
    csv: Option<ds_engine::monitor::CsvMonitor>,
    tb: Option<ds_engine::monitor::TensorBoardMonitor>,
}

impl Monitors {
    /// The monitors the config enables (none off rank 0).
    fn new(cfg: &ResolvedConfig, rank: usize) -> Result<Self, EngineError> {
        let on = |enabled: bool| rank == 0 && enabled;
        Ok(Monitors {
            csv: on(cfg.csv_monitor.enabled)
                .then(|| {
                    ds_engine::monitor::CsvMonitor::new(
                        &cfg.csv_monitor.output_path,
                        &cfg.csv_monitor.job_name,
                    )
                })
                .transpose()?,
            tb: on(cfg.tensorboard.enabled)
                .then(|| {
                    ds_engine::monitor::TensorBoardMonitor::new(
                        &cfg.tensorboard.output_path,
                        &cfg.tensorboard.job_name,
                    )
                })
                .transpose()?,
        })
    }

    /// One scalar at `samples` trained samples, to every monitor.
    fn event(&mut self, name: &str, value: f64, samples: u64) -> Result<(), EngineError> {
        if let Some(m) = self.csv.as_mut() {
            m.write_event(name, value, samples)?;
        }
        if let Some(m) = self.tb.as_mut() {
            m.write_event(name, value, samples)?;
        }
        Ok(())
    }

    /// The training events of one step (`Train/Samples/train_loss`, `.../lr`) at the samples
    /// trained after it; `lr` is the rate after the scheduler's step, as DeepSpeed writes it.
    fn train_step(
        &mut self,
        cfg: &ResolvedConfig,
        step: u64,
        loss: f64,
        lr: f64,
    ) -> Result<(), EngineError> {
        let samples = (step + 1) * cfg.train_batch_size;
        self.event("Train/Samples/train_loss", loss, samples)?;
        self.event("Train/Samples/lr", lr, samples)
    }

    /// The held-out results at the end (`Eval/Samples/val_loss`, `.../val_accuracy`), then
    /// flushes; returns the TensorBoard event file's path.
    fn finish(mut self, eval: &EvalResult, samples: u64) -> Result<Option<String>, EngineError> {
        for (name, v) in [
            ("Eval/Samples/val_loss", eval.loss),
            ("Eval/Samples/val_accuracy", eval.accuracy),
        ] {
            if let Some(v) = v {
                self.event(name, v, samples)?;
            }
        }
        if let Some(m) = self.csv.as_mut() {
            m.flush()?;
        }
        if let Some(m) = self.tb.as_mut() {
            m.flush()?;
        }
        Ok(self.tb.map(|m| m.path().display().to_string()))
    }
}

/// Rank 0's progress bar (`--progress` on a terminal).
fn progress_bar(rank: usize, args: &TrainArgs, start: u64) -> Option<indicatif::ProgressBar> {
    (rank == 0 && args.progress && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(
        || {
            let b = indicatif::ProgressBar::new(args.steps);
            b.set_position(start);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                b.set_style(style);
            }
            b
        },
    )
}

/// The start-up note of bf16 compute on the CPU with `units` (see
/// [`ds_models::Gpt::set_bf16_compute`]).
fn bf16_compute_note(units: ds_models::Bf16Units) -> String {
    use ds_models::Bf16Units;
    let env = ds_models::bf16mm::ENV;
    match units {
        Bf16Units::Avx512Bf16 => "bf16 compute: every matrix product of the CPU kernels (forward, backward, evaluation) rounds its operands to bf16 and runs on this CPU's AVX-512 BF16 units (vdpbf16ps), summing in f32; LayerNorm, softmax, GELU and the loss stay f32 (AMX is not used)".to_string(),
        Bf16Units::Emulated => format!("bf16 compute: {env}=emulate: the matrix products of the CPU kernels run on an emulation of vdpbf16ps (bf16 operands, f32 sums; slow, for testing)"),
        Bf16Units::Blas => format!("bf16 compute: every matrix product of the CPU kernels (forward, backward, evaluation) rounds its operands to bf16 and runs on the bf16 GEMM of the DS_BLAS library ({}: MKL uses AMX tiles or AVX-512 BF16 where the CPU has them){}; LayerNorm, softmax, GELU and the loss stay f32", ds_models::blas::init().ok().flatten().map_or("?", |b| b.path()), if ds_models::bf16mm::cpu_has_amx_bf16() || ds_models::bf16mm::cpu_has_avx512bf16() { "" } else { ". This CPU has no bf16 units: the library converts to f32 inside (no faster than f32)" }),
        Bf16Units::None => format!("bf16 compute: no AVX-512 BF16 units in use on this CPU (absent, or {env}=none / DS_SIMD below avx512): the CPU kernels compute in f32"),
    }
}

/// Rank 0's start-up lines: the engine's notes and, with `dump_state`, the resolved config.
fn say_notes(cfg: &ResolvedConfig, rank: usize, notes: &[String]) {
    if rank != 0 {
        return;
    }
    for n in notes {
        eprintln!("note: {n}");
    }
    if let Ok(Some(b)) = ds_models::blas::init() {
        eprintln!(
            "note: {}={}: the explicit kernels' large f32 products run on this CBLAS library, single-threaded in each of the kernels' threads (each product split into bands){}",
            ds_models::blas::ENV,
            b.path(),
            if b.threads_set_by().is_some() {
                ""
            } else {
                "; it exports no known call to set its threads, so its own environment variables (e.g. OMP_NUM_THREADS=1) must keep it to one"
            }
        );
    }
    if cfg.json()["dump_state"] == serde_json::Value::Bool(true) {
        eprintln!(
            "dump_state: resolved config {}",
            serde_json::to_string_pretty(cfg.json()).unwrap_or_default()
        );
    }
}

/// DeepSpeed's line for a skipped step.
fn overflow_line(
    cfg: &ResolvedConfig,
    step: u64,
    scale: f64,
    next_scale: f64,
    skipped: u64,
) -> String {
    if cfg.fp16.enabled {
        format!(
            "[ds] step {}: OVERFLOW! gradients inf/nan at loss scale {scale}: step skipped, next loss scale {next_scale} (skipped so far: {skipped})",
            step + 1,
        )
    } else {
        format!(
            "[ds] step {}: inf/nan gradients: step skipped (skipped so far: {skipped})",
            step + 1,
        )
    }
}

/// `memory_breakdown`'s line (process memory).
fn memory_line() -> String {
    let gb = |b: Option<u64>| b.unwrap_or(0) as f64 / 1e9;
    format!(
        "MemAllocated (process RSS)={:.3}GB, MaxMemAllocated (peak RSS)={:.3}GB",
        gb(ds_profiler::vm_rss_bytes()),
        gb(ds_profiler::vm_hwm_bytes())
    )
}

/// `wall_clock_breakdown`'s line: mean milliseconds per step over the last `k` steps.
fn wall_clock_line(fwd: f64, bwd: f64, step: f64, k: f64) -> String {
    format!(
        "time (ms) | fwd: {:.2} | bwd: {:.2} | step: {:.2}",
        fwd / k,
        bwd / k,
        step / k
    )
}

/// The training loop over an initialised engine; `fresh` builds a model of the same kind for
/// the final evaluation.
#[allow(clippy::too_many_arguments)]
fn drive<M: LanguageModel>(
    mut engine: Engine<'_, M>,
    fresh: &dyn Fn() -> Result<M, EngineError>,
    flops: Option<&FlopsReport<'_>>,
    comm: &dyn Communicator,
    cfg: &ResolvedConfig,
    source: &Source,
    args: &TrainArgs,
    log_every: u64,
) -> Result<RankResult, EngineError> {
    let (ws, rank) = (comm.world_size(), comm.rank());
    say_notes(cfg, rank, engine.notes());
    let mut monitors = Monitors::new(cfg, rank)?;
    if args.ckpt {
        engine.set_checkpoint_policy(ds_ckpt_act::Policy::Every)?;
    }
    let store = checkpoint_store(args)?;
    let keep_last = args.keep_last.or(cfg.checkpoint.keep_last);
    let mut start = 0u64;
    if let Some(ckpt) = resume_point(args, store.as_ref())? {
        let t = engine.load_checkpoint(&ckpt)?;
        start = t.global_step;
        if rank == 0 {
            eprintln!(
                "resumed from {} (step {}, saved by {} ranks at ZeRO stage {})",
                ckpt.dir().display(),
                t.global_step,
                ckpt.meta().world_size,
                ckpt.meta().zero_stage
            );
        }
    }
    // `--steps` is the total: a resumed run trains from the checkpoint's step up to it.
    let end = args.steps;
    if start >= end {
        return Err(EngineError::Config(format!(
            "--steps {end} is the total step count and the checkpoint is already at step {start}: nothing to train; raise --steps to train further"
        )));
    }
    // The sample count must not overflow.
    if end.checked_mul(cfg.train_batch_size.max(1)).is_none() {
        return Err(EngineError::Config(format!(
            "--steps {end} x train_batch_size {} overflows the sample count",
            cfg.train_batch_size
        )));
    }
    let micro = engine.micro_batch_size();
    let bar = progress_bar(rank, args, start);
    // Log lines go around the progress bar (stderr either way).
    let say = |line: String| match &bar {
        Some(b) => b.suspend(|| eprintln!("{line}")),
        None => eprintln!("{line}"),
    };
    // Periodic held-out evaluation (`--eval-interval`; by default at the log lines within a
    // 10% time budget, rank 0 alone at stages 0-2 where it holds the whole model).
    let stage3 = cfg.zero_optimization.stage >= 3;
    let eval_every = match args.eval_interval {
        Some(k) => k,
        None if stage3 => 0,
        None => log_every,
    };
    let budgeted = args.eval_interval.is_none();
    let periodic = (eval_every > 0)
        .then(|| eval_data(source, args.eval_samples.unwrap_or(EVAL_SEQUENCES)))
        .flatten();
    let mut eval_model: Option<M> = None;
    let (mut eval_secs, mut val_curve) = (0.0f64, Vec::new());
    let run_t0 = Instant::now();
    let mut losses = Vec::new();
    let mut lrs = Vec::new();
    let mut step_ms = Vec::new();
    let mut overhead = Vec::new();
    let (mut step_ms_during_save, mut save_ms) = (Vec::new(), Vec::new());
    let (mut f_acc, mut b_acc, mut s_acc) = (0.0, 0.0, 0.0);
    let mut saved_at = None;
    for step in start..end {
        let writing = engine.checkpoint_pending();
        let t0 = Instant::now();
        let r = engine.train_batch(|m| source.micro_batch(step, m, rank, ws, micro))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        step_ms.push(ms);
        overhead.push(((ms - r.model_ms - r.optimizer_ms) / ms).max(0.0));
        if writing {
            step_ms_during_save.push(ms);
        }
        if let (Some(k), Some(store)) = (args.save_interval, &store) {
            if engine.global_steps().is_multiple_of(k) && step + 1 < end {
                let tag = format!("global_step{}", engine.global_steps());
                let t = Instant::now();
                engine.save_checkpoint(store, &tag, cfg.train_batch_size)?;
                save_ms.push(t.elapsed().as_secs_f64() * 1e3);
                saved_at = Some(engine.global_steps());
                retain(store, keep_last, rank)?;
            }
        }
        losses.push(r.loss);
        // DeepSpeed writes `Train/Samples/lr` after the scheduler's step, at the sample count
        // after this step: the rate of the next step (`engine.py::step`).
        lrs.push(r.lr);
        monitors.train_step(cfg, step, r.loss, engine.current_lr())?;
        if let Some(b) = &bar {
            b.inc(1);
            b.set_message(format!("loss {:.4}", r.loss));
        }
        if let Some(f) = flops.filter(|_| {
            rank == 0
                && cfg.flops_profiler.enabled
                && step + 1 == cfg.flops_profiler.profile_step.max(1)
        }) {
            say(f(&r)?);
        }
        f_acc += r.fwd_ms;
        b_acc += r.bwd_ms;
        s_acc += r.step_ms;
        if r.step.overflow && rank == 0 {
            say(overflow_line(
                cfg,
                step,
                r.step.loss_scale,
                r.step.next_loss_scale,
                engine.skipped_steps(),
            ));
        }
        // Periodic evaluation: the same decision on every rank where it is a collective
        // (ZeRO-3's gather); rank 0 alone decides the budgeted default (no collective).
        let mut last_eval = None;
        if let Some(e) = periodic
            .as_ref()
            .filter(|_| (step + 1).is_multiple_of(eval_every) && step + 1 < end)
        {
            let within_budget = !budgeted
                || eval_secs <= 0.1 * (run_t0.elapsed().as_secs_f64() - eval_secs).max(0.0);
            if stage3 || (rank == 0 && within_budget) {
                let te = Instant::now();
                let r = if stage3 {
                    let full = engine.gather_full_params()?;
                    if rank == 0 {
                        if eval_model.is_none() {
                            eval_model = Some(fresh()?);
                        }
                        let m = eval_model
                            .as_ref()
                            .ok_or_else(|| EngineError::Data("evaluation model missing".into()))?;
                        Some(evaluate_flat(
                            m, &full, &e.inputs, &e.targets, &e.answers, micro,
                        )?)
                    } else {
                        None
                    }
                } else {
                    Some(evaluate(
                        engine.model(),
                        &e.inputs,
                        &e.targets,
                        &e.answers,
                        micro,
                    )?)
                };
                eval_secs += te.elapsed().as_secs_f64();
                if let Some((l, a)) = r {
                    val_curve.push((step + 1, l));
                    let samples = (step + 1) * cfg.train_batch_size;
                    monitors.event("Eval/Samples/val_loss", l, samples)?;
                    if let Some(a) = a {
                        monitors.event("Eval/Samples/val_accuracy", a, samples)?;
                    }
                    last_eval = Some((l, a));
                }
            }
        }
        let log_line = log_every > 0 && (step + 1).is_multiple_of(log_every);
        if let (0, false, Some((l, a))) = (rank, log_line, last_eval) {
            let acc = a.map(|a| format!(", val_acc={a:.3}")).unwrap_or_default();
            say(format!("step={}, val_loss={l:.4}{acc}", step + 1));
        }
        if rank == 0 && log_line {
            let val = match &last_eval {
                Some((l, Some(a))) => format!(", val_loss={l:.4}, val_acc={a:.3}"),
                Some((l, None)) => format!(", val_loss={l:.4}"),
                None => String::new(),
            };
            let scale = if cfg.fp16.enabled {
                format!(", loss_scale={}", r.step.next_loss_scale)
            } else {
                String::new()
            };
            say(format!(
                "step={}, skipped={}, lr=[{:.6e}], loss={:.4}, grad_norm={:.4}{scale}, step_ms={:.1}{val}",
                step + 1,
                engine.skipped_steps(),
                r.lr,
                r.loss,
                r.step.grad_norm,
                step_ms[step_ms.len() - 1]
            ));
            if cfg.activation_checkpointing.profile {
                for (i, f, b) in engine.segment_times() {
                    say(format!("checkpoint profile | block {i} | forward: {f:.2} ms | recompute+backward: {b:.2} ms"));
                }
            }
            if cfg.memory_breakdown {
                say(memory_line());
            }
            if cfg.wall_clock_breakdown {
                say(wall_clock_line(f_acc, b_acc, s_acc, log_every as f64));
            }
            f_acc = 0.0;
            b_acc = 0.0;
            s_acc = 0.0;
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // Held-out evaluation on rank 0 over the full parameters (gathered by every rank: a
    // collective at every stage).
    let samples = args.eval_samples.unwrap_or(EVAL_SEQUENCES);
    let te = Instant::now();
    let eval = held_out(
        source,
        samples,
        rank,
        micro,
        || engine.gather_full_params(),
        || match eval_model.take() {
            Some(m) => Ok(m),
            None => fresh(),
        },
    )?;
    eval_secs += te.elapsed().as_secs_f64();
    let tensorboard = monitors.finish(&eval, end * cfg.train_batch_size)?;
    if let Some(store) = &store {
        let tag = format!("global_step{}", engine.global_steps());
        if saved_at != Some(engine.global_steps()) {
            let t = Instant::now();
            engine.save_checkpoint(store, &tag, cfg.train_batch_size)?;
            save_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        engine.wait_checkpoint()?;
        retain(store, keep_last, rank)?;
        if rank == 0 {
            eprintln!("saved checkpoint {}", store.root().join(&tag).display());
        }
    }
    Ok(RankResult {
        start,
        eval,
        val_curve,
        eval_seconds: eval_secs,
        tensorboard,
        losses,
        lrs,
        step_ms,
        overhead,
        step_ms_during_save,
        save_ms,
        skipped: engine.skipped_steps(),
        state_bytes: {
            let m = engine.memory();
            m.params_bytes + m.grads_bytes + m.optimizer_bytes
        },
        comm_table: None,
        swap: engine.zero().swap_stats(),
    })
}

/// The candle device `--device` names: `cpu`, `cuda` or `cuda:N` (a CUDA build).
pub fn open_device(name: &str) -> Result<Device, EngineError> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => {
                return Err(EngineError::Config(format!(
                    "--device {name}: allowed: cpu, cuda, cuda:N (N a device ordinal)"
                )))
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::Config(format!(
            "--device {name}: this `ds` was built without CUDA support; build one with `bash scripts/cuda-build.sh` (CUDA 13 wheels from PyPI, no GPU needed to build) and run it on a GPU machine"
        )));
    }
    #[cfg(feature = "cuda")]
    ds_comm::nccl::probe_libraries()?;
    Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace to driver errors: keep the message.
        let e = e.to_string();
        EngineError::Config(format!(
            "--device {name}: cannot open CUDA device {ordinal}: {}",
            e.lines().next().unwrap_or("")
        ))
    })
}

/// A lower bound of a model's memory, in f64 (the flags can make the counts overflow an
/// integer): (fp32 weights bytes, one micro-batch's activation bytes through one block and the
/// head: logits, hidden states, attention state; parameter count). The attention state is what
/// the GPT's path keeps: the explicit CPU kernels (`blocked_attention`) keep one log-sum-exp
/// per row and head (B*H*T, linear in T; the T x T scores exist one tile per thread at a
/// time; candle autograd on the CPU through the same blocked kernels), candle autograd on
/// other devices and `ds profile` the B*H*T*T probabilities.
fn memory_lower_bound(
    kind: ModelKind,
    s: ModelShape,
    micro: usize,
    blocked_attention: bool,
) -> (f64, f64, f64) {
    let f = |x: usize| x as f64;
    let (d, t, v, l) = (f(s.hidden), f(s.seq), f(s.vocab), f(s.layers));
    let block = 12.0 * d * d + 13.0 * d;
    let params = match kind {
        ModelKind::Gpt => v * d + t * d + l * block + 2.0 * d,
        ModelKind::Mlp => 2.0 * v * d + l * (d * d + d) + v,
    };
    // Attention values kept per token.
    let scores = match kind {
        ModelKind::Gpt if blocked_attention => f(s.heads.max(1)),
        ModelKind::Gpt => f(s.heads.max(1)) * t,
        ModelKind::Mlp => 0.0,
    };
    let activations = 4.0 * f(micro.max(1)) * t * (v + 4.0 * d + scores);
    (4.0 * params, activations, params)
}

/// The optimizer's fp32 state bytes per parameter (Adam's two moments: 8), 0 without an
/// optimizer section (the engine refuses that later with its own message).
fn optimizer_state_bytes(cfg: &ResolvedConfig) -> u64 {
    ds_engine::engine::optimizer_spec(cfg).map_or(0, |s| s.state_bytes_per_element() as u64)
}

/// Refuses, before anything is allocated, a run whose memory cannot fit: a lower bound of what
/// one rank holds (its model states by `ds estimate-memory`'s formulas, and the
/// activations of one micro-batch through one block and the head) times the ranks in this
/// process, against the memory the kernel says is available. A lower bound: a run refused here
/// would abort on allocation (or swap to a halt) anyway.
fn preflight(args: &TrainArgs, cfg: &ResolvedConfig) -> Result<(), EngineError> {
    let micro = cfg.train_micro_batch_size_per_gpu.max(1) as usize;
    let ws = args.world_size.max(1);
    // The blocked attention of the CPU (the explicit kernels, and candle autograd's fused
    // attention op on the CPU); other devices run candle's generic attention.
    let blocked = args.device == "cpu";
    let (_, activations, params) = memory_lower_bound(args.model, args.shape, micro, blocked);
    // Model states by `ds estimate-memory`'s formulas (fp32: the host engine keeps f32 weights
    // in every precision); the parameter count is clamped where it cannot fit anyway.
    let state_bytes = optimizer_state_bytes(cfg);
    let est = ds_zero::estimate::estimate(
        params.min(2f64.powi(56)) as u64,
        ws as u64,
        cfg.zero_optimization.stage,
        ds_zero::estimate::Precision::Fp32,
        state_bytes,
    )
    .map_err(EngineError::Zero)?;
    let z = &cfg.zero_optimization;
    let (opt_nvme, param_nvme) = (z.offload_optimizer_to_nvme(), z.offload_param_to_nvme());
    let mut weights = est.params_bytes as f64;
    let mut states = (est.grads_bytes + est.optimizer_bytes) as f64;
    if opt_nvme || param_nvme {
        // ZeRO-Infinity: what the swap files take off memory, and the plan printed before
        // training (bytes per rank in memory and on disk, disk traffic per step).
        let max_in_cpu = z
            .offload_param
            .as_ref()
            .and_then(|o| o.max_in_cpu)
            .unwrap_or(1_000_000_000);
        let mb = if cfg.precision() == "fp32" { 4 } else { 2 };
        let placed = ds_zero::estimate::place(
            &est,
            z.stage,
            opt_nvme,
            param_nvme,
            max_in_cpu,
            cfg.gradient_accumulation_steps,
            mb,
        )
        .map_err(EngineError::Zero)?;
        let swapped_params = if param_nvme {
            est.params_bytes
                .saturating_sub(max_in_cpu.saturating_mul(mb).min(est.params_bytes))
        } else {
            0
        };
        weights -= swapped_params as f64;
        states = placed.memory_bytes as f64 - weights;
        let gb = |b: u64| b as f64 / 1e9;
        eprintln!(
            "ZeRO-Infinity plan per rank ({:.3e} parameters, stage {}, optimizer {}, parameters {}): in memory {:.2} GB of model states + {:.2} GB activations (lower bound) + {:.2} GB of gradient buckets (3 x reduce_bucket_size x 4 bytes, transient); on disk {:.2} GB of swap files; disk traffic per step: read {:.2} GB, write {:.2} GB",
            params,
            z.stage,
            if opt_nvme { "nvme" } else { "memory" },
            if param_nvme { "nvme" } else { "memory" },
            gb(placed.memory_bytes),
            activations / 1e9,
            if z.stage >= 2 { 12.0 * (z.reduce_bucket_size as f64).min(params) / 1e9 } else { 0.0 },
            gb(placed.disk_bytes),
            gb(placed.disk_read_bytes_per_step),
            gb(placed.disk_write_bytes_per_step)
        );
    }
    // Stages 2-3 stream gradients through buckets of reduce_bucket_size elements: the
    // bucket, its reduced copy and the pieces handed to the shard (fp32) are transient.
    let buckets = if z.stage >= 2 {
        3.0 * 4.0 * (z.reduce_bucket_size as f64).min(params)
    } else {
        0.0
    };
    // The model is created whole before the engine takes its parameters over (at ZeRO-3 one
    // block at a time, releasing each): its fp32 weights are a floor too.
    let per_rank = (weights + states + activations + buckets).max(4.0 * params);
    let local = if args.backend == "local" {
        ws as f64
    } else {
        1.0
    };
    let need = per_rank * local;
    let Some(avail) = ds_profiler::mem_available_bytes() else {
        return Ok(());
    };
    if need > avail as f64 {
        let gb = |b: f64| b / 1e9;
        return Err(EngineError::Config(format!(
            "this run needs at least {:.1} GB of memory ({} rank(s) in this process, each at least {:.1} GB: weights {:.1} GB, gradients and optimizer state {:.1} GB (`ds estimate-memory`'s formulas), one micro-batch's activations {:.1} GB; {:.3e} parameters), and {:.1} GB are available; reduce --batch/--seq/--vocab/--hidden/--layers, raise the ZeRO stage or the world size",
            gb(need),
            local,
            gb(per_rank),
            gb(weights),
            gb(states),
            gb(activations),
            params,
            gb(avail as f64)
        )));
    }
    Ok(())
}

/// Runs the main job; progress goes to stderr (rank 0).
pub fn train(args: &TrainArgs) -> Result<TrainReport, EngineError> {
    if args.world_size == 0 {
        return Err(EngineError::Config("--world-size must be >= 1".into()));
    }
    if args.steps == 0 {
        return Err(EngineError::Config(
            "--steps must be >= 1 (a run of 0 steps has no loss to report)".into(),
        ));
    }
    // DS_BLAS: a CBLAS library for the explicit kernels' products, opened once with each
    // rank's share of the cores; a bad path stops the run here.
    ds_models::blas::init().map_err(EngineError::Config)?;
    if let Some(out) = &args.out {
        if args.resume && args.overwrite {
            return Err(EngineError::Config(
                "--resume continues the run in --out and --overwrite replaces it: give one".into(),
            ));
        }
        // A run already there is not silently replaced (its checkpoints and `latest`).
        if !args.resume && !args.overwrite {
            use ds_checkpoint::CheckpointStore;
            let store = ds_checkpoint::FsCheckpointStore::new(out)
                .map_err(|e| EngineError::Checkpoint(e.to_string()))?;
            let tags = store.list().unwrap_or_default();
            if out.join("latest").exists() || !tags.is_empty() {
                return Err(EngineError::Config(format!(
                    "--out {} already holds a run ({}); add --resume to continue it or --overwrite to replace it",
                    out.display(),
                    match tags.last() {
                        Some(t) => format!("{} checkpoint(s), the last {t}", tags.len()),
                        None => "a `latest` file".to_string(),
                    }
                )));
            }
        }
    }
    #[cfg(feature = "mpi")]
    let mut mpi = if args.backend == "mpi" {
        let n = args.world_size_given.then_some(args.world_size);
        Some(crate::comm::init_mpi(args.comm_timeout, n)?)
    } else {
        None
    };
    #[cfg(feature = "mpi")]
    let args = &TrainArgs {
        world_size: mpi.as_ref().map_or(args.world_size, |c| c.world_size()),
        ..args.clone()
    };
    match args.backend.as_str() {
        "local" => {}
        "mpi" if cfg!(feature = "mpi") => {}
        "mpi" => {
            return Err(EngineError::Config(
                "--backend mpi: this `ds` was built without MPI; build it with `cargo build --release -p ds-cli --features mpi` and launch it under `mpirun -np N`".into(),
            ))
        }
        "nccl" if args.device == "cpu" => {
            return Err(EngineError::Config(
                "--backend nccl runs on GPUs (each process on the GPU of its LOCAL_RANK): drop --device cpu, or use --backend local|mpi on the CPU".into(),
            ))
        }
        "nccl" if cfg!(feature = "cuda") => {}
        "nccl" => {
            return Err(EngineError::Config(
                "--backend nccl: this `ds` was built without CUDA support; build one with `bash scripts/cuda-build.sh` (CUDA 13 wheels from PyPI, no GPU needed to build) and run it on a GPU machine, one process per GPU with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (or none of them for one GPU)".into(),
            ))
        }
        other => {
            return Err(EngineError::Config(format!(
                "--backend {other}: allowed: `local` (ranks as threads), `mpi` (processes under mpirun), `nccl` (GPUs; a CUDA build)"
            )))
        }
    }
    if args.comm_timeout.is_some() && args.backend != "mpi" {
        eprintln!(
            "warning: --comm-timeout applies to --backend mpi; ignored with --backend {}",
            args.backend
        );
    }
    if args.model == ModelKind::Mlp && args.dropout > 0.0 {
        return Err(EngineError::Config(
            "--dropout: the MLP has no dropout; use --model gpt or drop the flag".into(),
        ));
    }
    #[cfg(feature = "cuda")]
    let nccl_env = if args.backend == "nccl" {
        Some(ds_engine::gpu::gpu_env()?)
    } else {
        None
    };
    #[cfg(feature = "cuda")]
    let args = &TrainArgs {
        world_size: nccl_env.as_ref().map_or(args.world_size, |e| e.world_size),
        ..args.clone()
    };
    let mut cfg = resolve_config(args)?;
    #[cfg(feature = "mpi")]
    if let Some(c) = mpi.as_mut() {
        crate::comm::apply_config_timeout(c, args.comm_timeout, cfg.comm_timeout)?;
    }
    if args.flops_profile {
        cfg.flops_profiler.enabled = true;
        cfg.flops_profiler.profile_step = 2;
        cfg.flops_profiler.detailed = false;
        cfg.flops_profiler.module_depth = 1;
    }
    for w in &cfg.warnings {
        eprintln!("warning: {w}");
    }
    preflight(args, &cfg)?;
    let shape = args.shape;
    let (source, entropy, task) = match &args.data {
        None => match args.task {
            Task::Bigram => {
                let lang = BigramLanguage::new(shape.vocab, args.seed);
                let h = lang.entropy();
                (
                    Source::Bigram(DataLoader::new(lang, args.seed, shape.seq)),
                    Some(h),
                    "bigram",
                )
            }
            Task::Addition { digits } => {
                if shape.vocab < ds_engine::data::ADD_VOCAB {
                    return Err(EngineError::Data(format!(
                        "the addition task needs --vocab >= {} (digits, +, =, ;), got {}",
                        ds_engine::data::ADD_VOCAB,
                        shape.vocab
                    )));
                }
                let t = AdditionTask::new(digits, args.seed, shape.seq)?;
                if t.problems_per_sequence() == 0 {
                    eprintln!(
                        "note: --seq {} holds no complete addition problem ({} tokens each): no held-out accuracy",
                        shape.seq,
                        t.problem_len()
                    );
                }
                let h = t.loss_floor();
                (Source::Addition(t), Some(h), "addition")
            }
        },
        Some(p) if p.is_dir() => (
            Source::Tokens(TokenDataset::open(p, shape.vocab, shape.seq, args.seed)?),
            None,
            "tokens",
        ),
        Some(p) => {
            // A stream (/dev/zero, a FIFO) would be read until memory runs out; a text file
            // is held whole, so its size is checked against the memory available.
            let meta = std::fs::metadata(p).map_err(|e| {
                EngineError::Data(format!("cannot read --data {}: {e}", p.display()))
            })?;
            if !meta.is_file() {
                return Err(EngineError::Data(format!(
                    "--data {}: not a regular file or directory (a device, FIFO or socket would be read without end); allowed: a text file, or a directory holding train.bin and val.bin",
                    p.display()
                )));
            }
            let avail = ds_profiler::mem_available_bytes().unwrap_or(u64::MAX);
            // Each byte becomes a u32 token: 5 bytes of memory per byte of text.
            if meta.len().saturating_mul(5) > avail {
                return Err(EngineError::Data(format!(
                    "--data {}: {} bytes of text need about {} bytes of memory as tokens, more than the {avail} available; tokenise it into a nanoGPT train.bin/val.bin directory instead (memory-mapped)",
                    p.display(),
                    meta.len(),
                    meta.len().saturating_mul(5)
                )));
            }
            let bytes = std::fs::read(p).map_err(|e| {
                EngineError::Data(format!("cannot read --data {}: {e}", p.display()))
            })?;
            if shape.vocab < 256 {
                return Err(EngineError::Data(format!(
                    "--data trains on bytes: --vocab must be >= 256, got {}",
                    shape.vocab
                )));
            }
            if bytes.len() < shape.seq + 2 {
                return Err(EngineError::Data(format!(
                    "--data {} has {} bytes; at least seq + 2 = {} are needed",
                    p.display(),
                    bytes.len(),
                    shape.seq + 2
                )));
            }
            (
                Source::Bytes {
                    toks: bytes.into_iter().map(u32::from).collect(),
                    seed: args.seed,
                    seq: shape.seq,
                },
                None,
                "bytes",
            )
        }
    };
    let ws = args.world_size;
    let log_every = cfg.steps_per_print.unwrap_or(0);
    eprintln!(
        "ds train: {} {} layers x {} hidden ({} params), ZeRO stage {}, world size {ws}, micro-batch {} x {} accumulation, {} steps",
        if args.model == ModelKind::Mlp { "MLP" } else { "GPT" },
        shape.layers,
        shape.hidden,
        param_count(args.model, &shape),
        cfg.zero_optimization.stage,
        cfg.train_micro_batch_size_per_gpu,
        cfg.gradient_accumulation_steps,
        args.steps
    );
    #[cfg(feature = "mpi")]
    if let Some(comm) = &mpi {
        // A failure here (a stalled or dead peer, or this rank's own error) ends the job on
        // every rank with a message and MPI_Abort, never in MPI_Finalize.
        return train_mpi(comm, &cfg, &source, args, log_every, entropy, task)
            .map_err(|e| -> EngineError { crate::comm::fail(comm, e) });
    }
    #[cfg(feature = "cuda")]
    if let Some(env) = &nccl_env {
        return train_nccl(env, &cfg, &source, args, log_every, entropy, task);
    }
    // Local ranks (threads) share the device `--device` names.
    let dev = open_device(&args.device)?;
    let comms = LocalComm::create(ws);
    // A second group of the same ranks for the engine's communication thread (overlap_comm
    // at stages 2-3, the stage-3 prefetch).
    let z = &cfg.zero_optimization;
    let want2 = ws > 1 && z.stage >= 2 && (z.overlap_comm || z.stage == 3);
    let mut comms2: Vec<Option<LocalComm>> = if want2 {
        LocalComm::create(ws).into_iter().map(Some).collect()
    } else {
        (0..ws).map(|_| None).collect()
    };
    let results: Vec<Result<RankResult, EngineError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(comms2.drain(..))
            .map(|(c, c2)| {
                let cfg = &cfg;
                let source = &source;
                let dev = &dev;
                scope.spawn(move || -> Result<RankResult, EngineError> {
                    if cfg.comms_logger.enabled {
                        let logger = CommsLogger::new(c);
                        let logger2 = c2.map(CommsLogger::new);
                        let l2 = logger2.as_ref().map(|l| l as &(dyn Communicator + Sync));
                        let mut r = run_rank(&logger, l2, dev, cfg, source, args, log_every)?;
                        let mut table = logger.summary_table();
                        if let Some(l) = &logger2 {
                            table.push_str(
                                "\ncommunication thread (overlap_comm / stage-3 prefetch):\n",
                            );
                            table.push_str(&l.summary_table());
                        }
                        r.comm_table = Some(table);
                        Ok(r)
                    } else {
                        let l2 = c2.as_ref().map(|l| l as &(dyn Communicator + Sync));
                        run_rank(&c, l2, dev, cfg, source, args, log_every)
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(EngineError::Config("a rank thread panicked".into())))
            })
            .collect()
    });
    let mut ranks = Vec::with_capacity(ws);
    for r in results {
        ranks.push(r?);
    }
    if let Some(t) = ranks.first().and_then(|r| r.comm_table.as_ref()) {
        eprintln!("{t}");
    }
    let steps = ranks.first().map_or(0, |r| r.losses.len());
    let losses: Vec<f64> = (0..steps)
        .map(|i| ranks.iter().map(|r| r.losses[i]).sum::<f64>() / ws as f64)
        .collect();
    let r = report(
        args,
        &cfg,
        &ranks[0],
        losses,
        ranks.iter().map(|r| r.state_bytes).max().unwrap_or(0),
        ws as u64,
        (entropy, task),
    )?;
    plot(args, r, &ranks[0].lrs)
}

/// Writes the loss-curve PNG (`--plot`, or `<out>/loss_curve.png` with `--out`) and an SVG
/// beside it: the rank-mean train loss, the learning rate `lrs` and the validation loss.
fn plot(args: &TrainArgs, mut r: TrainReport, lrs: &[f64]) -> Result<TrainReport, EngineError> {
    let path = args
        .plot
        .clone()
        .or_else(|| args.out.as_ref().map(|d| d.join("loss_curve.png")));
    if let Some(p) = path {
        if r.rank == 0 {
            let first = r.steps_before + 1;
            let mut run = ds_engine::plot::RunCurves::from_losses("train", &r.losses, lrs, first);
            run.val_loss
                .extend(r.val_curve.iter().map(|&(s, v)| (s as f64, v)));
            if let Some(v) = r.val_loss {
                let last = (r.steps_before + r.steps) as f64;
                if run.val_loss.last().map(|p| p.0) != Some(last) {
                    run.val_loss.push((last, v));
                }
            }
            let model = match args.model {
                ModelKind::Gpt => "GPT",
                ModelKind::Mlp => "MLP",
            };
            let title = format!(
                "{model} ({} params), ZeRO stage {}, world size {}, {}",
                ds_engine::plot::fmt_count(r.params as f64),
                r.zero_stage,
                r.world_size,
                r.task
            );
            let opts = ds_engine::plot::PlotOptions::titled(&title);
            ds_engine::plot::write_pictures(&p, &[run], &opts)?;
        }
        r.loss_curve_png = Some(p.display().to_string());
    }
    Ok(r)
}

/// The report from rank 0's timings and the rank-mean losses; `ranks_in_process` divides the
/// process's peak memory.
fn report(
    args: &TrainArgs,
    cfg: &ResolvedConfig,
    r0: &RankResult,
    losses: Vec<f64>,
    state_bytes: usize,
    ranks_in_process: u64,
    (entropy, task): (Option<f64>, &str),
) -> Result<TrainReport, EngineError> {
    let shape = args.shape;
    let med = |v: &[f64]| {
        let mut t = v.to_vec();
        t.sort_by(f64::total_cmp);
        t.get(t.len() / 2).copied()
    };
    let median = med(&r0.step_ms).unwrap_or(0.0);
    let tokens = cfg.train_batch_size as f64 * shape.seq as f64;
    Ok(TrainReport {
        steps: losses.len() as u64,
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        median_step_ms: median,
        tokens_per_s: if median > 0.0 {
            tokens / (median / 1e3)
        } else {
            0.0
        },
        skipped_steps: r0.skipped,
        peak_bytes_per_rank: peak_rss_bytes() / ranks_in_process.max(1),
        checkpoint_dir: args.out.as_ref().map(|p| p.display().to_string()),
        losses,
        world_size: cfg.world_size,
        zero_stage: cfg.zero_optimization.stage,
        params: param_count(args.model, &shape),
        model_state_bytes_per_rank: state_bytes,
        data_entropy: entropy,
        task: task.to_string(),
        val_loss: r0.eval.loss,
        val_accuracy: r0.eval.accuracy,
        val_problems: r0.eval.problems,
        val_curve: r0.val_curve.clone(),
        eval_seconds: r0.eval_seconds,
        loss_curve_png: None,
        tensorboard_file: r0.tensorboard.clone(),
        steps_before: r0.start,
        median_step_ms_during_save: med(&r0.step_ms_during_save),
        engine_overhead_fraction: med(&r0.overhead).unwrap_or(0.0),
        median_save_call_ms: med(&r0.save_ms),
        swap: r0.swap,
        rank: 0,
    })
}

/// One process of an `mpirun` job: trains its rank, averages the losses over ranks.
#[cfg(feature = "mpi")]
fn train_mpi(
    comm: &ds_comm::MpiComm,
    cfg: &ResolvedConfig,
    source: &Source,
    args: &TrainArgs,
    log_every: u64,
    entropy: Option<f64>,
    task: &str,
) -> Result<TrainReport, EngineError> {
    let dev = open_device(&args.device)?;
    let r = run_rank(comm, None, &dev, cfg, source, args, log_every)?;
    let n = r.losses.len();
    let t = candle_core::Tensor::from_vec(r.losses.clone(), n, &Device::Cpu)?;
    let losses = comm
        .all_reduce(&t, ds_comm::ReduceOp::Avg)?
        .to_vec1::<f64>()?;
    let mut rep = report(args, cfg, &r, losses, r.state_bytes, 1, (entropy, task))?;
    rep.rank = comm.rank();
    plot(args, rep, &r.lrs)
}

/// `ds train --backend nccl` (a CUDA build): this process's GPU, an NCCL communicator on
/// candle's stream, and the engine with the model on that GPU.
#[cfg(feature = "cuda")]
fn train_nccl(
    env: &ds_engine::gpu::GpuEnv,
    cfg: &ResolvedConfig,
    source: &Source,
    args: &TrainArgs,
    log_every: u64,
    entropy: Option<f64>,
    task: &str,
) -> Result<TrainReport, EngineError> {
    let (dev, comm) = ds_engine::gpu::open_gpu(env)?;
    let r = run_rank(&comm, None, &dev, cfg, source, args, log_every)?;
    let n = r.losses.len();
    let t = candle_core::Tensor::from_vec(r.losses.clone(), n, &Device::Cpu)?;
    let losses = comm
        .all_reduce(&t, ds_comm::ReduceOp::Avg)?
        .to_vec1::<f64>()?;
    let mut rep = report(args, cfg, &r, losses, r.state_bytes, 1, (entropy, task))?;
    rep.rank = comm.rank();
    plot(args, rep, &r.lrs)
}

/// `ds profile`: the flops profile of one forward pass of the GPT at batch `batch` (after one
/// warm-up pass, as DeepSpeed's `get_model_profile`). Returns the DeepSpeed-style report and
/// the JSON profile. The config's `flops_profiler` section sets the report's depth, top
/// modules, detail and output file.
pub fn profile(
    config: Option<&std::path::Path>,
    shape: ModelShape,
    batch: usize,
) -> Result<(String, ds_profiler::Profile), EngineError> {
    let mut opts = ds_profiler::ProfilerOptions {
        enabled: true,
        ..Default::default()
    };
    if let Some(p) = config {
        let cfg = DeepSpeedConfig::from_path(p)?.resolve_with(&ResolveOptions {
            allow_unknown_keys: false,
            ..ResolveOptions::world_size(1)
        });
        // A config whose batch keys do not resolve still carries profiler options.
        let fp = match cfg {
            Ok(c) => c.flops_profiler,
            Err(e) => return Err(e.into()),
        };
        opts.recompute_fwd_factor = fp.recompute_fwd_factor;
        opts.profile_step = fp.profile_step;
        opts.module_depth = fp.module_depth;
        opts.top_modules = fp.top_modules as usize;
        opts.detailed = fp.detailed;
        opts.output_file = fp.output_file.map(PathBuf::from);
    }
    // The forward pass holds the weights and one batch's activations: refused up front when
    // they cannot fit (it aborted on allocation).
    // The profiled forward runs on candle's ops: the full probabilities.
    let (weights, activations, params) = memory_lower_bound(ModelKind::Gpt, shape, batch, false);
    if let Some(avail) = ds_profiler::mem_available_bytes() {
        if weights + activations > avail as f64 {
            return Err(EngineError::Config(format!(
                "profiling this model needs at least {:.1} GB of memory (weights {:.1} GB for {params:.3e} parameters, one batch's activations {:.1} GB), and {:.1} GB are available; reduce --batch/--seq/--vocab/--hidden/--layers",
                (weights + activations) / 1e9,
                weights / 1e9,
                activations / 1e9,
                avail as f64 / 1e9
            )));
        }
    }
    let model = Gpt::new(shape, 0, &Device::Cpu)?;
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..batch * shape.seq)
        .map(|_| (rng.next_u64() % shape.vocab as u64) as u32)
        .collect();
    let ids = candle_core::Tensor::from_vec(ids, (batch, shape.seq), &Device::Cpu)?;
    let prof = ds_profiler::FlopsProfiler::new();
    model.profile_forward(&ids, &prof)?; // warm-up (disabled: not recorded)
    prof.start_profile();
    model.profile_forward(&ids, &prof)?;
    prof.stop_profile();
    let ctx = ds_profiler::ReportContext {
        step: opts.profile_step,
        world_size: 1,
        batch_size_per_gpu: Some(batch),
        ..Default::default()
    };
    let report = prof
        .model_profile_report(&opts, &ctx)
        .map_err(|e| EngineError::Data(format!("flops profiler: {e}")))?;
    Ok((report, prof.profile()))
}
