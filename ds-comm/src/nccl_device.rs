//! NCCL collectives on CUDA candle tensors, in place on the tensors' device memory (feature
//! `cuda`).
//!
//! A collective writes into a candle tensor through [`InplaceOp1`]/[`InplaceOp2`], whose
//! `cuda_fwd` hands out the mutable `CudaStorage`. Out-of-place results are allocated on the
//! input's device and filled by NCCL. Nothing is staged through host memory. Put the
//! communicator on candle's stream ([`NcclComm::from_env_on_device`]) so that collectives and
//! kernels are ordered without extra synchronisation. On another stream, cudarc's event tracking
//! orders them.

use super::{nccl_err, nccl_op, NcclComm, NcclElem};
use crate::error::{CommError, Result};
use crate::local::gathered_dims;
use crate::{partition_range, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor};
use cudarc::driver::CudaView;
use half::{bf16, f16};
use std::marker::PhantomData;

/// Which collective an in-place op runs.
#[derive(Clone, Copy, Debug)]
enum Kind {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
    Reduce(ReduceOp, usize),
}

/// Runs one collective from `s2` (input) into `s1` (output), both contiguous CUDA storage.
struct Coll<'a, T> {
    comm: &'a NcclComm,
    kind: Kind,
    _t: PhantomData<T>,
}

fn cerr(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

fn span(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| cerr(format!("nccl: the {what} tensor must be contiguous")))
}

impl<T: NcclElem + CudaDType> Coll<'_, T> {
    fn nccl_fail(&self, e: cudarc::nccl::result::NcclError) -> candle_core::Error {
        cerr(format!("nccl {:?}: {:?}", self.kind, e.0))
    }
}

impl<T: NcclElem + CudaDType> InplaceOp2 for Coll<'_, T> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Err(cerr("nccl: device collectives take CUDA tensors".into()))
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (a1, b1) = span(l1, "output")?;
        let (a2, b2) = span(l2, "input")?;
        let input = s2.as_cuda_slice::<T>()?;
        let input = input.slice(a2..b2);
        let out = s1.as_cuda_slice_mut::<T>()?;
        let mut out = out.slice_mut(a1..b1);
        let c = &self.comm.comm;
        let rank = self.comm.rank;
        match self.kind {
            Kind::AllReduce(op) => c.all_reduce(&input, &mut out, &nccl_op(op)),
            Kind::ReduceScatter(op) => c.reduce_scatter(&input, &mut out, &nccl_op(op)),
            Kind::AllGather => c.all_gather(&input, &mut out),
            Kind::Broadcast(root) if root == rank => {
                c.broadcast(Some(&input), &mut out, root as i32)
            }
            Kind::Broadcast(root) => c.broadcast(None::<&CudaView<T>>, &mut out, root as i32),
            Kind::Reduce(op, root) => c.reduce(&input, Some(&mut out), &nccl_op(op), root as i32),
        }
        .map(drop)
        .map_err(|e| self.nccl_fail(e))
    }
}

/// In-place all-reduce of one contiguous CUDA tensor.
struct AllReduceInPlace<'a, T> {
    comm: &'a NcclComm,
    op: ReduceOp,
    _t: PhantomData<T>,
}

impl<T: NcclElem + CudaDType> InplaceOp1 for AllReduceInPlace<'_, T> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-in-place"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        Err(cerr("nccl: device collectives take CUDA tensors".into()))
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let (a, b) = span(l, "all_reduce")?;
        let buf = s.as_cuda_slice_mut::<T>()?;
        let mut view = buf.slice_mut(a..b);
        self.comm
            .comm
            .all_reduce_in_place(&mut view, &nccl_op(self.op))
            .map(drop)
            .map_err(|e| cerr(format!("nccl all_reduce in place: {:?}", e.0)))
    }
}

impl NcclComm {
    /// Runs `kind` from `input` into `output` (both CUDA, same dtype, contiguous).
    fn device_run(&self, kind: Kind, input: &Tensor, output: &Tensor, what: &str) -> Result<()> {
        with_nccl_elem!(input.dtype(), what, T => {
            let c = Coll::<T> { comm: self, kind, _t: PhantomData };
            output.inplace_op2(input, &c).map_err(|e| nccl_err(format!("{what}: {e}")))
        })
    }

    /// The tensor, contiguous (the caller has checked that it is a CUDA tensor).
    fn device_contiguous(&self, _what: &str, t: &Tensor) -> Result<Tensor> {
        Ok(t.contiguous()?)
    }

