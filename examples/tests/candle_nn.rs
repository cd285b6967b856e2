//! The candle-nn adapter (`ds_models::CandleModel`): a candle-nn MLP classifier and a
//! Llama-style decoder, each built from a `VarMap`, train through the one engine at ZeRO
//! stages 0-3 on 2 ranks to the weights of 1-rank training (within 1e-5), the loss falls,
//! and at stage 3 with every block checkpointed only one block's weights are held at a time.

use candle_core::Device;
use ds_config::{DeepSpeedConfig, ResolvedConfig};
use ds_engine::data::{BigramLanguage, DataLoader};
use ds_engine::traits::Tokens;
use ds_examples::*;
use serde_json::json;

fn cfg(ws: usize, stage: u8, batch: usize) -> ResolvedConfig {
    DeepSpeedConfig::from_value(json!({
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch / (2 * ws),
        "gradient_clipping": 1.0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        "zero_optimization": {"stage": stage},
    }))
    .resolve(ws)
    .unwrap()
}

/// Largest |a - b| / max(1, |b|).
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn candle_nn_mlp_classifier_trains_at_every_stage_on_2_ranks_as_on_1() {
    let (xs, ys) = spirals(100, 3);
    let steps = 30;
    for stage in 0..=3u8 {
        for ckpt in [false, true] {
            let one = train_ranks(
                &cfg(1, stage, 32),
                1,
                steps,
                ckpt,
                || mlp_classifier(mlp_varmap(5, &Device::Cpu)?),
                points_batch(&xs, &ys, 2),
            );
            let two = train_ranks(
                &cfg(2, stage, 32),
                2,
                steps,
                ckpt,
                || mlp_classifier(mlp_varmap(5, &Device::Cpu)?),
                points_batch(&xs, &ys, 2),
            );
            let one = one.into_iter().next().unwrap().unwrap();
            let two: Vec<RankRun> = two.into_iter().map(|r| r.unwrap()).collect();
            assert_eq!(
                two[0].params, two[1].params,
                "stage {stage}: ranks disagree"
            );
            let d = max_rel(&two[0].params, &one.params);
            assert!(
                d <= 1e-5,
                "stage {stage} ckpt {ckpt}: 2 ranks differ from 1 by {d:e}"
            );
            let l = &one.losses;
            assert!(l[l.len() - 1] < 0.8 * l[0], "stage {stage}: loss {l:?}");
            if stage == 3 {
                // The engine recomputes every block at stage 3 (it releases a block after its
                // forward), so one block's weights at a time, with or without the policy set.
                for r in &two {
                    assert_eq!(r.peak_blocks, 1, "stage 3 held {} blocks", r.peak_blocks);
                }
            } else {
                assert_eq!(two[0].peak_blocks, 0, "below stage 3 nothing is gathered");
            }
        }
    }
}

#[test]
fn candle_nn_llama_decoder_trains_at_every_stage_on_2_ranks_as_on_1() {
    let s = LlamaShape {
        vocab: 32,
        hidden: 32,
        heads: 4,
        layers: 2,
        ffn: 64,
        seq: 16,
    };
    let data = DataLoader::new(BigramLanguage::new(s.vocab, 2), 2, s.seq);
    let batch = |step: u64, m: usize, rank: usize, ws: usize, micro: usize| -> Tokens {
        data.micro_batch(step, m, rank, ws, micro).into()
    };
    let steps = 12;
    for stage in 0..=3u8 {
        let ckpt = stage == 3;
        let one = train_ranks(
            &cfg(1, stage, 8),
            1,
            steps,
            ckpt,
            || llama(llama_varmap(s, 9, &Device::Cpu)?, s),
            batch,
        );
        let two = train_ranks(
            &cfg(2, stage, 8),
            2,
            steps,
            ckpt,
            || llama(llama_varmap(s, 9, &Device::Cpu)?, s),
            batch,
        );
        let one = one.into_iter().next().unwrap().unwrap();
        let two: Vec<RankRun> = two.into_iter().map(|r| r.unwrap()).collect();
        let d = max_rel(&two[0].params, &one.params);
        assert!(d <= 1e-5, "stage {stage}: 2 ranks differ from 1 by {d:e}");
        let l = &one.losses;
        assert!(l[l.len() - 1] < l[0] - 0.3, "stage {stage}: loss {l:?}");
        if ckpt {
            for r in &two {
                assert_eq!(r.peak_blocks, 1);
            }
        }
    }
}

/// Every parameter of both networks receives a gradient (candle-nn's fused norms would not
/// give one: the examples write RMSNorm and softmax in differentiable form), and a network
/// that uses a fused op without backward is caught by name.
#[test]
fn every_parameter_gets_a_gradient_and_a_missing_one_is_named() {
    let (xs, ys) = spirals(10, 1);
    let m = mlp_classifier(mlp_varmap(1, &Device::Cpu).unwrap()).unwrap();
    m.check_gradients(&points_batch(&xs, &ys, 2)(0, 0, 0, 1, 8))
        .unwrap();
    let s = LlamaShape {
        vocab: 16,
        hidden: 16,
        heads: 2,
        layers: 1,
        ffn: 32,
        seq: 8,
    };
    let l = llama(llama_varmap(s, 1, &Device::Cpu).unwrap(), s).unwrap();
    let t = Tokens {
        ids: (0..16).map(|i| i % 16).collect(),
        targets: (0..16).map(|i| (i + 1) % 16).collect(),
    };
    l.check_gradients(&t).unwrap();
    // A classifier whose norm is candle-nn's fused LayerNorm: its scale gets no gradient.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    candle_nn::linear(2, 4, vb.pp("fc")).unwrap();
    candle_nn::layer_norm(4, 1e-5, vb.pp("ln")).unwrap();
    let bad = ds_models::CandleModel::new(varmap, |vb, b: &Points| {
        use candle_core::Module;
        let h = candle_nn::linear(2, 4, vb.pp("fc"))?.forward(&b.x)?;
        let h = candle_nn::layer_norm(4, 1e-5, vb.pp("ln"))?.forward(&h)?;
        candle_nn::loss::cross_entropy(&h, &b.y)
    })
    .unwrap();
    let err = bad
        .check_gradients(&points_batch(&xs, &ys, 2)(0, 0, 0, 1, 8))
        .unwrap_err();
    assert!(err.to_string().contains("ln.weight"), "{err}");
}
