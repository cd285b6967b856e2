//! Any candle-nn model, trained by the engine: [`CandleModel`].
//!
//! Build your network once with `VarBuilder::from_varmap` as usual (that creates and
//! initialises its `Var`s in the `VarMap`), then hand the `VarMap` and the code that builds the
//! network and computes the loss to a [`CandleModel`]. The model takes the `VarMap`'s variables
//! over and rebuilds the network from them on every pass (building a candle-nn module only
//! clones tensor handles), through a `VarBuilder` whose backend is the model's own table of
//! variables. That is what lets ZeRO-3 release parameters between uses without any
//! `RefCell` swapping in your code: a released parameter is simply absent from the table until
//! the engine gathers it again.
//!
//! Two forms:
//! - [`CandleModel::new`]: one closure `loss(vb, batch)`; every parameter stays whole on every
//!   rank (ZeRO-3 still partitions the optimizer state, gradients and master weights).
//! - [`CandleModel::sequential`]: `embed(vb, batch) -> x`, `n` blocks `block(vb.pp("{prefix}.{i}"),
//!   i, x) -> x` and `head(vb, x, batch) -> loss`. Each block's parameters (those named
//!   `{prefix}.{i}.…`) are a ZeRO-3 gather unit, and a block can be checkpointed (only its
//!   input kept, recomputed in the backward pass): with every block checkpointed, ZeRO-3 holds
//!   one block's full weights at a time.
//!
//! candle-nn's fused `softmax_last_dim`, `ops::layer_norm` and `ops::rms_norm` (and so
//! `LayerNorm`/`RmsNorm` on contiguous input) have no backward: write those layers in
//! differentiable form (`examples/examples/llama.rs` does). [`CandleModel::check_gradients`]
//! finds a parameter that receives no gradient.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use ds_ckpt_act::{checkpoint_forward, recompute_backward, Mode};
use ds_engine::traits::{autograd_forward_backward, BlockEvent, FwdBwd, Model, NamedParam, Policy};

/// The variables by name, and whether the network is built with tracked or detached
/// parameters (a checkpointed block's first forward records no graph).
#[derive(Clone)]
struct Table {
    vars: Arc<Mutex<HashMap<String, Var>>>,
    tracked: Arc<AtomicBool>,
}

impl Table {
    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
        self.vars
            .lock()
            .map_err(|_| candle_core::Error::Msg("the parameter table is poisoned".into()))
    }
}

