//! Runnable example programs for the `ds` workspace live in `examples/examples/`;
//! run one with `cargo run --release --example NAME`.
//!
//! This library holds what the candle-nn examples (`candle_mlp`, `llama`) and their tests
//! share: two networks written with plain candle-nn, an embedded data set, and a data-parallel
//! training loop over the one engine.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use ds_comm::{Communicator, LocalComm};
use ds_config::ResolvedConfig;
use ds_engine::data::Rng;
use ds_engine::engine::Engine;
use ds_engine::traits::{Model, Policy};
use ds_models::CandleModel;

/// Sets every variable of `varmap` (in name order) to seeded values: N(0, 1/fan_in) for
/// matrices, 1 for vectors named `*weight` (norm scales), 0 for other vectors. candle's own
/// initialisers draw from an unseeded generator; this makes runs repeatable.
pub fn seed_varmap(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = Rng::new(seed);
    for n in names {
        let v = &data[n];
        let dims = v.dims();
        let vals = if dims.len() >= 2 {
            let fan_in = dims[dims.len() - 1] as f64;
            rng.normal_vec(v.elem_count(), 1.0 / fan_in.sqrt())
        } else if n.ends_with("weight") {
            vec![1.0; v.elem_count()]
        } else {
            vec![0.0; v.elem_count()]
        };
        v.set(&Tensor::from_vec(vals, dims, v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ the MLP classifier

/// The embedded data set of the classifier: three interleaved spirals in the plane (the
/// classic toy problem no linear model separates), `per_class` points each, with Gaussian
/// noise; a fixed seed.
pub fn spirals(per_class: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for c in 0..3u32 {
        for i in 0..per_class {
            let r = i as f64 / per_class as f64;
            let t = c as f64 * 4.0 + 4.0 * r + rng.normal() * 0.2;
            xs.push((r * t.sin()) as f32);
            xs.push((r * t.cos()) as f32);
            ys.push(c);
        }
    }
    (xs, ys)
}

/// One micro-batch of the classifier: points (B, 2) and labels (B).
#[derive(Debug, Clone)]
pub struct Points {
    /// (B, 2) f32.
    pub x: Tensor,
    /// (B) u32.
    pub y: Tensor,
}

/// The micro-batches of the classifier over the data set `(xs, ys)`:
/// `batch(step, micro, rank, ws, micro_batch)` walks the points in a fixed scrambled order,
/// global batch by global batch (the same at every world size), and rank `r` takes its slice.
pub fn points_batch<'a>(
    xs: &'a [f32],
    ys: &'a [u32],
    gas: usize,
) -> impl Fn(u64, usize, usize, usize, usize) -> Points + Sync + 'a {
    move |step, m, rank, ws, micro| {
        let n = ys.len();
        let base = (step as usize * gas + m) * micro * ws;
        let idx: Vec<usize> = (rank * micro..(rank + 1) * micro)
            .map(|j| ((base + j) * 7919) % n)
            .collect();
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| [xs[2 * i], xs[2 * i + 1]])
            .collect();
        let y: Vec<u32> = idx.iter().map(|&i| ys[i]).collect();
        Points {
            x: Tensor::from_vec(x, (micro, 2), &Device::Cpu).expect("micro x 2 values"),
            y: Tensor::from_vec(y, micro, &Device::Cpu).expect("micro labels"),
        }
    }
}

/// Hidden layers of the classifier, each a `layers.{i}` block.
pub const MLP_LAYERS: usize = 2;
/// Width of the classifier.
pub const MLP_HIDDEN: usize = 64;

/// Builds the classifier once from `varmap` (creating its variables), seeded.
pub fn mlp_varmap(seed: u64, dev: &Device) -> candle_core::Result<VarMap> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    candle_nn::linear(2, MLP_HIDDEN, vb.pp("input"))?;
    for i in 0..MLP_LAYERS {
        candle_nn::linear(MLP_HIDDEN, MLP_HIDDEN, vb.pp(format!("layers.{i}")))?;
    }
    candle_nn::linear(MLP_HIDDEN, 3, vb.pp("output"))?;
    seed_varmap(&varmap, seed)?;
    Ok(varmap)
}

