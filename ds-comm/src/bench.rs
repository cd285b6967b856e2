//! Bus-bandwidth benchmark of the collectives (what `ds bench comm` runs).
//!
//! `all_reduce` is measured in place ([`Communicator::all_reduce_inplace`], like
//! `torch.distributed.all_reduce`); `reduce_scatter` and `all_gather` write into preallocated
//! outputs ([`Communicator::reduce_scatter_into`], [`Communicator::all_gather_into`], like
//! `reduce_scatter_tensor` / `all_gather_into_tensor`), so no run measures page faults of fresh
//! allocations.
//! For each op and size: a warm-up, then `iters` back-to-back calls between two barriers; the time
//! per call is the slowest rank's. Bandwidths use DeepSpeed's formulas ([`crate::logger::calc_bw`],
//! converted to GB/s = 1e9 bytes/s) with `bytes` the whole buffer: the tensor for `all_reduce`,
//! the input for `reduce_scatter`, the output for `all_gather`. So
//! `all_reduce`: algbw = 2·bytes/t, busbw = bytes/t·2(n−1)/n; `reduce_scatter`/`all_gather`:
//! algbw = bytes/t, busbw = bytes/t·(n−1)/n (busbw is the nccl-tests bus bandwidth).
//! `memcpy_GBps` is a single-thread copy of the largest size into an already-touched buffer,
//! measured in the same run (bytes copied / time), the physical reference on this machine.
//!
//! ```
//! use ds_comm::bench::{run_comm_bench, BenchOp, CommBenchOptions};
//! let report = run_comm_bench(&CommBenchOptions {
//!     world_size: 2,
//!     ops: vec![BenchOp::AllReduce],
//!     sizes: vec![1 << 16],
//!     iters: Some(3),
//!     ..Default::default()
//! })?;
//! assert_eq!(report.results.len(), 1);
//! println!("{}", report.to_table());
//! println!("{}", serde_json::to_string(&report).unwrap());
//! # Ok::<(), ds_comm::CommError>(())
//! ```

use crate::error::{CommError, Result};
use crate::logger::calc_bw;
use crate::{Communicator, LocalComm, LocalCommOptions, ReduceOp};
use candle_core::{DType, Device, Tensor};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Which collective to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchOp {
    /// `all_reduce` (sum).
    AllReduce,
    /// `reduce_scatter` (sum).
    ReduceScatter,
    /// `all_gather`.
    AllGather,
    /// `reduce` (sum) onto rank 0 (a new result tensor on the root per call; algbw = busbw =
    /// bytes/t, DeepSpeed's formula for reduce).
    Reduce,
}

impl BenchOp {
    /// `"all_reduce"`, `"reduce_scatter"`, `"all_gather"` or `"reduce"`.
    pub fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all_reduce",
            BenchOp::ReduceScatter => "reduce_scatter",
            BenchOp::AllGather => "all_gather",
            BenchOp::Reduce => "reduce",
        }
    }

    /// Parses an op name as [`BenchOp::name`] writes it.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "all_reduce" | "allreduce" => Ok(BenchOp::AllReduce),
            "reduce_scatter" | "reducescatter" => Ok(BenchOp::ReduceScatter),
            "all_gather" | "allgather" => Ok(BenchOp::AllGather),
            "reduce" => Ok(BenchOp::Reduce),
            other => Err(CommError::invalid(
                "bench",
                format!("unknown op {other:?}; expected all_reduce, reduce_scatter, all_gather or reduce"),
            )),
        }
    }
}

/// Which backend [`run_comm_bench`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchBackend {
    /// [`LocalComm`] with `world_size` threads.
    Local,
    /// `MpiComm` over `MPI_COMM_WORLD` (feature `mpi`; run under `mpirun`, `world_size` ignored).
    Mpi,
    /// `NcclComm` on CUDA tensors in device memory (feature `cuda`; one process per GPU with
    /// `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, or none of them for one GPU;
    /// `world_size` ignored). The reference bandwidth is the GPU's device-to-device copy.
    Nccl,
}

