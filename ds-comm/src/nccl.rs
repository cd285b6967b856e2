//! [`NcclComm`]: NCCL through cudarc, loaded at run time.
//!
//! cudarc panics when `libcuda`/`libnccl` are missing, so every constructor first probes the
//! libraries with `libloading` ([`probe_libraries`]) and returns [`CommError::Backend`] instead;
//! cudarc calls are also wrapped in `catch_unwind` as a second guard.
//!
//! The NCCL unique id is created on rank 0 and shared through [`crate::rendezvous`] (the
//! `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT` environment), or passed in by the
//! caller (e.g. broadcast over MPI) with [`NcclComm::with_id`].
//!
//! The [`Communicator`] implementation takes CPU candle tensors, staged through device buffers
//! (correct on any GPU, but it measures PCIe as much as NCCL), and, with the `cuda` feature
//! (candle's CUDA backend, which needs nvcc to build: `scripts/cuda-build.sh`), CUDA candle
//! tensors, reduced in place on the device with no staging. Create the communicator on candle's
//! stream with [`NcclComm::from_env_on_device`]. The conformance suite runs unchanged on both
//! (`examples/nccl_conformance.rs`; `--device` runs it on device tensors).
//! Collectives block until the stream completes; there is no timeout (NCCL would need
//! `ncclCommAbort` from a watchdog thread).

use crate::data::{self, Elem};
use crate::error::{CommError, Result};
use crate::local::gathered_dims;
use crate::rendezvous::{exchange_blob, DistEnv};
use crate::{partition_range, Communicator, ReduceOp};
use candle_core::{DType, Tensor};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType};
use half::{bf16, f16};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

/// Options for [`NcclComm`].
#[derive(Debug, Clone, PartialEq)]
pub struct NcclCommOptions {
    /// Deadline for the TCP rendezvous. Default 300 s.
    pub rendezvous_timeout: Duration,
    /// CUDA device ordinal; `None` uses `LOCAL_RANK`.
    pub device: Option<usize>,
    /// Compare call descriptors across ranks before each collective. Default true.
    pub check_calls: bool,
}

impl Default for NcclCommOptions {
    fn default() -> Self {
        Self {
            rendezvous_timeout: Duration::from_secs(300),
            device: None,
            check_calls: true,
        }
    }
}

fn nccl_err(msg: impl Into<String>) -> CommError {
    CommError::Backend {
        backend: "nccl".into(),
        msg: msg.into(),
    }
}

/// Library names cudarc 0.19 tries (a subset is enough to know it will find one).
const CUDA_LIBS: [&str; 2] = ["libcuda.so", "libcuda.so.1"];
const NCCL_LIBS: [&str; 1] = ["libnccl.so"];

/// Checks that libcuda and libnccl can be loaded under the names cudarc looks for, without
/// touching cudarc (which would panic).
pub fn probe_libraries() -> Result<()> {
    let loads = |name: &str| {
        // SAFETY: loading a system library runs its initialisers; libcuda/libnccl are designed
        // to be dlopen'ed.
        unsafe { libloading::Library::new(name) }.is_ok()
    };
    if !CUDA_LIBS.iter().any(|n| loads(n)) {
        return Err(nccl_err(
            "the CUDA driver library (libcuda.so / libcuda.so.1) is not installed or not on the loader path: no GPU here?",
        ));
    }
    if !NCCL_LIBS.iter().any(|n| loads(n)) {
        let hint = if loads("libnccl.so.2") {
            " (libnccl.so.2 is present but cudarc looks for libnccl.so: install libnccl-dev or put a symlink libnccl.so -> libnccl.so.2 on LD_LIBRARY_PATH)"
        } else {
            ""
        };
        return Err(nccl_err(format!("libnccl.so cannot be loaded{hint}")));
    }
    Ok(())
}

fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        nccl_err(format!("{what}: cudarc panicked: {msg}"))
    })
}

