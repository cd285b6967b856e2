//! Fused, flat, multithreaded fp32 optimizers over one rank's shard.
//!
//! Each optimizer owns its state as flat `Vec<f32>` buffers of the shard's length (exportable
//! for checkpoints: [`FlatOptimizer::state`]) and updates a flat parameter slice from a flat
//! gradient slice in ONE pass over memory (read p, g, state; write p, state), split across
//! threads in cache-friendly chunks.
//!
//! Update rules (each checked against a float64 reference in the tests):
//! - **Adam/AdamW** (DeepSpeed's FusedAdam / torch semantics): `m = b1 m + (1-b1) g`,
//!   `v = b2 v + (1-b2) g²`, `p -= lr (m/bc1) / (sqrt(v)/sqrt(bc2) + eps)` with
//!   `bc_i = 1 - b_i^t` when `bias_correction`; weight decay decoupled (`p -= lr wd p`) when
//!   `adam_w_mode` (DeepSpeed's default, also for type "Adam"), else L2 (`g += wd p`).
//! - **SGD** (torch): `g += wd p`; momentum buffer `b = g` on the first step, then
//!   `b = mu b + (1-dampening) g`; `g = g + mu b` (nesterov) or `g = b`; `p -= lr g`.
//! - **Lion**: `u = sign(b1 m + (1-b1) g)`, `p = p (1 - lr wd) - lr u`, `m = b2 m + (1-b2) g`.
//! - **Lamb** (DeepSpeed FusedLamb): Adam's moments, `u = (m/bc1)/(sqrt(v/bc2)+eps) + wd p`,
//!   per parameter trust ratio `r = clamp(|p|/|u|, min_coeff, max_coeff)` (1 when a norm is 0),
//!   `p -= lr r u`. The norms are per parameter: the caller passes parameter segments and a
//!   reduction for partial norms when a parameter spans several ranks' shards.

use std::ops::Range;

use rayon::prelude::*;

use crate::ZeroError;

/// Elements per parallel work item (a few hundred KiB of each stream: stays in L2).
const CHUNK: usize = 1 << 15;
/// Below this many elements the update runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Where a fused step hands each updated piece of the parameters:
/// `publish(offset, values)`, `values` being the new parameters `offset .. offset +
/// values.len()` of the shard, called right after that piece's update while it is still in
/// cache (so that copying the weights into the model costs only their write), possibly from
/// several threads at once for disjoint pieces. Every element is handed over exactly once.
pub type Publish<'a> = dyn Fn(usize, &[f32]) + Sync + 'a;

/// Hyper-parameters of Adam/AdamW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    /// Learning rate (the scheduler may override it per step).
    pub lr: f64,
    /// (beta1, beta2).
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Divide the moments by `1 - beta^t`.
    pub bias_correction: bool,
    /// Decoupled weight decay (AdamW). DeepSpeed's default, even for "Adam".
    pub adam_w_mode: bool,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction: true,
            adam_w_mode: true,
        }
    }
}

/// Hyper-parameters of SGD.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 = none).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// Hyper-parameters of Lion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionParams {
    /// Learning rate.
    pub lr: f64,
    /// (beta1, beta2).
    pub betas: (f64, f64),
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for LionParams {
    fn default() -> Self {
        LionParams {
            lr: 1e-4,
            betas: (0.9, 0.99),
            weight_decay: 0.0,
        }
    }
}

/// Hyper-parameters of Lamb.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambParams {
    /// Learning rate.
    pub lr: f64,
    /// (beta1, beta2).
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay (added to the update).
    pub weight_decay: f64,
    /// Bias-correct the moments.
    pub bias_correction: bool,
    /// Upper clamp of the trust ratio.
    pub max_coeff: f64,
    /// Lower clamp of the trust ratio.
    pub min_coeff: f64,
}

