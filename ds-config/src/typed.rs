//! Typed views of a resolved configuration, for the engine and other callers.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ConfigError;

/// A fully resolved, validated configuration.
///
/// The typed fields cover what the runtime acts on; [`ResolvedConfig::json`] holds the
/// complete resolved document (DeepSpeed key names, every default filled).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    /// The data-parallel world size the batch triangle was solved for.
    pub world_size: usize,
    /// Global batch per optimizer step.
    pub train_batch_size: u64,
    /// Micro-batch per rank per forward/backward.
    pub train_micro_batch_size_per_gpu: u64,
    /// Micro-steps per optimizer step.
    pub gradient_accumulation_steps: u64,
    /// Global L2-norm clipping threshold (0 disables).
    pub gradient_clipping: f64,
    /// The optimizer, if the config names one.
    pub optimizer: Option<OptimizerConfig>,
    /// The LR scheduler, if the config names one.
    pub scheduler: Option<SchedulerConfig>,
    /// fp16 mixed precision.
    pub fp16: Fp16Config,
    /// bf16 mixed precision.
    pub bf16: Bf16Config,
    /// ZeRO.
    pub zero_optimization: ZeroConfig,
    /// Activation checkpointing.
    pub activation_checkpointing: ActivationCheckpointingConfig,
    /// Flops profiler.
    pub flops_profiler: FlopsProfilerConfig,
    /// Comms logger.
    pub comms_logger: CommsLoggerConfig,
    /// Checkpoint options.
    pub checkpoint: CheckpointConfig,
    /// TensorBoard monitor.
    pub tensorboard: MonitorConfig,
    /// CSV monitor.
    pub csv_monitor: MonitorConfig,
    /// `data_types.grad_accum_dtype` (`None` = model dtype).
    pub grad_accum_dtype: Option<String>,
    /// `communication_data_type` (`None` = model dtype).
    pub communication_data_type: Option<String>,
    /// `"mean"` or `"sum"`.
    pub gradient_allreduce_op: String,
    /// Divide gradients before the all-reduce.
    pub prescale_gradients: bool,
    /// Pre-divide factor applied before the all-reduce.
    pub gradient_predivide_factor: f64,
    /// Asynchronous I/O of the NVMe swap files.
    pub aio: AioConfig,
    /// Progress line every N optimizer steps (`None` = never).
    pub steps_per_print: Option<u64>,
    /// Per-phase timers.
    pub wall_clock_breakdown: bool,
    /// Memory usage lines.
    pub memory_breakdown: bool,
    /// This runtime's extension `comm_timeout`: seconds one MPI call may wait for its peers
    /// (0 = forever). `DS_COMM_TIMEOUT` and `ds train --comm-timeout` override it.
    pub comm_timeout: f64,
    /// Notes from resolution: deprecated aliases read, `"auto"` values resolved, disabled
    /// sections ignored. Worth showing to the user.
    pub warnings: Vec<String>,
    json: Value,
}

/// `optimizer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OptimizerConfig {
    /// Canonical name: Adam, AdamW, Lamb, Lion, SGD or Adagrad.
    #[serde(rename = "type")]
    pub kind: String,
    /// Every parameter of that optimizer, defaults filled.
    pub params: Map<String, Value>,
    /// DeepSpeed's legacy fusion flag.
    pub legacy_fusion: bool,
}

impl OptimizerConfig {
    /// A numeric parameter (`lr`, `eps`, `weight_decay`, `momentum`, ...).
    pub fn param_f64(&self, key: &str) -> Option<f64> {
        self.params.get(key).and_then(Value::as_f64)
    }
    /// A boolean parameter.
    pub fn param_bool(&self, key: &str) -> Option<bool> {
        self.params.get(key).and_then(Value::as_bool)
    }
    /// `betas` as a pair.
    pub fn betas(&self) -> Option<(f64, f64)> {
        let b = self.params.get("betas")?.as_array()?;
        Some((b.first()?.as_f64()?, b.get(1)?.as_f64()?))
    }
}

/// `scheduler`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    /// WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle or LRRangeTest.
    #[serde(rename = "type")]
    pub kind: String,
    /// Every parameter of that scheduler, defaults filled.
    pub params: Map<String, Value>,
}

impl SchedulerConfig {
    /// A numeric parameter.
    pub fn param_f64(&self, key: &str) -> Option<f64> {
        self.params.get(key).and_then(Value::as_f64)
    }
}

/// `fp16`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Fp16Config {
    /// Train in fp16 with loss scaling.
    pub enabled: bool,
    /// Autocast inputs.
    pub auto_cast: bool,
    /// 0 = dynamic loss scaling; > 0 = this static scale.
    pub loss_scale: f64,
    /// Initial dynamic scale is 2^this.
    pub initial_scale_power: u32,
    /// Good steps before the scale doubles.
    pub loss_scale_window: u64,
    /// Overflows tolerated before the scale halves.
    pub hysteresis: u64,
    /// Refill hysteresis on every good step.
    pub consecutive_hysteresis: bool,
    /// Floor of the dynamic scale.
    pub min_loss_scale: f64,
}