/// Element types NCCL moves and reduces.
trait NcclElem: Elem + NcclType + DeviceRepr + ValidAsZeroBits {}
impl NcclElem for f32 {}
impl NcclElem for f64 {}
impl NcclElem for f16 {}
impl NcclElem for bf16 {}
impl NcclElem for u8 {}
impl NcclElem for u32 {}
impl NcclElem for i64 {}

macro_rules! with_nccl_elem {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {{
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            other => Err(CommError::UnsupportedDType {
                op: $op.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }};
}

fn nccl_op(op: ReduceOp) -> cudarc::nccl::ReduceOp {
    match op {
        ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
        ReduceOp::Avg => cudarc::nccl::ReduceOp::Avg,
        ReduceOp::Min => cudarc::nccl::ReduceOp::Min,
        ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
    }
}

/// One rank of an NCCL communicator (one process per GPU). Not `Send` (cudarc's `Comm` is not).
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    seq: Cell<u64>,
    options: NcclCommOptions,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world_size", &self.size)
            .finish()
    }
}

impl NcclComm {
    /// Joins the job described by the environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`): rank 0 creates the NCCL id and sends it over TCP.
    pub fn from_env(options: NcclCommOptions) -> Result<Self> {
        Self::from_env_on(None, options)
    }

    /// [`NcclComm::from_env`] on candle's CUDA device `dev` and its stream (feature `cuda`), so
    /// that collectives on the device's tensors are ordered with candle's kernels.
    #[cfg(feature = "cuda")]
    pub fn from_env_on_device(
        dev: &candle_core::CudaDevice,
        options: NcclCommOptions,
    ) -> Result<Self> {
        Self::from_env_on(Some(dev.cuda_stream()), options)
    }

    fn from_env_on(stream: Option<Arc<CudaStream>>, options: NcclCommOptions) -> Result<Self> {
        probe_libraries()?;
        let env = DistEnv::from_env()?;
        let blob = if env.rank == 0 {
            let id = guarded("ncclGetUniqueId", Id::new)?
                .map_err(|e| nccl_err(format!("ncclGetUniqueId failed: {:?}", e.0)))?;
            let mut b = [0u8; 128];
            for (d, s) in b.iter_mut().zip(id.internal().iter()) {
                *d = *s as u8;
            }
            Some(b)
        } else {
            None
        };
        let blob = exchange_blob(&env, blob, options.rendezvous_timeout)?;
        match stream {
            Some(stream) => {
                Self::with_id_on_stream(env.rank, env.world_size, stream, blob, options)
            }
            None => {
                let device = options.device.unwrap_or(env.local_rank);
                Self::with_id(env.rank, env.world_size, device, blob, options)
            }
        }
    }

    /// Creates this rank's communicator from an id shared by other means (e.g. an MPI broadcast
    /// of the 128 bytes rank 0 got from [`NcclComm::new_id`]).
    pub fn with_id(
        rank: usize,
        world_size: usize,
        device: usize,
        id: [u8; 128],
        options: NcclCommOptions,
    ) -> Result<Self> {
        probe_libraries()?;
        let ctx = guarded("cuInit/cuCtx", || CudaContext::new(device))?
            .map_err(|e| nccl_err(format!("cannot open CUDA device {device}: {e:?}")))?;
        Self::with_id_on_stream(rank, world_size, ctx.default_stream(), id, options)
    }

    /// [`NcclComm::with_id`] on an existing CUDA stream (e.g. candle's
    /// `CudaDevice::cuda_stream()`): collectives are queued on that stream.
    pub fn with_id_on_stream(
        rank: usize,
        world_size: usize,
        stream: Arc<CudaStream>,
        id: [u8; 128],
        options: NcclCommOptions,
    ) -> Result<Self> {
        probe_libraries()?;
        if rank >= world_size {
            return Err(CommError::invalid(
                "nccl init",
                format!("rank {rank} >= world size {world_size}"),
            ));
        }
        let mut raw = [0 as std::ffi::c_char; 128];
        for (d, s) in raw.iter_mut().zip(id.iter()) {
            *d = *s as std::ffi::c_char;
        }
        let comm = guarded("ncclCommInitRank", || {
            Comm::from_rank(stream.clone(), rank, world_size, Id::uninit(raw))
        })?
        .map_err(|e| nccl_err(format!("ncclCommInitRank failed: {:?}", e.0)))?;
        Ok(NcclComm {
            comm,
            stream,
            rank,
            size: world_size,
            seq: Cell::new(0),
            options,
        })
    }