impl Default for LambParams {
    fn default() -> Self {
        LambParams {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction: true,
            max_coeff: 10.0,
            min_coeff: 0.01,
        }
    }
}

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerSpec {
    /// Adam / AdamW.
    Adam(AdamParams),
    /// SGD.
    Sgd(SgdParams),
    /// Lion.
    Lion(LionParams),
    /// Lamb.
    Lamb(LambParams),
}

impl OptimizerSpec {
    /// The configured learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerSpec::Adam(p) => p.lr,
            OptimizerSpec::Sgd(p) => p.lr,
            OptimizerSpec::Lion(p) => p.lr,
            OptimizerSpec::Lamb(p) => p.lr,
        }
    }

    /// Names of the fp32 state buffers this optimizer keeps per element.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerSpec::Adam(_) | OptimizerSpec::Lamb(_) => &["exp_avg", "exp_avg_sq"],
            OptimizerSpec::Sgd(p) if p.momentum != 0.0 => &["momentum_buffer"],
            OptimizerSpec::Sgd(_) => &[],
            OptimizerSpec::Lion(_) => &["exp_avg"],
        }
    }

    /// Bytes of optimizer state per parameter element (fp32 buffers).
    pub fn state_bytes_per_element(&self) -> usize {
        4 * self.state_names().len()
    }
}

/// Exportable optimizer state: the step count and named flat fp32 buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Applied steps so far.
    pub step: u64,
    /// (name, buffer) pairs, each the shard's length.
    pub buffers: Vec<(String, Vec<f32>)>,
}

/// A fused optimizer over one flat fp32 shard.
#[derive(Debug, Clone)]
pub struct FlatOptimizer {
    spec: OptimizerSpec,
    len: usize,
    step: u64,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl FlatOptimizer {
    /// An optimizer for a shard of `len` elements, with zeroed state.
    pub fn new(spec: OptimizerSpec, len: usize) -> Self {
        let n = spec.state_names().len();
        FlatOptimizer {
            spec,
            len,
            step: 0,
            a: if n >= 1 { vec![0.0; len] } else { Vec::new() },
            b: if n >= 2 { vec![0.0; len] } else { Vec::new() },
        }
    }

    /// The optimizer and its hyper-parameters.
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Shard length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the shard is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Applied steps.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Bytes held for optimizer state.
    pub fn state_bytes(&self) -> usize {
        4 * (self.a.len() + self.b.len())
    }

    /// The state buffers, borrowed (as [`OptimizerSpec::state_names`]).
    pub fn state_slices(&self) -> Vec<&[f32]> {
        let n = self.spec.state_names().len();
        [&self.a[..], &self.b[..]].into_iter().take(n).collect()
    }

    /// A copy of the state for checkpoints.
    pub fn state(&self) -> OptimizerState {
        let names = self.spec.state_names();
        let mut buffers = Vec::new();
        if !names.is_empty() {
            buffers.push((names[0].to_string(), self.a.clone()));
        }
        if names.len() > 1 {
            buffers.push((names[1].to_string(), self.b.clone()));
        }
        OptimizerState {
            step: self.step,
            buffers,
        }
    }

    /// Restores state saved by [`FlatOptimizer::state`] (names and lengths must match).
    pub fn load_state(&mut self, state: &OptimizerState) -> Result<(), ZeroError> {
        let names = self.spec.state_names();
        if state.buffers.len() != names.len() {
            return Err(ZeroError::State(format!(
                "expected state buffers {names:?}, got {:?}",
                state.buffers.iter().map(|(n, _)| n).collect::<Vec<_>>()
            )));
        }
        for ((name, buf), want) in state.buffers.iter().zip(names) {
            if name != want || buf.len() != self.len {
                return Err(ZeroError::State(format!(
                    "state buffer `{name}` of {} elements does not match `{want}` of {}",
                    buf.len(),
                    self.len
                )));
            }
        }
        if let Some((_, a)) = state.buffers.first() {
            self.a.copy_from_slice(a);
        }
        if let Some((_, b)) = state.buffers.get(1) {
            self.b.copy_from_slice(b);
        }
        self.step = state.step;
        Ok(())
    }

    fn check(&self, params: &[f32], grads: &[f32]) -> Result<(), ZeroError> {
        if params.len() != self.len || grads.len() != self.len {
            return Err(ZeroError::Shape(format!(
                "optimizer shard has {} elements but got {} parameters and {} gradients",
                self.len,
                params.len(),
                grads.len()
            )));
        }
        Ok(())
    }

    /// One step with learning rate `lr` (Lamb needs [`FlatOptimizer::step_lamb`]).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) -> Result<(), ZeroError> {
        self.step_scaled(params, grads, lr, 1.0)
    }