impl Fp16Config {
    /// Whether the loss scale is dynamic (`loss_scale == 0`).
    pub fn dynamic_loss_scale(&self) -> bool {
        self.loss_scale == 0.0
    }
}

/// `bf16` (legacy name `bfloat16`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Bf16Config {
    /// Train in bf16.
    pub enabled: bool,
    /// Apply gradients right after backward.
    pub immediate_grad_update: bool,
    /// Skip steps whose gradients hold inf/nan.
    pub check_grad_overflow: bool,
}

/// `zero_optimization.offload_optimizer` / `offload_param`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OffloadConfig {
    /// `none`, `cpu` or `nvme` (ZeRO-Infinity).
    pub device: String,
    /// Directory of the swap files (`nvme`; required there).
    #[serde(default)]
    pub nvme_path: Option<String>,
    /// Pinned host buffers.
    pub pin_memory: bool,
    /// Swap buffers (optimizer: chunk buffers in flight during the step, default 4;
    /// parameters: default 5).
    pub buffer_count: u64,
    /// Parameter swap buffer size in elements (`offload_param`, default 1e8).
    #[serde(default)]
    pub buffer_size: Option<u64>,
    /// Parameter elements kept in memory with `nvme` (`offload_param`, default 1e9).
    #[serde(default)]
    pub max_in_cpu: Option<u64>,
    /// Read the next chunk of optimizer state while updating this one (`offload_optimizer`).
    #[serde(default)]
    pub pipeline_read: bool,
    /// Write a chunk of optimizer state back while updating the next (`offload_optimizer`).
    #[serde(default)]
    pub pipeline_write: bool,
}

/// The `aio` section: asynchronous I/O of the NVMe swap files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AioConfig {
    /// Bytes per request.
    pub block_size: u64,
    /// Requests queued at most.
    pub queue_depth: u64,
    /// I/O threads.
    pub thread_count: u64,
    /// Submit one request at a time.
    pub single_submit: bool,
    /// Overlap request submission and completion (always true here: the I/O threads run
    /// requests while more are queued).
    pub overlap_events: bool,
    /// GPUDirect Storage (refused: no GPU path here).
    pub use_gds: bool,
}

/// `zero_optimization`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ZeroConfig {
    /// 0..=3.
    pub stage: u8,
    /// Copy gradients into a contiguous buffer.
    pub contiguous_gradients: bool,
    /// Reduce-scatter instead of all-reduce for gradients.
    pub reduce_scatter: bool,
    /// Gradient bucket size in elements.
    pub reduce_bucket_size: u64,
    /// Parameter all-gather bucket size in elements.
    pub allgather_bucket_size: u64,
    /// Overlap reduction with backward (resolved: true iff stage 3 unless given).
    pub overlap_comm: bool,
    /// Optimizer state offload.
    pub offload_optimizer: Option<OffloadConfig>,
    /// Parameter offload (stage 3).
    pub offload_param: Option<OffloadConfig>,
    /// Elements per optimizer sub-group (the chunk the NVMe-offloaded step swaps).
    pub sub_group_size: u64,
    /// Stage-3 prefetch bucket size (elements).
    pub stage3_prefetch_bucket_size: u64,
    /// Stage-3 parameters smaller than this stay unpartitioned.
    pub stage3_param_persistence_threshold: u64,
    /// Stage-3 max live gathered parameters (elements).
    pub stage3_max_live_parameters: u64,
    /// Gather 16-bit weights when saving the model at stage 3.
    pub stage3_gather_16bit_weights_on_model_save: bool,
    /// Round-robin gradient partitioning.
    pub round_robin_gradients: bool,
}

impl ZeroConfig {
    /// Whether optimizer state is swapped to disk (ZeRO-Infinity).
    pub fn offload_optimizer_to_nvme(&self) -> bool {
        self.offload_optimizer
            .as_ref()
            .is_some_and(|o| o.device == "nvme")
    }

    /// Whether parameters are swapped to disk (ZeRO-Infinity, stage 3).
    pub fn offload_param_to_nvme(&self) -> bool {
        self.offload_param
            .as_ref()
            .is_some_and(|o| o.device == "nvme")
    }

    /// Whether optimizer state lives in host memory.
    pub fn offload_optimizer_to_cpu(&self) -> bool {
        self.offload_optimizer
            .as_ref()
            .is_some_and(|o| o.device == "cpu")
    }
}

/// `activation_checkpointing`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ActivationCheckpointingConfig {
    /// Partition saved activations across model-parallel ranks.
    pub partition_activations: bool,
    /// Keep saved activations in host memory.
    pub cpu_checkpointing: bool,
    /// Contiguous buffers for partitioned activations.
    pub contiguous_memory_optimization: bool,
    /// Number of checkpoints (for contiguous buffers).
    pub number_checkpoints: Option<u64>,
    /// Synchronise at checkpoint boundaries.
    pub synchronize_checkpoint_boundary: bool,
    /// Time each checkpointed segment.
    pub profile: bool,
}

