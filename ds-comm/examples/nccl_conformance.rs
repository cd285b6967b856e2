//! The conformance suite over `NcclComm` (one process per GPU), for GPU machines:
//!
//! ```text
//! cargo build --release -p ds-comm --features nccl --example nccl_conformance
//! # one GPU:
//! RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
//!     target/release/examples/nccl_conformance
//! # N GPUs: start one process per GPU with RANK=LOCAL_RANK=0..N-1 and WORLD_SIZE=N.
//! ```
//!
//! Host tensors are staged through device buffers. Built with `--features cuda`
//! (`scripts/cuda-build.sh`), `nccl_conformance --device` runs the same suite on CUDA candle
//! tensors: every input is moved to the GPU, the collective runs in place on device memory, and
//! the result is moved back for the comparison.
//!
//! Without CUDA/NCCL it reports the missing library and exits with status 2 (no panic).
//! `split_and_new_group` is expected to fail (NCCL split is not implemented).

use ds_comm::{conformance, Communicator, NcclComm, NcclCommOptions};

#[cfg(feature = "cuda")]
mod on_device {
    //! A [`Communicator`] that runs every collective of an inner `NcclComm` on device tensors.
    use candle_core::{DType, Device, Tensor};
    use ds_comm::{CommError, Communicator, ReduceOp, Result};

    pub struct OnDevice<C> {
        pub inner: C,
        pub dev: Device,
    }

    impl<C: Communicator> OnDevice<C> {
        fn up(&self, t: &Tensor) -> Result<Tensor> {
            let d = t.to_device(&self.dev)?;
            if !d.device().is_cuda() {
                return Err(CommError::invalid(
                    "on_device",
                    "tensor did not reach the GPU",
                ));
            }
            Ok(d)
        }
    }

    fn down(t: Tensor) -> Result<Tensor> {
        Ok(t.to_device(&Device::Cpu)?)
    }

    impl<C: Communicator> Communicator for OnDevice<C> {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn backend(&self) -> &'static str {
            "nccl-device"
        }
        fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
            down(self.inner.all_reduce(&self.up(t)?, op)?)
        }
        fn all_reduce_inplace(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
            let d = self.up(t)?;
            self.inner.all_reduce_inplace(&d, op)?;
            let r = down(d)?;
            // Write the result back into the caller's host tensor.
            t.flatten_all()?.slice_set(&r.flatten_all()?, 0, 0)?;
            Ok(())
        }
        fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
            down(self.inner.reduce_scatter(&self.up(t)?, op)?)
        }
        fn reduce(&self, t: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
            self.inner
                .reduce(&self.up(t)?, op, root)?
                .map(down)
                .transpose()
        }
        fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
            down(self.inner.all_gather(&self.up(t)?)?)
        }
        fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
            down(self.inner.broadcast(&self.up(t)?, root)?)
        }
        fn barrier(&self) -> Result<()> {
            self.inner.barrier()
        }
        fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
            self.inner.send(t, dst)
        }
        fn recv(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
            self.inner.recv(src, dims, dtype)
        }
        fn split(&self, c: Option<u32>, k: usize) -> Result<Option<Box<dyn Communicator>>> {
            self.inner.split(c, k)
        }
    }
}

fn report(comm: &dyn Communicator, label: &str) -> bool {
    let t0 = std::time::Instant::now();
    let rep = conformance::run_suite(comm);
    for (name, why) in &rep.failed {
        eprintln!("rank {} [{label}]: FAILED {name}: {why}", comm.rank());
    }
    println!(
        "rank {}/{} [{label}]: {} passed, {} failed ({:.1} s)",
        comm.rank(),
        comm.world_size(),
        rep.passed.len(),
        rep.failed.len(),
        t0.elapsed().as_secs_f64()
    );
    rep.failed.iter().all(|(n, _)| n == "split_and_new_group")
}

fn main() {
    let device = std::env::args().any(|a| a == "--device");
    if device && !cfg!(feature = "cuda") {
        eprintln!(
            "nccl_conformance: --device needs a build with --features cuda (scripts/cuda-build.sh)"
        );
        std::process::exit(2);
    }
    #[cfg(feature = "cuda")]
    if device {
        let ordinal = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let cuda = match candle_core::CudaDevice::new_with_stream(ordinal) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("nccl_conformance: cannot open CUDA device {ordinal}: {e}");
                std::process::exit(2);
            }
        };
        let comm = match NcclComm::from_env_on_device(&cuda, NcclCommOptions::default()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("nccl_conformance: {e}");
                std::process::exit(2);
            }
        };
        let on = on_device::OnDevice {
            inner: comm,
            dev: candle_core::Device::Cuda(cuda),
        };
        std::process::exit(if report(&on, "device tensors") { 0 } else { 1 });
    }
    let comm = match NcclComm::from_env(NcclCommOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nccl_conformance: {e}");
            std::process::exit(2);
        }
    };
    std::process::exit(if report(&comm, "host tensors") { 0 } else { 1 });
}