    /// One step on `grad_scale * grads`, the scaling fused into the update pass (unscaling,
    /// gradient averaging and clipping cost no extra pass over memory).
    pub fn step_scaled(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        grad_scale: f32,
    ) -> Result<(), ZeroError> {
        self.step_scaled_publish(params, grads, lr, grad_scale, None)
    }

    /// [`FlatOptimizer::step_scaled`] that hands every updated piece of `params` to `publish`
    /// (see [`Publish`]) inside the same pass, e.g. to write the new weights into the model's
    /// own storage without a second pass over the master weights. Same arithmetic, bit for
    /// bit.
    ///
    /// ```
    /// use std::sync::Mutex;
    /// use ds_zero::optim::{FlatOptimizer, OptimizerSpec, SgdParams};
    ///
    /// let mut opt = FlatOptimizer::new(OptimizerSpec::Sgd(SgdParams { lr: 0.5, ..Default::default() }), 3);
    /// let mut p = vec![1.0f32, 2.0, 3.0];
    /// let model = Mutex::new(vec![0f32; 3]);
    /// let publish = |off: usize, v: &[f32]| {
    ///     model.lock().unwrap()[off..off + v.len()].copy_from_slice(v);
    /// };
    /// opt.step_scaled_publish(&mut p, &[1.0, 1.0, 1.0], 0.5, 1.0, Some(&publish))?;
    /// assert_eq!(*model.lock().unwrap(), vec![0.5, 1.5, 2.5]);
    /// # Ok::<(), ds_zero::ZeroError>(())
    /// ```
    pub fn step_scaled_publish(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        grad_scale: f32,
        publish: Option<&Publish<'_>>,
    ) -> Result<(), ZeroError> {
        self.check(params, grads)?;
        self.step += 1;
        let t = self.step;
        let gs = grad_scale;
        let pb = publish;
        match self.spec {
            OptimizerSpec::Adam(p) => {
                adam_step(params, grads, &mut self.a, &mut self.b, &p, lr, t, gs, pb)
            }
            OptimizerSpec::Sgd(p) => sgd_step(params, grads, &mut self.a, &p, lr, t, gs, pb),
            OptimizerSpec::Lion(p) => lion_step(params, grads, &mut self.a, &p, lr, gs, pb),
            OptimizerSpec::Lamb(_) => {
                self.step -= 1;
                return Err(ZeroError::State(
                    "Lamb needs parameter boundaries: call step_lamb".into(),
                ));
            }
        }
        Ok(())
    }

    /// An optimizer whose state buffers live elsewhere (swap files): it keeps the step count
    /// and steps external state with [`FlatOptimizer::apply_external`].
    pub(crate) fn without_state(spec: OptimizerSpec, len: usize) -> Self {
        FlatOptimizer {
            spec,
            len,
            step: 0,
            a: Vec::new(),
            b: Vec::new(),
        }
    }

    /// Counts one step and returns its number (for [`FlatOptimizer::apply_external`]).
    pub(crate) fn next_step(&mut self) -> u64 {
        self.step += 1;
        self.step
    }

