//! `ds-comm`: collectives between ranks for the `ds` training runtime, over candle tensors.
//!
//! One narrow trait, [`Communicator`], with real engines underneath:
//!
//! * [`LocalComm`]: N ranks as threads of one process; shared-memory algorithms (each rank
//!   reduces its own partition of every buffer in parallel, then gathers). The default on one
//!   machine and in tests.
//! * `MpiComm` (cargo feature `mpi`): the system MPI (OpenMPI, MPICH) through the `mpi` crate;
//!   many processes, many nodes. Launch with `mpirun -np N`.
//! * `NcclComm` (cargo feature `nccl`): NCCL through cudarc, loaded at run time; the unique id is
//!   exchanged over TCP from the `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`/`LOCAL_RANK`
//!   environment, as DeepSpeed's launcher sets it.
//!
//! Around them: [`CommsLogger`], a decorator that times every call and reports DeepSpeed's
//! `comms_logger` statistics (algbw/busbw, trimmed means, a summary table); [`bench`](mod@bench), a
//! bus-bandwidth benchmark; and [`conformance`](mod@conformance), the test suite every backend must pass.
//!
//! Tensors: f32, f16, bf16, f64, u8, u32 and i64 (see [`SUPPORTED_DTYPES`]), any shape and any
//! length (non-contiguous inputs are made contiguous first). Results are new tensors.
//! [`Communicator::reduce_scatter`] splits a buffer of `L` elements into partitions of
//! `ceil(L / world_size)` elements (the last ones shorter, possibly empty), as DeepSpeed's padded
//! partitions do; nothing is ever truncated. Calls whose lengths, dtypes or ops differ between
//! ranks fail with [`CommError::Mismatch`] on every rank.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ds_comm::{Communicator, LocalComm, LocalCommOptions, ReduceOp};
//!
//! // Four ranks as threads; each contributes `rank + 1`.
//! let results = LocalComm::run(4, LocalCommOptions::default(), |comm| {
//!     let x = Tensor::full((comm.rank() + 1) as f32, 10, &Device::Cpu)?;
//!     let sum = comm.all_reduce(&x, ReduceOp::Sum)?; // 1+2+3+4 on every rank
//!     // Partitions of ceil(10/4) = 3 elements: ranks 0-2 get 3, rank 3 gets 1.
//!     let shard = comm.reduce_scatter(&x, ReduceOp::Avg)?;
//!     let everyone = comm.all_gather(&Tensor::new(&[shard.dims()[0] as u32], &Device::Cpu)?)?;
//!     Ok::<_, ds_comm::CommError>((sum.to_vec1::<f32>()?, shard.to_vec1::<f32>()?, everyone.to_vec1::<u32>()?))
//! });
//! for r in results {
//!     let (sum, shard, sizes) = r.expect("rank panicked")?;
//!     assert_eq!(sum, vec![10.0; 10]);
//!     assert!(shard.iter().all(|&v| v == 2.5));
//!     assert_eq!(sizes, vec![3, 3, 3, 1]);
//! }
//! # Ok::<(), ds_comm::CommError>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod conformance;
mod data;
mod error;
mod local;
pub mod logger;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;

pub use data::{partition_range, SUPPORTED_DTYPES};
pub use error::{CommError, Result};
pub use local::{LocalComm, LocalCommOptions, SMALL_MESSAGE_BYTES};
pub use logger::CommsLogger;
#[cfg(feature = "mpi")]
pub use mpi::{install_termination_handler, MpiComm, MpiCommOptions};
#[cfg(feature = "nccl")]
pub use nccl::{NcclComm, NcclCommOptions};

use candle_core::{DType, Tensor};

/// The reduction applied by [`Communicator::all_reduce`] and [`Communicator::reduce_scatter`].
///
/// `Avg` is the sum divided by the world size (integer division for integer dtypes; f16/bf16 are
/// accumulated in f32 and rounded once). `Min`/`Max` on floats ignore NaN where the other operand
/// is a number (IEEE `minNum`/`maxNum`); use a `u8` flag with `Max` for overflow detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceOp {
    /// Element-wise sum (integers wrap).
    Sum,
    /// Element-wise mean over the ranks.
    Avg,
    /// Element-wise minimum.
    Min,
    /// Element-wise maximum.
    Max,
}

impl ReduceOp {
    /// `"sum"`, `"avg"`, `"min"` or `"max"`.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
        }
    }
}

/// Collectives between the ranks of a group.
///
/// Every rank of the group must make the same collective calls in the same order with the same
/// op, dtype and shape (and root); a difference is detected and reported as
/// [`CommError::Mismatch`]. Inputs are never modified; results are new tensors. After a timeout or
/// a failed peer the communicator is poisoned and every later call returns an error.
pub trait Communicator {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Short backend name: `"local"`, `"mpi"`, `"nccl"` (decorators forward their inner one).
    fn backend(&self) -> &'static str;

    /// Reduces `tensor` element-wise over all ranks; every rank gets the result (same shape).
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// In-place [`Communicator::all_reduce`] (as `torch.distributed.all_reduce`): overwrites
    /// `tensor`, which must be a contiguous CPU tensor (for the CPU backends), with the result.
    /// No output is allocated, which matters for large buffers. Other views of the same storage
    /// see the change. The default implementation calls `all_reduce` and copies the result back.
    fn all_reduce_inplace(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        let r = self.all_reduce(tensor, op)?;
        data::copy_into("all_reduce", tensor, &r)
    }

