//! `ds-ckpt-act`: activation checkpointing for candle programs.
//!
//! Trade compute for memory: run a segment's forward pass without keeping its inner graph, keep
//! only its input, and in the backward pass recompute the segment from that input and push the
//! upstream gradient through it.
//!
//! candle has no no-grad mode: a tensor records its graph whenever it depends on a `Var`. A
//! segment is therefore written as a function of its input and of a *mode*: with
//! [`Mode::Untracked`] it must use detached parameter tensors (`var.as_detached_tensor()`,
//! no graph is built), with [`Mode::Tracked`] the `Var`s themselves. [`checkpoint_forward`]
//! runs the untracked form; [`recompute_backward`] runs the tracked form from the saved input
//! (made a `Var`, so its gradient is kept) and backpropagates
//! `(y * upstream.detach()).sum()`, which gives exactly `dL/dx` and `dL/dparams` for the
//! upstream gradient `dL/dy` (checked in the tests against a plain backward pass).
//!
//! Randomness inside a segment (dropout) must draw from a counter-based generator keyed by
//! (seed, step, segment, element) — [`dropout_mask`] — so the recompute draws exactly what the
//! first forward drew; the tests check loss and every gradient bit for bit with dropout on.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use ds_ckpt_act::{checkpoint_forward, recompute_backward, Mode};
//!
//! let w = Var::from_tensor(&Tensor::new(&[[2f32, 0.], [0., 3.]], &Device::Cpu)?)?;
//! let seg = |x: &Tensor, mode: Mode| -> candle_core::Result<Tensor> {
//!     let w = match mode { Mode::Tracked => w.as_tensor().clone(), Mode::Untracked => w.as_detached_tensor() };
//!     x.matmul(&w)?.tanh()
//! };
//! let x = Tensor::new(&[[0.1f32, 0.2]], &Device::Cpu)?;
//! let (y, saved) = checkpoint_forward(&seg, &x)?;          // no graph kept inside
//! let upstream = Tensor::ones_like(&y)?;                     // dL/dy
//! let g = recompute_backward(&seg, &saved, &upstream, &[&w])?;
//! assert_eq!(g.input.dims(), &[1, 2]);
//! assert!(g.params[0].is_some());
//! # Ok::<(), ds_ckpt_act::CkptError>(())
//! ```

#![warn(missing_docs)]

use candle_core::{Tensor, Var};

/// Errors of activation checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    /// A tensor operation failed (in the segment or the recompute).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The upstream gradient does not match the segment's output.
    #[error("upstream gradient of shape {got:?} for a segment output of shape {want:?}")]
    Shape {
        /// Output shape.
        want: Vec<usize>,
        /// Gradient shape.
        got: Vec<usize>,
    },
}

/// Whether a segment should build the autograd graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Use the `Var`s: the graph is recorded (the recompute in backward).
    Tracked,
    /// Use detached parameters: nothing is recorded (the checkpointed forward).
    Untracked,
}

/// What a checkpointed segment keeps between its forward and backward passes: its input only.
#[derive(Debug, Clone)]
pub struct Saved {
    input: Tensor,
}

impl Saved {
    /// The saved input (detached).
    pub fn input(&self) -> &Tensor {
        &self.input
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.input.elem_count() * self.input.dtype().size_in_bytes()
    }

    /// Whether the saved input is in host memory (the CPU device).
    pub fn on_host(&self) -> bool {
        self.input.device().is_cpu()
    }
}

/// Gradients from a recomputed segment.
#[derive(Debug)]
pub struct SegmentGrads {
    /// dL/d input.
    pub input: Tensor,
    /// dL/d each parameter passed to [`recompute_backward`] (`None` when the segment does not
    /// use it).
    pub params: Vec<Option<Tensor>>,
}

/// Runs `segment` without recording its graph; returns its (detached) output and the saved input.
pub fn checkpoint_forward<F>(segment: &F, input: &Tensor) -> Result<(Tensor, Saved), CkptError>
where
    F: Fn(&Tensor, Mode) -> candle_core::Result<Tensor>,
{
    let x = input.detach();
    let y = segment(&x, Mode::Untracked)?.detach();
    Ok((y, Saved { input: x }))
}

