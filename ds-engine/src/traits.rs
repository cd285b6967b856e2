//! What the engine trains: any [`Model`], i.e. an ordered list of blocks with named
//! parameters that computes its loss and gradients for a batch of token ids.
//!
//! The model library implements it for [`Gpt`] (fused kernels, activation checkpointing,
//! per-block ZeRO-3 gathering) and [`Mlp`] (plain candle autograd); a user implements it for
//! their own network (see `examples/examples/custom_model.rs`).

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{Device, Tensor, Var};
/// The activation-checkpointing policy a [`Model`] receives (re-exported from `ds-ckpt-act`).
pub use ds_ckpt_act::Policy;

use crate::model::{BlockEvent, FwdBwd, Gpt, NamedParam, Rng, BLOCK_PARAMS};

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
        crate::model::set_var(&np.var, data)
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
    /// over at once after the pass; a model that can do better overrides it (the [`Gpt`] hands
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
pub(crate) fn hand_over_all(
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

impl Model for Gpt {
    fn params(&self) -> Vec<NamedParam> {
        Gpt::params(self)
    }
    fn param_shapes(&self) -> Vec<Vec<usize>> {
        Gpt::param_shapes(self)
    }
    fn block_param_ranges(&self) -> Vec<Range<usize>> {
        (0..self.blocks().len())
            .map(|i| Gpt::block_param_start(i)..Gpt::block_param_start(i) + BLOCK_PARAMS)
            .collect()
    }
    fn gather_block(&self, i: usize, flat: &[f32]) -> candle_core::Result<()> {
        self.gather_block_flat(i, flat)
    }
    fn release_block(&self, i: usize) -> candle_core::Result<()> {
        self.release_block_on_device(i)
    }
    fn device(&self) -> Device {
        Gpt::device(self)
    }
    fn set_cpu_checkpointing(&mut self, on: bool) -> bool {
        Gpt::set_cpu_checkpointing(self, on);
        true
    }
    fn set_sync_timers(&mut self, on: bool) {
        Gpt::set_sync_timers(self, on)
    }
    fn seq_len(&self) -> usize {
        self.shape().seq
    }
    fn supports_checkpointing(&self) -> bool {
        true
    }
    fn set_step(&self, step: u64) {
        Gpt::set_step(self, step)
    }
    fn logits(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        Gpt::logits(self, ids)
    }
    fn set_param(&self, index: usize, data: &[f32]) -> candle_core::Result<()> {
        Gpt::set_param(self, index, data)
    }
    fn forward_backward_hooked(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        Gpt::forward_backward_hooked(self, ids, targets, policy, hook)
    }
    fn forward_backward_streamed(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
        loss_scale: f32,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
        sink: &mut GradSink<'_>,
    ) -> candle_core::Result<FwdBwd> {
        Gpt::forward_backward_streamed(self, ids, targets, policy, loss_scale, hook, sink)
    }
}

/// The shape of an [`Mlp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpShape {
    /// Hidden blocks.
    pub layers: usize,
    /// Width.
    pub hidden: usize,
    /// Tokens per sample.
    pub seq: usize,
    /// Vocabulary.
    pub vocab: usize,
}

/// A token-wise MLP language model: embedding, `layers` residual blocks
/// `x + tanh(x W^T + b)`, and an output Linear to the vocabulary. Each position predicts the
/// next token from its own token only (a learned bigram model). Backward is candle autograd.
#[derive(Debug)]
pub struct Mlp {
    shape: MlpShape,
    wte: Var,
    blocks: Vec<RefCell<[Var; 2]>>,
    head_w: Var,
    head_b: Var,
}

fn var(data: Vec<f32>, shape: &[usize], dev: &Device) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)
}

impl Mlp {
    /// Builds the MLP with N(0, 0.02) weights and zero biases from `seed`, on the CPU.
    pub fn new(shape: MlpShape, seed: u64) -> candle_core::Result<Self> {
        Self::new_on(shape, seed, &Device::Cpu)
    }