    /// Reduces `tensor` (`L` elements, same on every rank) element-wise over all ranks and returns
    /// this rank's partition as a 1-D tensor: elements [`partition_range`]`(L, n, rank)`, i.e.
    /// partitions of `ceil(L / n)` with the last ones shorter or empty.
    fn reduce_scatter(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// Reduces `tensor` element-wise over all ranks onto rank `root` only (as
    /// `torch.distributed.reduce`, and what DeepSpeed's ZeRO-2 uses to hand each gradient
    /// bucket's pieces to the ranks that own them): `root` gets `Some(result)` (same shape), the
    /// others `None`. The default implementation all-reduces (twice the traffic of a reduce);
    /// backends override it. A `root` outside the group is an error on every rank.
    fn reduce(&self, tensor: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        if root >= self.world_size() {
            return Err(CommError::invalid(
                "reduce",
                format!(
                    "root {root} is not a rank of a group of {}",
                    self.world_size()
                ),
            ));
        }
        let r = self.all_reduce(tensor, op)?;
        Ok((self.rank() == root).then_some(r))
    }

    /// [`Communicator::reduce_scatter`] into an existing tensor (as `reduce_scatter_tensor`):
    /// `output` must be a contiguous tensor of the input's dtype with exactly this rank's
    /// partition length, and must not overlap the input. Avoids allocating the result. A wrong
    /// `output` is reported after the collective ran, so the ranks stay in step. The default
    /// implementation calls `reduce_scatter` and copies.
    fn reduce_scatter_into(&self, tensor: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        let r = self.reduce_scatter(tensor, op)?;
        data::copy_into("reduce_scatter", output, &r)
    }

    /// [`Communicator::all_gather`] into an existing tensor (as `all_gather_into_tensor`):
    /// `output` must be contiguous, of the input's dtype, with `world_size` times its elements,
    /// and must not overlap the input. The default implementation calls `all_gather` and copies.
    fn all_gather_into(&self, tensor: &Tensor, output: &Tensor) -> Result<()> {
        let r = self.all_gather(tensor)?;
        data::copy_into("all_gather", output, &r)
    }

    /// Concatenates every rank's `tensor` (same shape on every rank) along dimension 0, in rank
    /// order; a 0-d tensor gives a 1-D result of `world_size` elements.
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;

    /// Returns rank `root`'s `tensor` on every rank. Non-root ranks pass a tensor of the same
    /// shape and dtype (its values are ignored).
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor>;

    /// Returns once every rank has called `barrier`.
    fn barrier(&self) -> Result<()>;

    /// Sends `tensor` to rank `dst` (which must call [`Communicator::recv`] with the same shape
    /// and dtype). May block until the receiver is ready (MPI semantics); `LocalComm` buffers.
    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()>;

    /// Receives a tensor of shape `dims` and `dtype` sent by rank `src`.
    fn recv(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor>;

    /// Splits the group (a collective over all ranks): ranks passing the same `Some(color)` form
    /// a new group, ordered by `(key, old rank)`; ranks passing `None` get `None`.
    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>>;

    /// Creates a group of the listed ranks (a collective over all ranks, like
    /// `torch.distributed.new_group`): members get their communicator, with ranks numbered in
    /// list order; the others get `None`.
    fn new_group(&self, ranks: &[usize]) -> Result<Option<Box<dyn Communicator>>> {
        let n = self.world_size();
        let mut seen = vec![false; n];
        for &r in ranks {
            if r >= n || seen[r] {
                return Err(CommError::invalid(
                    "new_group",
                    format!("ranks {ranks:?}: each must be distinct and below {n}"),
                ));
            }
            seen[r] = true;
        }
        let me = self.rank();
        match ranks.iter().position(|&r| r == me) {
            Some(pos) => self.split(Some(0), pos),
            None => self.split(None, 0),
        }
    }

    /// [`Communicator::reduce_scatter`] over several tensors (DeepSpeed's
    /// `reduce_scatter_coalesced`): each is partitioned and reduced on its own.
    fn reduce_scatter_coalesced(&self, tensors: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
        tensors.iter().map(|t| self.reduce_scatter(t, op)).collect()
    }
}

impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn backend(&self) -> &'static str {
        (**self).backend()
    }
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        (**self).all_reduce(tensor, op)
    }
    fn all_reduce_inplace(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        (**self).all_reduce_inplace(tensor, op)
    }
    fn reduce_scatter(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        (**self).reduce_scatter(tensor, op)
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        (**self).all_gather(tensor)
    }
    fn reduce_scatter_into(&self, tensor: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        (**self).reduce_scatter_into(tensor, output, op)
    }
    fn reduce(&self, tensor: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        (**self).reduce(tensor, op, root)
    }
    fn all_gather_into(&self, tensor: &Tensor, output: &Tensor) -> Result<()> {
        (**self).all_gather_into(tensor, output)
    }
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        (**self).broadcast(tensor, root)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        (**self).send(tensor, dst)
    }
    fn recv(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
        (**self).recv(src, dims, dtype)
    }
    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        (**self).split(color, key)
    }
}

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
