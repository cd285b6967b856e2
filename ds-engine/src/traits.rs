//! What the engine trains: any [`Model`], i.e. candle `Var`s with names in a fixed order,
//! optionally grouped into blocks, and a forward + backward pass over the model's own kind of
//! micro-batch ([`Model::Batch`]: token ids for a language model, images and labels for a
//! classifier, ...).
//!
//! The model library (`ds-models`) implements it for its GPT (fused kernels, activation
//! checkpointing, per-block ZeRO-3 gathering) and MLP (plain candle autograd); a user implements
//! it for their own network (see this crate's `examples/custom_model.rs`).

use std::ops::Range;

use candle_core::{DType, Device, Tensor, Var};
/// The activation-checkpointing policy a [`Model`] receives (re-exported from `ds-ckpt-act`).
pub use ds_ckpt_act::Policy;

/// A trainable model as the engine sees it: parameters (candle `Var`s on the model's device)
/// in a fixed order, optionally grouped into blocks (ZeRO-3's gather granularity; parameters
/// outside every block stay whole on every rank), and a forward + backward pass over one
/// micro-batch of the model's [`Model::Batch`].
///
/// A model without blocks implements four items; ZeRO-3 then keeps every parameter whole on
/// every rank between steps (only the optimizer state and gradients are partitioned):
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use ds_engine::traits::{autograd_forward_backward, BlockEvent, FwdBwd, Model, NamedParam, Policy};
///
/// /// y = w * x, least squares.
/// struct Scale { w: Var }
/// impl Model for Scale {
///     type Batch = (Tensor, Tensor);
///     fn params(&self) -> Vec<NamedParam> {
///         vec![NamedParam { name: "w".into(), var: self.w.clone() }]
///     }
///     fn param_shapes(&self) -> Vec<Vec<usize>> { vec![vec![1]] }
///     fn forward_backward_hooked(
///         &self, (x, y): &(Tensor, Tensor), _policy: Policy,
///         hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
///     ) -> candle_core::Result<FwdBwd> {
///         autograd_forward_backward(self, || x.broadcast_mul(&self.w)?.sub(y)?.sqr()?.mean_all(), hook)
///     }
/// }
/// let m = Scale { w: Var::new(&[1f32], &Device::Cpu)? };
/// let x = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// let fb = m.forward_backward_hooked(&(x.clone(), (&x * 3.0)?), Policy::None, &mut |_| Ok(()))?;
/// // d/dw mean((w x - 3x)^2) at w = 1: mean(2 (w - 3) x^2) = -10
/// assert_eq!(fb.grads[0].as_ref().unwrap().to_vec1::<f32>()?, vec![-10.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait Model {
    /// One micro-batch as the model takes it (the engine passes it through untouched).
    type Batch;

    /// Unique parameters (their current variables) in a fixed order. A released block's
    /// variables are empty.
    fn params(&self) -> Vec<NamedParam>;

    /// Parameter shapes in [`Model::params`] order (also while blocks are released).
    fn param_shapes(&self) -> Vec<Vec<usize>>;

    /// For each block in order, its range of indices into [`Model::params`] (disjoint,
    /// ascending); none by default.
    fn block_param_ranges(&self) -> Vec<Range<usize>> {
        Vec::new()
    }

    /// Installs block `i`'s parameter values (flat f32, in [`Model::params`] order), in the
    /// parameters' dtype on the model's device.
    fn gather_block(&self, i: usize, _flat: &[f32]) -> candle_core::Result<()> {
        candle_core::bail!("this model has no block {i}")
    }

    /// Drops block `i`'s parameter storage (ZeRO-3 between uses).
    fn release_block(&self, i: usize) -> candle_core::Result<()> {
        candle_core::bail!("this model has no block {i}")
    }

    /// Whether [`Model::forward_backward_hooked`] honours an activation-checkpointing
    /// policy (recomputing blocks in the backward pass). A model without it is refused a
    /// checkpointing config, and at ZeRO-3 gets all blocks gathered around the pass.
    fn supports_checkpointing(&self) -> bool {
        false
    }

    /// Sets the micro-step that keys random masks (dropout); nothing by default.
    fn set_step(&self, _step: u64) {}

    /// The model's hyperparameters that its parameter shapes do not show (a transformer's
    /// head count, say), saved with checkpoints and compared on load; `Null` (nothing) by
    /// default.
    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// The device the model's parameters live on (the engine builds each batch there); the
    /// CPU by default. The engine's partitions stay in host memory whatever the device:
    /// gradients are read back from the device and updated weights installed on it.
    fn device(&self) -> Device {
        Device::Cpu
    }

    /// Keeps checkpointed blocks' saved inputs in host memory
    /// (`activation_checkpointing.cpu_checkpointing`) when `on`. Returns whether the model
    /// honours it; the default honours it only on the CPU (where the inputs already are in
    /// host memory), and the engine refuses the key otherwise.
    fn set_cpu_checkpointing(&mut self, _on: bool) -> bool {
        self.device().is_cpu()
    }

    /// Synchronises the device before the pass's timers are read (`wall_clock_breakdown`,
    /// `activation_checkpointing.profile`), so that on a GPU they time the work rather than its
    /// launch; nothing by default.
    fn set_sync_timers(&mut self, _on: bool) {}

    /// Overwrites the values of parameter `index` (present), converted to its dtype on its
    /// device.
    fn set_param(&self, index: usize, data: &[f32]) -> candle_core::Result<()> {
        let p = self.params();
        let Some(np) = p.get(index) else {
            candle_core::bail!("no parameter {index}");
        };
        set_var(&np.var, data)
    }

    /// The loss of `batch` and every parameter's gradient (in [`Model::params`] order,
    /// detached; `None` = no gradient), calling `hook` with [`BlockEvent::Gather`] before a
    /// block's parameters are used and [`BlockEvent::Release`] when they may be dropped, and
    /// recomputing the blocks `policy` checkpoints when the model supports it
    /// ([`Model::supports_checkpointing`]).
    fn forward_backward_hooked(
        &self,
        batch: &Self::Batch,
        policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd>;

    /// [`Model::forward_backward_hooked`] handing the gradients to `sink` as they are produced
    /// (the engine's ZeRO-2/3 reduces them bucket by bucket during the backward pass) instead
    /// of returning them: `sink(params, grads)` gets the gradients of the parameter indices
    /// `params` in order (`None` = no gradient, i.e. zero). Every parameter is handed over
    /// exactly once; giving the groups last-first and contiguous (each group ending where the
    /// previous one started, as a backward pass produces them) lets the engine fill its
    /// buckets without gaps. The gradients are those of `loss * loss_scale` (fp16 loss
    /// scaling). The returned [`FwdBwd::grads`] is empty.
    ///
    /// The default runs [`Model::forward_backward_hooked`], scales and hands all gradients
    /// over at once after the pass; a model that can do better overrides it (the GPT hands
    /// over each block's gradients right after that block's backward).
    fn forward_backward_streamed(
        &self,
        batch: &Self::Batch,
        policy: Policy,
        loss_scale: f32,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
        sink: &mut GradSink<'_>,
    ) -> candle_core::Result<FwdBwd> {
        let fb = self.forward_backward_hooked(batch, policy, hook)?;
        hand_over_all(fb, loss_scale, sink)
    }
}

