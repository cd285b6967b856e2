//! [`PartitionedOptimizer`]: ZeRO as a candle program sees it, over its own `Var`s on any
//! device.
//!
//! A training loop computes gradients with candle autograd as usual; `step_vars` reduces them
//! over the ranks (all-reduce at stages 0-1, reduce-scatter at 2-3), updates this rank's fp32
//! partition with the fused optimizer, and writes the new values into the `Var`s (in their
//! dtype, on their device) on every rank. The partitions (fp32 master weights, optimizer state,
//! reduced gradients) live in host memory whatever the parameters' device (the ZeRO-Offload
//! placement): a GPU model's gradients are read back each step and the updated weights copied
//! to it.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use ds_comm::{Communicator, LocalComm};
//! use ds_zero::optim::{OptimizerSpec, SgdParams};
//! use ds_zero::{PartitionedOptimizer, ZeroOptimizer, ZeroOptions};
//!
//! // Two ranks (threads) fit y = 3x at ZeRO-2, each on its half of the data.
//! let results: Vec<f32> = std::thread::scope(|s| {
//!     LocalComm::create(2).into_iter().map(|comm| s.spawn(move || {
//!         let w = Var::new(&[0f32], &Device::Cpu)?;
//!         let opts = ZeroOptions { stage: 2, gradient_clipping: 0.0, ..Default::default() };
//!         let spec = OptimizerSpec::Sgd(SgdParams { lr: 0.1, ..Default::default() });
//!         let mut z = ZeroOptimizer::for_vars(&[w.clone()], spec, opts, &comm)?;
//!         let x = Tensor::new(&[1f32 + comm.rank() as f32], &Device::Cpu)?;
//!         for _ in 0..50 {
//!             let loss = (x.broadcast_mul(&w)? - (&x * 3.0)?)?.sqr()?.mean_all()?;
//!             let g = loss.backward()?.get(&w).cloned();
//!             z.step_vars(&[w.clone()], &[g], 0.1, &comm)?;
//!         }
//!         Ok::<f32, Box<dyn std::error::Error + Send + Sync>>(w.to_vec1::<f32>()?[0])
//!     })).collect::<Vec<_>>().into_iter().map(|h| h.join().unwrap().unwrap()).collect()
//! });
//! assert!((results[0] - 3.0).abs() < 1e-3 && results[0] == results[1]);
//! ```

use candle_core::{DType, Device, Tensor, Var};
use ds_comm::Communicator;

use crate::optim::{OptimizerSpec, OptimizerState};
use crate::zero::{MemoryReport, StepReport, ZeroOptimizer, ZeroOptions, ZeroPrecision};
use crate::ZeroError;

/// A data-parallel optimizer whose state is partitioned over the ranks (ZeRO stages 0-3),
/// driven with candle `Var`s and their gradients.
pub trait PartitionedOptimizer {
    /// One optimizer step (a collective: every rank calls it): reduces `grads` (one per
    /// parameter in construction order, on any device and dtype; `None` = zero; with fp16 they
    /// carry [`PartitionedOptimizer::loss_scale`]) over the ranks, unscales, clips and updates
    /// this rank's partition, and writes the updated weights into `params` on every rank. An
    /// overflow skips the update everywhere (reported, not an error).
    fn step_vars(
        &mut self,
        params: &[Var],
        grads: &[Option<Tensor>],
        lr: f64,
        comm: &dyn Communicator,
    ) -> Result<StepReport, ZeroError>;
    /// The loss scale the next backward pass should use (1 without fp16).
    fn loss_scale(&self) -> f64;
    /// Steps skipped for inf/nan gradients.
    fn skipped_steps(&self) -> u64;
    /// Bytes this rank holds for the model states.
    fn memory(&self) -> MemoryReport;
    /// This rank's fp32 master partition.
    fn master(&self) -> &[f32];
    /// This rank's optimizer state (for checkpoints).
    fn optimizer_state(&self) -> OptimizerState;
    /// Restores this rank's master partition and optimizer state.
    fn load_state(&mut self, master: &[f32], state: &OptimizerState) -> Result<(), ZeroError>;
    /// Every parameter's current value, flat in construction order (a collective).
    fn gather_params(&self, comm: &dyn Communicator) -> Result<Vec<f32>, ZeroError>;
}

/// `v`'s values as f32 on the host, flat.
fn host_f32(t: &Tensor) -> Result<Vec<f32>, ZeroError> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?)
}