impl BenchBackend {
    /// Parses `"local"`, `"mpi"` or `"nccl"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "local" => Ok(BenchBackend::Local),
            "mpi" => Ok(BenchBackend::Mpi),
            "nccl" => Ok(BenchBackend::Nccl),
            other => Err(CommError::invalid(
                "bench",
                format!("unknown backend {other:?}; expected local, mpi or nccl"),
            )),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct CommBenchOptions {
    /// Backend (default local).
    pub backend: BenchBackend,
    /// Ranks for the local backend (default 2).
    pub world_size: usize,
    /// Ops (default all three).
    pub ops: Vec<BenchOp>,
    /// Buffer sizes in bytes (default 1 MiB, 16 MiB, 64 MiB); see [`parse_sizes`].
    pub sizes: Vec<usize>,
    /// Element type (default f32).
    pub dtype: DType,
    /// Warm-up calls per size (default 2).
    pub warmup: usize,
    /// Timed calls per size; `None` picks about 1 GiB of traffic per size, between 5 and 200.
    pub iters: Option<usize>,
    /// Timeout of one collective. `None` waits forever; for MPI that selects blocking
    /// collectives (OpenMPI's tuned algorithms) instead of polled non-blocking ones.
    pub timeout: Option<Duration>,
    /// MPI: compare call descriptors before each collective (default true; see
    /// `MpiCommOptions::check_calls`).
    pub check_calls: bool,
    /// MPI: run the ring algorithms for large polled collectives (default true; see
    /// `MpiCommOptions::ring_min_bytes`). `false` uses MPI's non-blocking collectives throughout.
    pub mpi_ring: bool,
}

impl Default for CommBenchOptions {
    fn default() -> Self {
        Self {
            backend: BenchBackend::Local,
            world_size: 2,
            ops: vec![
                BenchOp::AllReduce,
                BenchOp::ReduceScatter,
                BenchOp::AllGather,
            ],
            sizes: vec![1 << 20, 16 << 20, 64 << 20],
            dtype: DType::F32,
            warmup: 2,
            iters: None,
            timeout: Some(Duration::from_secs(300)),
            check_calls: true,
            mpi_ring: true,
        }
    }
}

/// One measured (op, size).
#[allow(non_snake_case)]
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CommBenchResult {
    /// Op name.
    pub op: String,
    /// Whole-buffer size in bytes (see the module docs).
    pub bytes: u64,
    /// Timed calls.
    pub iters: usize,
    /// Mean time per call (slowest rank), ms.
    pub time_ms: f64,
    /// Algorithm bandwidth, GB/s (DeepSpeed's formula).
    pub algbw_GBps: f64,
    /// Bus bandwidth, GB/s.
    pub busbw_GBps: f64,
    /// `busbw_GBps / memcpy_GBps`.
    pub busbw_over_memcpy: f64,
}

/// The benchmark's output (the JSON of `ds bench comm --json`).
#[allow(non_snake_case)]
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CommBenchReport {
    /// Backend name.
    pub backend: String,
    /// Number of ranks.
    pub world_size: usize,
    /// Element type.
    pub dtype: String,
    /// Single-thread memcpy bandwidth measured in the same run, GB/s.
    pub memcpy_GBps: f64,
    /// Size used for the memcpy measurement, bytes.
    pub memcpy_bytes: u64,
    /// One entry per op and size.
    pub results: Vec<CommBenchResult>,
    /// The rank that produced this copy of the report (every rank gets the same numbers; print
    /// it on rank 0).
    #[serde(skip)]
    pub rank: usize,
}

impl CommBenchReport {
    /// An nccl-tests-style table.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# ds-comm bench: backend {} world_size {} dtype {} memcpy {:.2} GB/s ({} bytes)",
            self.backend, self.world_size, self.dtype, self.memcpy_GBps, self.memcpy_bytes
        );
        let _ = writeln!(
            s,
            "#{:>14} {:>16} {:>6} {:>11} {:>12} {:>12} {:>13}",
            "size(B)", "op", "iters", "time(ms)", "algbw(GB/s)", "busbw(GB/s)", "busbw/memcpy"
        );
        for r in &self.results {
            let _ = writeln!(
                s,
                "{:>15} {:>16} {:>6} {:>11.3} {:>12.2} {:>12.2} {:>13.2}",
                r.bytes, r.op, r.iters, r.time_ms, r.algbw_GBps, r.busbw_GBps, r.busbw_over_memcpy
            );
        }
        s
    }
}

