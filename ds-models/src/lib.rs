//! `ds-models`: the model library of the ds runtime, each model an implementation of
//! [`ds_engine::traits::Model`], the trait the engine trains.
//!
//! - [`Gpt`]: the GPT-2 architecture (pre-LayerNorm blocks, fused qkv, causal attention,
//!   tanh-GELU MLP, tied head). On an f32 model on the CPU it trains on hand-written forward and
//!   backward kernels ([`fast`], [`kernels`]); on any other device or dtype (a GPU, bf16) on
//!   candle autograd over the same layers, which is also the reference the kernels are tested
//!   against. Activation checkpointing and ZeRO-3's per-block gathering work on both paths.
//!   [`Gpt::set_bf16_compute`] runs the kernels' matrix products in bf16 on the CPU's AVX-512
//!   BF16 units ([`bf16mm`]: bf16 operands, f32 sums; detected at run time, f32 elsewhere).
//! - [`Mlp`]: a token-wise MLP language model on candle autograd.
//! - [`CandleModel`]: any candle-nn network built from a `VarMap`, with a loss closure (one
//!   piece, or embed / blocks / head for per-block ZeRO-3 gathering and checkpointing).
//!
//! `ds-engine`'s library does not depend on this crate; the `ds` command (`ds-cli`) does.
//!
//! ```
//! use candle_core::Device;
//! use ds_models::{Gpt, ModelShape};
//! use ds_engine::traits::{Model, Policy};
//!
//! let shape = ModelShape { layers: 1, hidden: 16, heads: 2, seq: 8, vocab: 32 };
//! let gpt = Gpt::new(shape, 0, &Device::Cpu)?;
//! let ids = candle_core::Tensor::zeros((2, 8), candle_core::DType::U32, &Device::Cpu)?;
//! let fb = gpt.forward_backward_hooked(&ids, &ids, Policy::None, &mut |_| Ok(()))?;
//! assert!(fb.loss > 0.0);
//! assert_eq!(fb.grads.len(), Model::params(&gpt).len());
//! # Ok::<(), candle_core::Error>(())
//! ```

#![warn(missing_docs)]

pub mod bf16mm;
pub mod blas;
pub mod gpt;
pub mod kernels;
pub mod mlp;
pub mod nn;

pub use bf16mm::Bf16Units;
pub use gpt::fast;
pub use gpt::{gpt_param_count, Gpt, GptBlock, ModelShape, BLOCK_PARAMS};
pub use mlp::{Mlp, MlpShape};
pub use nn::CandleModel;

#[cfg(test)]
mod tests {
    use crate::{Gpt, Mlp, MlpShape, ModelShape};
    use candle_core::{Device, Tensor};
    use ds_engine::traits::{Model, Policy, Tokens};

    fn tokens(vocab: u32, b: usize, t: usize) -> Tokens {
        Tokens {
            ids: (0..b * t).map(|i| (i as u32 * 7 + 3) % vocab).collect(),
            targets: (0..b * t).map(|i| (i as u32 * 5 + 1) % vocab).collect(),
        }
    }

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
        let models: [(&str, &dyn Model<Batch = Tokens>, bool); 3] = [
            ("gpt explicit", &explicit, true),
            ("gpt autograd", &autograd, false),
            ("mlp", &mlp, false),
        ];
        let tok = tokens(32, 2, 8);
        for (name, m, streams) in models {
            let want = m
                .forward_backward_hooked(&tok, Policy::None, &mut |_| Ok(()))
                .unwrap();
            let n = m.params().len();
            let mut got: Vec<Option<Vec<f32>>> = vec![None; n];
            let mut groups = Vec::new();
            let fb = m
                .forward_backward_streamed(&tok, Policy::None, 8.0, &mut |_| Ok(()), &mut |r, g| {
                    assert_eq!(r.len(), g.len());
                    groups.push(r.clone());
                    for (i, g) in r.zip(g) {
                        assert!(got[i].is_none(), "{name}: parameter {i} handed over twice");
                        got[i] = Some(g.unwrap().flatten_all()?.to_vec1::<f32>()?);
                    }
                    Ok(())
                })
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
    fn check_all_grads(m: &dyn Model<Batch = Tokens>, vocab: u32, seq: usize) {
        let fb = m
            .forward_backward_hooked(&tokens(vocab, 2, seq), Policy::None, &mut |_| Ok(()))
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
            .forward_backward_hooked(&tokens(10, 2, 4), Policy::None, &mut |_| Ok(()))
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

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
