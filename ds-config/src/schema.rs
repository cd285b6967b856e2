//! The declarative schema: every section and key DeepSpeed documents, with its type, its
//! default (DeepSpeed's code default, see `reference/deepspeed.md` §1) and its range.

/// The type and range of one key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    Bool,
    /// An integer in `min..=max`; `5e8`, `5.0e8` and `"5e8"` are accepted when integral.
    Int {
        min: i64,
        max: i64,
    },
    /// A finite float `>= min` (or `> min` when `exclusive`), `<= max`.
    Float {
        min: f64,
        exclusive: bool,
        max: f64,
    },
    Str,
    /// One of the listed strings (exact).
    Enum(&'static [&'static str]),
    /// One of the listed strings, compared case-insensitively; output in the listed spelling.
    EnumCi(&'static [&'static str]),
    /// A nested section.
    Obj(&'static [F]),
    /// A list of strings.
    StrList,
    /// A list of two floats in `[0, 1)` (Adam's betas).
    Betas,
    /// Any JSON value (free-form blocks this runtime passes through unvalidated).
    Any,
}

/// A key's default.
#[derive(Debug, Clone, Copy)]
pub(crate) enum D {
    Null,
    B(bool),
    I(i64),
    F(f64),
    S(&'static str),
    Betas(f64, f64),
    EmptyList,
    /// The nested section with all its defaults.
    Obj,
    /// No default: must be given.
    Required,
}

/// One key of a section.
#[derive(Debug, Clone, Copy)]
pub(crate) struct F {
    pub key: &'static str,
    pub ty: Ty,
    pub def: D,
    /// `null` is an allowed value.
    pub nullable: bool,
}

const IMAX: i64 = i64::MAX;

pub(crate) const fn int(min: i64) -> Ty {
    Ty::Int { min, max: IMAX }
}
pub(crate) const fn float(min: f64) -> Ty {
    Ty::Float {
        min,
        exclusive: false,
        max: f64::INFINITY,
    }
}
pub(crate) const fn pos_float() -> Ty {
    Ty::Float {
        min: 0.0,
        exclusive: true,
        max: f64::INFINITY,
    }
}
pub(crate) const fn unit() -> Ty {
    Ty::Float {
        min: 0.0,
        exclusive: false,
        max: 1.0,
    }
}
pub(crate) const fn f(key: &'static str, ty: Ty, def: D) -> F {
    F {
        key,
        ty,
        def,
        nullable: false,
    }
}
pub(crate) const fn n(key: &'static str, ty: Ty, def: D) -> F {
    F {
        key,
        ty,
        def,
        nullable: true,
    }
}

use Ty::{Bool, Str};
use D::*;

/// Top-level scalar keys (sections and the batch keys are handled by the resolver).
pub(crate) static TOP_SCALARS: &[F] = &[
    f("managed_gradient_accumulation", Bool, B(true)),
    f("gradient_clipping", float(0.0), F(1.0)),
    f("zero_allow_untested_optimizer", Bool, B(false)),
    f("zero_force_ds_cpu_optimizer", Bool, B(true)),
    n(
        "communication_data_type",
        Ty::Enum(&["fp16", "bf16", "fp32"]),
        Null,
    ),
    f(
        "gradient_allreduce_op",
        Ty::Enum(&["mean", "sum"]),
        S("mean"),
    ),
    f("prescale_gradients", Bool, B(false)),
    f("gradient_predivide_factor", pos_float(), F(1.0)),
    f("sparse_gradients", Bool, B(false)),
    // DeepSpeed's code default is now None (no progress lines, which hides skipped steps,
    // DeepSpeed issue #8415); its docs still say 10. We follow the docs: progress is shown.
    n("steps_per_print", int(1), I(10)),
    f("wall_clock_breakdown", Bool, B(false)),
    f("memory_breakdown", Bool, B(false)),
    f("dump_state", Bool, B(false)),
    f("dataloader_drop_last", Bool, B(false)),
    f("sequence_parallel_size", int(1), I(1)),
    // This runtime's extension (DeepSpeed has no such key): the deadline in seconds of one
    // collective or point-to-point call of the MPI backend; a stalled or dead peer ends the job
    // with an error naming the op and the silent rank(s) instead of a hang. 0 = wait forever
    // (blocking MPI calls). Overridden by DS_COMM_TIMEOUT and `ds train --comm-timeout`.
    f(
        "comm_timeout",
        Ty::Float {
            min: 0.0,
            exclusive: false,
            max: MAX_COMM_TIMEOUT_S,
        },
        F(60.0),
    ),
];

/// The largest `comm_timeout` accepted: one week, in seconds.
pub const MAX_COMM_TIMEOUT_S: f64 = 604_800.0;

pub(crate) static FP16: &[F] = &[
    f("enabled", Bool, B(false)),
    f("auto_cast", Bool, B(false)),
    f("loss_scale", float(0.0), F(0.0)),
    f("initial_scale_power", Ty::Int { min: 0, max: 127 }, I(16)),
    f("loss_scale_window", int(1), I(1000)),
    f("hysteresis", int(1), I(2)),
    f("consecutive_hysteresis", Bool, B(false)),
    f("min_loss_scale", float(0.0), F(1.0)),
    f("fp16_master_weights_and_grads", Bool, B(false)),
];

pub(crate) static BF16: &[F] = &[
    f("enabled", Bool, B(false)),
    f("immediate_grad_update", Bool, B(false)),
    f("check_grad_overflow", Bool, B(true)),
    f("bf16_master_weights_and_grads", Bool, B(false)),
    f("bf16_optimizer_states", Bool, B(false)),
];

pub(crate) static OFFLOAD_OPTIMIZER: &[F] = &[
    f("device", Ty::Enum(&["none", "cpu", "nvme"]), S("none")),
    n("nvme_path", Str, Null),
    f("buffer_count", int(0), I(4)),
    f("pin_memory", Bool, B(true)),
    f("pipeline_read", Bool, B(false)),
    f("pipeline_write", Bool, B(false)),
    f("fast_init", Bool, B(false)),
    f("ratio", unit(), F(1.0)),
    f("super_offload", Bool, B(false)),
    f("cpuadam_cores_perc", unit(), F(0.8)),
];

pub(crate) static OFFLOAD_PARAM: &[F] = &[
    f("device", Ty::Enum(&["none", "cpu", "nvme"]), S("none")),
    n("nvme_path", Str, Null),
    f("buffer_count", int(0), I(5)),
    f("buffer_size", int(0), I(100_000_000)),
    f("max_in_cpu", int(0), I(1_000_000_000)),
    f("pin_memory", Bool, B(true)),
];

pub(crate) static ZERO: &[F] = &[
    f("stage", Ty::Int { min: 0, max: 3 }, I(0)),
    f("contiguous_gradients", Bool, B(true)),
    f("reduce_scatter", Bool, B(true)),
    f("reduce_bucket_size", int(0), I(500_000_000)),
    f("use_multi_rank_bucket_allreduce", Bool, B(true)),
    f("allgather_partitions", Bool, B(true)),
    f("allgather_bucket_size", int(0), I(500_000_000)),
    n("overlap_comm", Bool, Null),
    f("load_from_fp32_weights", Bool, B(true)),
    f("elastic_checkpoint", Bool, B(false)),
    n("offload_param", Ty::Obj(OFFLOAD_PARAM), Null),
    n("offload_optimizer", Ty::Obj(OFFLOAD_OPTIMIZER), Null),
    f("sub_group_size", int(0), I(1_000_000_000)),
    f("stage3_prefetch_bucket_size", int(0), I(50_000_000)),
    f("stage3_param_persistence_threshold", int(0), I(100_000)),
    f("stage3_model_persistence_threshold", int(0), I(IMAX)),
    f("stage3_max_live_parameters", int(0), I(1_000_000_000)),
    f("stage3_max_reuse_distance", int(0), I(1_000_000_000)),
    f("stage3_gather_16bit_weights_on_model_save", Bool, B(false)),
    f("stage3_module_granularity_threshold", int(0), I(0)),
    f("stage3_use_all_reduce_for_fetch_params", Bool, B(false)),
    f("stage3_allgather_sequential", Bool, B(false)),
    f("ignore_unused_parameters", Bool, B(true)),
    f("legacy_stage1", Bool, B(false)),
    f("round_robin_gradients", Bool, B(false)),
    f("zero_hpz_partition_size", int(1), I(1)),
    f("zero_quantized_weights", Bool, B(false)),
    f("zero_quantized_nontrainable_weights", Bool, B(false)),
    f("zero_quantized_gradients", Bool, B(false)),
    n("zeropp_loco_param", Ty::Any, Null),
    f("mics_shard_size", int(-1), I(-1)),
    f("mics_hierarchical_params_gather", Bool, B(false)),
    f("memory_efficient_linear", Bool, B(true)),
    f("pipeline_loading_checkpoint", Bool, B(false)),
    f("override_module_apply", Bool, B(true)),
    f("log_trace_cache_warnings", Bool, B(false)),
    f("enable_sanity_checks", Bool, B(false)),
    n("zenflow", Ty::Any, Null),
    n("leaf_module", Ty::Any, Null),
];

/// ZeRO keys written without their `stage3_` prefix (DeepSpeed's field names; the prefixed
/// form is what its documentation shows, and what the resolved config prints).
pub(crate) static ZERO_SHORT_ALIASES: &[(&str, &str)] = &[
    ("prefetch_bucket_size", "stage3_prefetch_bucket_size"),
    (
        "param_persistence_threshold",
        "stage3_param_persistence_threshold",
    ),
    (
        "model_persistence_threshold",
        "stage3_model_persistence_threshold",
    ),
    ("max_live_parameters", "stage3_max_live_parameters"),
    ("max_reuse_distance", "stage3_max_reuse_distance"),
    (
        "gather_16bit_weights_on_model_save",
        "stage3_gather_16bit_weights_on_model_save",
    ),
    (
        "module_granularity_threshold",
        "stage3_module_granularity_threshold",
    ),
    (
        "use_all_reduce_for_fetch_params",
        "stage3_use_all_reduce_for_fetch_params",
    ),
    ("allgather_sequential", "stage3_allgather_sequential"),
    // Deprecated spelling of the 16-bit gather flag.
    (
        "stage3_gather_fp16_weights_on_model_save",
        "stage3_gather_16bit_weights_on_model_save",
    ),
];

pub(crate) static ACTIVATION_CHECKPOINTING: &[F] = &[
    f("partition_activations", Bool, B(false)),
    f("cpu_checkpointing", Bool, B(false)),
    f("contiguous_memory_optimization", Bool, B(false)),
    n("number_checkpoints", int(1), Null),
    f("synchronize_checkpoint_boundary", Bool, B(false)),
    f("profile", Bool, B(false)),
];

pub(crate) static FLOPS_PROFILER: &[F] = &[
    f("enabled", Bool, B(false)),
    f("recompute_fwd_factor", float(0.0), F(0.0)),
    f("profile_step", int(1), I(1)),
    f("module_depth", int(-1), I(-1)),
    f("top_modules", int(1), I(1)),
    f("detailed", Bool, B(true)),
    n("output_file", Str, Null),
];

pub(crate) static COMMS_LOGGER: &[F] = &[
    f("enabled", Bool, B(false)),
    f("verbose", Bool, B(false)),
    f("prof_all", Bool, B(true)),
    f("debug", Bool, B(false)),
    f("prof_ops", Ty::StrList, EmptyList),
];

pub(crate) static TENSORBOARD: &[F] = &[
    f("enabled", Bool, B(false)),
    f("output_path", Str, S("")),
    f("job_name", Str, S("DeepSpeedJobName")),
];

pub(crate) static CSV_MONITOR: &[F] = &[
    f("enabled", Bool, B(false)),
    f("output_path", Str, S("")),
    f("job_name", Str, S("DeepSpeedJobName")),
];

pub(crate) static WANDB: &[F] = &[
    f("enabled", Bool, B(false)),
    n("group", Str, Null),
    n("team", Str, Null),
    f("project", Str, S("deepspeed")),
];

pub(crate) static COMET: &[F] = &[
    f("enabled", Bool, B(false)),
    f("samples_log_interval", int(1), I(100)),
    n("project", Str, Null),
    n("workspace", Str, Null),
    n("api_key", Str, Null),
    n("experiment_name", Str, Null),
    n("experiment_key", Str, Null),
    n("online", Bool, Null),
    n("mode", Str, Null),
];

pub(crate) static PARALLEL_WRITE: &[F] = &[f("pipeline_stage", Bool, B(false))];

/// `checkpoint.writer` (DeepSpeed's `model_checkpointing` writer config; `decoupled` selects
/// the asynchronous DecoupledCheckpointEngine).
pub(crate) static CHECKPOINT_WRITER: &[F] = &[
    f("type", Ty::EnumCi(&["mock", "python", "fast"]), S("fast")),
    f("io_buffer_size", int(1), I(64 * 1024 * 1024)),
    f("io_buffer_double", Bool, B(true)),
    f("show_statistics", Bool, B(false)),
    n(
        "data_parallel",
        Ty::EnumCi(&["replica", "socket", "machine"]),
        Null,
    ),
    f("decoupled", Bool, B(false)),
    f("io_multiplier", int(1), I(1)),
];

pub(crate) static CHECKPOINT: &[F] = &[
    f(
        "tag_validation",
        Ty::EnumCi(&["Warn", "Ignore", "Fail"]),
        S("Warn"),
    ),
    f("load_universal", Bool, B(false)),
    f("use_node_local_storage", Bool, B(false)),
    f("parallel_write", Ty::Obj(PARALLEL_WRITE), Obj),
    f("checkpoint_serialization", Bool, B(true)),
    n("writer", Ty::Obj(CHECKPOINT_WRITER), Null),
    // This runtime's retention: keep only the newest N checkpoints of a run (null: all).
    n("keep_last", int(1), Null),
];

pub(crate) static DATA_TYPES: &[F] = &[n(
    "grad_accum_dtype",
    Ty::Enum(&["fp32", "fp16", "bf16"]),
    Null,
)];

pub(crate) static AIO: &[F] = &[
    f("block_size", int(1), I(1_048_576)),
    f("queue_depth", int(1), I(8)),
    f("intra_op_parallelism", int(1), I(1)),
    f("thread_count", int(1), I(1)),
    f("single_submit", Bool, B(false)),
    f("overlap_events", Bool, B(true)),
    f("use_gds", Bool, B(false)),
];

pub(crate) static THROUGHPUT_TIMER: &[F] = &[
    f("enabled", Bool, B(true)),
    f("synchronized", Bool, B(true)),
];
pub(crate) static TIMERS: &[F] = &[f("throughput", Ty::Obj(THROUGHPUT_TIMER), Obj)];

/// Sections validated by a plain table walk: (key, fields).
pub(crate) static TABLE_SECTIONS: &[(&str, &[F])] = &[
    ("fp16", FP16),
    ("bf16", BF16),
    ("activation_checkpointing", ACTIVATION_CHECKPOINTING),
    ("flops_profiler", FLOPS_PROFILER),
    ("comms_logger", COMMS_LOGGER),
    ("tensorboard", TENSORBOARD),
    ("wandb", WANDB),
    ("csv_monitor", CSV_MONITOR),
    ("comet", COMET),
    ("checkpoint", CHECKPOINT),
    ("data_types", DATA_TYPES),
    ("aio", AIO),
    ("timers", TIMERS),
];

// ----------------------------------------------------------------------------------------
// Optimizers

pub(crate) static ADAM: &[F] = &[
    f("lr", float(0.0), F(1e-3)),
    f("betas", Ty::Betas, Betas(0.9, 0.999)),
    f("eps", pos_float(), F(1e-8)),
    f("weight_decay", float(0.0), F(0.0)),
    f("bias_correction", Bool, B(true)),
    f("amsgrad", Bool, B(false)),
    f("adam_w_mode", Bool, B(true)),
    f("torch_adam", Bool, B(false)),
    f("fp32_optimizer_states", Bool, B(true)),
    f("set_grad_none", Bool, B(true)),
];

pub(crate) static LAMB: &[F] = &[
    f("lr", float(0.0), F(1e-3)),
    f("betas", Ty::Betas, Betas(0.9, 0.999)),
    f("eps", pos_float(), F(1e-8)),
    f("eps_inside_sqrt", Bool, B(false)),
    f("weight_decay", float(0.0), F(0.0)),
    f("bias_correction", Bool, B(true)),
    f("max_coeff", float(0.0), F(10.0)),
    f("min_coeff", float(0.0), F(0.01)),
    f("amsgrad", Bool, B(false)),
];

pub(crate) static LION: &[F] = &[
    f("lr", float(0.0), F(1e-4)),
    f("betas", Ty::Betas, Betas(0.9, 0.99)),
    f("weight_decay", float(0.0), F(0.0)),
];

pub(crate) static SGD: &[F] = &[
    f("lr", float(0.0), F(1e-3)),
    f("momentum", float(0.0), F(0.0)),
    f("dampening", float(0.0), F(0.0)),
    f("weight_decay", float(0.0), F(0.0)),
    f("nesterov", Bool, B(false)),
];

pub(crate) static ADAGRAD: &[F] = &[
    f("lr", float(0.0), F(1e-2)),
    f("lr_decay", float(0.0), F(0.0)),
    f("weight_decay", float(0.0), F(0.0)),
    f("initial_accumulator_value", float(0.0), F(0.0)),
    f("eps", pos_float(), F(1e-10)),
];

/// Optimizers this runtime runs: (canonical name, params). Looked up case-insensitively.
pub(crate) static OPTIMIZERS: &[(&str, &[F])] = &[
    ("Adam", ADAM),
    ("AdamW", ADAM),
    ("Lamb", LAMB),
    ("Lion", LION),
    ("SGD", SGD),
    ("Adagrad", ADAGRAD),
];

/// DeepSpeed optimizers this runtime does not run, with the reason.
pub(crate) static OPTIMIZERS_NOT_RUN: &[(&str, &str)] = &[
    (
        "onebitadam",
        "1-bit Adam (communication-compressed) is not run by this runtime; use Adam or AdamW",
    ),
    (
        "zerooneadam",
        "0/1 Adam (communication-compressed) is not run by this runtime; use Adam or AdamW",
    ),
    (
        "onebitlamb",
        "1-bit LAMB (communication-compressed) is not run by this runtime; use Lamb",
    ),
    ("muon", "Muon is not run by this runtime; use AdamW"),
    ("muadam", "MuAdam is not run by this runtime; use Adam"),
    ("muadamw", "MuAdamW is not run by this runtime; use AdamW"),
    ("musgd", "MuSGD is not run by this runtime; use SGD"),
];

// ----------------------------------------------------------------------------------------
// LR schedulers

const WARMUP_TYPE: Ty = Ty::Enum(&["log", "linear"]);

pub(crate) static WARMUP_LR: &[F] = &[
    f("warmup_min_lr", float(0.0), F(0.0)),
    // null = the optimizer's lr (DeepSpeed: each param group's current lr).
    n("warmup_max_lr", float(0.0), Null),
    f("warmup_num_steps", int(0), I(1000)),
    f("warmup_type", WARMUP_TYPE, S("log")),
    f("last_batch_iteration", int(-1), I(-1)),
];

pub(crate) static WARMUP_DECAY_LR: &[F] = &[
    f("total_num_steps", int(1), Required),
    f("warmup_min_lr", float(0.0), F(0.0)),
    f("warmup_max_lr", float(0.0), F(0.001)),
    f("warmup_num_steps", int(0), I(1000)),
    f("warmup_type", WARMUP_TYPE, S("log")),
    f("last_batch_iteration", int(-1), I(-1)),
];

pub(crate) static WARMUP_COSINE_LR: &[F] = &[
    f("total_num_steps", int(1), Required),
    f("warmup_min_ratio", unit(), F(0.0)),
    f("warmup_num_steps", int(0), I(1000)),
    f("cos_min_ratio", unit(), F(0.0001)),
    f("warmup_type", WARMUP_TYPE, S("log")),
    f("last_batch_iteration", int(-1), I(-1)),
];

pub(crate) static ONE_CYCLE: &[F] = &[
    f("cycle_min_lr", float(0.0), Required),
    f("cycle_max_lr", float(0.0), Required),
    f("decay_lr_rate", float(0.0), F(0.0)),
    f("cycle_first_step_size", int(1), I(2000)),
    n("cycle_second_step_size", int(0), Null),
    f("cycle_first_stair_count", int(0), I(0)),
    n("cycle_second_stair_count", int(0), Null),
    f("decay_step_size", int(0), I(0)),
    f("cycle_momentum", Bool, B(true)),
    f("cycle_min_mom", unit(), F(0.8)),
    f("cycle_max_mom", unit(), F(0.9)),
    f("decay_mom_rate", float(0.0), F(0.0)),
    f("last_batch_iteration", int(-1), I(-1)),
];

pub(crate) static LR_RANGE_TEST: &[F] = &[
    f("lr_range_test_min_lr", float(0.0), F(1e-3)),
    f("lr_range_test_step_size", int(1), I(2000)),
    f("lr_range_test_step_rate", float(0.0), F(1.0)),
    f("lr_range_test_staircase", Bool, B(false)),
    f("last_batch_iteration", int(-1), I(-1)),
];

pub(crate) static SCHEDULERS: &[(&str, &[F])] = &[
    ("WarmupLR", WARMUP_LR),
    ("WarmupDecayLR", WARMUP_DECAY_LR),
    ("WarmupCosineLR", WARMUP_COSINE_LR),
    ("OneCycle", ONE_CYCLE),
    ("LRRangeTest", LR_RANGE_TEST),
];

// ----------------------------------------------------------------------------------------
// Sections of features this runtime does not run: accepted when disabled, refused when
// enabled. (key, what it is, how "enabled" is decided)

#[derive(Debug, Clone, Copy)]
pub(crate) enum Enabled {
    /// `"enabled": true` at the section's top.
    Flag,
    /// any `"enabled": true` anywhere inside.
    AnyNested,
    /// present and not `"enabled": false`.
    UnlessDisabled,
}

pub(crate) static NOT_RUN: &[(&str, &str, Enabled)] = &[
    ("elasticity", "elastic training", Enabled::Flag),
    ("autotuning", "the autotuner", Enabled::Flag),
    ("compression_training", "the compression library (quantization-aware training, pruning; also removed from DeepSpeed itself)", Enabled::AnyNested),
    ("weight_quantization", "weight quantization", Enabled::AnyNested),
    ("pipeline", "pipeline parallelism (PipelineModule)", Enabled::UnlessDisabled),
    ("tensor_parallel", "tensor parallelism (AutoTP)", Enabled::Flag),
    ("compile", "torch.compile / DeepCompile", Enabled::Flag),
    ("nebula", "Nebula checkpointing", Enabled::Flag),
    ("datastates", "DataStates checkpointing", Enabled::Flag),
    ("hybrid_engine", "the RLHF hybrid engine", Enabled::Flag),
    ("eigenvalue", "eigenvalue computation", Enabled::Flag),
    ("progressive_layer_drop", "progressive layer drop", Enabled::Flag),
    ("data_efficiency", "the data-efficiency library", Enabled::Flag),
    ("curriculum_learning", "legacy top-level curriculum learning (removed from DeepSpeed; it lives in data_efficiency.data_sampling.curriculum_learning there)", Enabled::Flag),
    ("quantize_training", "quantize training (MoQ)", Enabled::Flag),
    ("sparse_attention", "sparse attention", Enabled::UnlessDisabled),
    ("amp", "NVIDIA Apex AMP (also removed from DeepSpeed); use fp16 or bf16", Enabled::Flag),
    ("torch_autocast", "torch autocast; use fp16 or bf16", Enabled::Flag),
];

/// Hints for keys DeepSpeed users often write in the wrong place: (key, advice).
pub(crate) static KEY_HINTS: &[(&str, &str)] = &[
    ("max_grad_norm", "gradient clipping is the top-level key `gradient_clipping`"),
    ("logging", "DeepSpeed has no `logging` section: `steps_per_print` is a top-level key"),
    ("enable_cuda_graph", "this is an inference key (deepspeed.init_inference), not a training key"),
    ("pipeline_parallel_size", "pipeline parallelism is configured in the `pipeline` section, which this runtime does not run"),
    ("opt_level", "`opt_level` belongs to NVIDIA Apex AMP (the removed `amp` section), not to fp16"),
    ("aio", "`aio` is a top-level section, not part of zero_optimization"),
];