/// The default hand-over of [`Model::forward_backward_streamed`]: all of a finished pass's
/// gradients, times `loss_scale`, in one group.
pub fn hand_over_all(
    mut fb: FwdBwd,
    loss_scale: f32,
    sink: &mut GradSink<'_>,
) -> candle_core::Result<FwdBwd> {
    let mut grads = std::mem::take(&mut fb.grads);
    if loss_scale != 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = g.affine(f64::from(loss_scale), 0.0)?;
        }
    }
    let n = grads.len();
    sink(0..n, grads)?;
    Ok(fb)
}

/// Where [`Model::forward_backward_streamed`] hands gradients: (parameter indices, their
/// gradients in order; `None` = zero).
pub type GradSink<'a> =
    dyn FnMut(Range<usize>, Vec<Option<Tensor>>) -> candle_core::Result<()> + 'a;

/// A forward + backward pass by candle autograd for any [`Model`] whose `loss()` builds a graph
/// over its parameters: every block is gathered first (the graph keeps all of them until the
/// backward pass ends) and released after. The building block of a model's
/// [`Model::forward_backward_hooked`].
pub fn autograd_forward_backward<M: Model + ?Sized>(
    model: &M,
    loss: impl FnOnce() -> candle_core::Result<Tensor>,
    hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
) -> candle_core::Result<FwdBwd> {
    let nblocks = model.block_param_ranges().len();
    for i in 0..nblocks {
        hook(BlockEvent::Gather(i))?;
    }
    let t0 = std::time::Instant::now();
    let l = loss()?;
    let value = l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let fwd_ms = t0.elapsed().as_secs_f64() * 1e3;
    let grads = l.backward()?;
    let out: Vec<Option<Tensor>> = model
        .params()
        .iter()
        .map(|p| grads.get(p.var.as_tensor()).map(|g| g.detach()))
        .collect();
    drop(grads);
    let bwd_ms = t0.elapsed().as_secs_f64() * 1e3 - fwd_ms;
    for i in 0..nblocks {
        hook(BlockEvent::Release(i))?;
    }
    Ok(FwdBwd {
        loss: value,
        grads: out,
        fwd_ms,
        bwd_ms,
        segments: Vec::new(),
    })
}