/// `flops_profiler`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlopsProfilerConfig {
    /// Profile one step.
    pub enabled: bool,
    /// Extra forward passes counted per step (activation recomputation).
    pub recompute_fwd_factor: f64,
    /// The global step profiled.
    pub profile_step: u64,
    /// Depth of the module tree shown (-1 = all).
    pub module_depth: i64,
    /// Top modules per depth in the aggregated view.
    pub top_modules: u64,
    /// Print the detailed tree.
    pub detailed: bool,
    /// Write the report here instead of stdout.
    pub output_file: Option<String>,
}

/// `comms_logger`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CommsLoggerConfig {
    /// Log collectives.
    pub enabled: bool,
    /// A line per op.
    pub verbose: bool,
    /// Profile every op (else only `prof_ops`).
    pub prof_all: bool,
    /// Append the caller.
    pub debug: bool,
    /// Ops to profile when `prof_all` is false.
    pub prof_ops: Vec<String>,
}

/// `checkpoint`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CheckpointConfig {
    /// `Warn`, `Ignore` or `Fail` on tags that differ across ranks.
    pub tag_validation: String,
    /// Each node writes to its local storage.
    pub use_node_local_storage: bool,
    /// The checkpoint writer (`null`: DeepSpeed's default torch engine).
    pub writer: Option<CheckpointWriterConfig>,
    /// Keep only the newest N checkpoints of a run (`null`: keep all; not a DeepSpeed key).
    pub keep_last: Option<u64>,
}

/// `checkpoint.writer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CheckpointWriterConfig {
    /// `mock`, `python` or `fast`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Asynchronous (decoupled) saving: training continues while the checkpoint is written.
    pub decoupled: bool,
    /// I/O buffer bytes of DeepSpeed's fast writer.
    pub io_buffer_size: u64,
}

/// `tensorboard` / `csv_monitor`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MonitorConfig {
    /// Write events.
    pub enabled: bool,
    /// Output folder.
    pub output_path: String,
    /// Job name (subfolder).
    pub job_name: String,
}

fn field<T: for<'de> Deserialize<'de>>(json: &Value, key: &str) -> Result<T, ConfigError> {
    serde_json::from_value(json.get(key).cloned().unwrap_or(Value::Null)).map_err(|e| {
        ConfigError::invalid(
            key,
            &crate::resolve::show(json.get(key).unwrap_or(&Value::Null)),
            &format!("internal: the resolved section does not match its typed form ({e})"),
        )
    })
}

impl ResolvedConfig {
    pub(crate) fn from_resolved(
        json: Value,
        warnings: Vec<String>,
        world_size: usize,
    ) -> Result<Self, ConfigError> {
        let opt_str = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_string);
        Ok(ResolvedConfig {
            world_size,
            train_batch_size: field(&json, "train_batch_size")?,
            train_micro_batch_size_per_gpu: field(&json, "train_micro_batch_size_per_gpu")?,
            gradient_accumulation_steps: field(&json, "gradient_accumulation_steps")?,
            gradient_clipping: field(&json, "gradient_clipping")?,
            optimizer: field(&json, "optimizer")?,
            scheduler: field(&json, "scheduler")?,
            fp16: field(&json, "fp16")?,
            bf16: field(&json, "bf16")?,
            zero_optimization: field(&json, "zero_optimization")?,
            activation_checkpointing: field(&json, "activation_checkpointing")?,
            flops_profiler: field(&json, "flops_profiler")?,
            comms_logger: field(&json, "comms_logger")?,
            checkpoint: field(&json, "checkpoint")?,
            tensorboard: field(&json, "tensorboard")?,
            csv_monitor: field(&json, "csv_monitor")?,
            grad_accum_dtype: json
                .get("data_types")
                .and_then(|d| d.get("grad_accum_dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
            communication_data_type: opt_str("communication_data_type"),
            gradient_allreduce_op: field(&json, "gradient_allreduce_op")?,
            prescale_gradients: field(&json, "prescale_gradients")?,
            gradient_predivide_factor: field(&json, "gradient_predivide_factor")?,
            aio: field(&json, "aio")?,
            steps_per_print: field(&json, "steps_per_print")?,
            wall_clock_breakdown: field(&json, "wall_clock_breakdown")?,
            memory_breakdown: field(&json, "memory_breakdown")?,
            comm_timeout: field(&json, "comm_timeout")?,
            warnings,
            json,
        })
    }

    /// The complete resolved document: DeepSpeed key names, every default filled.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The model/compute dtype implied by fp16/bf16: `"fp16"`, `"bf16"` or `"fp32"`.
    pub fn precision(&self) -> &'static str {
        if self.fp16.enabled {
            "fp16"
        } else if self.bf16.enabled {
            "bf16"
        } else {
            "fp32"
        }
    }
}
