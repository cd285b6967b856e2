//! Fused CPU kernels with hand-written backward passes, plugged into candle's autograd as
//! custom ops: softmax cross-entropy, LayerNorm and the causal attention softmax.
//!
//! Each replaces a chain of generic candle ops (one tensor and one pass over memory per op,
//! forward and backward) by one multithreaded pass per direction. Their gradients are checked
//! against the generic differentiable forms in the tests.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use crate::fast::rows;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        bail!("{what}: expected u32 targets");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: expected contiguous targets"),
    }
}

fn rows_cols(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let d = l.dims();
    if d.is_empty() {
        bail!("{what}: expected at least one dimension");
    }
    let cols = d[d.len() - 1];
    Ok((l.shape().elem_count() / cols.max(1), cols))
}

// ------------------------------------------------------------------ cross-entropy

/// Mean softmax cross-entropy of logits (N, V) against u32 targets (N).
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let t = u32_slice(s2, l2, self.name())?;
        let (n, v) = rows_cols(l1, self.name())?;
        if t.len() != n {
            bail!("{}: {} targets for {n} rows", self.name(), t.len());
        }
        if let Some(bad) = t.iter().find(|&&k| k as usize >= v) {
            bail!(
                "{}: target {bad} outside the vocabulary of {v}",
                self.name()
            );
        }
        let total: f64 = x
            .par_chunks(v)
            .zip(t.par_iter())
            .map_init(Vec::new, |scratch, (row, &k)| {
                let m = rows::max(row);
                scratch.clear();
                scratch.extend_from_slice(row);
                let s = rows::exp_shift_sum(scratch, m);
                f64::from(m) + f64::from(s).ln() - f64::from(row[k as usize])
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let gl = logits.apply_op2_no_bwd(targets, &CrossEntropyGrad(g))?;
        Ok((Some(gl), None))
    }
}