/// A micro-batch of token sequences for a language model (the GPT's and the MLP's
/// [`Model::Batch`]): `B` sequences of the model's length, row-major, and as many next-token
/// targets (what the data loaders give).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Input token ids.
    pub ids: Vec<u32>,
    /// Target token ids, one per input.
    pub targets: Vec<u32>,
}

impl From<(Vec<u32>, Vec<u32>)> for Tokens {
    fn from((ids, targets): (Vec<u32>, Vec<u32>)) -> Self {
        Tokens { ids, targets }
    }
}

impl Tokens {
    /// The batch as (B, `seq`) u32 tensors on `dev`; an error naming the lengths unless both
    /// hold the same positive multiple of `seq` ids.
    pub fn tensors(&self, seq: usize, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let n = self.ids.len();
        if seq == 0 || n == 0 || !n.is_multiple_of(seq) || self.targets.len() != n {
            candle_core::bail!(
                "a micro-batch needs inputs and targets of equal length, a multiple of seq ({seq}); got {} and {}",
                n,
                self.targets.len()
            );
        }
        Ok((
            Tensor::from_slice(&self.ids, (n / seq, seq), dev)?,
            Tensor::from_slice(&self.targets, (n / seq, seq), dev)?,
        ))
    }
}

/// A named trainable parameter.
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Dotted name, e.g. `blocks.0.qkv.weight`.
    pub name: String,
    /// The variable.
    pub var: Var,
}

/// What [`Model::forward_backward_hooked`] asks of its caller around each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockEvent {
    /// Block `i` is about to run (forward, or recompute + backward): its parameters must be
    /// present ([`Model::gather_block`]).
    Gather(usize),
    /// Block `i` is done for now: its parameters may be released ([`Model::release_block`]).
    Release(usize),
}

/// Result of a forward + backward pass ([`Model::forward_backward_hooked`]).
#[derive(Debug)]
pub struct FwdBwd {
    /// The loss.
    pub loss: f32,
    /// Gradient per parameter ([`Model::params`] order), detached.
    pub grads: Vec<Option<Tensor>>,
    /// Forward milliseconds (with checkpointing: the forward without inner graphs).
    pub fwd_ms: f64,
    /// Backward milliseconds (with checkpointing: including the recomputation).
    pub bwd_ms: f64,
    /// Per checkpointed block: (index, forward ms, recompute + backward ms) — what
    /// `activation_checkpointing.profile` reports.
    pub segments: Vec<(usize, f64, f64)>,
}

/// Overwrites a variable's values with `data` (f32, the variable's element count), converted
/// to the variable's dtype on its device. A contiguous f32 CPU variable is written in place
/// (its storage locked for writing meanwhile): no intermediate tensor.
pub fn set_var(v: &Var, data: &[f32]) -> candle_core::Result<()> {
    if v.device().is_cpu()
        && v.dtype() == DType::F32
        && v.is_contiguous()
        && v.elem_count() == data.len()
    {
        return ds_zero::zero::with_f32_mut(v, |d| d.copy_from_slice(data))
            .map_err(|e| candle_core::Error::Msg(e.to_string()));
    }
    let t = Tensor::from_slice(data, v.shape(), v.device())?;
    if v.dtype() == DType::F32 {
        v.set(&t)
    } else {
        v.set(&t.to_dtype(v.dtype())?)
    }
}

/// Total number of parameter elements.
pub fn numel(params: &[NamedParam]) -> usize {
    params.iter().map(|p| p.var.elem_count()).sum()
}