    /// A fresh NCCL unique id (call on one rank, share the bytes with the others).
    pub fn new_id() -> Result<[u8; 128]> {
        probe_libraries()?;
        let id = guarded("ncclGetUniqueId", Id::new)?
            .map_err(|e| nccl_err(format!("ncclGetUniqueId failed: {:?}", e.0)))?;
        let mut b = [0u8; 128];
        for (d, s) in b.iter_mut().zip(id.internal().iter()) {
            *d = *s as u8;
        }
        Ok(b)
    }

    /// cudarc's communicator, for collectives on device buffers.
    pub fn raw(&self) -> &Comm {
        &self.comm
    }

    fn up<T: NcclElem>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(|e| nccl_err(format!("host to device copy: {e:?}")))
    }

    fn zeros<T: NcclElem>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| nccl_err(format!("device allocation: {e:?}")))
    }

    fn down<T: NcclElem>(&self, d: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut v = self
            .stream
            .clone_dtoh(d)
            .map_err(|e| nccl_err(format!("device to host copy: {e:?}")))?;
        v.truncate(n);
        Ok(v)
    }

    fn check(
        &self,
        op: &str,
        code: i64,
        dtype: Option<DType>,
        len: usize,
        root: usize,
    ) -> Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        if !self.options.check_calls || self.size <= 1 {
            return Ok(());
        }
        let dt = dtype
            .map(|d| d.size_in_bytes() as i64 * 16 + d as i64)
            .unwrap_or(0);
        let d = [seq as i64, code, dt, len as i64, root as i64];
        let mut v = [0i64; 10];
        for i in 0..5 {
            v[i] = d[i];
            v[5 + i] = -d[i];
        }
        let s = self.up(&v)?;
        let mut r = self.zeros::<i64>(10)?;
        self.comm
            .all_reduce(&s, &mut r, &cudarc::nccl::ReduceOp::Max)
            .map_err(|e| nccl_err(format!("{op}: call check failed: {:?}", e.0)))?;
        let r = self.down(&r, 10)?;
        if (0..5).all(|i| r[i] == -r[5 + i]) {
            Ok(())
        } else {
            Err(CommError::Mismatch {
                seq,
                detail: format!(
                    "ranks disagree on {op} (call #{seq}): op, dtype, length or root differ"
                ),
            })
        }
    }

    fn all_reduce_t<T: NcclElem>(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let len = t.elem_count();
        let host = data::to_vec::<T>(t)?;
        if len == 0 {
            return data::from_vec(host, t.dims());
        }
        let s = self.up(&host)?;
        let mut r = self.zeros::<T>(len)?;
        self.comm
            .all_reduce(&s, &mut r, &nccl_op(op))
            .map_err(|e| nccl_err(format!("all_reduce: {:?}", e.0)))?;
        data::from_vec(self.down(&r, len)?, t.dims())
    }

    fn reduce_scatter_t<T: NcclElem>(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let len = t.elem_count();
        let n = self.size;
        let c = len.div_ceil(n).max(1);
        let mut host = data::zeroed::<T>(c * n);
        data::with_slice::<T, _>(t, |s| host[..len].copy_from_slice(s))?;
        let s = self.up(&host)?;
        let mut r = self.zeros::<T>(c)?;
        self.comm
            .reduce_scatter(&s, &mut r, &nccl_op(op))
            .map_err(|e| nccl_err(format!("reduce_scatter: {:?}", e.0)))?;
        let (lo, hi) = partition_range(len, n, self.rank);
        data::from_vec(self.down(&r, hi - lo)?, &[hi - lo])
    }

    /// `ncclReduce` onto `root`: only the root allocates a device (and host) result.
    fn reduce_t<T: NcclElem>(
        &self,
        t: &Tensor,
        op: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        let len = t.elem_count();
        let is_root = self.rank == root;
        if len == 0 {
            return Ok(is_root.then(|| t.clone()));
        }
        let s = self.up(&data::to_vec::<T>(t)?)?;
        if is_root {
            let mut r = self.zeros::<T>(len)?;
            self.comm
                .reduce(&s, Some(&mut r), &nccl_op(op), root as i32)
                .map_err(|e| nccl_err(format!("reduce: {:?}", e.0)))?;
            Ok(Some(data::from_vec(self.down(&r, len)?, t.dims())?))
        } else {
            self.comm
                .reduce(&s, None::<&mut CudaSlice<T>>, &nccl_op(op), root as i32)
                .map_err(|e| nccl_err(format!("reduce: {:?}", e.0)))?;
            self.stream
                .synchronize()
                .map_err(|e| nccl_err(format!("reduce: {e:?}")))?;
            Ok(None)
        }
    }

    fn all_gather_t<T: NcclElem>(&self, t: &Tensor) -> Result<Tensor> {
        let len = t.elem_count();
        let dims = gathered_dims(t.dims(), self.size);
        if len == 0 {
            return data::from_vec(Vec::<T>::new(), &dims);
        }
        let s = self.up(&data::to_vec::<T>(t)?)?;
        let mut r = self.zeros::<T>(len * self.size)?;
        self.comm
            .all_gather(&s, &mut r)
            .map_err(|e| nccl_err(format!("all_gather: {:?}", e.0)))?;
        data::from_vec(self.down(&r, len * self.size)?, &dims)
    }

    fn broadcast_t<T: NcclElem>(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let len = t.elem_count();
        if len == 0 {
            return Ok(t.clone());
        }
        let mut r = self.zeros::<T>(len)?;
        if self.rank == root {
            let s = self.up(&data::to_vec::<T>(t)?)?;
            self.comm.broadcast(Some(&s), &mut r, root as i32)
        } else {
            self.comm
                .broadcast(None::<&CudaSlice<T>>, &mut r, root as i32)
        }
        .map_err(|e| nccl_err(format!("broadcast: {:?}", e.0)))?;
        data::from_vec(self.down(&r, len)?, t.dims())
    }
}