/// [`checkpoint_forward`] keeping the saved input in host memory (DeepSpeed's
/// `cpu_checkpointing`): for a segment on a GPU the input is copied to the CPU, and
/// [`recompute_backward`] copies it back to the device of the upstream gradient. On the CPU
/// device this is [`checkpoint_forward`].
pub fn checkpoint_forward_to_host<F>(
    segment: &F,
    input: &Tensor,
) -> Result<(Tensor, Saved), CkptError>
where
    F: Fn(&Tensor, Mode) -> candle_core::Result<Tensor>,
{
    let (y, saved) = checkpoint_forward(segment, input)?;
    let input = saved.input.to_device(&candle_core::Device::Cpu)?;
    Ok((y, Saved { input }))
}

/// Recomputes the segment from its saved input with the graph on and backpropagates
/// `upstream` (= dL/d output) through it. Every gradient is detached before returning, so no
/// graph outlives this call. A saved input in host memory ([`checkpoint_forward_to_host`]) is
/// moved to `upstream`'s device first.
pub fn recompute_backward<F>(
    segment: &F,
    saved: &Saved,
    upstream: &Tensor,
    params: &[&Var],
) -> Result<SegmentGrads, CkptError>
where
    F: Fn(&Tensor, Mode) -> candle_core::Result<Tensor>,
{
    let x = Var::from_tensor(&saved.input.to_device(upstream.device())?)?;
    let y = segment(x.as_tensor(), Mode::Tracked)?;
    if y.dims() != upstream.dims() {
        return Err(CkptError::Shape {
            want: y.dims().to_vec(),
            got: upstream.dims().to_vec(),
        });
    }
    let grads = (y * upstream.detach())?.sum_all()?.backward()?;
    let input = match grads.get(x.as_tensor()) {
        Some(g) => g.detach(),
        None => x.as_tensor().zeros_like()?,
    };
    let params = params
        .iter()
        .map(|p| grads.get(p.as_tensor()).map(|g| g.detach()))
        .collect();
    Ok(SegmentGrads { input, params })
}

/// What a multi-input segment keeps: its inputs only.
#[derive(Debug, Clone)]
pub struct SavedMany {
    inputs: Vec<Tensor>,
}