    /// [`Mlp::new`] on any candle device (f32).
    pub fn new_on(shape: MlpShape, seed: u64, dev: &Device) -> candle_core::Result<Self> {
        let (h, v) = (shape.hidden, shape.vocab);
        let mut rng = Rng::new(seed);
        let wte = var(rng.normal_vec(v * h, 0.02), &[v, h], dev)?;
        let blocks = (0..shape.layers)
            .map(|_| {
                Ok(RefCell::new([
                    var(rng.normal_vec(h * h, 0.02), &[h, h], dev)?,
                    var(vec![0.0; h], &[h], dev)?,
                ]))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let head_w = var(rng.normal_vec(v * h, 0.02), &[v, h], dev)?;
        let head_b = var(vec![0.0; v], &[v], dev)?;
        Ok(Mlp {
            shape,
            wte,
            blocks,
            head_w,
            head_b,
        })
    }

    /// The shape.
    pub fn shape(&self) -> MlpShape {
        self.shape
    }

    /// Logits (B*T, V) of `ids` (B, T) (autograd graph kept).
    pub fn logits(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.wte.embedding(&ids.flatten_all()?)?;
        for b in &self.blocks {
            let [w, bias] = &*b.borrow();
            x = (&x + x.matmul(&w.t()?)?.broadcast_add(bias)?.tanh()?)?;
        }
        x.matmul(&self.head_w.t()?)?.broadcast_add(&self.head_b)
    }

    /// Mean next-token cross-entropy of `ids` against `targets` (autograd graph kept).
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::cross_entropy(&self.logits(ids)?, &targets.flatten_all()?)
    }

    /// Parameter count of an MLP of this shape.
    pub fn param_count(s: &MlpShape) -> usize {
        2 * s.vocab * s.hidden + s.layers * (s.hidden * s.hidden + s.hidden) + s.vocab
    }
}

impl Model for Mlp {
    fn params(&self) -> Vec<NamedParam> {
        let mut v = vec![NamedParam {
            name: "wte.weight".into(),
            var: self.wte.clone(),
        }];
        for (i, b) in self.blocks.iter().enumerate() {
            let [w, bias] = &*b.borrow();
            v.push(NamedParam {
                name: format!("blocks.{i}.weight"),
                var: w.clone(),
            });
            v.push(NamedParam {
                name: format!("blocks.{i}.bias"),
                var: bias.clone(),
            });
        }
        v.push(NamedParam {
            name: "head.weight".into(),
            var: self.head_w.clone(),
        });
        v.push(NamedParam {
            name: "head.bias".into(),
            var: self.head_b.clone(),
        });
        v
    }
    fn param_shapes(&self) -> Vec<Vec<usize>> {
        let (h, v) = (self.shape.hidden, self.shape.vocab);
        let mut s = vec![vec![v, h]];
        for _ in &self.blocks {
            s.push(vec![h, h]);
            s.push(vec![h]);
        }
        s.push(vec![v, h]);
        s.push(vec![v]);
        s
    }
    fn block_param_ranges(&self) -> Vec<Range<usize>> {
        (0..self.blocks.len())
            .map(|i| 1 + 2 * i..3 + 2 * i)
            .collect()
    }
    fn gather_block(&self, i: usize, flat: &[f32]) -> candle_core::Result<()> {
        let h = self.shape.hidden;
        let Some(b) = self.blocks.get(i) else {
            candle_core::bail!("no block {i}");
        };
        if flat.len() != h * h + h {
            candle_core::bail!("block {i} expects {} values, got {}", h * h + h, flat.len());
        }
        let dev = self.wte.device();
        *b.borrow_mut() = [
            var(flat[..h * h].to_vec(), &[h, h], dev)?,
            var(flat[h * h..].to_vec(), &[h], dev)?,
        ];
        Ok(())
    }
    fn release_block(&self, i: usize) -> candle_core::Result<()> {
        let Some(b) = self.blocks.get(i) else {
            candle_core::bail!("no block {i}");
        };
        // Empty placeholders in host memory (a zero-byte device allocation is an error in CUDA).
        *b.borrow_mut() = [
            var(Vec::new(), &[0], &Device::Cpu)?,
            var(Vec::new(), &[0], &Device::Cpu)?,
        ];
        Ok(())
    }
    fn seq_len(&self) -> usize {
        self.shape.seq
    }
    fn device(&self) -> Device {
        self.wte.device().clone()
    }
    fn logits(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        Mlp::logits(self, ids)
    }
    fn forward_backward_hooked(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        _policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        autograd_forward_backward(self, |i, t| self.loss(i, t), ids, targets, hook)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelShape;

    fn batch(vocab: u32, b: usize, t: usize) -> (Tensor, Tensor) {
        let ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7 + 3) % vocab).collect();
        let tg: Vec<u32> = (0..b * t).map(|i| (i as u32 * 5 + 1) % vocab).collect();
        (
            Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
            Tensor::from_vec(tg, (b, t), &Device::Cpu).unwrap(),
        )
    }