#[cfg(feature = "cuda")]
#[path = "nccl_device.rs"]
mod device;

/// The length code the call check compares for `all_gather` (element count and shape).
fn shape_code(t: &Tensor) -> usize {
    t.dims()
        .iter()
        .fold(t.elem_count(), |a, &d| a.wrapping_mul(31).wrapping_add(d))
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    // Each collective first compares its call descriptor across ranks (a collective too), then
    // runs on device tensors in place (feature `cuda`) or stages host tensors.

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let (dt, n) = (Some(tensor.dtype()), tensor.elem_count());
        self.check("all_reduce", op as i64, dt, n, 0)?;
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            return self.device_all_reduce(tensor, op);
        }
        let t = data::cpu_contiguous("all_reduce", tensor)?;
        with_nccl_elem!(t.dtype(), "all_reduce", T => self.all_reduce_t::<T>(&t, op))
    }

    fn reduce_scatter(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let (dt, n) = (Some(tensor.dtype()), tensor.elem_count());
        self.check("reduce_scatter", 10 + op as i64, dt, n, 0)?;
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            return self.device_reduce_scatter(tensor, op);
        }
        let t = data::cpu_contiguous("reduce_scatter", tensor)?;
        with_nccl_elem!(t.dtype(), "reduce_scatter", T => self.reduce_scatter_t::<T>(&t, op))
    }

    fn reduce(&self, tensor: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        if root >= self.size {
            return Err(CommError::invalid(
                "reduce",
                format!("root {root} out of range for world size {}", self.size),
            ));
        }
        let (dt, n) = (Some(tensor.dtype()), tensor.elem_count());
        self.check("reduce", 50 + op as i64, dt, n, root)?;
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            return self.device_reduce(tensor, op, root);
        }
        let t = data::cpu_contiguous("reduce", tensor)?;
        with_nccl_elem!(t.dtype(), "reduce", T => self.reduce_t::<T>(&t, op, root))
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        self.check(
            "all_gather",
            20,
            Some(tensor.dtype()),
            shape_code(tensor),
            0,
        )?;
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            return self.device_all_gather(tensor);
        }
        let t = data::cpu_contiguous("all_gather", tensor)?;
        with_nccl_elem!(t.dtype(), "all_gather", T => self.all_gather_t::<T>(&t))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.size {
            return Err(CommError::invalid(
                "broadcast",
                format!("root {root} out of range for world size {}", self.size),
            ));
        }
        let (dt, n) = (Some(tensor.dtype()), tensor.elem_count());
        self.check("broadcast", 30, dt, n, root)?;
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            return self.device_broadcast(tensor, root);
        }
        let t = data::cpu_contiguous("broadcast", tensor)?;
        with_nccl_elem!(t.dtype(), "broadcast", T => self.broadcast_t::<T>(&t, root))
    }

    fn all_reduce_inplace(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            let (dt, n) = (Some(tensor.dtype()), tensor.elem_count());
            self.check("all_reduce", op as i64, dt, n, 0)?;
            return self.device_all_reduce_inplace(tensor, op);
        }
        let r = self.all_reduce(tensor, op)?;
        data::copy_into("all_reduce", tensor, &r)
    }

    fn reduce_scatter_into(&self, tensor: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            let (dt, n) = (Some(tensor.dtype()), tensor.elem_count());
            self.check("reduce_scatter", 10 + op as i64, dt, n, 0)?;
            return self.device_reduce_scatter_into(tensor, output, op);
        }
        let r = self.reduce_scatter(tensor, op)?;
        data::copy_into("reduce_scatter", output, &r)
    }

    fn all_gather_into(&self, tensor: &Tensor, output: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        if tensor.device().is_cuda() {
            self.check(
                "all_gather",
                20,
                Some(tensor.dtype()),
                shape_code(tensor),
                0,
            )?;
            return self.device_all_gather_into(tensor, output);
        }
        let r = self.all_gather(tensor)?;
        data::copy_into("all_gather", output, &r)
    }

    fn barrier(&self) -> Result<()> {
        self.check("barrier", 40, None, 0, 0)?;
        // An all-reduce of one byte, then a stream sync.
        let t = Tensor::zeros(1, DType::U8, &candle_core::Device::Cpu)?;
        self.all_reduce_t::<u8>(&t, ReduceOp::Max).map(drop)
    }

    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        if dst >= self.size {
            return Err(CommError::invalid(
                "send",
                format!("destination {dst} out of range"),
            ));
        }
        let t = data::cpu_contiguous("send", tensor)?;
        with_nccl_elem!(t.dtype(), "send", T => {
            let s = self.up(&data::to_vec::<T>(&t)?)?;
            self.comm
                .send(&s, dst as i32)
                .map_err(|e| nccl_err(format!("send: {:?}", e.0)))?;
            self.stream
                .synchronize()
                .map_err(|e| nccl_err(format!("send: {e:?}")))
        })
    }

    fn recv(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
        if src >= self.size {
            return Err(CommError::invalid(
                "recv",
                format!("source {src} out of range"),
            ));
        }
        let len: usize = dims.iter().product();
        with_nccl_elem!(dtype, "recv", T => {
            let mut r = self.zeros::<T>(len)?;
            self.comm
                .recv(&mut r, src as i32)
                .map_err(|e| nccl_err(format!("recv: {:?}", e.0)))?;
            data::from_vec(self.down(&r, len)?, dims)
        })
    }

    fn split(&self, _color: Option<u32>, _key: usize) -> Result<Option<Box<dyn Communicator>>> {
        Err(nccl_err(
            "split is not implemented for NCCL yet (ncclCommSplit); create one NcclComm per group",
        ))
    }
}