/// Parses a size list like `"1M,16M,64M"` or `"4096,1G"` (K/M/G are powers of 1024; optional
/// `B`/`iB`).
pub fn parse_sizes(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let p = p.trim();
            let up = p.to_ascii_uppercase();
            let up = up.trim_end_matches("IB").trim_end_matches('B');
            let (num, mult) = match up.chars().last() {
                Some('K') => (&up[..up.len() - 1], 1usize << 10),
                Some('M') => (&up[..up.len() - 1], 1 << 20),
                Some('G') => (&up[..up.len() - 1], 1 << 30),
                _ => (up, 1),
            };
            num.trim()
                .parse::<usize>()
                .ok()
                .and_then(|v| v.checked_mul(mult))
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    CommError::invalid(
                        "bench",
                        format!("bad size {p:?}; expected e.g. 1M, 64M, 4096"),
                    )
                })
        })
        .collect()
}

/// Single-thread memcpy bandwidth (GB/s) for `bytes`: best of 5 copies into a touched buffer.
pub fn measure_memcpy(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// Runs the benchmark, creating the backend the options name. For `Mpi` every process of the
/// `mpirun` job must call this; all get the report (print it where `report.rank == 0`).
pub fn run_comm_bench(opts: &CommBenchOptions) -> Result<CommBenchReport> {
    validate(opts)?;
    match opts.backend {
        BenchBackend::Local => {
            let memcpy_bytes = *opts.sizes.iter().max().unwrap_or(&(64 << 20));
            let memcpy = measure_memcpy(memcpy_bytes);
            let options = LocalCommOptions {
                timeout: opts.timeout.unwrap_or(Duration::from_secs(30 * 24 * 3600)),
            };
            let mut reports = LocalComm::run(opts.world_size, options, |c| {
                run_comm_bench_on(&c, opts, memcpy, memcpy_bytes)
            });
            if reports.is_empty() {
                return Err(CommError::invalid("bench", "world_size must be at least 1"));
            }
            reports
                .swap_remove(0)
                .map_err(|_| CommError::invalid("bench", "rank 0 panicked"))?
        }
        BenchBackend::Mpi => {
            #[cfg(feature = "mpi")]
            {
                let comm = crate::MpiComm::init(crate::MpiCommOptions {
                    timeout: opts.timeout,
                    check_calls: opts.check_calls,
                    ring_min_bytes: if opts.mpi_ring {
                        crate::mpi::RING_MIN_BYTES
                    } else {
                        usize::MAX
                    },
                })?;
                let memcpy_bytes = *opts.sizes.iter().max().unwrap_or(&(64 << 20));
                // Every rank measures; the report carries the minimum over ranks (a shared host).
                let m = measure_memcpy(memcpy_bytes);
                let m = comm
                    .all_reduce(&Tensor::new(&[m], &Device::Cpu)?, ReduceOp::Min)?
                    .to_vec1::<f64>()?[0];
                run_comm_bench_on(&comm, opts, m, memcpy_bytes)
            }
            #[cfg(not(feature = "mpi"))]
            Err(CommError::Backend {
                backend: "mpi".into(),
                msg: "ds-comm was built without the `mpi` feature".into(),
            })
        }
        BenchBackend::Nccl => {
            #[cfg(feature = "cuda")]
            {
                nccl_bench(opts)
            }
            #[cfg(not(feature = "cuda"))]
            Err(CommError::Backend {
                backend: "nccl".into(),
                msg: "this build has no CUDA support (the `cuda` feature); build one with `bash scripts/cuda-build.sh` and run it on a GPU machine".into(),
            })
        }
    }
}

/// `--backend nccl`: this process's GPU, an NCCL communicator on candle's stream, device
/// buffers.
#[cfg(feature = "cuda")]
fn nccl_bench(opts: &CommBenchOptions) -> Result<CommBenchReport> {
    use crate::{NcclComm, NcclCommOptions};
    crate::nccl::probe_libraries()?;
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let local = env("LOCAL_RANK").or(env("RANK")).unwrap_or(0);
    let backend = |msg: String| CommError::Backend {
        backend: "nccl".into(),
        msg,
    };
    let dev = Device::new_cuda(local).map_err(|e| {
        backend(format!(
            "cannot open CUDA device {local}: {}",
            first_line(&e)
        ))
    })?;
    let Device::Cuda(cuda) = &dev else {
        return Err(backend("candle did not return a CUDA device".into()));
    };
    let o = NcclCommOptions {
        device: Some(local),
        check_calls: opts.check_calls,
        ..NcclCommOptions::default()
    };
    let comm = if std::env::var("RANK").is_err() && std::env::var("WORLD_SIZE").is_err() {
        NcclComm::with_id_on_stream(0, 1, cuda.cuda_stream(), NcclComm::new_id()?, o)?
    } else {
        NcclComm::from_env_on_device(cuda, o)?
    };
    let memcpy_bytes = *opts.sizes.iter().max().unwrap_or(&(64 << 20));
    let memcpy = measure_device_copy(&dev, memcpy_bytes)?;
    let m = comm
        .all_reduce(&Tensor::new(&[memcpy], &dev)?, ReduceOp::Min)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f64>()?[0];
    run_comm_bench_on_device(&comm, opts, m, memcpy_bytes, &dev)
}

#[cfg(feature = "cuda")]
fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// Device-to-device copy bandwidth of `dev` (bytes copied per second, best of 5, GB/s).
#[cfg(feature = "cuda")]
fn measure_device_copy(dev: &Device, bytes: usize) -> Result<f64> {
    let x = Tensor::zeros(bytes / 4, DType::F32, dev)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        dev.synchronize()?;
        let t0 = Instant::now();
        let y = x.copy()?;
        dev.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(y);
    }
    Ok(bytes as f64 / best / 1e9)
}

