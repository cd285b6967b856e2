//! `ds train`: the main job. Resolves a DeepSpeed config (or the embedded default), starts the
//! ranks, trains the GPT on the embedded data (or a byte-level text file) and reports.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use ds_comm::{CommsLogger, Communicator, LocalComm};
use ds_config::{DeepSpeedConfig, ResolveOptions, ResolvedConfig};
use serde::Serialize;
use serde_json::Value;

use crate::data::{BigramLanguage, DataLoader};
use crate::engine::Engine;
use crate::model::{gpt_param_count, Gpt, ModelShape, Rng};
use crate::EngineError;

/// The embedded default configuration (`examples/configs/gpt_zero2.json`).
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/configs/gpt_zero2.json");

/// The main job's defaults: a small GPT that trains in about a minute on 2 cores.
pub const DEFAULT_SHAPE: ModelShape = ModelShape {
    layers: 2,
    hidden: 128,
    heads: 4,
    seq: 64,
    vocab: 512,
};

/// Options of `ds train`.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// DeepSpeed config file (JSON or TOML); `None` = the embedded default.
    pub config: Option<PathBuf>,
    /// Data-parallel ranks.
    pub world_size: usize,
    /// `local` (threads sharing memory).
    pub backend: String,
    /// Optimizer steps.
    pub steps: u64,
    /// Byte-level text file to train on instead of the embedded language.
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
    /// Also save a checkpoint every this many steps (needs `out`; `None`: only at the end).
    pub save_interval: Option<u64>,
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
    /// Where checkpoints went (`null`: checkpointing is not wired in yet).
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
    /// Median wall time of the steps that ran while a decoupled checkpoint was being written
    /// (`null` when none did).
    pub median_step_ms_during_save: Option<f64>,
    /// Median wall time of the `save_checkpoint` calls (with a decoupled writer: the copy to
    /// host buffers and the collectives; else the whole save), `null` without saves.
    pub median_save_call_ms: Option<f64>,
    /// The rank that made this report (only rank 0 prints it).
    #[serde(skip)]
    pub rank: usize,
}