impl SimpleBackend for Table {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let vars = self.lock()?;
        let Some(v) = vars.get(name) else {
            candle_core::bail!(
                "`{name}` is not a parameter of this model (it was not in the VarMap the model was made from)"
            );
        };
        if v.elem_count() == 0 && s.elem_count() != 0 {
            candle_core::bail!("`{name}` is released (ZeRO-3): its block was not gathered");
        }
        if v.shape() != &s {
            candle_core::bail!(
                "`{name}` has shape {:?}, the network asks for {:?}",
                v.dims(),
                s.dims()
            );
        }
        let t = if self.tracked.load(Ordering::Relaxed) {
            v.as_tensor().clone()
        } else {
            v.as_detached_tensor()
        };
        if t.dtype() != dtype || !t.device().same_device(dev) {
            return t.to_dtype(dtype)?.to_device(dev);
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = match self.lock()?.get(name) {
            Some(v) => v.shape().clone(),
            None => candle_core::bail!("`{name}` is not a parameter of this model"),
        };
        self.get(shape, name, candle_nn::Init::Const(0.0), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().is_ok_and(|v| v.contains_key(name))
    }
}

type LossFn<B> = dyn Fn(VarBuilder<'_>, &B) -> candle_core::Result<Tensor>;
type EmbedFn<B> = dyn Fn(VarBuilder<'_>, &B) -> candle_core::Result<Tensor>;
type BlockFn = dyn Fn(VarBuilder<'_>, usize, &Tensor) -> candle_core::Result<Tensor>;
type HeadFn<B> = dyn Fn(VarBuilder<'_>, &Tensor, &B) -> candle_core::Result<Tensor>;

enum Form<B> {
    Whole(Box<LossFn<B>>),
    Sequential {
        embed: Box<EmbedFn<B>>,
        block: Box<BlockFn>,
        head: Box<HeadFn<B>>,
        prefix: String,
    },
}

/// A candle-nn network as a [`Model`]: see the module docs.
pub struct CandleModel<B> {
    table: Table,
    /// Parameter names in [`Model::params`] order: the parameters outside every block (sorted),
    /// then each block's (sorted).
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    blocks: Vec<Range<usize>>,
    dtype: DType,
    dev: Device,
    form: Form<B>,
}

impl<B> std::fmt::Debug for CandleModel<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleModel")
            .field("params", &self.names.len())
            .field("blocks", &self.blocks.len())
            .field("dtype", &self.dtype)
            .field("device", &self.dev)
            .finish()
    }
}

impl<B> CandleModel<B> {
    /// Takes the variables of `varmap` over (drop your own handles to the network built from
    /// it, so that released parameters are freed) and trains the network `loss(vb, batch)`
    /// builds from `vb` (the same names as when it was built from the `VarMap`).
    pub fn new(
        varmap: VarMap,
        loss: impl Fn(VarBuilder<'_>, &B) -> candle_core::Result<Tensor> + 'static,
    ) -> candle_core::Result<Self> {
        Self::build(varmap, Form::Whole(Box::new(loss)), None)
    }

    /// A network that is `embed`, then `blocks` blocks, then `head` (which returns the loss):
    /// block `i` is built by `block(vb.pp(format!("{prefix}.{i}")), i, x)` and owns the
    /// parameters named `{prefix}.{i}.…`; every other parameter belongs to `embed` or `head`.
    /// Every block must own at least one parameter.
    pub fn sequential(
        varmap: VarMap,
        prefix: &str,
        blocks: usize,
        embed: impl Fn(VarBuilder<'_>, &B) -> candle_core::Result<Tensor> + 'static,
        block: impl Fn(VarBuilder<'_>, usize, &Tensor) -> candle_core::Result<Tensor> + 'static,
        head: impl Fn(VarBuilder<'_>, &Tensor, &B) -> candle_core::Result<Tensor> + 'static,
    ) -> candle_core::Result<Self> {
        Self::build(
            varmap,
            Form::Sequential {
                embed: Box::new(embed),
                block: Box::new(block),
                head: Box::new(head),
                prefix: prefix.to_string(),
            },
            Some((prefix, blocks)),
        )
    }

    fn build(
        varmap: VarMap,
        form: Form<B>,
        blocks: Option<(&str, usize)>,
    ) -> candle_core::Result<Self> {
        let vars: HashMap<String, Var> = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("the VarMap is poisoned".into()))?;
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        drop(varmap);
        if vars.is_empty() {
            candle_core::bail!("the VarMap has no variables: build the network from it first (VarBuilder::from_varmap)");
        }
        let (first_dtype, first_dev) = {
            let v = vars
                .values()
                .next()
                .ok_or_else(|| candle_core::Error::Msg("empty".into()))?;
            (v.dtype(), v.device().clone())
        };
        if let Some((n, v)) = vars
            .iter()
            .find(|(_, v)| v.dtype() != first_dtype || !v.device().same_device(&first_dev))
        {
            candle_core::bail!(
                "`{n}` is {:?} on {:?}, other parameters {first_dtype:?} on {first_dev:?}: a model's parameters share one dtype and device",
                v.dtype(),
                v.device()
            );
        }
        let mut outside: Vec<String> = Vec::new();
        let mut per_block: Vec<Vec<String>> = vec![Vec::new(); blocks.map_or(0, |b| b.1)];
        for name in vars.keys() {
            let owner = blocks.and_then(|(prefix, n)| {
                let rest = name.strip_prefix(prefix)?.strip_prefix('.')?;
                let (idx, _) = rest.split_once('.')?;
                idx.parse::<usize>().ok().filter(|&i| i < n)
            });
            match owner {
                Some(i) => per_block[i].push(name.clone()),
                None => outside.push(name.clone()),
            }
        }
        outside.sort();
        let mut names = outside;
        let mut ranges = Vec::with_capacity(per_block.len());
        for (i, mut b) in per_block.into_iter().enumerate() {
            if b.is_empty() {
                candle_core::bail!(
                    "block {i} owns no parameter: no VarMap name starts with `{}.{i}.`",
                    blocks.map_or("", |b| b.0)
                );
            }
            b.sort();
            ranges.push(names.len()..names.len() + b.len());
            names.extend(b);
        }
        let shapes = names.iter().map(|n| vars[n].dims().to_vec()).collect();
        Ok(CandleModel {
            table: Table {
                vars: Arc::new(Mutex::new(vars)),
                tracked: Arc::new(AtomicBool::new(true)),
            },
            names,
            shapes,
            blocks: ranges,
            dtype: first_dtype,
            dev: first_dev,
            form,
        })
    }

    /// A `VarBuilder` over the model's current variables.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.table.clone()), self.dtype, self.dev.clone())
    }

    /// The names of the parameters in [`Model::params`] order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Runs one forward + backward pass on `batch` and errors naming every parameter that
    /// received no gradient (a fused candle op without backward, or an unused parameter).
    pub fn check_gradients(&self, batch: &B) -> candle_core::Result<()> {
        let fb = self.forward_backward_hooked(batch, Policy::None, &mut |_| Ok(()))?;
        let missing: Vec<&str> = self
            .names
            .iter()
            .zip(&fb.grads)
            .filter(|(_, g)| g.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            candle_core::bail!(
                "no gradient for {missing:?}: a fused candle-nn op without backward (softmax_last_dim, ops::layer_norm/rms_norm) or an unused parameter"
            );
        }
        Ok(())
    }

    fn var(&self, i: usize) -> candle_core::Result<Var> {
        match self.table.lock()?.get(&self.names[i]) {
            Some(v) => Ok(v.clone()),
            None => candle_core::bail!("no parameter {i}"),
        }
    }

    fn set_tracked(&self, on: bool) {
        self.table.tracked.store(on, Ordering::Relaxed);
    }
}

impl<B> Model for CandleModel<B> {
    type Batch = B;

    fn params(&self) -> Vec<NamedParam> {
        let vars = match self.table.lock() {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        };
        self.names
            .iter()
            .filter_map(|n| {
                vars.get(n).map(|v| NamedParam {
                    name: n.clone(),
                    var: v.clone(),
                })
            })
            .collect()
    }

    fn param_shapes(&self) -> Vec<Vec<usize>> {
        self.shapes.clone()
    }

    fn block_param_ranges(&self) -> Vec<Range<usize>> {
        self.blocks.clone()
    }

    fn gather_block(&self, i: usize, flat: &[f32]) -> candle_core::Result<()> {
        let Some(r) = self.blocks.get(i) else {
            candle_core::bail!("no block {i} (the model has {})", self.blocks.len());
        };
        let total: usize = self.shapes[r.clone()]
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum();
        if flat.len() != total {
            candle_core::bail!("block {i} expects {total} values, got {}", flat.len());
        }
        let mut off = 0;
        let mut vars = self.table.lock()?;
        for p in r.clone() {
            let n: usize = self.shapes[p].iter().product();
            let t = Tensor::from_slice(&flat[off..off + n], self.shapes[p].as_slice(), &self.dev)?
                .to_dtype(self.dtype)?;
            vars.insert(self.names[p].clone(), Var::from_tensor(&t)?);
            off += n;
        }
        Ok(())
    }

    fn release_block(&self, i: usize) -> candle_core::Result<()> {
        let Some(r) = self.blocks.get(i) else {
            candle_core::bail!("no block {i} (the model has {})", self.blocks.len());
        };
        let mut vars = self.table.lock()?;
        for p in r.clone() {
            // An empty placeholder in host memory (a zero-byte device allocation is an error in
            // CUDA).
            let empty = Var::from_tensor(&Tensor::zeros(0, self.dtype, &Device::Cpu)?)?;
            vars.insert(self.names[p].clone(), empty);
        }
        Ok(())
    }

    fn supports_checkpointing(&self) -> bool {
        matches!(self.form, Form::Sequential { .. })
    }

    fn device(&self) -> Device {
        self.dev.clone()
    }

    fn forward_backward_hooked(
        &self,
        batch: &B,
        policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        self.set_tracked(true);
        let (embed, block, head, prefix) = match &self.form {
            Form::Whole(loss) => {
                return autograd_forward_backward(self, || loss(self.var_builder(), batch), hook)
            }
            Form::Sequential {
                embed,
                block,
                head,
                prefix,
            } => (embed, block, head, prefix),
        };
        let n = self.blocks.len();
        let vb = || self.var_builder();
        // Block `i` on `t`, its parameters tracked or detached (a checkpointed first forward
        // records no graph).
        let run_block = |i: usize, t: &Tensor, m: Mode| {
            self.set_tracked(m == Mode::Tracked);
            let out = block(vb().pp(format!("{prefix}.{i}")), i, t);
            self.set_tracked(true);
            out
        };
        if policy == Policy::None {
            return autograd_forward_backward(
                self,
                || {
                    let mut x = embed(vb(), batch)?;
                    for i in 0..n {
                        x = block(vb().pp(format!("{prefix}.{i}")), i, &x)?;
                    }
                    head(vb(), &x, batch)
                },
                hook,
            );
        }
        let t0 = std::time::Instant::now();
        let np = self.names.len();
        let mut out: Vec<Option<Tensor>> = vec![None; np];
        let mut add = |i: usize, g: Tensor| -> candle_core::Result<()> {
            out[i] = Some(match out[i].take() {
                Some(a) => (a + g)?,
                None => g,
            });
            Ok(())
        };
        // Parameters outside the blocks (embed + head): their indices.
        let outside = 0..self.blocks.first().map_or(np, |r| r.start);
        enum Kept {
            Ckpt(ds_ckpt_act::Saved),
            Graph(Var, Tensor),
        }
        // Forward: the embedding keeps its graph; each block keeps only its input
        // (checkpointed) or its own graph from a Var input.
        let x0 = embed(vb(), batch)?;
        let mut x = x0.detach();
        let mut kept = Vec::with_capacity(n);
        for i in 0..n {
            let seg = |t: &Tensor, m: Mode| run_block(i, t, m);
            hook(BlockEvent::Gather(i))?;
            if policy.checkpointed(i, n) {
                let (y, saved) = checkpoint_forward(&seg, &x).map_err(to_candle)?;
                kept.push(Kept::Ckpt(saved));
                x = y;
                hook(BlockEvent::Release(i))?;
            } else {
                let xv = Var::from_tensor(&x)?;
                let y = seg(xv.as_tensor(), Mode::Tracked)?;
                x = y.detach();
                kept.push(Kept::Graph(xv, y));
            }
        }
        let xl = Var::from_tensor(&x)?;
        let loss = head(vb(), xl.as_tensor(), batch)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let fwd_ms = t0.elapsed().as_secs_f64() * 1e3;
        let grads = loss.backward()?;
        for i in outside.clone() {
            if let Some(g) = grads.get(self.var(i)?.as_tensor()) {
                add(i, g.detach())?;
            }
        }
        let mut g = match grads.get(xl.as_tensor()) {
            Some(g) => g.detach(),
            None => x.zeros_like()?,
        };
        drop(grads);
        let mut segments = Vec::new();
        for (i, k) in kept.into_iter().enumerate().rev() {
            let r = self.blocks[i].clone();
            match k {
                Kept::Ckpt(saved) => {
                    hook(BlockEvent::Gather(i))?;
                    let vars = r
                        .clone()
                        .map(|p| self.var(p))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    let refs: Vec<&Var> = vars.iter().collect();
                    let seg = |t: &Tensor, m: Mode| run_block(i, t, m);
                    let ts = std::time::Instant::now();
                    let sg = recompute_backward(&seg, &saved, &g, &refs).map_err(to_candle)?;
                    segments.push((i, 0.0, ts.elapsed().as_secs_f64() * 1e3));
                    for (k, pg) in sg.params.into_iter().enumerate() {
                        if let Some(pg) = pg {
                            add(r.start + k, pg)?;
                        }
                    }
                    g = sg.input;
                    hook(BlockEvent::Release(i))?;
                }
                Kept::Graph(xv, y) => {
                    let grads = (y * &g)?.sum_all()?.backward()?;
                    for p in r.clone() {
                        if let Some(pg) = grads.get(self.var(p)?.as_tensor()) {
                            add(p, pg.detach())?;
                        }
                    }
                    g = match grads.get(xv.as_tensor()) {
                        Some(t) => t.detach(),
                        None => g.zeros_like()?,
                    };
                }
            }
        }
        // The embedding's parameters.
        let grads = (x0 * &g)?.sum_all()?.backward()?;
        for i in outside {
            if let Some(pg) = grads.get(self.var(i)?.as_tensor()) {
                add(i, pg.detach())?;
            }
        }
        Ok(FwdBwd {
            loss: value,
            grads: out,
            fwd_ms,
            bwd_ms: t0.elapsed().as_secs_f64() * 1e3 - fwd_ms,
            segments,
        })
    }
}

fn to_candle(e: ds_ckpt_act::CkptError) -> candle_core::Error {
    match e {
        ds_ckpt_act::CkptError::Tensor(t) => t,
        other => candle_core::Error::Msg(other.to_string()),
    }
}