    /// Sets the step count (checkpoint load of external state).
    pub(crate) fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Step `t` on a piece of the shard whose state is given (`states` as
    /// [`OptimizerSpec::state_names`]): the same arithmetic as [`FlatOptimizer::step_scaled`],
    /// element for element.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_external(
        &self,
        t: u64,
        params: &mut [f32],
        grads: &[f32],
        states: &mut [&mut [f32]],
        lr: f64,
        gs: f32,
    ) -> Result<(), ZeroError> {
        let want = self.spec.state_names().len();
        if states.len() != want
            || states.iter().any(|s| s.len() != params.len())
            || grads.len() != params.len()
        {
            return Err(ZeroError::Shape(format!(
                "external optimizer step: {} parameters, {} gradients, {} state buffers (want {want} of the parameters' length)",
                params.len(),
                grads.len(),
                states.len()
            )));
        }
        match (self.spec, states) {
            (OptimizerSpec::Adam(p), [a, b]) => {
                adam_step(params, grads, a, b, &p, lr, t, gs, None)
            }
            (OptimizerSpec::Sgd(p), [a]) => sgd_step(params, grads, a, &p, lr, t, gs, None),
            (OptimizerSpec::Sgd(p), []) => {
                sgd_step(params, grads, &mut [], &p, lr, t, gs, None)
            }
            (OptimizerSpec::Lion(p), [a]) => lion_step(params, grads, a, &p, lr, gs, None),
            _ => {
                return Err(ZeroError::Option(
                    "Lamb needs whole-parameter norms: it cannot step swapped chunks (use Adam, AdamW, SGD or Lion with NVMe offload)".into(),
                ))
            }
        }
        Ok(())
    }

    /// One Lamb step. `segments` are the ranges of the shard that belong to one parameter each
    /// (in order, covering what should be updated); `reduce` sums partial squared norms across
    /// the ranks that share a parameter (identity when every parameter is whole on this rank).
    /// The slice passed to `reduce` holds `[|p|², |u|²]` per segment.
    pub fn step_lamb(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        segments: &[Range<usize>],
        lr: f64,
        reduce: &mut dyn FnMut(&mut [f64]) -> Result<(), ZeroError>,
    ) -> Result<(), ZeroError> {
        self.check(params, grads)?;
        let OptimizerSpec::Lamb(h) = self.spec else {
            return Err(ZeroError::State("step_lamb on a non-Lamb optimizer".into()));
        };
        for s in segments {
            if s.start > s.end || s.end > self.len {
                return Err(ZeroError::Shape(format!(
                    "Lamb segment {s:?} outside the shard of {} elements",
                    self.len
                )));
            }
        }
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = h.betas;
        let (bc1, bc2) = if h.bias_correction {
            (1.0 - b1.powi(t), 1.0 - b2.powi(t))
        } else {
            (1.0, 1.0)
        };
        // Pass 1: moments and the update (kept in `grads`' place: we need a scratch buffer).
        let mut update = vec![0f32; self.len];
        let (b1f, b2f) = (b1 as f32, b2 as f32);
        let (ib1, ib2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
        let (rbc1, rbc2) = ((1.0 / bc1) as f32, (1.0 / bc2) as f32);
        let (eps, wd) = (h.eps as f32, h.weight_decay as f32);
        for i in 0..self.len {
            let g = grads[i];
            let m = b1f * self.a[i] + ib1 * g;
            let v = b2f * self.b[i] + ib2 * g * g;
            self.a[i] = m;
            self.b[i] = v;
            update[i] = (m * rbc1) / ((v * rbc2).sqrt() + eps) + wd * params[i];
        }
        let mut norms = vec![0f64; 2 * segments.len()];
        for (k, s) in segments.iter().enumerate() {
            let (mut pn, mut un) = (0f64, 0f64);
            for i in s.clone() {
                pn += f64::from(params[i]) * f64::from(params[i]);
                un += f64::from(update[i]) * f64::from(update[i]);
            }
            norms[2 * k] = pn;
            norms[2 * k + 1] = un;
        }
        reduce(&mut norms)?;
        for (k, s) in segments.iter().enumerate() {
            let (pn, un) = (norms[2 * k].sqrt(), norms[2 * k + 1].sqrt());
            let ratio = if pn > 0.0 && un > 0.0 {
                (pn / un).clamp(h.min_coeff, h.max_coeff)
            } else {
                1.0
            };
            let scale = (lr * ratio) as f32;
            for i in s.clone() {
                params[i] -= scale * update[i];
            }
        }
        Ok(())
    }
}

/// Runs `f` over aligned chunks of up to four slices, in parallel when large, handing each
/// updated chunk of `p` to `publish` right after `f`.
fn for_chunks<F>(
    p: &mut [f32],
    g: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    publish: Option<&Publish<'_>>,
    f: F,
) where
    F: Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]) + Sync + Send,
{
    let n = p.len();
    if n < PARALLEL_MIN {
        f(p, g, a, b);
        if let Some(pb) = publish {
            pb(0, p);
        }
        return;
    }
    let pa: Vec<&mut [f32]> = p.chunks_mut(CHUNK).collect();
    let ga: Vec<&[f32]> = g.chunks(CHUNK).collect();
    let aa = split_or_empty(a, n);
    let ba = split_or_empty(b, n);
    pa.into_par_iter()
        .zip(ga)
        .zip(aa)
        .zip(ba)
        .enumerate()
        .for_each(|(k, (((p, g), a), b))| {
            f(p, g, a, b);
            if let Some(pb) = publish {
                pb(k * CHUNK, p);
            }
        });
}

