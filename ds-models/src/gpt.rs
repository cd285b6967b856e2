//! The model library: an ordered list of blocks with named parameters.
//!
//! The GPT is the GPT-2 architecture of `peer/gpt_model.py` of the workspace's shared folder (pre-LayerNorm blocks,
//! fused qkv Linear with bias, causal softmax attention, tanh-GELU MLP of 4x width, final
//! LayerNorm, LM head tied to the token embedding, N(0, 0.02) init, zero biases, no dropout).
//! Every op is differentiable in candle (candle-nn's fused softmax/layer-norm kernels have no
//! backward, so the forms here are written out), and a test checks that every parameter
//! receives a gradient.

use std::cell::RefCell;
use std::ops::Range;

use crate::bf16mm::Bf16Units;
use ds_engine::traits::Model;

#[path = "fast.rs"]
pub mod fast;

use candle_core::{DType, Device, Tensor, Var, D};
use ds_ckpt_act::{checkpoint_forward, recompute_backward, Mode, Policy, Saved};
pub use ds_engine::data::Rng;
pub use ds_engine::traits::{numel, set_var, BlockEvent, FwdBwd, GradSink, NamedParam, Tokens};

/// The tensor of a parameter for a mode: the `Var` itself (graph recorded) or detached.
fn w(v: &Var, mode: Mode) -> Tensor {
    match mode {
        Mode::Tracked => v.as_tensor().clone(),
        Mode::Untracked => v.as_detached_tensor(),
    }
}

/// Model shape flags (`--model gpt|mlp --layers L --hidden H --heads A --seq T --batch B --vocab V`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Transformer blocks (or hidden layers of the MLP).
    pub layers: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Sequence length.
    pub seq: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl Default for ModelShape {
    /// The reference GPT of the peer scripts: 4 layers, hidden 256, 4 heads, seq 128, vocab 8192.
    fn default() -> Self {
        ModelShape {
            layers: 4,
            hidden: 256,
            heads: 4,
            seq: 128,
            vocab: 8192,
        }
    }
}

fn var(data: Vec<f32>, shape: &[usize], dev: &Device) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)
}

/// A Linear layer `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in).
    pub weight: Var,
    /// (out).
    pub bias: Option<Var>,
}

impl Linear {
    fn new(
        rng: &mut Rng,
        inp: usize,
        out: usize,
        bias: bool,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        Ok(Linear {
            weight: var(rng.normal_vec(inp * out, 0.02), &[out, inp], dev)?,
            bias: if bias {
                Some(var(vec![0.0; out], &[out], dev)?)
            } else {
                None
            },
        })
    }

    /// Applies the layer to (..., in).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_mode(x, Mode::Tracked)
    }

    /// Applies the layer with tracked or detached parameters.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inp))?;
        let y = match &self.bias {
            Some(b) => crate::kernels::linear(&x2, &w(&self.weight, mode), &w(b, mode))?,
            None => x2.matmul(&w(&self.weight, mode).t()?)?,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dims()[0];
        y.reshape(out)
    }
}

/// LayerNorm over the last dimension (differentiable form, eps 1e-5).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Var,
    /// Shift.
    pub bias: Var,
}

impl LayerNorm {
    fn new(d: usize, dev: &Device) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            weight: var(vec![1.0; d], &[d], dev)?,
            bias: var(vec![0.0; d], &[d], dev)?,
        })
    }

    /// Normalises the last dimension (the fused kernel).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_mode(x, Mode::Tracked)
    }

    /// Normalises with tracked or detached parameters.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        crate::kernels::layer_norm(x, &w(&self.weight, mode), &w(&self.bias, mode))
    }

    /// The same with generic candle ops (the reference the fused kernel is tested against).
    pub fn forward_generic(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        xn.broadcast_mul(self.weight.as_tensor())?
            .broadcast_add(self.bias.as_tensor())
    }
}

/// Softmax over the last dimension (differentiable form).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of logits (N, V) against targets (N) (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Key of a block's dropout masks: probability, seed, step and block index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropKey {
    /// Drop probability.
    pub p: f32,
    /// Run seed (and rank).
    pub seed: u64,
    /// Micro-step counter.
    pub step: u64,
    /// Block index.
    pub block: u64,
}

fn apply_dropout(y: Tensor, drop: Option<DropKey>, site: u64) -> candle_core::Result<Tensor> {
    match drop {
        Some(d) if d.p > 0.0 => {
            let mask =
                ds_ckpt_act::dropout_mask(y.elem_count(), d.p, d.seed, d.step, d.block * 2 + site);
            let mask = Tensor::from_vec(mask, y.shape(), y.device())?.to_dtype(y.dtype())?;
            y * mask
        }
        _ => Ok(y),
    }
}

/// The parameters of one block (swappable: ZeRO-3 gathers them before use and releases them).
#[derive(Debug, Clone)]
struct BlockLayers {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    fc2: Linear,
}

/// Parameters per block (every Linear has a bias).
pub const BLOCK_PARAMS: usize = 12;

/// One pre-LN transformer block.
#[derive(Debug, Clone)]
pub struct GptBlock {
    layers: RefCell<BlockLayers>,
    heads: usize,
    hidden: usize,
}

/// Errors unless `tensors` have exactly the shapes `want`, in order (`what` names them).
fn check_dims<'a>(
    what: &str,
    tensors: &[Tensor],
    want: impl ExactSizeIterator<Item = &'a [usize]> + Clone,
) -> candle_core::Result<()> {
    if tensors.len() != want.len()
        || tensors
            .iter()
            .zip(want.clone())
            .any(|(t, sh)| t.dims() != sh)
    {
        candle_core::bail!(
            "{what}: expected shapes {:?}, got {:?}",
            want.collect::<Vec<_>>(),
            tensors.iter().map(|t| t.dims()).collect::<Vec<_>>()
        );
    }
    Ok(())
}

impl GptBlock {
    fn new(rng: &mut Rng, s: &ModelShape, dev: &Device) -> candle_core::Result<Self> {
        let d = s.hidden;
        Ok(GptBlock {
            layers: RefCell::new(BlockLayers {
                ln1: LayerNorm::new(d, dev)?,
                qkv: Linear::new(rng, d, 3 * d, true, dev)?,
                proj: Linear::new(rng, d, d, true, dev)?,
                ln2: LayerNorm::new(d, dev)?,
                fc: Linear::new(rng, d, 4 * d, true, dev)?,
                fc2: Linear::new(rng, 4 * d, d, true, dev)?,
            }),
            heads: s.heads,
            hidden: d,
        })
    }