impl ZeroOptimizer {
    /// A [`ZeroOptimizer`] over candle variables (on any device and dtype; rank 0's values are
    /// broadcast so that every rank starts from the same weights), in fp32 precision.
    pub fn for_vars(
        vars: &[Var],
        spec: OptimizerSpec,
        opts: ZeroOptions,
        comm: &dyn Communicator,
    ) -> Result<Self, ZeroError> {
        Self::for_vars_with_precision(vars, spec, opts, ZeroPrecision::F32, comm)
    }

    /// [`ZeroOptimizer::for_vars`] with a training precision (fp16/bf16 masters in fp32).
    pub fn for_vars_with_precision(
        vars: &[Var],
        spec: OptimizerSpec,
        opts: ZeroOptions,
        precision: ZeroPrecision,
        comm: &dyn Communicator,
    ) -> Result<Self, ZeroError> {
        let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        let mut init = Vec::with_capacity(sizes.iter().sum());
        for v in vars {
            init.extend(host_f32(v.as_tensor())?);
        }
        let init = broadcast_from_rank0(init, comm)?;
        let z = Self::with_precision(&sizes, &init, spec, opts, precision, comm)?;
        write_vars(vars, &z.gather_params(comm)?)?;
        Ok(z)
    }
}

/// Rank 0's `values` on every rank (a collective; the values themselves with one rank), as
/// DeepSpeed broadcasts the model at initialisation so that every rank starts alike.
pub fn broadcast_from_rank0(
    values: Vec<f32>,
    comm: &dyn Communicator,
) -> Result<Vec<f32>, ZeroError> {
    if comm.world_size() == 1 {
        return Ok(values);
    }
    let n = values.len();
    Ok(comm
        .broadcast(&Tensor::from_vec(values, n, &Device::Cpu)?, 0)?
        .to_vec1::<f32>()?)
}

/// Writes `flat` (parameter order) into `vars`, each in its dtype on its device.
fn write_vars(vars: &[Var], flat: &[f32]) -> Result<(), ZeroError> {
    let mut off = 0;
    for v in vars {
        let n = v.elem_count();
        let Some(src) = flat.get(off..off + n) else {
            return Err(ZeroError::Shape(format!(
                "{} values for parameters of {} or more",
                flat.len(),
                off + n
            )));
        };
        let t = Tensor::from_slice(src, v.shape(), v.device())?;
        v.set(&t.to_dtype(v.dtype())?)?;
        off += n;
    }
    Ok(())
}

impl PartitionedOptimizer for ZeroOptimizer {
    fn step_vars(
        &mut self,
        params: &[Var],
        grads: &[Option<Tensor>],
        lr: f64,
        comm: &dyn Communicator,
    ) -> Result<StepReport, ZeroError> {
        let numel = self.layout().numel;
        if params.len() != grads.len() {
            return Err(ZeroError::Shape(format!(
                "{} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        let total: usize = params.iter().map(|v| v.elem_count()).sum();
        if total != numel {
            return Err(ZeroError::Shape(format!(
                "the parameters hold {total} values, the optimizer was built for {numel}"
            )));
        }
        let mut flat = Vec::with_capacity(numel);
        for (v, g) in params.iter().zip(grads) {
            match g {
                Some(g) if g.elem_count() == v.elem_count() => flat.extend(host_f32(g)?),
                Some(g) => {
                    return Err(ZeroError::Shape(format!(
                        "a gradient of {} values for a parameter of {}",
                        g.elem_count(),
                        v.elem_count()
                    )))
                }
                None => flat.resize(flat.len() + v.elem_count(), 0.0),
            }
        }
        self.reduce_gradients_swap(&mut flat, comm)?;
        let report = self.step(lr, comm)?;
        if report.applied {
            write_vars(params, &self.gather_params(comm)?)?;
        }
        Ok(report)
    }

    fn loss_scale(&self) -> f64 {
        ZeroOptimizer::loss_scale(self)
    }

    fn skipped_steps(&self) -> u64 {
        ZeroOptimizer::skipped_steps(self)
    }

    fn memory(&self) -> MemoryReport {
        ZeroOptimizer::memory(self)
    }

    fn master(&self) -> &[f32] {
        ZeroOptimizer::master(self)
    }

    fn optimizer_state(&self) -> OptimizerState {
        ZeroOptimizer::optimizer_state(self)
    }

    fn load_state(&mut self, master: &[f32], state: &OptimizerState) -> Result<(), ZeroError> {
        ZeroOptimizer::load_state(self, master, state)
    }

    fn gather_params(&self, comm: &dyn Communicator) -> Result<Vec<f32>, ZeroError> {
        ZeroOptimizer::gather_params(self, comm)
    }
}