impl SavedMany {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Gradients from a recomputed multi-input segment.
#[derive(Debug)]
pub struct SegmentGradsMany {
    /// dL/d each input (zeros for an input the outputs do not depend on).
    pub inputs: Vec<Tensor>,
    /// dL/d each parameter passed in (`None` when unused).
    pub params: Vec<Option<Tensor>>,
}

/// [`checkpoint_forward`] for a segment with several tensor inputs and outputs (non-tensor
/// arguments are captured by the closure).
pub fn checkpoint_forward_many<F>(
    segment: &F,
    inputs: &[Tensor],
) -> Result<(Vec<Tensor>, SavedMany), CkptError>
where
    F: Fn(&[Tensor], Mode) -> candle_core::Result<Vec<Tensor>>,
{
    let xs: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
    let ys = segment(&xs, Mode::Untracked)?
        .into_iter()
        .map(|y| y.detach())
        .collect();
    Ok((ys, SavedMany { inputs: xs }))
}

/// [`recompute_backward`] for several inputs and outputs: `upstream[k]` is dL/d output k, or
/// `None` when the loss does not depend on that output. Inputs that need no gradient (integer
/// tensors such as token ids) get zeros.
pub fn recompute_backward_many<F>(
    segment: &F,
    saved: &SavedMany,
    upstream: &[Option<Tensor>],
    params: &[&Var],
) -> Result<SegmentGradsMany, CkptError>
where
    F: Fn(&[Tensor], Mode) -> candle_core::Result<Vec<Tensor>>,
{
    let vars: Vec<Option<Var>> = saved
        .inputs
        .iter()
        .map(|t| {
            if t.dtype().is_float() {
                Var::from_tensor(t).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<candle_core::Result<_>>()?;
    let xs: Vec<Tensor> = vars
        .iter()
        .zip(&saved.inputs)
        .map(|(v, t)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let ys = segment(&xs, Mode::Tracked)?;
    if ys.len() != upstream.len() {
        return Err(CkptError::Shape {
            want: vec![ys.len()],
            got: vec![upstream.len()],
        });
    }
    let mut total: Option<Tensor> = None;
    for (y, g) in ys.iter().zip(upstream) {
        let Some(g) = g else { continue };
        if y.dims() != g.dims() {
            return Err(CkptError::Shape {
                want: y.dims().to_vec(),
                got: g.dims().to_vec(),
            });
        }
        let term = (y * g.detach())?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    let grads = match total {
        Some(t) => Some(t.backward()?),
        None => None,
    };
    let inputs = vars
        .iter()
        .zip(&saved.inputs)
        .map(|(v, t)| {
            match (v, &grads) {
                (Some(v), Some(g)) => g.get(v.as_tensor()).map(|x| x.detach()),
                _ => None,
            }
            .map_or_else(|| t.zeros_like(), Ok)
        })
        .collect::<candle_core::Result<_>>()?;
    let params = params
        .iter()
        .map(|p| {
            grads
                .as_ref()
                .and_then(|g| g.get(p.as_tensor()))
                .map(|x| x.detach())
        })
        .collect();
    Ok(SegmentGradsMany { inputs, params })
}

/// Which segments of a stack of `n` to checkpoint (DeepSpeed's `activation_checkpointing`
/// policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Keep every activation (no recompute).
    None,
    /// Checkpoint every segment.
    Every,
    /// Checkpoint `k` evenly spaced segments (`number_checkpoints`).
    Count(usize),
}

impl Policy {
    /// Whether segment `i` of `n` is checkpointed.
    pub fn checkpointed(&self, i: usize, n: usize) -> bool {
        match *self {
            Policy::None => false,
            Policy::Every => true,
            Policy::Count(k) => {
                if k == 0 || n == 0 {
                    return false;
                }
                if k >= n {
                    return true;
                }
                // Evenly spaced: segment i is chosen when floor(i*k/n) advances.
                (i * k) / n != ((i + 1) * k) / n
            }
        }
    }
}

/// splitmix64 of a key: a counter-based generator (no state to save or restore).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A dropout mask (values 0 or `1/(1-p)`) of `n` elements keyed by (seed, step, segment):
/// the same key always gives the same mask, so a recomputed segment drops exactly the same
/// elements as its first forward pass.
pub fn dropout_mask(n: usize, p: f32, seed: u64, step: u64, segment: u64) -> Vec<f32> {
    let key = mix(seed ^ mix(step ^ mix(segment)));
    let keep = 1.0 / (1.0 - p);
    let threshold = (f64::from(p) * (1u64 << 53) as f64) as u64;
    (0..n as u64)
        .map(|i| {
            if (mix(key ^ i) >> 11) < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// Two inputs (one float, one integer index tensor), two outputs, a parameter that gets no
    /// gradient, and a non-tensor argument: gradients equal plain backprop.
    #[test]
    fn many_inputs_and_outputs() {
        let dev = Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap()).unwrap();
        let unused = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
        let scale = 1.5f64; // a non-tensor argument, captured
        let seg = |xs: &[Tensor], mode: Mode| -> candle_core::Result<Vec<Tensor>> {
            let w = match mode {
                Mode::Tracked => w.as_tensor().clone(),
                Mode::Untracked => w.as_detached_tensor(),
            };
            let picked = xs[0].index_select(&xs[1], 0)?;
            let a = (picked.matmul(&w)? * scale)?.tanh()?;
            let b = xs[0].sqr()?.sum_keepdim(1)?;
            Ok(vec![a, b])
        };
        let x = Var::from_tensor(
            &Tensor::new(&[[0.1f32, 0.2], [0.3, -0.4], [0.5, 0.6]], &dev).unwrap(),
        )
        .unwrap();
        let idx = Tensor::new(&[2u32, 0], &dev).unwrap();
        let outs = seg(&[x.as_tensor().clone(), idx.clone()], Mode::Tracked).unwrap();
        let loss = (outs[0].sqr().unwrap().sum_all().unwrap()
            + (&outs[1] * 3.0).unwrap().sum_all().unwrap())
        .unwrap();
        let plain = loss.backward().unwrap();
        let (ys, saved) = checkpoint_forward_many(&seg, &[x.as_tensor().clone(), idx]).unwrap();
        let up0 = (&ys[0] * 2.0).unwrap();
        let up1 = Tensor::full(3f32, ys[1].shape(), &dev).unwrap();
        let g =
            recompute_backward_many(&seg, &saved, &[Some(up0), Some(up1)], &[&w, &unused]).unwrap();
        let v2 = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        assert_eq!(v2(&g.inputs[0]), v2(plain.get(x.as_tensor()).unwrap()));
        assert_eq!(
            v2(g.params[0].as_ref().unwrap()),
            v2(plain.get(w.as_tensor()).unwrap())
        );
        assert!(g.params[1].is_none());
        assert_eq!(g.inputs[1].to_vec1::<u32>().unwrap(), vec![0, 0]);
        assert!(saved.bytes() > 0);
        // Only the second output matters: upstream None for the first.
        let g = recompute_backward_many(
            &seg,
            &saved,
            &[None, Some(Tensor::ones((3, 1), DType::F32, &dev).unwrap())],
            &[&w],
        )
        .unwrap();
        assert!(g.params[0].is_none());
        let want: Vec<Vec<f32>> = v2(x.as_tensor())
            .iter()
            .map(|r| r.iter().map(|v| 2.0 * v).collect())
            .collect();
        assert_eq!(v2(&g.inputs[0]), want);
        // Wrong number of upstream gradients: an error.
        assert!(recompute_backward_many(&seg, &saved, &[None], &[&w]).is_err());
    }

    #[test]
    fn policy_count_spreads_checkpoints_evenly() {
        let picked: Vec<usize> = (0..12)
            .filter(|&i| Policy::Count(4).checkpointed(i, 12))
            .collect();
        assert_eq!(picked.len(), 4);
        assert_eq!(picked, vec![2, 5, 8, 11]);
        assert!((0..5).all(|i| Policy::Count(9).checkpointed(i, 5)));
        assert!((0..5).all(|i| !Policy::Count(0).checkpointed(i, 5)));
        assert!(
            (0..5).all(|i| Policy::Every.checkpointed(i, 5) && !Policy::None.checkpointed(i, 5))
        );
    }

    #[test]
    fn dropout_mask_is_deterministic_per_key_and_has_the_right_rate() {
        let a = dropout_mask(100_000, 0.1, 1, 2, 3);
        assert_eq!(a, dropout_mask(100_000, 0.1, 1, 2, 3));
        assert_ne!(a, dropout_mask(100_000, 0.1, 1, 2, 4));
        assert_ne!(a, dropout_mask(100_000, 0.1, 1, 3, 3));
        let dropped = a.iter().filter(|&&m| m == 0.0).count() as f64 / 1e5;
        assert!((dropped - 0.1).abs() < 0.005, "{dropped}");
        assert!(a.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.9).abs() < 1e-6));
    }

    /// A two-layer segment with dropout: checkpointed gradients equal plain backprop bit for bit.
    #[test]
    fn recompute_gives_identical_gradients_with_dropout() {
        let dev = Device::Cpu;
        let mk = |v: Vec<f32>, s: (usize, usize)| {
            Var::from_tensor(&Tensor::from_vec(v, s, &dev).unwrap()).unwrap()
        };
        let w1 = mk(
            (0..48)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05)
                .collect(),
            (6, 8),
        );
        let w2 = mk(
            (0..32)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.07)
                .collect(),
            (8, 4),
        );
        let mask = Tensor::from_vec(dropout_mask(5 * 8, 0.25, 9, 0, 1), (5, 8), &dev).unwrap();
        let seg = |x: &Tensor, mode: Mode| -> candle_core::Result<Tensor> {
            let (a, b) = match mode {
                Mode::Tracked => (w1.as_tensor().clone(), w2.as_tensor().clone()),
                Mode::Untracked => (w1.as_detached_tensor(), w2.as_detached_tensor()),
            };
            (x.matmul(&a)?.gelu()? * &mask)?.matmul(&b)?.tanh()
        };
        let x0 = Var::from_tensor(
            &Tensor::from_vec(
                (0..30).map(|i| (i as f32 * 0.37).sin()).collect(),
                (5, 6),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        // Plain: loss = sum(softmax-ish(y)^2) through the graph.
        let loss_of = |y: &Tensor| {
            y.sqr()
                .unwrap()
                .sum_keepdim(D::Minus1)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let y = seg(x0.as_tensor(), Mode::Tracked).unwrap();
        let plain = loss_of(&y).backward().unwrap();
        // Checkpointed: forward without graph, loss gradient w.r.t. y, then recompute.
        let (yc, saved) = checkpoint_forward(&seg, x0.as_tensor()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), yc.to_vec2::<f32>().unwrap());
        let yv = Var::from_tensor(&yc).unwrap();
        let up = loss_of(yv.as_tensor())
            .backward()
            .unwrap()
            .get(yv.as_tensor())
            .unwrap()
            .clone();
        let g = recompute_backward(&seg, &saved, &up, &[&w1, &w2]).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap())
        };
        same(&g.input, plain.get(x0.as_tensor()).unwrap());
        same(
            g.params[0].as_ref().unwrap(),
            plain.get(w1.as_tensor()).unwrap(),
        );
        same(
            g.params[1].as_ref().unwrap(),
            plain.get(w2.as_tensor()).unwrap(),
        );
        // Only the input is kept.
        assert_eq!(saved.bytes(), 5 * 6 * 4);
        // A wrong upstream shape is an error, not a panic.
        let bad = Tensor::zeros((2, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(recompute_backward(&seg, &saved, &bad, &[&w1]).is_err());
    }
}

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