    /// Shapes of the block's parameters, in [`GptBlock::vars`] order.
    pub fn param_shapes(&self) -> Vec<Vec<usize>> {
        let d = self.hidden;
        vec![
            vec![d],
            vec![d],
            vec![3 * d, d],
            vec![3 * d],
            vec![d, d],
            vec![d],
            vec![4 * d, d],
            vec![4 * d],
            vec![d, 4 * d],
            vec![d],
            vec![d],
            vec![d],
        ]
    }

    /// Installs parameter values (flat, [`GptBlock::vars`] order) as fresh variables.
    pub fn set_data(&self, flat: &[f32]) -> candle_core::Result<()> {
        let shapes = self.param_shapes();
        let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        if flat.len() != total {
            candle_core::bail!("block expects {total} parameter values, got {}", flat.len());
        }
        let mut off = 0;
        let mut vars = Vec::with_capacity(BLOCK_PARAMS);
        for sh in &shapes {
            let n: usize = sh.iter().product();
            vars.push(var(flat[off..off + n].to_vec(), sh, &Device::Cpu)?);
            off += n;
        }
        self.install(vars)
    }

    /// Drops the block's parameter storage (ZeRO-3 between uses); [`GptBlock::set_data`]
    /// brings it back.
    pub fn release(&self) -> candle_core::Result<()> {
        let empty = (0..BLOCK_PARAMS)
            .map(|_| var(Vec::new(), &[0], &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.install(empty)
    }

    /// Whether the parameters are present.
    pub fn is_gathered(&self) -> bool {
        self.layers.borrow().ln1.weight.elem_count() > 0
    }

    fn install(&self, v: Vec<Var>) -> candle_core::Result<()> {
        let n = v.len();
        let Ok([a, b, c, d, e, f, g, h, i, j, k, m]) = <[Var; BLOCK_PARAMS]>::try_from(v) else {
            candle_core::bail!("a block has {BLOCK_PARAMS} parameters, got {n}");
        };
        let l = &mut *self.layers.borrow_mut();
        l.ln1 = LayerNorm { weight: a, bias: b };
        l.qkv = Linear {
            weight: c,
            bias: Some(d),
        };
        l.proj = Linear {
            weight: e,
            bias: Some(f),
        };
        l.fc = Linear {
            weight: g,
            bias: Some(h),
        };
        l.fc2 = Linear {
            weight: i,
            bias: Some(j),
        };
        l.ln2 = LayerNorm { weight: k, bias: m };
        Ok(())
    }

    fn names(prefix: &str) -> Vec<String> {
        [
            "ln1.weight",
            "ln1.bias",
            "qkv.weight",
            "qkv.bias",
            "proj.weight",
            "proj.bias",
            "fc.weight",
            "fc.bias",
            "fc2.weight",
            "fc2.bias",
            "ln2.weight",
            "ln2.bias",
        ]
        .iter()
        .map(|n| format!("{prefix}.{n}"))
        .collect()
    }

    /// (B, T, C) -> (B, T, C), no dropout.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_mode(x, Mode::Tracked, None)
    }

    /// The block's parameters (current variables), in the order of [`Gpt::params`].
    pub fn vars(&self) -> Vec<Var> {
        let l = self.layers.borrow();
        let mut v = vec![l.ln1.weight.clone(), l.ln1.bias.clone()];
        for lin in [&l.qkv, &l.proj, &l.fc, &l.fc2] {
            v.push(lin.weight.clone());
            if let Some(b) = &lin.bias {
                v.push(b.clone());
            }
        }
        v.push(l.ln2.weight.clone());
        v.push(l.ln2.bias.clone());
        v
    }

    /// The block with tracked or detached parameters, and residual dropout keyed by `drop`
    /// (the same key gives the same masks: a recompute drops exactly what the forward did).
    pub fn forward_mode(
        &self,
        x: &Tensor,
        mode: Mode,
        drop: Option<DropKey>,
    ) -> candle_core::Result<Tensor> {
        let l = self.layers.borrow();
        let qkv = l.qkv.forward_mode(&l.ln1.forward_mode(x, mode)?, mode)?;
        let y = crate::kernels::causal_attention(&qkv, self.heads)?;
        let a = apply_dropout(l.proj.forward_mode(&y, mode)?, drop, 0)?;
        let x = (x + a)?;
        let h = l.fc.forward_mode(&l.ln2.forward_mode(&x, mode)?, mode)?;
        let m = apply_dropout(
            l.fc2.forward_mode(&crate::kernels::gelu(&h)?, mode)?,
            drop,
            1,
        )?;
        x + m
    }
}

/// The GPT.
#[derive(Debug)]
pub struct Gpt {
    shape: ModelShape,
    wte: Var,
    wpe: Var,
    blocks: Vec<GptBlock>,
    ln_f: LayerNorm,
    names: Vec<String>,
    dropout: f32,
    dropout_seed: u64,
    step: std::sync::atomic::AtomicU64,
    threads: usize,
    fast: bool,
    /// The bf16 units the explicit kernels' matrix products run on ([`Bf16Units::None`]: f32).
    bf16: Bf16Units,
    cpu_ckpt: bool,
    /// Synchronise the device before reading the per-block checkpoint timers.
    sync_timers: bool,
}

impl Gpt {
    /// Residual dropout with probability `p` (0 = off, the default), masks keyed by `seed`,
    /// the step set by [`Gpt::set_step`] and the block.
    pub fn set_dropout(&mut self, p: f32, seed: u64) {
        self.dropout = p;
        self.dropout_seed = seed;
    }

    /// Threads the explicit kernels use for this model (default: the machine's cores). Ranks
    /// that are threads of one process should each get their share (`cores / ranks`), so that
    /// the kernels never oversubscribe the machine.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// The threads the explicit kernels use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Chooses the training path of [`Gpt::forward_backward`]: the explicit kernels of
    /// `fast.rs` (the default) or candle autograd over the fused custom ops (the reference the
    /// explicit kernels are tested against).
    pub fn set_explicit_kernels(&mut self, on: bool) {
        self.fast = on;
    }

    /// bf16 compute for the explicit kernels (the f32 model on the CPU): with `units` other than
    /// [`Bf16Units::None`], every matrix product of the training forward and backward and of
    /// the evaluation (the linear layers, the tied head, the attention tiles) rounds its two
    /// operands to bf16 and sums their products in f32 on those units (see [`crate::bf16mm`]);
    /// everything else (LayerNorm, softmax, GELU, the loss, the weights and gradients) stays f32.
    /// [`Bf16Units::None`] (the default) keeps every product in f32, bit for bit as before.
    /// Pass [`crate::bf16mm::units`] for the units detected on this CPU.
    ///
    /// An error when `units` cannot run on this CPU (AVX-512 BF16 where it is absent); the
    /// setting is then unchanged. Candle autograd (another device or dtype, or
    /// [`Gpt::set_explicit_kernels`] off) ignores it.
    pub fn set_bf16_compute(&mut self, units: Bf16Units) -> candle_core::Result<()> {
        if units == Bf16Units::Avx512Bf16 && !crate::bf16mm::cpu_has_avx512bf16() {
            candle_core::bail!("bf16 compute: this CPU has no AVX512_BF16 instructions");
        }
        if units == Bf16Units::Blas && !crate::bf16mm::blas_has_bf16() {
            candle_core::bail!(
                "bf16 compute: no DS_BLAS library with a bf16 GEMM (cblas_gemm_bf16bf16f32) is open"
            );
        }
        self.bf16 = units;
        Ok(())
    }