/// The classifier as a [`CandleModel`]: input Linear + ReLU, [`MLP_LAYERS`] residual
/// Linear + ReLU blocks, output Linear, cross-entropy (candle-nn's, which is differentiable).
pub fn mlp_classifier(varmap: VarMap) -> candle_core::Result<CandleModel<Points>> {
    CandleModel::sequential(
        varmap,
        "layers",
        MLP_LAYERS,
        |vb, b: &Points| {
            candle_nn::linear(2, MLP_HIDDEN, vb.pp("input"))?
                .forward(&b.x)?
                .relu()
        },
        |vb, _i, x| {
            let l: Linear = candle_nn::linear(MLP_HIDDEN, MLP_HIDDEN, vb)?;
            x + l.forward(x)?.relu()?
        },
        |vb, x, b: &Points| {
            let logits = candle_nn::linear(MLP_HIDDEN, 3, vb.pp("output"))?.forward(x)?;
            candle_nn::loss::cross_entropy(&logits, &b.y)
        },
    )
}

/// The classifier's accuracy on `(xs, ys)` with the given parameters (a fresh network).
pub fn mlp_accuracy(params: &[f32], xs: &[f32], ys: &[u32]) -> candle_core::Result<f64> {
    let dev = Device::Cpu;
    let model = mlp_classifier(mlp_varmap(0, &dev)?)?;
    let mut off = 0;
    for p in model.params() {
        let n = p.var.elem_count();
        ds_engine::traits::set_var(&p.var, &params[off..off + n])?;
        off += n;
    }
    let vb = model.var_builder();
    let x = Tensor::from_slice(xs, (ys.len(), 2), &dev)?;
    let mut h = candle_nn::linear(2, MLP_HIDDEN, vb.pp("input"))?
        .forward(&x)?
        .relu()?;
    for i in 0..MLP_LAYERS {
        let l = candle_nn::linear(MLP_HIDDEN, MLP_HIDDEN, vb.pp(format!("layers.{i}")))?;
        h = (&h + l.forward(&h)?.relu()?)?;
    }
    let pred = candle_nn::linear(MLP_HIDDEN, 3, vb.pp("output"))?
        .forward(&h)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?;
    Ok(pred.iter().zip(ys).filter(|(a, b)| a == b).count() as f64 / ys.len() as f64)
}

// ------------------------------------------------------------------ the Llama-style decoder

/// Shape of the Llama-style decoder.
#[derive(Debug, Clone, Copy)]
pub struct LlamaShape {
    /// Vocabulary.
    pub vocab: usize,
    /// Width.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// SwiGLU hidden width.
    pub ffn: usize,
    /// Tokens per sequence.
    pub seq: usize,
}

/// RMSNorm in differentiable form (candle-nn's fused `rms_norm` has no backward).
fn rms_norm(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-6)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last dimension in differentiable form.
fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotary position embedding of (B, H, T, Dh) by the angles `pos * 10000^(-2k/Dh)`
/// (the half-split form of Llama's reference code).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let dh = x.dim(D::Minus1)?;
    let (a, b) = (
        x.narrow(D::Minus1, 0, dh / 2)?,
        x.narrow(D::Minus1, dh / 2, dh / 2)?,
    );
    let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
    let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
    Tensor::cat(&[ra, rb], D::Minus1)
}

/// (cos, sin) tables (T, Dh/2).
fn rope_tables(seq: usize, dh: usize, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = dh / 2;
    let mut c = Vec::with_capacity(seq * half);
    let mut s = Vec::with_capacity(seq * half);
    for p in 0..seq {
        for k in 0..half {
            let a = p as f64 * 10000f64.powf(-2.0 * k as f64 / dh as f64);
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(c, (seq, half), dev)?,
        Tensor::from_vec(s, (seq, half), dev)?,
    ))
}

/// One decoder block built from `vb` (`attn_norm`, `q`/`k`/`v`/`o`, `ffn_norm`, `gate`/`up`/`down`,
/// no biases): pre-RMSNorm causal attention with rotary embeddings, then a SwiGLU MLP.
pub fn llama_block(vb: VarBuilder<'_>, s: LlamaShape, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let dh = d / s.heads;
    let lin = |i, o, n: &str| candle_nn::linear_no_bias(i, o, vb.pp(n));
    let h = rms_norm(x, &vb.get(d, "attn_norm.weight")?)?;
    let split = |y: Tensor| -> candle_core::Result<Tensor> {
        y.reshape((b, t, s.heads, dh))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (cos, sin) = rope_tables(t, dh, x.device())?;
    let q = rope(&split(lin(d, d, "q")?.forward(&h)?)?, &cos, &sin)?;
    let k = rope(&split(lin(d, d, "k")?.forward(&h)?)?, &cos, &sin)?;
    let v = split(lin(d, d, "v")?.forward(&h)?)?;
    let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), x.device())?;
    let att = softmax(&scores.broadcast_add(&mask)?)?;
    let y = att
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, d))?;
    let x = (x + lin(d, d, "o")?.forward(&y)?)?;
    let h = rms_norm(&x, &vb.get(d, "ffn_norm.weight")?)?;
    let gate = candle_nn::ops::silu(&lin(d, s.ffn, "gate")?.forward(&h)?)?;
    let up = lin(d, s.ffn, "up")?.forward(&h)?;
    &x + lin(s.ffn, d, "down")?.forward(&(gate * up)?)?
}