fn validate(opts: &CommBenchOptions) -> Result<()> {
    if opts.sizes.is_empty() || opts.ops.is_empty() {
        return Err(CommError::invalid(
            "bench",
            "need at least one op and one size",
        ));
    }
    if opts.backend == BenchBackend::Local && opts.world_size == 0 {
        return Err(CommError::invalid("bench", "world_size must be at least 1"));
    }
    crate::data::check_dtype("bench", opts.dtype)
}

/// Runs the benchmark on an existing communicator (a collective: every rank calls it with the
/// same options). `memcpy_gbps` is the reference bandwidth to report (see [`measure_memcpy`]).
pub fn run_comm_bench_on(
    comm: &dyn Communicator,
    opts: &CommBenchOptions,
    memcpy_gbps: f64,
    memcpy_bytes: usize,
) -> Result<CommBenchReport> {
    run_comm_bench_on_device(comm, opts, memcpy_gbps, memcpy_bytes, &Device::Cpu)
}

/// [`run_comm_bench_on`] with the buffers on `dev` (CUDA tensors for `NcclComm`'s in-place
/// device collectives). The timing ends with a barrier, which waits for the device.
pub fn run_comm_bench_on_device(
    comm: &dyn Communicator,
    opts: &CommBenchOptions,
    memcpy_gbps: f64,
    memcpy_bytes: usize,
    dev: &Device,
) -> Result<CommBenchReport> {
    validate(opts)?;
    let n = comm.world_size();
    let esize = opts.dtype.size_in_bytes();
    let mut results = Vec::new();
    for &op in &opts.ops {
        for &size in &opts.sizes {
            let elems = (size / esize).max(1);
            // all_gather: each rank contributes 1/n of the output.
            let (input_elems, total_elems, msg_elems) = match op {
                BenchOp::AllReduce | BenchOp::Reduce => (elems, elems, elems),
                BenchOp::ReduceScatter => (elems, elems, elems.div_ceil(n)),
                BenchOp::AllGather => {
                    let per = (elems / n).max(1);
                    (per, per * n, per)
                }
            };
            let x = Tensor::ones(input_elems, opts.dtype, dev)?;
            let out_elems = match op {
                BenchOp::AllReduce | BenchOp::Reduce => 0,
                BenchOp::ReduceScatter => {
                    let (lo, hi) = crate::partition_range(elems, n, comm.rank());
                    hi - lo
                }
                BenchOp::AllGather => total_elems,
            };
            let out = Tensor::zeros(out_elems, opts.dtype, dev)?;
            let bytes = total_elems * esize;
            let iters = opts
                .iters
                .unwrap_or_else(|| ((1usize << 30) / bytes.max(1)).clamp(5, 200))
                .max(1);
            let call = || -> Result<()> {
                match op {
                    // In place, as torch.distributed.all_reduce and nccl-tests measure it.
                    BenchOp::AllReduce => comm.all_reduce_inplace(&x, ReduceOp::Sum),
                    BenchOp::ReduceScatter => comm.reduce_scatter_into(&x, &out, ReduceOp::Sum),
                    BenchOp::AllGather => comm.all_gather_into(&x, &out),
                    BenchOp::Reduce => comm.reduce(&x, ReduceOp::Sum, 0).map(drop),
                }
            };
            for _ in 0..opts.warmup {
                call()?;
            }
            comm.barrier()?;
            let t0 = Instant::now();
            for _ in 0..iters {
                call()?;
            }
            comm.barrier()?;
            let mine = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let t = comm
                .all_reduce(&Tensor::new(&[mine], &Device::Cpu)?, ReduceOp::Max)?
                .to_vec1::<f64>()?[0];
            let (alg, bus) = calc_bw(op.name(), (msg_elems * esize) as f64, t, n);
            let (alg, bus) = (alg / 8.0, bus / 8.0);
            results.push(CommBenchResult {
                op: op.name().to_string(),
                bytes: bytes as u64,
                iters,
                time_ms: t,
                algbw_GBps: alg,
                busbw_GBps: bus,
                busbw_over_memcpy: if memcpy_gbps > 0.0 {
                    bus / memcpy_gbps
                } else {
                    0.0
                },
            });
        }
    }
    Ok(CommBenchReport {
        backend: comm.backend().to_string(),
        world_size: n,
        dtype: format!("{:?}", opts.dtype).to_lowercase(),
        memcpy_GBps: memcpy_gbps,
        memcpy_bytes: memcpy_bytes as u64,
        results,
        rank: comm.rank(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(
            parse_sizes("1M,16M,64M").unwrap(),
            vec![1 << 20, 16 << 20, 64 << 20]
        );
        assert_eq!(
            parse_sizes("4096, 1k,2G,3MiB").unwrap(),
            vec![4096, 1024, 2 << 30, 3 << 20]
        );
        assert!(parse_sizes("1X").is_err());
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes("M").is_err());
    }

    #[test]
    fn reduce_is_benchmarked() {
        assert_eq!(BenchOp::parse("reduce").unwrap(), BenchOp::Reduce);
        let rep = run_comm_bench(&CommBenchOptions {
            world_size: 3,
            ops: vec![BenchOp::Reduce],
            sizes: vec![1 << 16],
            iters: Some(2),
            warmup: 1,
            ..Default::default()
        })
        .unwrap();
        let r = &rep.results[0];
        assert_eq!((r.op.as_str(), r.bytes), ("reduce", 1 << 16));
        let gbps = r.bytes as f64 / r.time_ms / 1e6;
        assert!((r.algbw_GBps - gbps).abs() <= 1e-9 * gbps, "{r:?}");
        assert_eq!(r.algbw_GBps, r.busbw_GBps);
    }

    #[test]
    fn report_fields_follow_the_formulas() {
        let opts = CommBenchOptions {
            world_size: 3,
            sizes: vec![3 << 12],
            iters: Some(2),
            warmup: 1,
            ..Default::default()
        };
        let rep = run_comm_bench(&opts).unwrap();
        assert_eq!(rep.world_size, 3);
        assert_eq!(rep.results.len(), 3);
        assert!(rep.memcpy_GBps > 0.0);
        for r in &rep.results {
            assert_eq!(r.bytes, 3 << 12, "{}", r.op);
            let s_per_ms = r.bytes as f64 / r.time_ms / 1e6; // GB/s
            let (alg, bus) = match r.op.as_str() {
                "all_reduce" => (2.0 * s_per_ms, s_per_ms * 4.0 / 3.0),
                _ => (s_per_ms, s_per_ms * 2.0 / 3.0),
            };
            assert!((r.algbw_GBps - alg).abs() <= 1e-9 * alg, "{r:?}");
            assert!((r.busbw_GBps - bus).abs() <= 1e-9 * bus, "{r:?}");
        }
        let json = serde_json::to_value(&rep).unwrap();
        for k in ["op", "bytes", "time_ms", "algbw_GBps", "busbw_GBps"] {
            assert!(json["results"][0].get(k).is_some(), "missing {k}");
        }
        assert!(json["memcpy_GBps"].is_number());
        assert!(rep.to_table().contains("all_gather"));
    }
}