/// d(mean CE)/d logits scaled by the upstream gradient: (softmax - onehot) * g / N.
struct CrossEntropyGrad(f32);

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let t = u32_slice(s2, l2, self.name())?;
        let (n, v) = rows_cols(l1, self.name())?;
        let scale = self.0 / n as f32;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(t.par_iter())
            .for_each(|((o, row), &k)| {
                let m = rows::max(row);
                o.copy_from_slice(row);
                let s = rows::exp_shift_sum(o, m);
                let r = scale / s;
                for oi in o.iter_mut() {
                    *oi *= r;
                }
                o[k as usize] -= scale;
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Whether the fused CPU kernels apply: f32 on the CPU. Other devices (CUDA) and dtypes
/// (bf16/f16 models) take candle's generic, differentiable ops instead.
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Mean cross-entropy of `logits` (N, V) against `targets` (N) in one fused pass per direction.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fused(logits) {
        // Other devices and 16-bit logits: candle's generic ops, in f32.
        return crate::gpt::cross_entropy(&logits.to_dtype(DType::F32)?, targets);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

// ------------------------------------------------------------------ layer norm

const LN_EPS: f32 = 1e-5;

/// LayerNorm over the last dimension: (x, weight, bias) -> y.
struct LayerNormOp;

fn ln_stats(row: &[f32]) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = row.iter().sum::<f32>() / d;
    let var = row.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + LN_EPS).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (_, d) = rows_cols(l1, self.name())?;
        if w.len() != d || b.len() != d {
            bail!(
                "{}: weight/bias of {}/{} for rows of {d}",
                self.name(),
                w.len(),
                b.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let (mean, rstd) = ln_stats(row);
                for i in 0..d {
                    o[i] = (row[i] - mean) * rstd * w[i] + b[i];
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad)?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm backward: (x, weight, dy) -> [dx (flat), dw, db] packed in one 1-D tensor.
struct LayerNormGrad;

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let dy = f32_slice(s3, l3, self.name())?;
        let (rows, d) = rows_cols(l1, self.name())?;
        let mut out = vec![0f32; x.len() + 2 * d];
        let (dx, rest) = out.split_at_mut(x.len());
        // dx per row in parallel; dw/db reduced over row blocks.
        let block = rows
            .div_ceil(rayon::current_num_threads().max(1) * 4)
            .max(1);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(block * d)
            .zip(x.par_chunks(block * d))
            .zip(dy.par_chunks(block * d))
            .map(|((dxb, xb), dyb)| {
                let mut dw = vec![0f32; d];
                let mut db = vec![0f32; d];
                for ((dxr, xr), dyr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(dyb.chunks(d)) {
                    let (mean, rstd) = ln_stats(xr);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for i in 0..d {
                        let xhat = (xr[i] - mean) * rstd;
                        let g = dyr[i] * w[i];
                        s1 += g;
                        s2 += g * xhat;
                        dw[i] += dyr[i] * xhat;
                        db[i] += dyr[i];
                    }
                    let inv_d = 1.0 / d as f32;
                    for i in 0..d {
                        let xhat = (xr[i] - mean) * rstd;
                        let g = dyr[i] * w[i];
                        dxr[i] = rstd * (g - inv_d * s1 - xhat * inv_d * s2);
                    }
                }
                (dw, db)
            })
            .collect();
        let (dw, db) = rest.split_at_mut(d);
        for (pw, pb) in partials {
            for i in 0..d {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// LayerNorm over the last dimension (eps 1e-5), fused forward and backward.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        // Generic ops with the statistics in f32 (as mixed-precision LayerNorm does).
        let dt = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + LN_EPS as f64)?.sqrt()?)?;
        return xn
            .broadcast_mul(&weight.to_dtype(DType::F32)?)?
            .broadcast_add(&bias.to_dtype(DType::F32)?)?
            .to_dtype(dt);
    }
    x.contiguous()?.apply_op3(weight, bias, LayerNormOp)
}

// ------------------------------------------------------------------ causal softmax

/// softmax(scale * x) over the last dimension of (..., T, T) with a causal mask (column j > row i
/// gets probability 0).
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let dims = l.dims();
        if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
            bail!("{}: expected (..., T, T), got {dims:?}", self.name());
        }
        let t = dims[dims.len() - 1];
        let scale = self.scale;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * t)
            .zip(x.par_chunks(t * t))
            .for_each(|(ym, xm)| {
                for i in 0..t {
                    let row = &xm[i * t..i * t + i + 1];
                    let out = &mut ym[i * t..i * t + i + 1];
                    out.iter_mut().zip(row).for_each(|(o, &v)| *o = v * scale);
                    let m = rows::max(out);
                    let s = rows::exp_shift_sum(out, m);
                    let r = 1.0 / s;
                    for v in out[..=i].iter_mut() {
                        *v *= r;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// Softmax backward from its output y: dx = scale * y * (dy - sum(dy * y)).
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, self.name())?;
        let dy = f32_slice(s2, l2, self.name())?;
        let (_, t) = rows_cols(l1, self.name())?;
        let scale = self.scale;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(t)
            .zip(y.par_chunks(t).zip(dy.par_chunks(t)))
            .for_each(|(o, (yr, gr))| {
                let dot = rows::dot(yr, gr);
                for j in 0..t {
                    o[j] = scale * yr[j] * (gr[j] - dot);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Causal softmax of `scale * x` over the last dimension of (..., T, T).
pub fn causal_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    if !fused(x) {
        // Generic ops in f32: a -inf-like additive mask above the diagonal.
        let t = x.dim(D::Minus1)?;
        let dt = x.dtype();
        let keep = Tensor::tril2(t, DType::F32, x.device())?;
        let mask = ((keep - 1.0)? * 1e30)?;
        let z = x
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?
            .broadcast_add(&mask)?;
        return crate::gpt::softmax_last(&z)?.to_dtype(dt);
    }
    x.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })
}

// ------------------------------------------------------------------ GELU (tanh)

/// GELU with the tanh approximation (PyTorch's `approximate='tanh'`).
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, xs)| {
                rows::gelu(xs, o);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// GELU backward: dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        if x.len() != g.len() {
            bail!(
                "{}: {} inputs for {} gradients",
                self.name(),
                x.len(),
                g.len()
            );
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14).zip(g.par_chunks(1 << 14)))
            .for_each(|(o, (xs, gs))| {
                o.copy_from_slice(gs);
                rows::gelu_grad(xs, o);
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU (tanh approximation), fused forward and backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        // candle's GELU is the same tanh approximation, with its own backward.
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Gelu)
}

// ------------------------------------------------------------------ linear

/// `x W^T + b` for x (N, in), W (out, in), b (out): one matrix product with the bias as its
/// initial value, and a backward of two products reading the operands in place (no transposed
/// copies) plus one column sum for the bias, on the explicit kernels' GEMM.
struct LinearOp;

fn cpu_f32(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => Ok(f32_slice(c, l, what)?.to_vec()),
        _ => bail!("{what}: expected a CPU tensor"),
    }
}

fn threads() -> crate::fast::Threads {
    crate::fast::Threads(rayon::current_num_threads().max(1))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (n, din) = l1.shape().dims2()?;
        let (dout, win) = l2.shape().dims2()?;
        if win != din || b.len() != dout {
            bail!(
                "{}: x {:?}, weight {:?}, bias {:?} do not fit",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let y = crate::fast::linear_forward(threads(), x, w, b, n, din, dout)?;
        Ok((CpuStorage::F32(y), Shape::from((n, dout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, din) = x.dims2()?;
        let dout = w.dim(0)?;
        let (xv, wv, dy) = (
            cpu_f32(x, self.name())?,
            cpu_f32(w, self.name())?,
            cpu_f32(grad, self.name())?,
        );
        let mut dx = vec![0f32; n * din];
        let mut dw = vec![0f32; dout * din];
        let mut db = vec![0f32; dout];
        crate::fast::linear_backward(
            threads(),
            &dy,
            &xv,
            &wv,
            n,
            din,
            dout,
            &mut dx,
            &mut dw,
            &mut db,
        )?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, din), dev)?),
            Some(Tensor::from_vec(dw, (dout, din), dev)?),
            Some(Tensor::from_vec(db, dout, dev)?),
        ))
    }
}