/// Builds the decoder once from a new `VarMap` (creating its variables), seeded.
pub fn llama_varmap(s: LlamaShape, seed: u64, dev: &Device) -> candle_core::Result<VarMap> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let ids = Tensor::zeros((1, s.seq), DType::U32, dev)?;
    let x = candle_nn::embedding(s.vocab, s.hidden, vb.pp("embed"))?.forward(&ids)?;
    let mut x = x;
    for i in 0..s.layers {
        x = llama_block(vb.pp(format!("layers.{i}")), s, &x)?;
    }
    vb.get(s.hidden, "norm.weight")?;
    candle_nn::linear_no_bias(s.hidden, s.vocab, vb.pp("lm_head"))?;
    seed_varmap(&varmap, seed)?;
    Ok(varmap)
}

/// The decoder as a [`CandleModel`] over token batches: embedding, [`LlamaShape::layers`]
/// `layers.{i}` blocks, final RMSNorm, untied LM head, next-token cross-entropy.
pub fn llama(
    varmap: VarMap,
    s: LlamaShape,
) -> candle_core::Result<CandleModel<ds_engine::traits::Tokens>> {
    let dev = Device::Cpu;
    CandleModel::sequential(
        varmap,
        "layers",
        s.layers,
        move |vb, b: &ds_engine::traits::Tokens| {
            let (ids, _) = b.tensors(s.seq, &dev)?;
            candle_nn::embedding(s.vocab, s.hidden, vb.pp("embed"))?.forward(&ids)
        },
        move |vb, _i, x| llama_block(vb, s, x),
        move |vb, x, b| {
            let (b_, t, d) = x.dims3()?;
            let h = rms_norm(x, &vb.get(d, "norm.weight")?)?.reshape((b_ * t, d))?;
            let logits = candle_nn::linear_no_bias(d, s.vocab, vb.pp("lm_head"))?.forward(&h)?;
            let targets = Tensor::from_slice(&b.targets, b_ * t, x.device())?;
            candle_nn::loss::cross_entropy(&logits, &targets)
        },
    )
}

/// What one rank ends with after [`train_ranks`].
#[derive(Debug, Clone)]
pub struct RankRun {
    /// Mean loss of each step.
    pub losses: Vec<f64>,
    /// All parameters, flat in the model's order, after training.
    pub params: Vec<f32>,
    /// The most blocks whose weights were present at once during training.
    pub peak_blocks: usize,
}

/// Trains `make()` on `ws` local ranks (threads) for `steps` steps of the engine, every block
/// checkpointed when `ckpt`; `batch(step, micro, rank, ws, micro_batch)` gives the micro-batches.
pub fn train_ranks<M, F, D>(
    cfg: &ResolvedConfig,
    ws: usize,
    steps: u64,
    ckpt: bool,
    make: F,
    batch: D,
) -> Vec<Result<RankRun, String>>
where
    M: Model,
    F: Fn() -> candle_core::Result<M> + Sync,
    D: Fn(u64, usize, usize, usize, usize) -> M::Batch + Sync,
{
    std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let (make, batch) = (&make, &batch);
                s.spawn(move || -> Result<RankRun, String> {
                    let model = make().map_err(|e| e.to_string())?;
                    let mut e = Engine::initialize(cfg, model, &comm).map_err(|e| e.to_string())?;
                    if ckpt {
                        e.set_checkpoint_policy(Policy::Every)
                            .map_err(|e| e.to_string())?;
                    }
                    let micro = e.micro_batch_size();
                    let (rank, n) = (comm.rank(), comm.world_size());
                    let mut losses = Vec::new();
                    let mut peak = 0;
                    for step in 0..steps {
                        let r = e
                            .train_batch(|m| batch(step, m, rank, n, micro))
                            .map_err(|e| e.to_string())?;
                        losses.push(r.loss);
                        peak = peak.max(e.peak_gathered_blocks());
                    }
                    Ok(RankRun {
                        losses,
                        params: e.gather_full_params().map_err(|e| e.to_string())?,
                        peak_blocks: peak,
                    })
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
            .collect()
    })
}
