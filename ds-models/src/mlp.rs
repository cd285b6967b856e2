//! A token-wise MLP language model trained by candle autograd (the simplest [`Model`]).

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{Device, Tensor, Var};
use ds_engine::data::Rng;
use ds_engine::traits::{
    autograd_forward_backward, BlockEvent, FwdBwd, Model, NamedParam, Policy, Tokens,
};

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
    type Batch = Tokens;
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
    fn device(&self) -> Device {
        self.wte.device().clone()
    }
    fn forward_backward_hooked(
        &self,
        batch: &Tokens,
        _policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        let (ids, targets) = batch.tensors(self.shape.seq, self.wte.device())?;
        autograd_forward_backward(self, || self.loss(&ids, &targets), hook)
    }
}