/// `x W^T + b` for x (N, in), weight (out, in), bias (out): fused on the CPU in f32 (forward
/// and backward on the explicit kernels' GEMM), candle's generic matmul and broadcast add
/// elsewhere.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !(fused(x) && fused(weight) && fused(bias)) {
        return x.matmul(&weight.t()?)?.broadcast_add(bias);
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp)
}

// ------------------------------------------------------------------ causal attention

/// Causal self-attention of `qkv` (B*T, 3C) to `y` (B*T, C) on the explicit kernels' blocked
/// (FlashAttention-2) attention: the forward keeps one log-sum-exp per row and head for its
/// backward, never the T x T probabilities.
struct AttentionOp {
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    /// The forward's log-sum-exp (B, H, T), read by the backward.
    lse: std::sync::Mutex<Vec<f32>>,
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, l, self.name())?;
        let (y, lse) =
            crate::fast::attention_forward(threads(), qkv, self.b, self.t, self.c, self.heads)?;
        match self.lse.lock() {
            Ok(mut g) => *g = lse,
            Err(_) => bail!("{}: state lock poisoned", self.name()),
        }
        Ok((CpuStorage::F32(y), Shape::from((self.b * self.t, self.c))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let qkv = cpu_f32(arg, self.name())?;
        let y = cpu_f32(res, self.name())?;
        let dy = cpu_f32(grad, self.name())?;
        let lse = match self.lse.lock() {
            Ok(g) => g.clone(),
            Err(_) => bail!("{}: state lock poisoned", self.name()),
        };
        let d = crate::fast::attention_backward(
            threads(),
            &dy,
            &qkv,
            &y,
            &lse,
            self.b,
            self.t,
            self.c,
            self.heads,
        )?;
        Ok(Some(Tensor::from_vec(d, arg.shape(), arg.device())?))
    }
}

