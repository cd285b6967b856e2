//! `ds train --backend nccl`: where this process sits in a GPU job and how it opens its GPU
//! and NCCL communicator (a CUDA build). The training itself is the one
//! [`crate::engine::Engine`], with the model on the GPU.

#[cfg(feature = "cuda")]
use crate::EngineError;
#[cfg(feature = "cuda")]
use candle_core::Device;

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