    /// The streamed pass hands every parameter's gradient over exactly once, equal to the
    /// returned gradients times the loss scale: the GPT on the explicit kernels (groups last
    /// first and contiguous: final LayerNorm, blocks n-1..0, embeddings) and on candle autograd,
    /// and the MLP through the default implementation.
    #[test]
    fn streamed_gradients_equal_returned_gradients_times_the_loss_scale() {
        let s = ModelShape {
            layers: 2,
            hidden: 16,
            heads: 2,
            seq: 8,
            vocab: 32,
        };
        let mut explicit = Gpt::new(s, 3, &Device::Cpu).unwrap();
        explicit.set_explicit_kernels(true);
        let mut autograd = Gpt::new(s, 3, &Device::Cpu).unwrap();
        autograd.set_explicit_kernels(false);
        let mlp = Mlp::new(
            MlpShape {
                layers: 2,
                hidden: 16,
                seq: 8,
                vocab: 32,
            },
            3,
        )
        .unwrap();
        let models: [(&str, &dyn Model, bool); 3] = [
            ("gpt explicit", &explicit, true),
            ("gpt autograd", &autograd, false),
            ("mlp", &mlp, false),
        ];
        let (ids, tg) = batch(32, 2, 8);
        for (name, m, streams) in models {
            let want = m
                .forward_backward_hooked(&ids, &tg, Policy::None, &mut |_| Ok(()))
                .unwrap();
            let n = m.params().len();
            let mut got: Vec<Option<Vec<f32>>> = vec![None; n];
            let mut groups = Vec::new();
            let fb = m
                .forward_backward_streamed(
                    &ids,
                    &tg,
                    Policy::None,
                    8.0,
                    &mut |_| Ok(()),
                    &mut |r, g| {
                        assert_eq!(r.len(), g.len());
                        groups.push(r.clone());
                        for (i, g) in r.zip(g) {
                            assert!(got[i].is_none(), "{name}: parameter {i} handed over twice");
                            got[i] = Some(g.unwrap().flatten_all()?.to_vec1::<f32>()?);
                        }
                        Ok(())
                    },
                )
                .unwrap();
            assert!(fb.grads.is_empty(), "{name}");
            assert!(
                (fb.loss - want.loss).abs() <= 1e-6 * want.loss.abs(),
                "{name}"
            );
            if streams {
                assert_eq!(groups.len(), s.layers + 2, "{name}: {groups:?}");
                for w in groups.windows(2) {
                    assert_eq!(w[0].start, w[1].end, "{name}: {groups:?}");
                }
            }
            for (i, (g, w)) in got.iter().zip(&want.grads).enumerate() {
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: parameter {i} missing"));
                let w = w
                    .as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let scale = w.iter().fold(0f32, |a, b| a.max(b.abs())).max(1e-12);
                for (a, b) in g.iter().zip(&w) {
                    assert!(
                        (a - 8.0 * b).abs() <= 1e-5 * 8.0 * scale,
                        "{name} param {i}: {a} vs 8 x {b}"
                    );
                }
            }
        }
    }

    /// Every parameter of every model in the library receives a non-zero gradient, and the
    /// shapes and block ranges agree with the parameters.
    fn check_all_grads(m: &dyn Model, vocab: u32, seq: usize) {
        let (x, y) = batch(vocab, 2, seq);
        let fb = m
            .forward_backward_hooked(&x, &y, Policy::None, &mut |_| Ok(()))
            .unwrap();
        let params = m.params();
        assert_eq!(fb.grads.len(), params.len());
        assert_eq!(m.param_shapes().len(), params.len());
        for ((p, g), sh) in params.iter().zip(&fb.grads).zip(m.param_shapes()) {
            assert_eq!(p.var.dims(), &sh[..], "{}", p.name);
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no gradient", p.name));
            assert_eq!(g.dims(), &sh[..]);
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0 && n.is_finite(), "{}: gradient norm {n}", p.name);
        }
        let mut last = 0;
        for r in m.block_param_ranges() {
            assert!(r.start >= last && r.end <= params.len());
            last = r.end;
        }
    }

    #[test]
    fn every_parameter_of_every_model_gets_a_gradient() {
        let gpt = Gpt::new(
            ModelShape {
                layers: 2,
                hidden: 16,
                heads: 2,
                seq: 8,
                vocab: 32,
            },
            1,
            &Device::Cpu,
        )
        .unwrap();
        check_all_grads(&gpt, 32, 8);
        let mlp = Mlp::new(
            MlpShape {
                layers: 2,
                hidden: 16,
                seq: 8,
                vocab: 32,
            },
            1,
        )
        .unwrap();
        check_all_grads(&mlp, 32, 8);
        let n: usize = Model::params(&mlp).iter().map(|p| p.var.elem_count()).sum();
        assert_eq!(n, Mlp::param_count(&mlp.shape()));
    }

    #[test]
    fn mlp_gradient_matches_finite_differences() {
        // d loss / d head.bias[k] by central differences in f64-accumulated f32.
        let mlp = Mlp::new(
            MlpShape {
                layers: 1,
                hidden: 8,
                seq: 4,
                vocab: 10,
            },
            3,
        )
        .unwrap();
        let (x, y) = batch(10, 2, 4);
        let fb = mlp
            .forward_backward_hooked(&x, &y, Policy::None, &mut |_| Ok(()))
            .unwrap();
        let idx = mlp.params().len() - 1; // head.bias
        let g = fb.grads[idx].as_ref().unwrap().to_vec1::<f32>().unwrap();
        let base = mlp.params()[idx].var.to_vec1::<f32>().unwrap();
        for k in [0usize, 3, 7] {
            let eps = 1e-2f32;
            let at = |d: f32| {
                let mut b = base.clone();
                b[k] += d;
                mlp.set_param(idx, &b).unwrap();
                mlp.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[k]).abs() < 2e-3,
                "k={k}: fd {fd} vs autograd {}",
                g[k]
            );
        }
        mlp.set_param(idx, &base).unwrap();
    }
}