/// Chunks of a state buffer, or empty slices when the optimizer keeps no such buffer.
fn split_or_empty(s: &mut [f32], n: usize) -> Vec<&mut [f32]> {
    if s.is_empty() {
        (0..n.div_ceil(CHUNK)).map(|_| Default::default()).collect()
    } else {
        s.chunks_mut(CHUNK).collect()
    }
}

// The kernel takes its streams and scalars flat: bundling them would only hide the data flow.
#[allow(clippy::too_many_arguments)]
fn adam_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamParams,
    lr: f64,
    t: u64,
    gs: f32,
    publish: Option<&Publish<'_>>,
) {
    let (b1, b2) = h.betas;
    let ti = t.min(i32::MAX as u64) as i32;
    let (bc1, bc2) = if h.bias_correction {
        (1.0 - b1.powi(ti), 1.0 - b2.powi(ti))
    } else {
        (1.0, 1.0)
    };
    let step_size = (lr / bc1) as f32;
    let rsqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let (b1f, b2f) = (b1 as f32, b2 as f32);
    let (ib1, ib2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
    let eps = h.eps as f32;
    let decay = if h.adam_w_mode {
        (1.0 - lr * h.weight_decay) as f32
    } else {
        1.0
    };
    let l2 = if h.adam_w_mode {
        0.0
    } else {
        h.weight_decay as f32
    };
    let k = AdamConsts {
        gs,
        l2,
        b1f,
        ib1,
        b2f,
        ib2,
        rsqrt_bc2,
        eps,
        decay,
        step_size,
    };
    for_chunks(p, g, m, v, publish, |p, g, m, v| {
        adam_rows_simd(p, g, m, v, &k)
    });
}

/// The per-step constants of the Adam update.
struct AdamConsts {
    gs: f32,
    l2: f32,
    b1f: f32,
    ib1: f32,
    b2f: f32,
    ib2: f32,
    rsqrt_bc2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
}

/// The Adam update over one chunk (vectorised by the compiler; the crate targets baseline
/// x86-64, i.e. 4-lane SSE, unless called through [`adam_rows_simd`]). No fused multiply-add,
/// so every build and every SIMD level gives bit-identical results.
#[inline(always)]
fn adam_rows(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConsts) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let pi = p[i];
        let gi = k.gs * g[i] + k.l2 * pi;
        let mi = k.b1f * m[i] + k.ib1 * gi;
        let vi = k.b2f * v[i] + k.ib2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() * k.rsqrt_bc2 + k.eps;
        p[i] = pi * k.decay - k.step_size * mi / denom;
    }
}

