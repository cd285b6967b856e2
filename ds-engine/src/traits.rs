//! What the engine trains: any [`Model`], i.e. an ordered list of blocks with named
//! parameters that computes its loss and gradients for a batch of token ids.
//!
//! The model library (`ds-models`) implements it for its GPT (fused kernels, activation
//! checkpointing, per-block ZeRO-3 gathering) and MLP (plain candle autograd); a user implements
//! it for their own network (see `examples/examples/custom_model.rs`).

use std::ops::Range;

use candle_core::{DType, Device, Tensor, Var};
/// The activation-checkpointing policy a [`Model`] receives (re-exported from `ds-ckpt-act`).
pub use ds_ckpt_act::Policy;

/// A trainable model as the engine sees it: parameters in a fixed order, grouped into blocks
/// (ZeRO-3's gather granularity; parameters outside every block stay whole on every rank),
/// and a forward + backward pass over token ids.
pub trait Model {
    /// Unique parameters (their current variables) in a fixed order. A released block's
    /// variables are empty.
    fn params(&self) -> Vec<NamedParam>;

    /// Parameter shapes in [`Model::params`] order (also while blocks are released).
    fn param_shapes(&self) -> Vec<Vec<usize>>;

    /// For each block in order, its range of indices into [`Model::params`] (disjoint,
    /// ascending).
    fn block_param_ranges(&self) -> Vec<Range<usize>>;

    /// Installs block `i`'s parameter values (flat, in [`Model::params`] order).
    fn gather_block(&self, i: usize, flat: &[f32]) -> candle_core::Result<()>;

    /// Drops block `i`'s parameter storage (ZeRO-3 between uses).
    fn release_block(&self, i: usize) -> candle_core::Result<()>;

    /// Tokens per sample: a micro-batch is `B * seq_len()` ids and as many targets.
    fn seq_len(&self) -> usize;

    /// Whether [`Model::forward_backward_hooked`] honours an activation-checkpointing
    /// policy (recomputing blocks in the backward pass). A model without it is refused a
    /// checkpointing config, and at ZeRO-3 gets all blocks gathered around the pass.
    fn supports_checkpointing(&self) -> bool {
        false
    }

    /// Logits (B*T, V) of `ids` (B, T) for evaluation (greedy accuracy, held-out loss); by
    /// default an error (a model need not provide them to be trained).
    fn logits(&self, _ids: &Tensor) -> candle_core::Result<Tensor> {
        candle_core::bail!("this model does not provide logits for evaluation")
    }

    /// Sets the micro-step that keys random masks (dropout); nothing by default.
    fn set_step(&self, _step: u64) {}

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

    /// The mean loss of `ids` (B, T) against `targets` (B, T) and every parameter's gradient
    /// (in [`Model::params`] order, detached; `None` = no gradient), calling `hook` with
    /// [`BlockEvent::Gather`] before a block's parameters are used and
    /// [`BlockEvent::Release`] when they may be dropped.
    fn forward_backward_hooked(
        &self,
        ids: &Tensor,
        targets: &Tensor,
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
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
        loss_scale: f32,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
        sink: &mut GradSink<'_>,
    ) -> candle_core::Result<FwdBwd> {
        let fb = self.forward_backward_hooked(ids, targets, policy, hook)?;
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

/// A forward + backward pass by candle autograd for any [`Model`] whose loss `loss(ids,
/// targets)` builds a graph over its parameters: every block is gathered first (the graph
/// keeps all of them until the backward pass ends) and released after. The building block of
/// a user model's [`Model::forward_backward_hooked`].
pub fn autograd_forward_backward<M: Model + ?Sized>(
    model: &M,
    loss: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ids: &Tensor,
    targets: &Tensor,
    hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
) -> candle_core::Result<FwdBwd> {
    let nblocks = model.block_param_ranges().len();
    for i in 0..nblocks {
        hook(BlockEvent::Gather(i))?;
    }
    let t0 = std::time::Instant::now();
    let l = loss(ids, targets)?;
    let value = l.to_scalar::<f32>()?;
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
/// to the variable's dtype on its device.
pub fn set_var(v: &Var, data: &[f32]) -> candle_core::Result<()> {
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