    /// The bf16 units the explicit kernels' matrix products run on ([`Gpt::set_bf16_compute`]).
    pub fn bf16_compute(&self) -> Bf16Units {
        self.bf16
    }

    /// Sets the step that keys the dropout masks.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, std::sync::atomic::Ordering::Relaxed);
    }

    fn drop_key(&self, block: usize) -> Option<DropKey> {
        (self.dropout > 0.0).then(|| DropKey {
            p: self.dropout,
            seed: self.dropout_seed,
            step: self.step.load(std::sync::atomic::Ordering::Relaxed),
            block: block as u64,
        })
    }

    /// Builds the model with GPT-2 initialisation from `seed`.
    pub fn new(shape: ModelShape, seed: u64, dev: &Device) -> candle_core::Result<Self> {
        if shape.heads == 0 || !shape.hidden.is_multiple_of(shape.heads) {
            candle_core::bail!(
                "hidden ({}) must be a positive multiple of heads ({})",
                shape.hidden,
                shape.heads
            );
        }
        let mut rng = Rng::new(seed);
        let wte = var(
            rng.normal_vec(shape.vocab * shape.hidden, 0.02),
            &[shape.vocab, shape.hidden],
            dev,
        )?;
        let wpe = var(
            rng.normal_vec(shape.seq * shape.hidden, 0.02),
            &[shape.seq, shape.hidden],
            dev,
        )?;
        let blocks = (0..shape.layers)
            .map(|_| GptBlock::new(&mut rng, &shape, dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(shape.hidden, dev)?;
        let mut names = vec!["wte.weight".to_string(), "wpe.weight".to_string()];
        for i in 0..blocks.len() {
            names.extend(GptBlock::names(&format!("blocks.{i}")));
        }
        names.push("ln_f.weight".into());
        names.push("ln_f.bias".into());
        Ok(Gpt {
            shape,
            wte,
            wpe,
            blocks,
            ln_f,
            names,
            dropout: 0.0,
            dropout_seed: 0,
            step: std::sync::atomic::AtomicU64::new(0),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            fast: true,
            bf16: Bf16Units::None,
            cpu_ckpt: false,
            sync_timers: false,
        })
    }

    /// The shape.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// Unique parameters (their current variables) in a fixed order: `wte`, `wpe`, the
    /// blocks' [`BLOCK_PARAMS`] each, `ln_f` (the tied head shares `wte.weight`). A released
    /// block's variables are empty.
    pub fn params(&self) -> Vec<NamedParam> {
        let mut vars = vec![self.wte.clone(), self.wpe.clone()];
        for b in &self.blocks {
            vars.extend(b.vars());
        }
        vars.push(self.ln_f.weight.clone());
        vars.push(self.ln_f.bias.clone());
        self.names
            .iter()
            .zip(vars)
            .map(|(n, v)| NamedParam {
                name: n.clone(),
                var: v,
            })
            .collect()
    }

    /// Parameter shapes in [`Gpt::params`] order (whether or not blocks are released).
    pub fn param_shapes(&self) -> Vec<Vec<usize>> {
        let d = self.shape.hidden;
        let mut v = vec![vec![self.shape.vocab, d], vec![self.shape.seq, d]];
        for b in &self.blocks {
            v.extend(b.param_shapes());
        }
        v.push(vec![d]);
        v.push(vec![d]);
        v
    }

    /// The blocks.
    pub fn blocks(&self) -> &[GptBlock] {
        &self.blocks
    }

    /// Index in [`Gpt::params`] of block `i`'s first parameter.
    pub fn block_param_start(i: usize) -> usize {
        2 + i * BLOCK_PARAMS
    }

    /// Loads every parameter by name from a safetensors file (PyTorch's `state_dict` names of
    /// the peer GPT match: `wte.weight`, `blocks.0.qkv.weight`, ...; a tied `head.weight` is
    /// ignored). Every parameter must be present with its shape; the model's blocks must be
    /// gathered.
    pub fn load_safetensors(&self, path: &std::path::Path) -> candle_core::Result<()> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        for p in self.params() {
            let Some(t) = tensors.get(&p.name) else {
                candle_core::bail!("{}: no tensor named `{}`", path.display(), p.name);
            };
            if t.dims() != p.var.dims() {
                candle_core::bail!(
                    "{}: `{}` has shape {:?}, the model expects {:?}",
                    path.display(),
                    p.name,
                    t.dims(),
                    p.var.dims()
                );
            }
            p.var
                .set(&t.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
        }
        Ok(())
    }

    /// Replaces every parameter with a fresh variable holding `tensors[i]` ([`Gpt::params`]
    /// order, shapes as [`Gpt::param_shapes`]), on the tensors' device and in their dtype:
    /// how weights moved to a device or cast are installed.
    pub fn install_all(&mut self, tensors: &[Tensor]) -> candle_core::Result<()> {
        let shapes = self.param_shapes();
        if tensors.len() != shapes.len() {
            candle_core::bail!(
                "the GPT has {} parameters, got {} tensors",
                shapes.len(),
                tensors.len()
            );
        }
        for (i, (t, sh)) in tensors.iter().zip(&shapes).enumerate() {
            if t.dims() != sh.as_slice() {
                candle_core::bail!(
                    "parameter {} ({}) has shape {sh:?}, got {:?}",
                    i,
                    self.names[i],
                    t.dims()
                );
            }
        }
        let v = |t: &Tensor| Var::from_tensor(&t.detach());
        self.wte = v(&tensors[0])?;
        self.wpe = v(&tensors[1])?;
        for (i, b) in self.blocks.iter().enumerate() {
            let s = Gpt::block_param_start(i);
            let vars = tensors[s..s + BLOCK_PARAMS]
                .iter()
                .map(v)
                .collect::<candle_core::Result<Vec<_>>>()?;
            b.install(vars)?;
        }
        let n = tensors.len();
        self.ln_f = LayerNorm {
            weight: v(&tensors[n - 2])?,
            bias: v(&tensors[n - 1])?,
        };
        Ok(())
    }

    /// Casts every parameter to `dtype` on its device (a bf16/fp16 model for mixed precision).
    pub fn cast(&mut self, dtype: DType) -> candle_core::Result<()> {
        let t = self
            .params()
            .iter()
            .map(|p| p.var.as_tensor().to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.install_all(&t)
    }

    /// Releases every block's parameters (ZeRO-3 off the CPU: [`Gpt::install_all`]
    /// brings them back). The placeholders are empty host tensors in the model dtype: a
    /// zero-byte device allocation is an error in CUDA.
    pub fn release_blocks_on_device(&self) -> candle_core::Result<()> {
        for i in 0..self.blocks.len() {
            self.release_block_on_device(i)?;
        }
        Ok(())
    }

    /// Releases block `i`'s parameters, as [`Gpt::release_blocks_on_device`] does for all.
    pub fn release_block_on_device(&self, i: usize) -> candle_core::Result<()> {
        let Some(b) = self.blocks.get(i) else {
            candle_core::bail!("no block {i} (the GPT has {})", self.blocks.len());
        };
        let dt = self.wte.dtype();
        let empty = (0..BLOCK_PARAMS)
            .map(|_| Var::from_tensor(&Tensor::zeros(0, dt, &Device::Cpu)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        b.install(empty)
    }

    /// Installs block `i`'s parameters from `tensors` (its [`BLOCK_PARAMS`] tensors in
    /// [`Gpt::params`] order, on any device and dtype): ZeRO-3 off the CPU, one block at a
    /// time.
    pub fn install_block(&self, i: usize, tensors: &[Tensor]) -> candle_core::Result<()> {
        let Some(b) = self.blocks.get(i) else {
            candle_core::bail!("no block {i} (the GPT has {})", self.blocks.len());
        };
        let shapes = b.param_shapes();
        check_dims(
            &format!("block {i}"),
            tensors,
            shapes.iter().map(|s| s.as_slice()),
        )?;
        let vars = tensors
            .iter()
            .map(|t| Var::from_tensor(&t.detach()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        b.install(vars)
    }

    /// Installs the parameters outside the blocks (ZeRO-3's persistent ones): `tensors` are
    /// `wte`, `wpe`, the final LayerNorm's weight and bias, on any device and dtype.
    pub fn install_persistent(&mut self, tensors: &[Tensor]) -> candle_core::Result<()> {
        let shapes = self.param_shapes();
        let n = shapes.len();
        let want = [&shapes[0], &shapes[1], &shapes[n - 2], &shapes[n - 1]];
        check_dims(
            "the persistent parameters (wte, wpe, ln_f)",
            tensors,
            want.iter().map(|s| s.as_slice()),
        )?;
        let v = |t: &Tensor| Var::from_tensor(&t.detach());
        self.wte = v(&tensors[0])?;
        self.wpe = v(&tensors[1])?;
        self.ln_f = LayerNorm {
            weight: v(&tensors[2])?,
            bias: v(&tensors[3])?,
        };
        Ok(())
    }

    /// How many blocks hold their parameters now (ZeRO-3 bookkeeping).
    pub fn gathered_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.is_gathered()).count()
    }

    /// Overwrites the values of parameter `index` (which must be present), converted to the
    /// parameter's dtype on its device.
    pub fn set_param(&self, index: usize, data: &[f32]) -> candle_core::Result<()> {
        let p = self.params();
        let Some(np) = p.get(index) else {
            candle_core::bail!("no parameter {index}");
        };
        set_var(&np.var, data)
    }

    /// The device the model's parameters live on.
    pub fn device(&self) -> Device {
        self.wte.device().clone()
    }

    /// The model dtype (f32 on the host; bf16/f16 for a 16-bit model on a device).
    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// Installs block `i`'s parameter values (flat f32, [`GptBlock::vars`] order) as fresh
    /// variables on the model's device in the model's dtype (ZeRO-3's gather).
    pub fn gather_block_flat(&self, i: usize, flat: &[f32]) -> candle_core::Result<()> {
        let Some(b) = self.blocks.get(i) else {
            candle_core::bail!("no block {i} (the GPT has {})", self.blocks.len());
        };
        if self.wte.device().is_cpu() && self.wte.dtype() == DType::F32 {
            return b.set_data(flat);
        }
        let shapes = b.param_shapes();
        let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        if flat.len() != total {
            candle_core::bail!(
                "block {i} expects {total} parameter values, got {}",
                flat.len()
            );
        }
        let (dev, dt) = (self.device(), self.dtype());
        let all = Tensor::from_slice(flat, total, &dev)?.to_dtype(dt)?;
        let mut off = 0;
        let mut tensors = Vec::with_capacity(shapes.len());
        for sh in &shapes {
            let n: usize = sh.iter().product();
            tensors.push(all.narrow(0, off, n)?.reshape(sh.as_slice())?);
            off += n;
        }
        self.install_block(i, &tensors)
    }

    /// Moves every parameter to `dev` in `dtype` (e.g. onto a GPU in bf16 for mixed
    /// precision); the explicit kernels run only for an f32 model on the CPU, anything else
    /// trains on candle autograd.
    pub fn to_device(&mut self, dev: &Device, dtype: DType) -> candle_core::Result<()> {
        let t = self
            .params()
            .iter()
            .map(|p| p.var.as_tensor().to_device(dev)?.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.install_all(&t)
    }

    /// Mean next-token cross-entropy of `ids` (B, T) against `targets` (B, T), both u32.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::cross_entropy(&self.logits(ids)?, &targets.flatten_all()?)
    }

    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self
            .wte
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, self.shape.hidden))?;
        x.broadcast_add(&self.wpe.narrow(0, 0, t)?)
    }

    /// Final LayerNorm and the tied LM head: (B, T, C) -> logits (B*T, V).
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let x = self.ln_f.forward(x)?.reshape((b * t, self.shape.hidden))?;
        x.matmul(&self.wte.t()?)
    }

    fn head_loss(&self, x: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::cross_entropy(&self.head(x)?, &targets.flatten_all()?)
    }

    /// The loss and the gradient of every parameter (in [`Gpt::params`] order, detached),
    /// with the blocks the policy names checkpointed: their forward keeps only their input and
    /// their backward recomputes them (`ds-ckpt-act`). The result equals a plain backward pass.
    pub fn forward_backward(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
    ) -> candle_core::Result<FwdBwd> {
        self.forward_backward_hooked(ids, targets, policy, &mut |_| Ok(()))
    }

    /// [`ds_engine::traits::Model::forward_backward_streamed`] for the GPT: on the explicit kernels
    /// the final LayerNorm's gradients are handed to `sink` after the head's backward, each
    /// block's right after its backward (last block first), and the embeddings' at the end;
    /// the gradients are those of `loss * loss_scale` (the logits' gradient is scaled before
    /// the backward pass, as scaling the loss does). On the candle-autograd path they are
    /// handed over after the pass.
    pub fn forward_backward_streamed(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
        loss_scale: f32,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
        sink: &mut GradSink<'_>,
    ) -> candle_core::Result<FwdBwd> {
        if self.fast && fast::supported(self) {
            return fast::forward_backward(
                self,
                ids,
                targets,
                policy,
                loss_scale,
                hook,
                Some(sink),
            );
        }
        let fb = self.forward_backward_hooked(ids, targets, policy, hook)?;
        ds_engine::traits::hand_over_all(fb, loss_scale, sink)
    }

    /// [`Gpt::forward_backward`] calling `hook` around every block:
    /// [`BlockEvent::Gather`] before a block runs (forward, and recompute + backward) and
    /// [`BlockEvent::Release`] after, which is where ZeRO-3 all-gathers a block's parameters
    /// and frees them. On the explicit kernels (the default) every block is gathered before its
    /// forward and again before its backward, and released after each, whatever the policy; on
    /// the candle-autograd path the hook is not called with `Policy::None` (the whole graph is
    /// kept) and blocks that are not checkpointed are not released.
    pub fn forward_backward_hooked(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        if self.fast && fast::supported(self) {
            return fast::forward_backward(self, ids, targets, policy, 1.0, hook, None);
        }
        self.forward_backward_scaled_hooked(ids, targets, policy, 1.0, hook)
    }

    /// Keep checkpointed blocks' inputs in host memory (`cpu_checkpointing`) on the
    /// candle-autograd path; a no-op for a model on the CPU.
    pub fn set_cpu_checkpointing(&mut self, on: bool) {
        self.cpu_ckpt = on;
    }

    /// Synchronise the device before each per-block checkpoint timer is read on the
    /// candle-autograd path ([`FwdBwd::segments`]), so that on a GPU they time the blocks' work
    /// rather than its launch. A no-op on the CPU.
    pub fn set_sync_timers(&mut self, on: bool) {
        self.sync_timers = on;
    }

    /// The candle-autograd pass on any device and dtype (what every non-CPU device runs): the
    /// loss, and the gradients of `loss * loss_scale` (fp16 loss scaling), with the blocks the
    /// policy names checkpointed (their inputs in host memory with
    /// [`Gpt::set_cpu_checkpointing`]).
    pub fn forward_backward_scaled(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
        loss_scale: f64,
    ) -> candle_core::Result<FwdBwd> {
        self.forward_backward_scaled_hooked(ids, targets, policy, loss_scale, &mut |_| Ok(()))
    }

    /// [`Gpt::forward_backward_scaled`] calling `hook` around the blocks as
    /// [`Gpt::forward_backward_hooked`] does on the candle-autograd path: `Gather(i)` before every
    /// block's forward and before a checkpointed block's recompute, `Release(i)` after a
    /// checkpointed block's forward and after its backward; never with `Policy::None`.
    pub fn forward_backward_scaled_hooked(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        policy: Policy,
        loss_scale: f64,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        let t0 = std::time::Instant::now();
        let nparams = self.names.len();
        let mut out: Vec<Option<Tensor>> = vec![None; nparams];
        let mut add = |i: usize, g: Tensor| -> candle_core::Result<()> {
            out[i] = Some(match out[i].take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
            Ok(())
        };
        let (ln_w, ln_b) = (nparams - 2, nparams - 1);
        if policy == Policy::None {
            let loss = self.loss(ids, targets)?;
            let l = loss.to_scalar::<f32>()?;
            let fwd_ms = t0.elapsed().as_secs_f64() * 1e3;
            let grads = scaled(&loss, loss_scale)?.backward()?;
            for (i, p) in self.params().iter().enumerate() {
                if let Some(g) = grads.get(p.var.as_tensor()) {
                    add(i, g.detach())?;
                }
            }
            return Ok(FwdBwd {
                loss: l,
                grads: out,
                fwd_ms,
                bwd_ms: t0.elapsed().as_secs_f64() * 1e3 - fwd_ms,
                segments: Vec::new(),
            });
        }
        // Forward: the embedding keeps its (small) graph; each block either keeps only its
        // input (checkpointed) or its whole graph from a Var input.
        enum Kept {
            Ckpt(Saved),
            Graph(Var, Tensor),
        }
        let x0 = self.embed(ids)?;
        let n = self.blocks.len();
        let mut kept = Vec::with_capacity(n);
        let mut seg_fwd = vec![0f64; n];
        let mut segments: Vec<(usize, f64, f64)> = Vec::new();
        let mut x = x0.detach();
        for (i, blk) in self.blocks.iter().enumerate() {
            let key = self.drop_key(i);
            let seg = |t: &Tensor, m: Mode| blk.forward_mode(t, m, key);
            hook(BlockEvent::Gather(i))?;
            if policy.checkpointed(i, n) {
                let ts = std::time::Instant::now();
                let (y, saved) = if self.cpu_ckpt {
                    ds_ckpt_act::checkpoint_forward_to_host(&seg, &x)
                } else {
                    checkpoint_forward(&seg, &x)
                }
                .map_err(to_candle)?;
                if self.sync_timers {
                    y.device().synchronize()?;
                }
                seg_fwd[i] = ts.elapsed().as_secs_f64() * 1e3;
                kept.push(Kept::Ckpt(saved));
                x = y;
                hook(BlockEvent::Release(i))?;
            } else {
                let xv = Var::from_tensor(&x)?;
                let y = blk.forward_mode(xv.as_tensor(), Mode::Tracked, key)?;
                x = y.detach();
                kept.push(Kept::Graph(xv, y));
            }
        }
        // Head.
        let xl = Var::from_tensor(&x)?;
        let loss = self.head_loss(xl.as_tensor(), targets)?;
        let l = loss.to_scalar::<f32>()?;
        let fwd_ms = t0.elapsed().as_secs_f64() * 1e3;
        let grads = scaled(&loss, loss_scale)?.backward()?;
        for (i, v) in [(ln_w, &self.ln_f.weight), (ln_b, &self.ln_f.bias)] {
            add(
                i,
                grads
                    .get(v.as_tensor())
                    .map(|g| g.detach())
                    .unwrap_or(v.zeros_like()?),
            )?;
        }
        if let Some(g) = grads.get(self.wte.as_tensor()) {
            add(0, g.detach())?;
        }
        let mut g = match grads.get(xl.as_tensor()) {
            Some(g) => g.detach(),
            None => x.zeros_like()?,
        };
        drop(grads);
        // Blocks in reverse.
        for (i, (blk, k)) in self.blocks.iter().zip(kept).enumerate().rev() {
            let key = self.drop_key(i);
            let first = Self::block_param_start(i);
            match k {
                Kept::Ckpt(saved) => {
                    hook(BlockEvent::Gather(i))?;
                    let vars = blk.vars();
                    let refs: Vec<&Var> = vars.iter().collect();
                    let seg = |t: &Tensor, m: Mode| blk.forward_mode(t, m, key);
                    let ts = std::time::Instant::now();
                    let sg = recompute_backward(&seg, &saved, &g, &refs).map_err(to_candle)?;
                    if self.sync_timers {
                        g.device().synchronize()?;
                    }
                    segments.push((i, seg_fwd[i], ts.elapsed().as_secs_f64() * 1e3));
                    for (k, pg) in sg.params.into_iter().enumerate() {
                        if let Some(pg) = pg {
                            add(first + k, pg)?;
                        }
                    }
                    g = sg.input;
                    hook(BlockEvent::Release(i))?;
                }
                Kept::Graph(xv, y) => {
                    let vars = blk.vars();
                    let grads = (y * &g)?.sum_all()?.backward()?;
                    for (k, v) in vars.iter().enumerate() {
                        if let Some(pg) = grads.get(v.as_tensor()) {
                            add(first + k, pg.detach())?;
                        }
                    }
                    g = match grads.get(xv.as_tensor()) {
                        Some(t) => t.detach(),
                        None => g.zeros_like()?,
                    };
                }
            }
        }
        // Embedding.
        let grads = (x0 * &g)?.sum_all()?.backward()?;
        for (i, v) in [(0, &self.wte), (1, &self.wpe)] {
            if let Some(pg) = grads.get(v.as_tensor()) {
                add(i, pg.detach())?;
            }
        }
        Ok(FwdBwd {
            loss: l,
            grads: out,
            fwd_ms,
            bwd_ms: t0.elapsed().as_secs_f64() * 1e3 - fwd_ms,
            segments,
        })
    }

    /// [`Gpt::logits`] instrumented for the flops profiler with DeepSpeed's module tree and
    /// counting rules (the peer GPT's module names: `wte`, `wpe`, `blocks.i.{ln1, qkv, proj,
    /// ln2, fc, fc2}`, `ln_f`, `head`). As in DeepSpeed, operator additions and scalings
    /// (`x + y`, `* scale`, the mask) are not counted; the tied head's parameters are counted
    /// once, under `wte`. The training path carries no instrumentation at all.
    pub fn profile_forward(
        &self,
        ids: &Tensor,
        prof: &ds_profiler::FlopsProfiler,
    ) -> candle_core::Result<Tensor> {
        use ds_profiler::Activation;
        let (b, t) = ids.dims2()?;
        let d = self.shape.hidden;
        let linear = |name: &str, l: &Linear, x: &Tensor| -> candle_core::Result<Tensor> {
            let _g = prof.scope(name, "Linear");
            prof.set_params(
                (l.weight.elem_count() + l.bias.as_ref().map_or(0, |b| b.elem_count())) as u64,
            );
            prof.record_linear(x.dims(), l.weight.dims()[0]);
            l.forward(x)
        };
        let norm = |name: &str, l: &LayerNorm, x: &Tensor| -> candle_core::Result<Tensor> {
            let _g = prof.scope(name, "LayerNorm");
            prof.set_params((l.weight.elem_count() + l.bias.elem_count()) as u64);
            prof.record_layer_norm(x.dims(), true);
            l.forward(x)
        };
        let _root = prof.scope("model", "GPT");
        let tok = {
            let _g = prof.scope("wte", "Embedding");
            prof.set_params(self.wte.elem_count() as u64);
            prof.record_embedding(ids.dims());
            self.wte
                .embedding(&ids.flatten_all()?)?
                .reshape((b, t, d))?
        };
        let pos = {
            let _g = prof.scope("wpe", "Embedding");
            prof.set_params(self.wpe.elem_count() as u64);
            self.wpe.narrow(0, 0, t)?
        };
        let mut x = tok.broadcast_add(&pos)?;
        {
            let _list = prof.scope("blocks", "ModuleList");
            for (i, blk) in self.blocks.iter().enumerate() {
                let _g = prof.scope(&i.to_string(), "Block");
                let l = blk.layers.borrow();
                let h = blk.heads;
                let hd = d / h;
                let qkv = linear("qkv", &l.qkv, &norm("ln1", &l.ln1, &x)?)?;
                let split = |k: usize| -> candle_core::Result<Tensor> {
                    qkv.narrow(2, k * d, d)?
                        .reshape((b, t, h, hd))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let (q, k, v) = (split(0)?, split(1)?, split(2)?);
                prof.record_matmul(&[b, h, t, hd], &[b, h, hd, t]);
                let att = q.matmul(&k.t()?)?;
                prof.record_softmax(att.dims());
                let att = crate::kernels::causal_softmax(&att, 1.0 / (hd as f64).sqrt())?;
                prof.record_matmul(att.dims(), v.dims());
                let y = att
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((b, t, d))?;
                x = (x + linear("proj", &l.proj, &y)?)?;
                let hmid = linear("fc", &l.fc, &norm("ln2", &l.ln2, &x)?)?;
                prof.record_activation(Activation::Gelu, hmid.dims());
                let m = linear("fc2", &l.fc2, &crate::kernels::gelu(&hmid)?)?;
                x = (x + m)?;
            }
        }
        let x = norm("ln_f", &self.ln_f, &x)?.reshape((b * t, d))?;
        let _g = prof.scope("head", "Linear");
        prof.record_linear(&[b, t, d], self.shape.vocab);
        x.matmul(&self.wte.t()?)
    }

    /// Held-out evaluation of `batch` sequences (`ids` and `targets` hold `batch` x T tokens):
    /// the summed next-token loss over every position, and each position's argmax token.
    /// No dropout, and nothing is kept for a backward pass. An f32 model on the CPU runs the
    /// explicit kernels (the training step's forward); any other runs candle ops.
    pub fn evaluate_tokens(
        &self,
        ids: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> candle_core::Result<(f64, Vec<u32>)> {
        if self.fast && fast::supported(self) {
            return fast::evaluate(self, ids, targets, batch);
        }
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            candle_core::bail!(
                "evaluation: {} tokens do not make {batch} sequences",
                ids.len()
            );
        }
        if targets.len() != ids.len() {
            candle_core::bail!("{} targets for {} inputs", targets.len(), ids.len());
        }
        let dev = self.wte.device().clone();
        let x = Tensor::from_slice(ids, (batch, ids.len() / batch), &dev)?;
        let y = Tensor::from_slice(targets, ids.len(), &dev)?;
        let mut h = self.embed(&x)?.detach();
        for blk in &self.blocks {
            h = blk.forward_mode(&h, Mode::Untracked, None)?;
        }
        let logits = self.head(&h)?.detach().to_dtype(DType::F32)?;
        let n = ids.len() as f64;
        let mean = crate::kernels::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        let preds = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        Ok((f64::from(mean) * n, preds))
    }

    /// Logits (B*T, V) of `ids` (B, T).
    pub fn logits(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.embed(ids)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward_mode(&x, Mode::Tracked, self.drop_key(i))?;
        }
        self.head(&x)
    }
}

/// `loss * s` (the loss itself when `s` is 1).
fn scaled(loss: &Tensor, s: f64) -> candle_core::Result<Tensor> {
    if s == 1.0 {
        Ok(loss.clone())
    } else {
        loss.affine(s, 0.0)
    }
}

fn to_candle(e: ds_ckpt_act::CkptError) -> candle_core::Error {
    match e {
        ds_ckpt_act::CkptError::Tensor(t) => t,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// The analytic parameter count of the GPT (for tests and reports).
pub fn gpt_param_count(s: &ModelShape) -> usize {
    let d = s.hidden;
    let block =
        2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d);
    s.vocab * d + s.seq * d + s.layers * block + 2 * d
}

impl Model for Gpt {
    type Batch = Tokens;
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
    fn config(&self) -> serde_json::Value {
        let s = self.shape;
        serde_json::json!({"model": "gpt", "layers": s.layers, "hidden": s.hidden, "heads": s.heads, "seq": s.seq, "vocab": s.vocab})
    }
    fn set_sync_timers(&mut self, on: bool) {
        Gpt::set_sync_timers(self, on)
    }
    fn supports_checkpointing(&self) -> bool {
        true
    }
    fn set_step(&self, step: u64) {
        Gpt::set_step(self, step)
    }
    fn set_param(&self, index: usize, data: &[f32]) -> candle_core::Result<()> {
        Gpt::set_param(self, index, data)
    }
    fn forward_backward_hooked(
        &self,
        batch: &Tokens,
        policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        let (ids, targets) = batch.tensors(self.shape.seq, &Gpt::device(self))?;
        Gpt::forward_backward_hooked(self, &ids, &targets, policy, hook)
    }
    fn forward_backward_streamed(
        &self,
        batch: &Tokens,
        policy: Policy,
        loss_scale: f32,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
        sink: &mut GradSink<'_>,
    ) -> candle_core::Result<FwdBwd> {
        let (ids, targets) = batch.tensors(self.shape.seq, &Gpt::device(self))?;
        Gpt::forward_backward_streamed(self, &ids, &targets, policy, loss_scale, hook, sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelShape {
        ModelShape {
            layers: 2,
            hidden: 16,
            heads: 2,
            seq: 8,
            vocab: 32,
        }
    }

    #[test]
    fn reference_gpt_has_the_peer_parameter_count() {
        // peer/README.md: 4 layers, hidden 256, 4 heads, seq 128, vocab 8192 = 5,289,472.
        assert_eq!(gpt_param_count(&ModelShape::default()), 5_289_472);
        let m = Gpt::new(tiny(), 0, &Device::Cpu).unwrap();
        assert_eq!(numel(&m.params()), gpt_param_count(&tiny()));
        let shapes: usize = m
            .param_shapes()
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum();
        assert_eq!(shapes, gpt_param_count(&tiny()));
    }

    #[test]
    fn initial_loss_is_log_vocab_and_every_param_gets_a_gradient() {
        let s = tiny();
        let m = Gpt::new(s, 1, &Device::Cpu).unwrap();
        let mut rng = Rng::new(2);
        let ids: Vec<u32> = (0..2 * s.seq)
            .map(|_| (rng.next_u64() % s.vocab as u64) as u32)
            .collect();
        let tg: Vec<u32> = (0..2 * s.seq)
            .map(|_| (rng.next_u64() % s.vocab as u64) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (2, s.seq), &Device::Cpu).unwrap();
        let tg = Tensor::from_vec(tg, (2, s.seq), &Device::Cpu).unwrap();
        let loss = m.loss(&ids, &tg).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        // N(0, 0.02) init: logits near 0, loss near ln(V) for targets unrelated to the inputs.
        assert!((l - (s.vocab as f32).ln()).abs() < 0.1, "{l}");
        let grads = loss.backward().unwrap();
        for p in m.params() {
            let g = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {}", p.name));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0 && n.is_finite(), "{}: |g|^2 = {n}", p.name);
        }
    }

    #[test]
    fn checkpointed_backward_equals_plain_backward() {
        let s = ModelShape {
            layers: 3,
            ..tiny()
        };
        let mut m = Gpt::new(s, 5, &Device::Cpu).unwrap();
        // Dropout on: the recompute must draw the same masks.
        m.set_dropout(0.2, 11);
        m.set_step(3);
        let mut rng = Rng::new(6);
        let mut toks = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| (rng.next_u64() % s.vocab as u64) as u32)
                .collect()
        };
        let ids = Tensor::from_vec(toks(2 * s.seq), (2, s.seq), &Device::Cpu).unwrap();
        let tg = Tensor::from_vec(toks(2 * s.seq), (2, s.seq), &Device::Cpu).unwrap();
        let r0 = m.forward_backward(&ids, &tg, Policy::None).unwrap();
        let (l0, g0) = (r0.loss, r0.grads);
        // Dropout is really on: another step draws other masks and another loss.
        m.set_step(4);
        assert_ne!(
            m.forward_backward(&ids, &tg, Policy::None).unwrap().loss,
            l0
        );
        m.set_step(3);
        for policy in [Policy::Every, Policy::Count(1), Policy::Count(2)] {
            let r = m.forward_backward(&ids, &tg, policy).unwrap();
            let (l, g) = (r.loss, r.grads);
            assert_eq!(l, l0, "{policy:?}");
            for ((p, a), b) in m.params().iter().zip(&g).zip(&g0) {
                let a = a
                    .as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = b
                    .as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let d = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                let scale = b.iter().fold(0f32, |acc, x| acc.max(x.abs()));
                // Bit for bit, except the tied embedding whose two contributions (head and
                // embedding) are summed in the other order: within rounding of that one add.
                let tol = if p.name == "wte.weight" {
                    1e-7 * scale
                } else {
                    0.0
                };
                assert!(
                    d <= tol,
                    "{policy:?} {}: max diff {d:e} (scale {scale:e})",
                    p.name
                );
            }
        }
    }

    /// ZeRO-3's per-block install: release and install one block at a time (the count of
    /// gathered blocks follows), the installed values are the given ones, and wrong shapes or
    /// a missing block are refused by name.
    #[test]
    fn install_and_release_single_blocks() {
        let m = Gpt::new(tiny(), 0, &Device::Cpu).unwrap();
        let start = Gpt::block_param_start(1);
        let vals: Vec<Tensor> = m.params()[start..start + BLOCK_PARAMS]
            .iter()
            .map(|p| (p.var.as_tensor() + 1.0).unwrap())
            .collect();
        m.release_blocks_on_device().unwrap();
        assert_eq!(m.gathered_blocks(), 0);
        m.install_block(1, &vals).unwrap();
        assert_eq!(m.gathered_blocks(), 1);
        for (p, v) in m.params()[start..start + BLOCK_PARAMS].iter().zip(&vals) {
            let d = (p.var.as_tensor() - v).unwrap().abs().unwrap();
            assert_eq!(
                d.flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
        m.release_block_on_device(1).unwrap();
        assert_eq!(m.gathered_blocks(), 0);
        let err = m.install_block(0, &vals[1..]).unwrap_err().to_string();
        assert!(err.contains("block 0: expected shapes"), "{err}");
        assert!(m.install_block(2, &vals).is_err());
        let mut m = m;
        let err = m.install_persistent(&vals[..4]).unwrap_err().to_string();
        assert!(err.contains("persistent parameters"), "{err}");
    }

    #[test]
    fn safetensors_round_trip_and_errors() {
        let a = Gpt::new(tiny(), 1, &Device::Cpu).unwrap();
        let b = Gpt::new(tiny(), 2, &Device::Cpu).unwrap();
        let dir = std::env::temp_dir().join(format!("ds-model-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let map: std::collections::HashMap<String, Tensor> = a
            .params()
            .into_iter()
            .map(|p| (p.name, p.var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        b.load_safetensors(&path).unwrap();
        for (p, q) in a.params().iter().zip(b.params()) {
            let x = p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = q.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(x, y, "{}", p.name);
        }
        // A model of another shape: a clear error naming the tensor.
        let c = Gpt::new(
            ModelShape {
                hidden: 32,
                ..tiny()
            },
            1,
            &Device::Cpu,
        )
        .unwrap();
        let msg = c.load_safetensors(&path).unwrap_err().to_string();
        assert!(msg.contains("wte.weight") && msg.contains("shape"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The instrumented forward's totals equal the analytic count of DeepSpeed's rules.
    #[test]
    fn profiled_forward_matches_the_analytic_flop_count() {
        for (s, b) in [
            (tiny(), 2usize),
            (
                ModelShape {
                    layers: 3,
                    hidden: 24,
                    heads: 3,
                    seq: 5,
                    vocab: 40,
                },
                3,
            ),
        ] {
            let m = Gpt::new(s, 0, &Device::Cpu).unwrap();
            let prof = ds_profiler::FlopsProfiler::new();
            prof.start_profile();
            let ids = Tensor::zeros((b, s.seq), DType::U32, &Device::Cpu).unwrap();
            let logits = m.profile_forward(&ids, &prof).unwrap();
            prof.stop_profile();
            // Same values as the training path (which runs the fused CPU linear and
            // attention ops: equal within f32 rounding, not bit for bit).
            let (p, r) = (
                logits.to_vec2::<f32>().unwrap(),
                m.logits(&ids).unwrap().to_vec2::<f32>().unwrap(),
            );
            assert_eq!((p.len(), p[0].len()), (r.len(), r[0].len()));
            for (pr, rr) in p.iter().zip(&r) {
                for (a, b) in pr.iter().zip(rr) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
            let (b, t, d, v, h) = (
                b as u64,
                s.seq as u64,
                s.hidden as u64,
                s.vocab as u64,
                s.heads as u64,
            );
            let per_block = 2 * b * t * 12 * d * d // qkv, proj, fc, fc2 (bias not counted)
                + 2 * 2 * b * t * t * d            // q k^T and att v
                + b * h * t * t                    // softmax
                + 2 * 5 * b * t * d                // two LayerNorms
                + b * t * 4 * d; // GELU
            let want = s.layers as u64 * per_block + 5 * b * t * d + 2 * b * t * d * v;
            assert_eq!(prof.total_flops(), want, "{s:?}");
            assert_eq!(prof.total_params(), gpt_param_count(&s) as u64);
        }
    }

    #[test]
    fn causal_mask_future_tokens_do_not_change_past_losses() {
        let s = tiny();
        let m = Gpt::new(s, 3, &Device::Cpu).unwrap();
        let a: Vec<u32> = (0..s.seq as u32).collect();
        let mut b = a.clone();
        b[s.seq - 1] = 31; // change only the last input token
        let t = |v: Vec<u32>| Tensor::from_vec(v, (1, s.seq), &Device::Cpu).unwrap();
        let la = m.logits(&t(a)).unwrap().to_vec2::<f32>().unwrap();
        let lb = m.logits(&t(b)).unwrap().to_vec2::<f32>().unwrap();
        // Positions before the changed token see the same logits; the last one differs.
        assert_eq!(la[..s.seq - 1], lb[..s.seq - 1]);
        assert_ne!(la[s.seq - 1], lb[s.seq - 1]);
    }

    #[test]
    fn fused_layer_norm_equals_the_generic_ops() {
        let dev = Device::Cpu;
        let d = 48;
        let ln = LayerNorm::new(d, &dev).unwrap();
        let wv: Vec<f32> = (0..d).map(|i| 1.0 + (i as f32 * 0.3).sin() * 0.5).collect();
        let bv: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).cos() * 0.1).collect();
        ln.weight
            .set(&Tensor::from_vec(wv, d, &dev).unwrap())
            .unwrap();
        ln.bias
            .set(&Tensor::from_vec(bv, d, &dev).unwrap())
            .unwrap();
        let xv: Vec<f32> = (0..3 * 5 * d)
            .map(|i| (i as f32 * 0.13).sin() * 2.0 + 0.5)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(xv, (3, 5, d), &dev).unwrap()).unwrap();
        let r = Tensor::from_vec(
            (0..3 * 5 * d)
                .map(|i| (i as f32 * 0.29).cos())
                .collect::<Vec<f32>>(),
            (3, 5, d),
            &dev,
        )
        .unwrap();
        let run = |y: Tensor| {
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y,
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(ln.weight.as_tensor()).unwrap().clone(),
                g.get(ln.bias.as_tensor()).unwrap().clone(),
            ]
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        let fused = run(ln.forward(x.as_tensor()).unwrap());
        let generic = run(ln.forward_generic(x.as_tensor()).unwrap());
        for (what, (a, b)) in ["y", "dx", "dweight", "dbias"]
            .iter()
            .zip(fused.iter().zip(&generic))
        {
            let diff = a
                .iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-4, "{what}: max abs diff {diff}");
        }
    }
}