ds_simd::dispatch!(
    /// [`adam_rows`] compiled for AVX-512 and AVX2+FMA as well, run at `ds_simd::level()` (8 or
    /// 16 lanes: the square roots and divisions no longer bound the pass).
    fn adam_rows_simd, adam_rows_at =>
        adam_rows(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConsts)
);

/// Every SIMD level this CPU has steps Adam to the scalar path's bits (parameters and both
/// moments); levels above the CPU's are clamped by `ds_simd`.
#[cfg(test)]
#[allow(clippy::items_after_test_module)] // kept beside the dispatch it tests
mod simd_levels {
    use super::*;
    use ds_simd::Level;

    #[test]
    fn every_level_equals_scalar_bitwise() {
        let k = AdamConsts {
            gs: 0.5,
            l2: 0.0,
            b1f: 0.9,
            ib1: 0.1,
            b2f: 0.999,
            ib2: 1.0 - 0.999,
            rsqrt_bc2: 1.0 / (1.0f32 - 0.999 * 0.999).sqrt(),
            eps: 1e-8,
            decay: 1.0 - 1e-3 * 0.01,
            step_size: 1e-3 / (1.0 - 0.9 * 0.9),
        };
        for n in [0usize, 1, 15, 1000, 4099] {
            let init = |salt: f32| {
                (0..n)
                    .map(|i| ((i as f32 + salt) * 0.61).sin())
                    .collect::<Vec<f32>>()
            };
            let g = init(1.0);
            let run = |l: Level| {
                let (mut p, mut m, mut v) = (
                    init(2.0),
                    init(3.0),
                    init(4.0).iter().map(|x| x * x).collect::<Vec<_>>(),
                );
                for _ in 0..3 {
                    adam_rows_at(l, &mut p, &g, &mut m, &mut v, &k);
                }
                [p, m, v].map(|b| b.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
            };
            let want = run(Level::Scalar);
            for l in ds_simd::available() {
                assert_eq!(run(l), want, "{l} {n}");
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sgd_step(
    p: &mut [f32],
    g: &[f32],
    buf: &mut [f32],
    h: &SgdParams,
    lr: f64,
    t: u64,
    gs: f32,
    publish: Option<&Publish<'_>>,
) {
    let lr = lr as f32;
    let wd = h.weight_decay as f32;
    let mu = h.momentum as f32;
    let damp = (1.0 - h.dampening) as f32;
    let nesterov = h.nesterov;
    let first = t == 1;
    let mut empty: [f32; 0] = [];
    if h.momentum == 0.0 {
        for_chunks(p, g, &mut [], &mut empty, publish, |p, g, _, _| {
            for i in 0..p.len() {
                p[i] -= lr * (gs * g[i] + wd * p[i]);
            }
        });
        return;
    }
    for_chunks(p, g, buf, &mut empty, publish, |p, g, b, _| {
        for i in 0..p.len() {
            let gi = gs * g[i] + wd * p[i];
            let bi = if first { gi } else { mu * b[i] + damp * gi };
            b[i] = bi;
            let d = if nesterov { gi + mu * bi } else { bi };
            p[i] -= lr * d;
        }
    });
}

fn lion_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    h: &LionParams,
    lr: f64,
    gs: f32,
    publish: Option<&Publish<'_>>,
) {
    let (b1, b2) = (h.betas.0 as f32, h.betas.1 as f32);
    let decay = (1.0 - lr * h.weight_decay) as f32;
    let lr = lr as f32;
    let mut empty: [f32; 0] = [];
    for_chunks(p, g, m, &mut empty, publish, |p, g, m, _| {
        for i in 0..p.len() {
            let gi = gs * g[i];
            let c = b1 * m[i] + (1.0 - b1) * gi;
            let u = if c > 0.0 {
                1.0
            } else if c < 0.0 {
                -1.0
            } else {
                0.0
            };
            p[i] = p[i] * decay - lr * u;
            m[i] = b2 * m[i] + (1.0 - b2) * gi;
        }
    });
}