/// Causal self-attention with `heads` heads of `qkv` (B, T, 3C) (queries, keys, values side
/// by side, as the GPT's fused projection writes them) to (B, T, C), scaled by
/// 1/sqrt(head dim): fused and blocked on the CPU in f32, candle's generic ops (with the
/// T x T probabilities) elsewhere.
pub fn causal_attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    if heads == 0 || c3 % 3 != 0 || c % heads != 0 {
        bail!(
            "causal attention: qkv {:?} does not split into 3 x {heads} heads",
            qkv.dims()
        );
    }
    let hd = c / heads;
    if !fused(qkv) {
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let att = causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hd as f64).sqrt())?;
        return att
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, c));
    }
    let op = AttentionOp {
        b,
        t,
        c,
        heads,
        lse: std::sync::Mutex::new(Vec::new()),
    };
    qkv.reshape((b * t, c3))?
        .contiguous()?
        .apply_op1(op)?
        .reshape((b, t, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::{softmax_last, Rng};
    use candle_core::{Device, Var, D};

    fn rand(rng: &mut Rng, shape: &[usize]) -> Var {
        let n = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(rng.normal_vec(n, 1.0), shape, &Device::Cpu).unwrap())
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The generic fallbacks (taken off the CPU, and for 16-bit or f64 tensors) compute what the
    /// fused kernels compute, forward and backward: f64 inputs on the CPU take the fallback.
    #[test]
    fn generic_fallbacks_match_the_fused_kernels() {
        let mut rng = Rng::new(11);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let a = a
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let b = b
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert_eq!(a.len(), b.len(), "{what}");
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= 2e-5 * (1.0 + y.abs()),
                    "{what} [{i}]: {x} vs {y}"
                );
            }
        };
        let x = rand(&mut rng, &[2, 3, 8, 8]);
        let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        // Causal softmax and GELU: forward values and input gradients of sum(y * w).
        let w = rand(&mut rng, &[2, 3, 8, 8]).as_tensor().clone();
        let w64 = w.to_dtype(DType::F64).unwrap();
        for (name, f32y, f64y) in [
            (
                "causal_softmax",
                causal_softmax(&x, 0.3).unwrap(),
                causal_softmax(&x64, 0.3).unwrap(),
            ),
            ("gelu", gelu(&x).unwrap(), gelu(&x64).unwrap()),
        ] {
            assert_eq!(f64y.dtype(), DType::F64, "{name} keeps the dtype");
            close(&f32y, &f64y, name);
            let g32 = (f32y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g64 = (f64y * &w64)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(g32.get(&x).unwrap(), g64.get(&x64).unwrap(), name);
        }
        // LayerNorm.
        let h = rand(&mut rng, &[5, 16]);
        let (gw, gb) = (rand(&mut rng, &[16]), rand(&mut rng, &[16]));
        let h64 = h.to_dtype(DType::F64).unwrap();
        let y32 = layer_norm(&h, &gw, &gb).unwrap();
        let y64 = layer_norm(&h64, gw.as_tensor(), gb.as_tensor()).unwrap();
        close(&y32, &y64, "layer_norm");
        // Cross-entropy (the fallback computes in f32).
        let logits = rand(&mut rng, &[6, 10]);
        let t = Tensor::new(&[1u32, 0, 9, 4, 4, 2], &Device::Cpu).unwrap();
        let l32 = cross_entropy(&logits, &t).unwrap();
        let l64 = cross_entropy(&logits.to_dtype(DType::F64).unwrap(), &t).unwrap();
        close(&l32, &l64, "cross_entropy");
    }

    #[test]
    fn gelu_matches_candle_gelu_forward_and_backward() {
        let mut rng = Rng::new(4);
        let x = Var::from_tensor(
            &Tensor::from_vec(rng.normal_vec(4096, 3.0), 4096, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let up = Tensor::from_vec(rng.normal_vec(4096, 1.0), 4096, &Device::Cpu).unwrap();
        let a = gelu(&x).unwrap();
        let b = x.gelu().unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn causal_attention_matches_the_generic_form_forward_and_backward() {
        // The fused blocked attention against candle's matmuls + masked softmax (the path
        // other devices run), on odd shapes: head dim 3, T not a multiple of any tile.
        let mut rng = Rng::new(12);
        for (b, t, heads, hd) in [(2, 7, 3, 3), (1, 1, 1, 4), (1, 70, 2, 5)] {
            let c = heads * hd;
            let qkv = rand(&mut rng, &[b, t, 3 * c]);
            let up =
                Tensor::from_vec(rng.normal_vec(b * t * c, 1.0), (b, t, c), &Device::Cpu).unwrap();
            let a = causal_attention(qkv.as_tensor(), heads).unwrap();
            let split = |i: usize| {
                qkv.narrow(2, i * c, c)
                    .unwrap()
                    .reshape((b, t, heads, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (split(0), split(1), split(2));
            let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let mask: Vec<f32> = (0..t * t)
                .map(|i| {
                    if i % t > i / t {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
            let p = candle_nn_free_softmax(&s.broadcast_add(&mask).unwrap());
            let r = p
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, t, c))
                .unwrap();
            assert!(max_diff(&a, &r) < 1e-5, "({b},{t},{heads},{hd})");
            let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (r * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(ga.get(&qkv).unwrap(), gr.get(&qkv).unwrap());
            assert!(d < 1e-4, "({b},{t},{heads},{hd}): {d}");
        }
        let qkv = rand(&mut rng, &[1, 2, 10]);
        assert!(
            causal_attention(qkv.as_tensor(), 2).is_err(),
            "10 is not 3 x C"
        );
    }

    /// Softmax over the last dimension from candle's differentiable primitives.
    fn candle_nn_free_softmax(x: &Tensor) -> Tensor {
        let m = x.max_keepdim(D::Minus1).unwrap();
        let e = x.broadcast_sub(&m).unwrap().exp().unwrap();
        let s = e.sum_keepdim(D::Minus1).unwrap();
        e.broadcast_div(&s).unwrap()
    }

    #[test]
    fn linear_matches_matmul_plus_bias_forward_and_backward() {
        // Odd sizes (not multiples of any SIMD width); the reference is candle's generic
        // matmul + broadcast add with its own backward, compared in f64-free f32 tolerance.
        let mut rng = Rng::new(9);
        for (n, din, dout) in [(13, 7, 5), (1, 1, 1), (33, 17, 29)] {
            let x = rand(&mut rng, &[n, din]);
            let w = rand(&mut rng, &[dout, din]);
            let b = rand(&mut rng, &[dout]);
            let up =
                Tensor::from_vec(rng.normal_vec(n * dout, 1.0), (n, dout), &Device::Cpu).unwrap();
            let a = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let r = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            assert!(max_diff(&a, &r) < 1e-5);
            let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (r * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let d = max_diff(ga.get(v).unwrap(), gr.get(v).unwrap());
                assert!(d < 1e-4, "({n},{din},{dout}): {d}");
            }
        }
        // Shapes that do not fit are an error.
        let x = rand(&mut rng, &[3, 4]);
        let w = rand(&mut rng, &[2, 5]);
        let b = rand(&mut rng, &[2]);
        assert!(linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).is_err());
    }

    #[test]
    fn cross_entropy_matches_the_generic_form_forward_and_backward() {
        let mut rng = Rng::new(1);
        let x = rand(&mut rng, &[37, 11]);
        let t: Vec<u32> = (0..37).map(|i| (i * 7 % 11) as u32).collect();
        let t = Tensor::from_vec(t, 37, &Device::Cpu).unwrap();
        let a = cross_entropy(x.as_tensor(), &t).unwrap();
        let b = crate::gpt::cross_entropy(x.as_tensor(), &t).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        // Upstream gradient 3: the op must scale by it.
        let ga = (a * 3.0).unwrap().backward().unwrap();
        let gb = (b * 3.0).unwrap().backward().unwrap();
        let d = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
        assert!(d < 1e-6, "{d}");
        let bad = Tensor::from_vec(vec![11u32; 37], 37, &Device::Cpu).unwrap();
        assert!(cross_entropy(x.as_tensor(), &bad).is_err());
    }

    #[test]
    fn layer_norm_matches_the_generic_form_forward_and_backward() {
        let mut rng = Rng::new(2);
        let x = rand(&mut rng, &[3, 5, 24]);
        let w = rand(&mut rng, &[24]);
        let b = rand(&mut rng, &[24]);
        let up =
            Tensor::from_vec(rng.normal_vec(3 * 5 * 24, 1.0), (3, 5, 24), &Device::Cpu).unwrap();
        let a = layer_norm(&x, &w, &b).unwrap();
        let generic = {
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&w)
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
        };
        assert!(max_diff(&a, &generic) < 1e-5);
        let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (generic * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let d = max_diff(ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(d < 2e-5, "{d}");
        }
    }

    #[test]
    fn causal_softmax_matches_masked_softmax_forward_and_backward() {
        let mut rng = Rng::new(3);
        let t = 9;
        let x = rand(&mut rng, &[2, 3, t, t]);
        let up = Tensor::from_vec(
            rng.normal_vec(2 * 3 * t * t, 1.0),
            (2, 3, t, t),
            &Device::Cpu,
        )
        .unwrap();
        let scale = 0.35;
        let a = causal_softmax(&x, scale).unwrap();
        let mut m = vec![0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                m[i * t + j] = -1e9;
            }
        }
        let mask = Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap();
        let b = softmax_last(
            &(x.as_tensor() * scale)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap(),
        )
        .unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
        assert!(d < 1e-5, "{d}");
    }
}
