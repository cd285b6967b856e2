//! The `ds` command. Every subcommand exits 0 on success and 2 on bad input, with the reason
//! on stderr; JSON goes to stdout and nothing else does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: ds_profiler::CountingAlloc = ds_profiler::CountingAlloc::new();

#[derive(Parser)]
#[command(
    name = "ds",
    version,
    about = "A DeepSpeed-class training runtime in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the `train` variant costs nothing worth boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Resolve and validate a DeepSpeed config (JSON or TOML); print it fully resolved as JSON.
    CheckConfig {
        /// The config file (`.toml` is read as TOML, anything else as DeepSpeed JSON).
        file: PathBuf,
        /// Data-parallel world size for the batch-size triangle.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        world_size: u32,
        /// Value for a key written as "auto", e.g. --auto train_micro_batch_size_per_gpu=4
        /// (repeatable).
        #[arg(long = "auto", value_name = "KEY=VALUE")]
        auto: Vec<String>,
        /// Report unknown keys as warnings instead of errors.
        #[arg(long)]
        allow_unknown: bool,
        /// Accepted for uniformity: the output is always JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train the GPT end to end (the main job); with no flags, the embedded default config and data.
    Train {
        /// DeepSpeed config (JSON or TOML); default: the embedded examples/configs/gpt_zero2.json.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data-parallel ranks [default: 2; with --backend mpi the processes mpirun started,
        /// and a different value is refused].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        world_size: Option<u32>,
        /// Collective backend.
        #[arg(long, default_value = "local", value_parser = ["local", "mpi", "nccl"])]
        backend: String,
        /// Seconds one collective of the MPI backend may wait for its peers before the job
        /// ends with an error naming the op and the silent rank(s); 0 waits forever. Default:
        /// $DS_COMM_TIMEOUT, else the config's `comm_timeout`, else 60.
        #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
        comm_timeout: Option<f64>,
        /// Optimizer steps.
        #[arg(long, default_value_t = ds_cli::train::DEFAULT_STEPS)]
        steps: u64,
        /// Training data instead of the embedded task: a nanoGPT directory with train.bin and
        /// val.bin (uint16 little-endian tokens), or any other file as bytes.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Embedded data when no --data is given: `addition` (held-out accuracy reported) or
        /// `bigram` (a synthetic language with a known entropy).
        #[arg(long, value_parser = ["addition", "bigram"])]
        task: Option<String>,
        /// Operand digits of the addition task (1-6).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=6).map(|v| v as usize))]
        digits: usize,
        /// Write the loss curve as a PNG here (default with --out: OUT/loss_curve.png).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Checkpoint directory: a checkpoint is saved there at the end of the run.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Resume from the latest checkpoint in --out (any world size, any ZeRO stage).
        #[arg(long)]
        resume: bool,
        /// Replace a run already in --out (its checkpoints and `latest`); without it, an --out
        /// holding a run is refused unless --resume is given.
        #[arg(long)]
        overwrite: bool,
        /// Keep only the newest N checkpoints in --out, deleting older ones after each save
        /// (overrides the config's `checkpoint.keep_last`).
        #[arg(long)]
        keep_last: Option<u64>,
        /// Held-out sequences evaluated after training (default 128; 0 skips the evaluation,
        /// which gathers the full weights into memory).
        #[arg(long)]
        eval_samples: Option<usize>,
        /// Held-out evaluation every N steps during training (0: only at the end). Default:
        /// at the log lines (`steps_per_print`) at ZeRO stages 0-2, skipped where it would
        /// take evaluation past 10% of the run's time; none during training at ZeRO-3 (there
        /// it gathers the full weights, a collective).
        #[arg(long)]
        eval_interval: Option<u64>,
        /// Also save a checkpoint into --out every N steps (decoupled, i.e. in the background,
        /// with the config's `checkpoint.writer.decoupled: true`).
        #[arg(long)]
        save_interval: Option<u64>,
        /// Seed of initialisation and data.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print DeepSpeed's flops profile of step 2 (module depth 1, no detailed tree).
        #[arg(long)]
        flops_profile: bool,
        /// Where the model runs: cpu, cuda or cuda:N (a CUDA build). Default: cpu, or with
        /// `--backend nccl` the GPU of each process's LOCAL_RANK.
        #[arg(long)]
        device: Option<String>,
        /// Train the GPT on candle autograd (the path every non-CPU device runs) instead of its
        /// explicit CPU kernels: the GPU code path on a machine without a GPU.
        #[arg(long)]
        autograd: bool,
        #[command(flatten)]
        model: ModelFlags,
        /// Print one JSON document with the results.
        #[arg(long)]
        json: bool,
    },
    /// The flops profile of the model's forward pass (DeepSpeed's report, or JSON).
    Profile {
        /// DeepSpeed config whose `flops_profiler` section sets depth, top modules, detail and
        /// output file.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        model: ModelFlags,
        /// Print one JSON document (`flops`, `macs`, `params`, `fwd_latency_ms`, `modules`).
        #[arg(long)]
        json: bool,
    },
    /// Full weights from a sharded checkpoint as one safetensors file (DeepSpeed's zero_to_fp32);
    /// the checkpoint (manifest, headers, every byte) is verified first.
    Consolidate {
        /// The checkpoint directory (holding `latest` and the tags).
        ckpt_dir: PathBuf,
        /// The safetensors file to write.
        out: PathBuf,
        /// Tag to read (default: `latest`).
        #[arg(long)]
        tag: Option<String>,
        /// Output dtype.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
        dtype: String,
    },
    /// ZeRO model-state memory per rank (parameters, gradients, optimizer state).
    EstimateMemory {
        /// Number of model parameters (5e8-style accepted).
        #[arg(long, value_parser = parse_count)]
        params: u64,
        /// Data-parallel ranks.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        world_size: u64,
        /// ZeRO stage 0-3.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
        stage: u8,
        /// `mixed` (16-bit model, fp32 master and Adam state) or `fp32`.
        #[arg(long, default_value = "mixed", value_parser = ["mixed", "fp32"])]
        precision: String,
        /// Where the master weights and optimizer state live (`zero_optimization.
        /// offload_optimizer.device`): `nvme` puts them in swap files.
        #[arg(long, default_value = "none", value_parser = ["none", "cpu", "nvme"])]
        offload_optimizer: String,
        /// Where the stage-3 parameters live (`offload_param.device`).
        #[arg(long, default_value = "none", value_parser = ["none", "cpu", "nvme"])]
        offload_param: String,
        /// Parameter elements kept in memory with `--offload-param nvme` (`max_in_cpu`).
        #[arg(long, default_value = "1e9", value_parser = parse_count)]
        max_in_cpu: u64,
        /// Micro-batches per optimizer step (swapped parameters are read twice per
        /// micro-batch).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        gradient_accumulation_steps: u64,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Overlay the loss curves of several runs in one picture (PNG, and an SVG beside it) from
    /// their CSV monitors (the config's `csv_monitor`), to compare runs without TensorBoard.
    Plot {
        /// csv_monitor folders (`<output_path>/<job_name>`, holding Train_Samples_train_loss.csv),
        /// or folders holding such folders (each one a run, named after its folder).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// The PNG to write; the SVG goes beside it (same name, .svg).
        #[arg(long, short, default_value = "loss_curves.png")]
        out: PathBuf,
        /// The picture's title (default: the runs' names).
        #[arg(long)]
        title: Option<String>,
        /// Trained samples on the x axis instead of optimizer steps (compares runs of different
        /// batch sizes).
        #[arg(long)]
        samples: bool,
        /// EMA smoothing weight of the train loss in [0, 1) (TensorBoard's slider; default 0.6
        /// up to 625 steps, then a window of about steps/250 points).
        #[arg(long, value_parser = parse_smoothing)]
        smoothing: Option<f64>,
    },
    /// Component benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// Model flags shared by train, profile and the benches.
#[derive(clap::Args, Debug, Clone)]
struct ModelFlags {
    /// Model family: `gpt`, or `mlp` (`ds train` only: a token-wise MLP trained by candle
    /// autograd; --layers and --hidden apply, --heads does not).
    #[arg(long, default_value = "gpt", value_parser = ["gpt", "mlp"])]
    model: String,
    /// Transformer blocks.
    #[arg(long, default_value_t = ds_cli::train::DEFAULT_SHAPE.layers)]
    layers: usize,
    /// Hidden width.
    #[arg(long, default_value_t = ds_cli::train::DEFAULT_SHAPE.hidden, value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    hidden: usize,
    /// Attention heads (must divide --hidden).
    #[arg(long, default_value_t = ds_cli::train::DEFAULT_SHAPE.heads, value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    heads: usize,
    /// Sequence length.
    #[arg(long, default_value_t = ds_cli::train::DEFAULT_SHAPE.seq, value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    seq: usize,
    /// Micro-batch per rank (overrides the config's batch keys, keeping its accumulation).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    batch: Option<usize>,
    /// Checkpoint every block's activations (recompute in backward).
    #[arg(long)]
    ckpt: bool,
    /// Residual dropout probability in [0, 1) (masks reproducible from the seed and step).
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Vocabulary size.
    #[arg(long, default_value_t = ds_cli::train::DEFAULT_SHAPE.vocab, value_parser = clap::value_parser!(u64).range(2..).map(|v| v as usize))]
    vocab: usize,
}

/// `--smoothing`: a weight in [0, 1).
fn parse_smoothing(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if (0.0..1.0).contains(&w) => Ok(w),
        _ => Err(format!("{s} is not a smoothing weight in [0, 1)")),
    }
}

/// Where `ds train` with no arguments writes its checkpoint and loss curve.
const DEMO_OUT: &str = "ds-train-out";

#[derive(Subcommand)]
enum BenchCommand {
    /// The matrix products of a GPT step on every GEMM backend at hand (the `gemm` crate and
    /// CBLAS libraries loaded at run time), side by side, and the machine's measured f32
    /// matrix peak. Defaults: the GPT-2-small shape (hidden 768, 12 layers, vocab 50304,
    /// 4 x 256 tokens).
    Gemm {
        /// Hidden width.
        #[arg(long, default_value_t = 768)]
        hidden: usize,
        /// MLP width (default 4 x hidden).
        #[arg(long)]
        ff: Option<usize>,
        /// Vocabulary (the tied head's width).
        #[arg(long, default_value_t = 50304)]
        vocab: usize,
        /// Tokens per micro-batch (batch x sequence).
        #[arg(long, default_value_t = 1024)]
        rows: usize,
        /// Transformer blocks (how often a block's products run per micro-batch).
        #[arg(long, default_value_t = 12)]
        layers: usize,
        /// Threads (default: the machine's cores): the `gemm` crate's, and the bands each
        /// library product is split into (the libraries run single-threaded in each, as
        /// under `DS_BLAS`).
        #[arg(long)]
        threads: Option<usize>,
        /// A CBLAS library to compare, NAME=PATH (repeatable), e.g.
        /// `mkl=/opt/mkl/lib/libmkl_rt.so.3`, `blis=/usr/lib/x86_64-linux-gnu/libblis.so.4`.
        #[arg(long)]
        blas: Vec<String>,
        /// Seconds of timed calls per product and backend (at least 3 calls).
        #[arg(long, default_value_t = 0.3)]
        min_secs: f64,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Activation checkpointing: peak memory and step time with and without it.
    CkptAct {
        /// Transformer blocks.
        #[arg(long, default_value_t = 8)]
        layers: usize,
        /// Hidden width.
        #[arg(long, default_value_t = 256)]
        hidden: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Sequence length.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Vocabulary.
        #[arg(long, default_value_t = 8192)]
        vocab: usize,
        /// Timed passes per policy (median reported).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Collective bandwidth (nccl-tests style), with this machine's memcpy bandwidth measured in
    /// the same run.
    Comm {
        /// `local` (ranks as threads), `mpi` (run under mpirun; needs the `mpi` feature) or `nccl`
        /// (GPUs, device buffers; a CUDA build, one process per GPU).
        #[arg(long, default_value = "local")]
        backend: String,
        /// Ranks of the local backend.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
        world_size: u32,
        /// One op (default: all_reduce, reduce_scatter and all_gather).
        #[arg(long)]
        op: Option<String>,
        /// Buffer sizes, e.g. 1M,16M,64M (K/M/G = powers of 1024).
        #[arg(long, default_value = "1M,16M,64M")]
        sizes: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The GPT's explicit kernels one by one (forward and backward): GFLOP/s against this
    /// machine's matrix-product peak, GB/s against its memcpy bandwidth, measured in one run.
    Kernels {
        /// Hidden width.
        #[arg(long, default_value_t = 256)]
        hidden: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Sequence length.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Vocabulary.
        #[arg(long, default_value_t = 8192)]
        vocab: usize,
        /// Threads (default: the machine's cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Timed calls per kernel (median reported).
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Fused AdamW throughput against this machine's memory bandwidth.
    /// ZeRO-Infinity's swap pipeline: the NVMe-offloaded AdamW step against the disk's own
    /// direct-I/O read and write bandwidth and the in-memory update, in one run.
    Offload {
        /// Directory for the swap files (a local disk).
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        path: PathBuf,
        /// Elements of the swapped part (12 bytes each on disk; 5e8-style accepted).
        #[arg(long, default_value = "64M", value_parser = parse_count)]
        numel: u64,
        /// Elements per swapped chunk.
        #[arg(long, default_value = "16M", value_parser = parse_count)]
        chunk: u64,
        /// Chunk buffers in flight (`offload_optimizer.buffer_count`).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
        buffer_count: u64,
        /// I/O threads (`aio.thread_count`).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
        thread_count: u64,
        /// Bytes per request (`aio.block_size`).
        #[arg(long, default_value = "1M", value_parser = parse_count)]
        block_size: u64,
        /// Requests queued (`aio.queue_depth`).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
        queue_depth: u64,
        /// Timed steps (median reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    Adamw {
        /// Elements (5e8-style accepted).
        #[arg(long, default_value = "100000000", value_parser = parse_count)]
        numel: u64,
        /// Timed steps (median reported).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Parses a count written as `100000000`, `1e8` or `100M`.
fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1e3),
        Some('M' | 'm') => (&t[..t.len() - 1], 1e6),
        Some('B' | 'b' | 'G' | 'g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a count (e.g. 100000000, 1e8, 100M)"))?;
    let v = x * mult;
    if !(v.is_finite() && v >= 1.0 && v.fract() == 0.0 && v < 1.8e19) {
        return Err(format!("`{s}` must be a whole number >= 1"));
    }
    Ok(v as u64)
}

fn print_json(v: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot print JSON: {e}");
            ExitCode::from(2)
        }
    }
}

fn gib(b: u64) -> String {
    format!("{:.3} GiB", b as f64 / (1u64 << 30) as f64)
}

fn main() -> ExitCode {
    // candle's elementwise thread pool spin-waits at a barrier; beside the rayon pool that runs
    // the matrix products and this workspace's fused kernels, on few cores it burns most of
    // the step (measured: 1.44 s -> 0.67 s per reference GPT step, BENCHMARKS.md). One candle
    // thread for elementwise ops, unless the user chose otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::CheckConfig {
            file,
            world_size,
            auto,
            allow_unknown,
            json: _,
        } => match ds_engine::cli::check_config(&file, world_size as usize, &auto, allow_unknown) {
            Ok(out) => {
                for w in &out.warnings {
                    eprintln!("warning: {w}");
                }
                match serde_json::to_string_pretty(&out.resolved) {
                    Ok(s) => {
                        println!("{s}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: cannot print the resolved config: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::Train {
            config,
            world_size,
            backend,
            comm_timeout,
            steps,
            data,
            task,
            digits,
            plot,
            out,
            resume,
            overwrite,
            keep_last,
            save_interval,
            seed,
            flops_profile,
            device,
            autograd,
            eval_samples,
            eval_interval,
            mut model,
            json,
        } => {
            // `ds train` with no arguments at all is the demonstration run: activation
            // checkpointing, the flops profile printed once, a checkpoint and the loss-curve PNG
            // in ./ds-train-out.
            let demo = std::env::args_os().count() == 2;
            let out = out.or_else(|| demo.then(|| PathBuf::from(DEMO_OUT)));
            // The demonstration run replaces its own earlier output.
            let overwrite = overwrite || demo;
            let flops_profile = flops_profile || demo;
            model.ckpt |= demo;
            if data.is_some() && task.is_some() {
                eprintln!(
                    "error: --task picks the embedded data; it cannot be combined with --data"
                );
                return ExitCode::from(2);
            }
            if resume && out.is_none() {
                eprintln!("error: --resume needs --out DIR (the checkpoint directory)");
                return ExitCode::from(2);
            }
            if !(0.0..1.0).contains(&model.dropout) {
                eprintln!("error: --dropout {} must be in [0, 1)", model.dropout);
                return ExitCode::from(2);
            }
            if model.hidden % model.heads != 0 {
                eprintln!(
                    "error: --hidden {} must be a multiple of --heads {}",
                    model.hidden, model.heads
                );
                return ExitCode::from(2);
            }
            let is_mlp = model.model == "mlp";
            let shape = ds_models::gpt::ModelShape {
                layers: model.layers,
                hidden: model.hidden,
                heads: model.heads,
                seq: model.seq,
                vocab: model.vocab,
            };
            let device = device
                .unwrap_or_else(|| if backend == "nccl" { "cuda" } else { "cpu" }.to_string());
            let args = ds_cli::train::TrainArgs {
                model: if model.model == "mlp" {
                    ds_cli::train::ModelKind::Mlp
                } else {
                    ds_cli::train::ModelKind::Gpt
                },
                task: match task.as_deref() {
                    Some("bigram") => ds_cli::train::Task::Bigram,
                    _ => ds_cli::train::Task::Addition { digits },
                },
                progress: !json,
                plot,
                config,
                world_size: world_size.unwrap_or(2) as usize,
                world_size_given: world_size.is_some(),
                comm_timeout,
                backend,
                steps,
                data,
                seed,
                shape: ds_models::gpt::ModelShape {
                    layers: model.layers,
                    hidden: model.hidden,
                    heads: model.heads,
                    seq: model.seq,
                    vocab: model.vocab,
                },
                batch: model.batch,
                ckpt: model.ckpt,
                dropout: model.dropout,
                out,
                resume,
                overwrite,
                keep_last,
                flops_profile,
                save_interval,
                device,
                autograd,
                eval_samples,
                eval_interval,
            };
            match ds_cli::train::train(&args) {
                // Under mpirun every process trains; rank 0 reports.
                Ok(r) if r.rank != 0 => ExitCode::SUCCESS,
                Ok(r) if json => print_json(&r),
                Ok(r) => {
                    println!(
                        "trained {} steps: final loss {:.4}{}, median step {:.1} ms, {:.0} tokens/s, {} skipped, peak {:.1} MiB per rank",
                        r.steps,
                        r.final_loss,
                        r.data_entropy.map(|h| format!(" (loss floor {h:.4})")).unwrap_or_default(),
                        r.median_step_ms,
                        r.tokens_per_s,
                        r.skipped_steps,
                        r.peak_bytes_per_rank as f64 / (1u64 << 20) as f64
                    );
                    if let Some(sw) = r.swap {
                        let hidden = if sw.param_read_s > 0.0 {
                            format!(
                                "; parameter reads {:.1} s, {:.0}% hidden behind compute",
                                sw.param_read_s,
                                100.0 * (1.0 - sw.param_wait_s / sw.param_read_s).clamp(0.0, 1.0)
                            )
                        } else {
                            String::new()
                        };
                        println!(
                            "swap (rank 0): read {:.2} GB, wrote {:.2} GB; optimizer steps {:.1} s, of which I/O not hidden behind the update {:.1} s{hidden}",
                            sw.bytes_read as f64 / 1e9,
                            sw.bytes_written as f64 / 1e9,
                            sw.step_s,
                            sw.step_io_wait_s
                        );
                    }
                    if let Some(l) = r.val_loss {
                        print!("held-out ({}): loss {l:.4}", r.task);
                        if let (Some(a), Some(n)) = (r.val_accuracy, r.val_problems) {
                            print!(", exact-match accuracy {:.1}% of {n} problems", 100.0 * a);
                        }
                        println!();
                    }
                    if !is_mlp {
                        // Model FLOPs (DeepSpeed's matmul count: 3 x forward per token, the
                        // recompute of checkpointed blocks excluded), per rank.
                        let (l, c, v, t) = (
                            shape.layers as f64,
                            shape.hidden as f64,
                            shape.vocab as f64,
                            shape.seq as f64,
                        );
                        let fwd_per_token = 2.0 * (12.0 * l * c * c + v * c) + 4.0 * l * t * c;
                        println!(
                            "achieved {:.1} GFLOP/s per rank (model FLOPs: 3 x {:.2} MFLOP forward per token)",
                            3.0 * fwd_per_token * r.tokens_per_s / r.world_size.max(1) as f64 / 1e9,
                            fwd_per_token / 1e6
                        );
                    }
                    if let Some(p) = &r.checkpoint_dir {
                        println!("checkpoint: {p} (ds consolidate {p} weights.safetensors)");
                    }
                    if let Some(p) = &r.loss_curve_png {
                        println!("loss curve: {p}");
                    }
                    if let Some(p) = &r.tensorboard_file {
                        println!("tensorboard events: {p}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Profile {
            config,
            model,
            json,
        } => {
            if model.model != "gpt" {
                eprintln!(
                    "error: --model {}: `ds profile` profiles the GPT only",
                    model.model
                );
                return ExitCode::from(2);
            }
            if model.heads == 0 || model.hidden % model.heads != 0 {
                eprintln!(
                    "error: --hidden {} must be a multiple of --heads {}",
                    model.hidden, model.heads
                );
                return ExitCode::from(2);
            }
            let shape = ds_models::gpt::ModelShape {
                layers: model.layers,
                hidden: model.hidden,
                heads: model.heads,
                seq: model.seq,
                vocab: model.vocab,
            };
            match ds_cli::train::profile(config.as_deref(), shape, model.batch.unwrap_or(8)) {
                Ok((report, _)) if !json => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Ok((_, profile)) => print_json(&profile),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Consolidate {
            ckpt_dir,
            out,
            tag,
            dtype,
        } => {
            let dt = match dtype.as_str() {
                "bf16" => ds_checkpoint::Dtype::BF16,
                "f16" => ds_checkpoint::Dtype::F16,
                _ => ds_checkpoint::Dtype::F32,
            };
            let result = ds_checkpoint::FsCheckpointStore::new(&ckpt_dir)
                .and_then(|s| s.open(tag.as_deref()))
                .and_then(|c| {
                    if c.manifest_checksum().is_none() {
                        eprintln!(
                            "warning: {} has no manifest checksum (format version {}, written before version 3): its content is checked for consistency only",
                            c.dir().join(ds_checkpoint::MANIFEST_FILE).display(),
                            c.manifest().format_version
                        );
                    }
                    // Every file is verified whole before anything is written.
                    ds_checkpoint::consolidate(&c, &out, dt).map(|_| c)
                });
            match result {
                Ok(c) => {
                    eprintln!(
                        "wrote {} ({} parameters from tag {}, {dtype})",
                        out.display(),
                        c.meta().params.len(),
                        c.tag()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::EstimateMemory {
            params,
            world_size,
            stage,
            precision,
            offload_optimizer,
            offload_param,
            max_in_cpu,
            gradient_accumulation_steps,
            json,
        } => {
            let prec = if precision == "fp32" {
                ds_zero::estimate::Precision::Fp32
            } else {
                ds_zero::estimate::Precision::Mixed
            };
            let mb = if precision == "fp32" { 4 } else { 2 };
            // Adam: 8 bytes of fp32 state per parameter.
            let placed =
                ds_zero::estimate::estimate(params, world_size, stage, prec, 8).and_then(|e| {
                    let p = ds_zero::estimate::place(
                        &e,
                        stage,
                        offload_optimizer == "nvme",
                        offload_param == "nvme",
                        max_in_cpu,
                        gradient_accumulation_steps,
                        mb,
                    )?;
                    Ok((e, p))
                });
            match placed {
                Ok((e, p)) if json => {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    if let (Some(o), Ok(serde_json::Value::Object(pv))) =
                        (v.as_object_mut(), serde_json::to_value(p))
                    {
                        o.extend(pv);
                    }
                    print_json(&v)
                }
                Ok((e, p)) => {
                    println!(
                        "ZeRO stage {stage}, {params} params, world size {world_size}, {precision} precision (Adam)"
                    );
                    println!("  params:    {}", gib(e.params_bytes));
                    println!("  grads:     {}", gib(e.grads_bytes));
                    println!("  optimizer: {}", gib(e.optimizer_bytes));
                    println!("  per rank:  {}", gib(e.per_rank_bytes));
                    if p.disk_bytes > 0 || offload_optimizer == "nvme" || offload_param == "nvme" {
                        println!(
                            "  placement (optimizer {offload_optimizer}, parameters {offload_param}):"
                        );
                        println!("    in memory:        {}", gib(p.memory_bytes));
                        println!("    on disk:          {}", gib(p.disk_bytes));
                        println!(
                            "    disk per step:    read {}, write {}",
                            gib(p.disk_read_bytes_per_step),
                            gib(p.disk_write_bytes_per_step)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Plot {
            dirs,
            out,
            title,
            samples,
            smoothing,
        } => {
            let result = ds_engine::plot::load_csv_runs(&dirs, !samples).and_then(|runs| {
                let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
                let mut opts = ds_engine::plot::PlotOptions::titled(
                    &title.unwrap_or_else(|| format!("loss: {}", names.join(" vs "))),
                );
                opts.smoothing = smoothing;
                if samples {
                    opts.x_label = "samples".into();
                }
                ds_engine::plot::write_pictures(&out, &runs, &opts).map(|svg| (runs.len(), svg))
            });
            match result {
                Ok((n, svg)) => {
                    let runs = if n == 1 { "run" } else { "runs" };
                    eprintln!("wrote {} and {} ({n} {runs})", out.display(), svg.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Bench { what } => match what {
            BenchCommand::CkptAct {
                layers,
                hidden,
                heads,
                seq,
                batch,
                vocab,
                steps,
                json,
            } => {
                if heads == 0
                    || hidden % heads != 0
                    || layers == 0
                    || seq == 0
                    || batch == 0
                    || vocab < 2
                {
                    eprintln!("error: need --layers, --seq, --batch >= 1, --vocab >= 2 and --hidden a multiple of --heads");
                    return ExitCode::from(2);
                }
                let shape = ds_models::gpt::ModelShape {
                    layers,
                    hidden,
                    heads,
                    seq,
                    vocab,
                };
                eprintln!(
                    "bench ckpt-act: GPT {layers} layers x {hidden}, seq {seq}, batch {batch} ..."
                );
                match ds_cli::bench::ckpt_act_bench(
                    shape,
                    batch,
                    steps,
                    || ALLOC.current(),
                    || ALLOC.peak(),
                    || ALLOC.reset_peak(),
                ) {
                    Ok(r) if json => print_json(&r),
                    Ok(r) => {
                        println!(
                            "without checkpointing: peak {:.1} MiB, {:.1} ms; every block checkpointed: peak {:.1} MiB, {:.1} ms (memory / {:.2}, time x {:.2})",
                            r.peak_bytes_without as f64 / 1048576.0,
                            r.step_ms_without,
                            r.peak_bytes_with as f64 / 1048576.0,
                            r.step_ms_with,
                            r.memory_ratio,
                            r.time_ratio
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            BenchCommand::Comm {
                backend,
                world_size,
                op,
                sizes,
                json,
            } => {
                let opts = (|| -> Result<ds_comm::bench::CommBenchOptions, ds_comm::CommError> {
                    let mut o = ds_comm::bench::CommBenchOptions {
                        backend: ds_comm::bench::BenchBackend::parse(&backend)?,
                        world_size: world_size as usize,
                        sizes: ds_comm::bench::parse_sizes(&sizes)?,
                        ..Default::default()
                    };
                    if let Some(op) = &op {
                        o.ops = vec![ds_comm::bench::BenchOp::parse(op)?];
                    }
                    Ok(o)
                })();
                let opts = match opts {
                    Ok(o) => o,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                };
                match ds_comm::bench::run_comm_bench(&opts) {
                    Ok(r) if r.rank != 0 => ExitCode::SUCCESS,
                    Ok(r) if json => print_json(&r),
                    Ok(r) => {
                        println!("{}", r.to_table());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            BenchCommand::Gemm {
                hidden,
                ff,
                vocab,
                rows,
                layers,
                threads,
                blas,
                min_secs,
                json,
            } => {
                if hidden == 0 || vocab == 0 || rows == 0 || layers == 0 || ff == Some(0) {
                    eprintln!(
                        "error: --hidden, --ff, --vocab, --rows and --layers must be positive"
                    );
                    return ExitCode::from(2);
                }
                if !(min_secs.is_finite() && min_secs >= 0.0) {
                    eprintln!("error: --min-secs must be a non-negative number of seconds");
                    return ExitCode::from(2);
                }
                let mut libs = Vec::new();
                for spec in &blas {
                    let Some((name, path)) = spec.split_once('=') else {
                        eprintln!("error: --blas {spec}: expected NAME=PATH, e.g. mkl=/opt/mkl/lib/libmkl_rt.so.3");
                        return ExitCode::from(2);
                    };
                    match ds_cli::gemm::Cblas::load(name, path) {
                        Ok(l) => libs.push(l),
                        Err(e) => {
                            eprintln!("error: {e}");
                            return ExitCode::from(2);
                        }
                    }
                }
                let threads = threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                let shapes =
                    ds_cli::gemm::gpt_shapes(hidden, ff.unwrap_or(4 * hidden), vocab, rows, layers);
                match ds_cli::gemm::gemm_bench(&shapes, threads, &libs, min_secs) {
                    Ok(r) if json => print_json(&r),
                    Ok(r) => {
                        let names: Vec<String> = std::iter::once("gemm-crate".to_string())
                            .chain(libs.iter().map(|l| l.name().to_string()))
                            .collect();
                        println!("GEMM backends, f32, GFLOP/s at the best of repeated calls ({} threads: the gemm crate's own; each library single-threaded in as many bands)", r.threads);
                        for (n, p) in &r.libraries {
                            println!("  {n}: {p}");
                        }
                        print!("{:<22} {:>22} {:>4}", "product", "m x k x n", "");
                        for n in &names {
                            print!(" {n:>12}");
                        }
                        println!("  fastest");
                        for sr in &r.shapes {
                            let s = &sr.shape;
                            print!(
                                "{:<22} {:>22} {:>4}",
                                s.name,
                                format!("{} x {} x {}", s.m, s.k, s.n),
                                format!("{:?}", s.layout)
                            );
                            for t in &sr.timings {
                                print!(" {:>12.1}", t.gflops);
                            }
                            println!("  {}", sr.fastest);
                        }
                        for t in &r.totals {
                            println!(
                                "step total {:<20} {:>10.1} ms  {:>8.1} GFLOP/s",
                                t.backend, t.step_ms, t.gflops
                            );
                        }
                        println!(
                            "step total {:<20} {:>10.1} ms  {:>8.1} GFLOP/s",
                            r.best_per_shape.backend,
                            r.best_per_shape.step_ms,
                            r.best_per_shape.gflops
                        );
                        println!(
                            "measured f32 matrix peak: {:.1} GFLOP/s ({})",
                            r.peak_gflops, r.peak_at
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            BenchCommand::Kernels {
                hidden,
                heads,
                seq,
                batch,
                vocab,
                threads,
                reps,
                json,
            } => {
                if heads == 0
                    || hidden == 0
                    || hidden % heads != 0
                    || seq == 0
                    || batch == 0
                    || vocab == 0
                {
                    eprintln!("error: --hidden must be a positive multiple of --heads, and --seq, --batch, --vocab positive");
                    return ExitCode::from(2);
                }
                let shape = ds_models::gpt::ModelShape {
                    layers: 1,
                    hidden,
                    heads,
                    seq,
                    vocab,
                };
                let threads = threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                match ds_models::blas::init() {
                    Ok(Some(b)) => eprintln!(
                        "note: {}={}: the large products run on it",
                        ds_models::blas::ENV,
                        b.path()
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                }
                match ds_cli::bench::kernels_bench(shape, batch, threads, reps) {
                    Ok(r) if json => print_json(&r),
                    Ok(r) => {
                        println!(
                            "explicit kernels, {} threads: matmul peak {:.1} GFLOP/s (best GPT-2-small block product), memcpy {:.1} GB/s (read + write)",
                            r.threads, r.matmul_peak_gflops, r.memcpy_gbps
                        );
                        let m = &r.bf16;
                        match m.bf16_gflops {
                            Some(g) => println!(
                                "matmul {}: f32 {:.1} GFLOP/s, bf16 {g:.1} GFLOP/s ({}, f32 sums)",
                                m.shape, m.f32_gflops, m.units
                            ),
                            None => println!(
                                "matmul {}: f32 {:.1} GFLOP/s; bf16 not timed: no AVX-512 BF16 units in use (units: {})",
                                m.shape, m.f32_gflops, m.units
                            ),
                        }
                        println!(
                            "{:<34} {:<36} {:>9} {:>12} {:>9}",
                            "kernel", "shape", "ms", "rate", "fraction"
                        );
                        for k in &r.results {
                            let rate = match (k.gflops, k.gbps) {
                                (Some(g), _) => format!("{g:.1} GFLOP/s"),
                                (_, Some(g)) => format!("{g:.1} GB/s"),
                                _ => String::new(),
                            };
                            println!(
                                "{:<34} {:<36} {:>9.3} {:>12} {:>9.2}",
                                k.kernel, k.shape, k.ms, rate, k.fraction
                            );
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            BenchCommand::Offload {
                path,
                numel,
                chunk,
                buffer_count,
                thread_count,
                block_size,
                queue_depth,
                steps,
                json,
            } => {
                let us = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
                let need = 12 * numel + 12 * numel.div_ceil(2 << 20) * (8 << 20) / 12;
                match ds_zero::swap::free_disk_bytes(&path) {
                    Ok(free) if free < need.saturating_mul(2) => {
                        eprintln!(
                            "error: --numel {numel} needs about {} bytes of swap files and as much for the disk probe under {}, which has {free} free; lower --numel",
                            need,
                            path.display()
                        );
                        return ExitCode::from(2);
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                    _ => {}
                }
                let nvme = ds_zero::NvmeOptions {
                    buffer_count: us(buffer_count),
                    chunk_elems: us(chunk),
                    pipeline_read: true,
                    pipeline_write: true,
                    aio: ds_zero::swap::AioOptions {
                        block_size: us(block_size),
                        queue_depth: us(queue_depth),
                        thread_count: us(thread_count),
                        single_submit: false,
                        direct: true,
                    },
                    ..Default::default()
                };
                eprintln!(
                    "bench offload: {numel} elements ({:.2} GB each way per step) under {} ...",
                    12.0 * numel as f64 / 1e9,
                    path.display()
                );
                match ds_zero::bench::offload_bench(&path, us(numel), us(steps), nvme) {
                    Ok(r) if json => print_json(&r),
                    Ok(r) => {
                        println!(
                            "NVMe-offloaded AdamW step: {:.2} s for {:.2} GB read + {:.2} GB written = {:.2} GB/s (I/O wait {:.2} s; in-memory update {:.3} s)",
                            r.step_s,
                            r.step_bytes_each_way as f64 / 1e9,
                            r.step_bytes_each_way as f64 / 1e9,
                            r.swap_gbps,
                            r.step_io_wait_s,
                            r.update_only_s
                        );
                        println!(
                            "disk (direct I/O {}): write {:.2} GB/s, read {:.2} GB/s; the step reaches {:.2} of the disk's read+write bandwidth",
                            r.direct, r.disk_write_gbps, r.disk_read_gbps, r.disk_fraction
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            BenchCommand::Adamw { numel, steps, json } => {
                let numel = match usize::try_from(numel) {
                    Ok(n) => n,
                    Err(_) => {
                        eprintln!(
                            "error: --numel {numel} does not fit this machine's address space"
                        );
                        return ExitCode::from(2);
                    }
                };
                eprintln!("bench adamw: {numel} elements, {steps} timed steps ...");
                match ds_zero::bench::adamw_bench(numel, steps as usize) {
                    Ok(r) if json => print_json(&r),
                    Ok(r) => {
                        println!(
                            "fused AdamW: {:.2} ms/step, {:.1} GB/s; machine read-modify-write {:.1} GB/s; fraction {:.2} ({} threads)",
                            r.ms_per_step, r.gbps, r.machine_gbps, r.bandwidth_fraction, r.threads
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
        },
    }
}