    pub(super) fn device_all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let t = self.device_contiguous("all_reduce", t)?;
        let out = Tensor::zeros(t.dims(), t.dtype(), t.device())?;
        if t.elem_count() > 0 {
            self.device_run(Kind::AllReduce(op), &t, &out, "all_reduce")?;
        }
        Ok(out)
    }

    pub(super) fn device_all_reduce_inplace(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        if !t.is_contiguous() {
            return Err(CommError::invalid(
                "all_reduce",
                "in-place collectives need a contiguous tensor",
            ));
        }
        if t.elem_count() == 0 {
            return Ok(());
        }
        with_nccl_elem!(t.dtype(), "all_reduce", T => {
            let c = AllReduceInPlace::<T> { comm: self, op, _t: PhantomData };
            t.inplace_op1(&c).map_err(|e| nccl_err(format!("all_reduce: {e}")))
        })
    }

    /// Pads `t` (flattened) with zeros to `c * n` elements when its length is not a multiple.
    fn padded(&self, t: &Tensor) -> Result<(Tensor, usize)> {
        let len = t.elem_count();
        let n = self.size;
        let c = len.div_ceil(n).max(1);
        let flat = t.flatten_all()?;
        if c * n == len {
            return Ok((flat, c));
        }
        let pad = Tensor::zeros(c * n - len, t.dtype(), t.device())?;
        Ok((Tensor::cat(&[&flat, &pad], 0)?, c))
    }

    pub(super) fn device_reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let t = self.device_contiguous("reduce_scatter", t)?;
        let len = t.elem_count();
        let (lo, hi) = partition_range(len, self.size, self.rank);
        if len == 0 {
            return Ok(t.flatten_all()?);
        }
        let (padded, c) = self.padded(&t)?;
        let out = Tensor::zeros(c, t.dtype(), t.device())?;
        self.device_run(Kind::ReduceScatter(op), &padded, &out, "reduce_scatter")?;
        Ok(out.narrow(0, 0, hi - lo)?)
    }

    pub(super) fn device_reduce_scatter_into(
        &self,
        t: &Tensor,
        output: &Tensor,
        op: ReduceOp,
    ) -> Result<()> {
        let t = self.device_contiguous("reduce_scatter", t)?;
        let len = t.elem_count();
        let n = self.size;
        let direct = len % n == 0
            && len > 0
            && output.is_contiguous()
            && output.dtype() == t.dtype()
            && output.elem_count() == len / n
            && output.device().same_device(t.device())
            && !shares_storage(output, &t);
        if direct {
            return self.device_run(
                Kind::ReduceScatter(op),
                &t.flatten_all()?,
                output,
                "reduce_scatter",
            );
        }
        let r = self.device_reduce_scatter(&t, op)?;
        copy_into("reduce_scatter", output, &r)
    }

    pub(super) fn device_all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let t = self.device_contiguous("all_gather", t)?;
        let dims = gathered_dims(t.dims(), self.size);
        let out = Tensor::zeros(dims, t.dtype(), t.device())?;
        if t.elem_count() > 0 {
            self.device_run(Kind::AllGather, &t, &out, "all_gather")?;
        }
        Ok(out)
    }

    pub(super) fn device_all_gather_into(&self, t: &Tensor, output: &Tensor) -> Result<()> {
        let t = self.device_contiguous("all_gather", t)?;
        let direct = t.elem_count() > 0
            && output.is_contiguous()
            && output.dtype() == t.dtype()
            && output.elem_count() == t.elem_count() * self.size
            && output.device().same_device(t.device())
            && !shares_storage(output, &t);
        if direct {
            return self.device_run(Kind::AllGather, &t, output, "all_gather");
        }
        let r = self.device_all_gather(&t)?;
        copy_into("all_gather", output, &r)
    }

    pub(super) fn device_broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let t = self.device_contiguous("broadcast", t)?;
        let out = Tensor::zeros(t.dims(), t.dtype(), t.device())?;
        if t.elem_count() > 0 {
            self.device_run(Kind::Broadcast(root), &t, &out, "broadcast")?;
        }
        Ok(out)
    }

    pub(super) fn device_reduce(
        &self,
        t: &Tensor,
        op: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        let t = self.device_contiguous("reduce", t)?;
        // Every rank passes a receive buffer (NCCL ignores it off the root); only the root keeps it.
        let out = Tensor::zeros(t.dims(), t.dtype(), t.device())?;
        if t.elem_count() > 0 {
            self.device_run(Kind::Reduce(op, root), &t, &out, "reduce")?;
        }
        Ok((self.rank == root).then_some(out))
    }
}

/// Whether two tensors are views of one allocation. Candle refuses an in-place op whose input
/// aliases its output, so an aliased `_into` call (the output a slice of the input's buffer, as
/// DeepSpeed's flat buffers do) goes through a separate result and a device copy instead.
fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    let pa = {
        let (s, _) = a.storage_and_layout();
        &*s as *const candle_core::Storage
    };
    let (s, _) = b.storage_and_layout();
    std::ptr::eq(pa, &*s)
}

/// Copies `src` into `dst` (same element count and dtype) on the device: `dst` is overwritten in
/// place (`slice_set`), so other views of its storage see the result.
fn copy_into(what: &str, dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.elem_count() != src.elem_count() || dst.dtype() != src.dtype() || !dst.is_contiguous() {
        return Err(CommError::invalid(
            what,
            format!(
                "output must be a contiguous {:?} tensor of {} elements, got {:?} of {}",
                src.dtype(),
                src.elem_count(),
                dst.dtype(),
                dst.elem_count()
            ),
        ));
    }
    let flat = dst.flatten_all()?;
    flat.slice_set(&src.flatten_all()?, 0, 0)?;
    Ok(())
}