enum Source {
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

struct RankResult {
    losses: Vec<f64>,
    step_ms: Vec<f64>,
    step_ms_during_save: Vec<f64>,
    save_ms: Vec<f64>,
    skipped: u64,
    state_bytes: usize,
    comm_table: Option<String>,
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

/// One rank's training loop (any backend).
fn run_rank(
    comm: &dyn Communicator,
    cfg: &ResolvedConfig,
    source: &Source,
    args: &TrainArgs,
    log_every: u64,
) -> Result<RankResult, EngineError> {
    let (shape, ws, rank) = (args.shape, comm.world_size(), comm.rank());
    let mut model = Gpt::new(shape, args.seed, &Device::Cpu)?;
    model.set_threads(kernel_threads(ws));
    if args.dropout > 0.0 {
        // Each rank draws its own masks (its own data), reproducibly.
        model.set_dropout(
            args.dropout,
            args.seed ^ (rank as u64).wrapping_mul(0x9E37_79B9),
        );
    }
    let mut engine = Engine::initialize(cfg, model, comm)?;
    if rank == 0 {
        for n in engine.notes() {
            eprintln!("note: {n}");
        }
        if cfg.json()["dump_state"] == serde_json::Value::Bool(true) {
            eprintln!(
                "dump_state: resolved config {}",
                serde_json::to_string_pretty(cfg.json()).unwrap_or_default()
            );
        }
    }
    let mut csv = if rank == 0 && cfg.csv_monitor.enabled {
        Some(crate::monitor::CsvMonitor::new(
            &cfg.csv_monitor.output_path,
            &cfg.csv_monitor.job_name,
        )?)
    } else {
        None
    };
    if args.ckpt {
        engine.set_checkpoint_policy(ds_ckpt_act::Policy::Every);
    }
    let store = match &args.out {
        Some(dir) => Some(
            ds_checkpoint::FsCheckpointStore::new(dir)
                .map_err(|e| EngineError::Checkpoint(e.to_string()))?,
        ),
        None => None,
    };
    let mut start = 0u64;
    if args.resume {
        let Some(store) = &store else {
            return Err(EngineError::Config(
                "--resume needs --out DIR (where the checkpoints are)".into(),
            ));
        };
        let ckpt = store
            .open(None)
            .map_err(|e| EngineError::Checkpoint(e.to_string()))?;
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
    let micro = engine.micro_batch_size();
    let mut losses = Vec::new();
    let mut step_ms = Vec::new();
    let (mut step_ms_during_save, mut save_ms) = (Vec::new(), Vec::new());
    let (mut f_acc, mut b_acc, mut s_acc) = (0.0, 0.0, 0.0);
    if args.save_interval == Some(0) {
        return Err(EngineError::Config("--save-interval must be >= 1".into()));
    }
    if args.save_interval.is_some() && store.is_none() {
        return Err(EngineError::Config(
            "--save-interval needs --out DIR (where the checkpoints go)".into(),
        ));
    }
    let mut saved_at = None;
    for step in start..start + args.steps {
        let writing = engine.checkpoint_pending();
        let t0 = Instant::now();
        let r = engine.train_batch(|m| source.micro_batch(step, m, rank, ws, micro))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        step_ms.push(ms);
        if writing {
            step_ms_during_save.push(ms);
        }
        if let (Some(k), Some(store)) = (args.save_interval, &store) {
            if engine.global_steps() % k == 0 && step + 1 < start + args.steps {
                let tag = format!("global_step{}", engine.global_steps());
                let t = Instant::now();
                engine.save_checkpoint(store, &tag, cfg.train_batch_size)?;
                save_ms.push(t.elapsed().as_secs_f64() * 1e3);
                saved_at = Some(engine.global_steps());
            }
        }
        losses.push(r.loss);
        if let Some(m) = csv.as_mut() {
            let samples = (step + 1) * cfg.train_batch_size;
            m.write_event("Train/Samples/train_loss", r.loss, samples)?;
            m.write_event("Train/Samples/lr", r.lr, samples)?;
        }
        f_acc += r.fwd_ms;
        b_acc += r.bwd_ms;
        s_acc += r.step_ms;
        if r.step.overflow && rank == 0 {
            eprintln!(
                "[ds] step {}: inf/nan gradients: step skipped (skipped so far: {})",
                step + 1,
                engine.skipped_steps()
            );
        }
        if rank == 0 && log_every > 0 && (step + 1) % log_every == 0 {
            eprintln!(
                "step={}, skipped={}, lr=[{:.6e}], loss={:.4}, grad_norm={:.4}, step_ms={:.1}",
                step + 1,
                engine.skipped_steps(),
                r.lr,
                r.loss,
                r.step.grad_norm,
                step_ms[step_ms.len() - 1]
            );
            if cfg.activation_checkpointing.profile {
                for (i, f, b) in engine.segment_times() {
                    eprintln!("checkpoint profile | block {i} | forward: {f:.2} ms | recompute+backward: {b:.2} ms");
                }
            }
            if cfg.memory_breakdown {
                let gb = |b: Option<u64>| b.unwrap_or(0) as f64 / 1e9;
                eprintln!(
                    "MemAllocated (process RSS)={:.3}GB, MaxMemAllocated (peak RSS)={:.3}GB",
                    gb(ds_profiler::vm_rss_bytes()),
                    gb(ds_profiler::vm_hwm_bytes())
                );
            }
            if cfg.wall_clock_breakdown {
                let k = log_every as f64;
                eprintln!(
                    "time (ms) | fwd: {:.2} | bwd: {:.2} | step: {:.2}",
                    f_acc / k,
                    b_acc / k,
                    s_acc / k
                );
            }
            f_acc = 0.0;
            b_acc = 0.0;
            s_acc = 0.0;
        }
    }
    if let Some(m) = csv.as_mut() {
        m.flush()?;
    }
    if let Some(store) = &store {
        let tag = format!("global_step{}", engine.global_steps());
        if saved_at != Some(engine.global_steps()) {
            let t = Instant::now();
            engine.save_checkpoint(store, &tag, cfg.train_batch_size)?;
            save_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        engine.wait_checkpoint()?;
        if rank == 0 {
            eprintln!("saved checkpoint {}", store.root().join(&tag).display());
        }
    }
    Ok(RankResult {
        losses,
        step_ms,
        step_ms_during_save,
        save_ms,
        skipped: engine.skipped_steps(),
        state_bytes: {
            let m = engine.memory();
            m.params_bytes + m.grads_bytes + m.optimizer_bytes
        },
        comm_table: None,
    })
}

/// Runs the main job; progress goes to stderr (rank 0).
pub fn train(args: &TrainArgs) -> Result<TrainReport, EngineError> {
    if args.world_size == 0 {
        return Err(EngineError::Config("--world-size must be >= 1".into()));
    }
    #[cfg(feature = "mpi")]
    let mpi = if args.backend == "mpi" {
        Some(ds_comm::MpiComm::init(ds_comm::MpiCommOptions::default())?)
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
                "--backend mpi: this `ds` was built without MPI; build it with `cargo build --release -p ds-engine --features mpi` and launch it under `mpirun -np N`".into(),
            ))
        }
        other => {
            return Err(EngineError::Config(format!(
                "--backend {other}: `ds train` runs `local` (ranks as threads) and `mpi` (processes under mpirun); NCCL training is not wired in yet"
            )))
        }
    }
    let cfg = resolve_config(args)?;
    for w in &cfg.warnings {
        eprintln!("warning: {w}");
    }
    let shape = args.shape;
    let (source, entropy) = match &args.data {
        None => {
            let lang = BigramLanguage::new(shape.vocab, args.seed);
            let h = lang.entropy();
            (
                Source::Bigram(DataLoader::new(lang, args.seed, shape.seq)),
                Some(h),
            )
        }
        Some(p) => {
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
            )
        }
    };
    let ws = args.world_size;
    let log_every = cfg.steps_per_print.unwrap_or(0);
    eprintln!(
        "ds train: GPT {} layers x {} hidden ({} params), ZeRO stage {}, world size {ws}, micro-batch {} x {} accumulation, {} steps",
        shape.layers,
        shape.hidden,
        gpt_param_count(&shape),
        cfg.zero_optimization.stage,
        cfg.train_micro_batch_size_per_gpu,
        cfg.gradient_accumulation_steps,
        args.steps
    );
    #[cfg(feature = "mpi")]
    if let Some(comm) = &mpi {
        return train_mpi(comm, &cfg, &source, args, log_every, entropy);
    }
    let comms = LocalComm::create(ws);
    let results: Vec<Result<RankResult, EngineError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let cfg = &cfg;
                let source = &source;
                scope.spawn(move || -> Result<RankResult, EngineError> {
                    if cfg.comms_logger.enabled {
                        let logger = CommsLogger::new(c);
                        let mut r = run_rank(&logger, cfg, source, args, log_every)?;
                        r.comm_table = Some(logger.summary_table());
                        Ok(r)
                    } else {
                        run_rank(&c, cfg, source, args, log_every)
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
    let steps = args.steps as usize;
    let losses: Vec<f64> = (0..steps)
        .map(|i| ranks.iter().map(|r| r.losses[i]).sum::<f64>() / ws as f64)
        .collect();
    Ok(report(
        args,
        &cfg,
        &ranks[0],
        losses,
        ranks.iter().map(|r| r.state_bytes).max().unwrap_or(0),
        ws as u64,
        entropy,
    ))
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
    entropy: Option<f64>,
) -> TrainReport {
    let shape = args.shape;
    let med = |v: &[f64]| {
        let mut t = v.to_vec();
        t.sort_by(f64::total_cmp);
        t.get(t.len() / 2).copied()
    };
    let median = med(&r0.step_ms).unwrap_or(0.0);
    let tokens = cfg.train_batch_size as f64 * shape.seq as f64;
    TrainReport {
        steps: args.steps,
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
        params: gpt_param_count(&shape),
        model_state_bytes_per_rank: state_bytes,
        data_entropy: entropy,
        median_step_ms_during_save: med(&r0.step_ms_during_save),
        median_save_call_ms: med(&r0.save_ms),
        rank: 0,
    }
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
) -> Result<TrainReport, EngineError> {
    let r = run_rank(comm, cfg, source, args, log_every)?;
    let n = r.losses.len();
    let t = candle_core::Tensor::from_vec(r.losses.clone(), n, &Device::Cpu)?;
    let losses = comm
        .all_reduce(&t, ds_comm::ReduceOp::Avg)?
        .to_vec1::<f64>()?;
    let mut rep = report(args, cfg, &r, losses, r.state_bytes, 1, entropy);
    rep.rank = comm.rank();
    Ok(rep)
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
