//! `PartitionedOptimizer::step_vars`: ZeRO over a candle program's own `Var`s. A two-layer
//! network trained at stages 0-3 on 1-3 ranks (each rank its slice of the global batch) ends
//! with the weights of 1-rank stage-0 training (within 1e-5), and a bf16 model's `Var`s
//! receive the bf16 copies of the fp32 masters.

use candle_core::{DType, Device, Tensor, Var};
use ds_comm::{Communicator, LocalComm};
use ds_zero::optim::{AdamParams, OptimizerSpec};
use ds_zero::{PartitionedOptimizer, ZeroOptimizer, ZeroOptions, ZeroPrecision};

/// Deterministic values in [-0.5, 0.5).
fn vals(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) % 1000) as f32 / 1000.0
                - 0.5
        })
        .collect()
}

fn train(stage: u8, ws: usize, steps: usize, dtype: DType) -> Vec<Vec<f32>> {
    let (d, h, batch) = (4, 8, 12);
    let x_all = vals(batch * d, 1);
    let y_all = vals(batch, 2);
    std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let (x_all, y_all) = (&x_all, &y_all);
                s.spawn(move || {
                    let dev = Device::Cpu;
                    let mk = |v: Vec<f32>, shape: (usize, usize)| {
                        Var::from_tensor(
                            &Tensor::from_vec(v, shape, &dev)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap(),
                        )
                        .unwrap()
                    };
                    let w1 = mk(vals(d * h, 3), (d, h));
                    let w2 = mk(vals(h, 4), (h, 1));
                    let vars = [w1.clone(), w2.clone()];
                    let opts = ZeroOptions {
                        stage,
                        gradient_clipping: 1.0,
                        ..Default::default()
                    };
                    let spec = OptimizerSpec::Adam(AdamParams {
                        lr: 0.01,
                        ..Default::default()
                    });
                    let prec = if dtype == DType::BF16 {
                        ZeroPrecision::bf16()
                    } else {
                        ZeroPrecision::F32
                    };
                    let mut z =
                        ZeroOptimizer::for_vars_with_precision(&vars, spec, opts, prec, &comm)
                            .unwrap();
                    let per = batch / ws;
                    let r = comm.rank();
                    let x =
                        Tensor::from_slice(&x_all[r * per * d..(r + 1) * per * d], (per, d), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                    let y = Tensor::from_slice(&y_all[r * per..(r + 1) * per], (per, 1), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    for _ in 0..steps {
                        let p = x.matmul(&w1).unwrap().tanh().unwrap().matmul(&w2).unwrap();
                        let loss = (p - &y).unwrap().sqr().unwrap().mean_all().unwrap();
                        let g = loss.backward().unwrap();
                        let grads = [g.get(&w1).cloned(), g.get(&w2).cloned()];
                        let rep = z.step_vars(&vars, &grads, 0.01, &comm).unwrap();
                        assert!(rep.applied);
                    }
                    vars.iter()
                        .flat_map(|v| {
                            v.flatten_all()
                                .unwrap()
                                .to_dtype(DType::F32)
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap()
                        })
                        .collect::<Vec<f32>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    })
}

#[test]
fn zero_over_candle_vars_equals_single_rank_training() {
    let reference = train(0, 1, 15, DType::F32).remove(0);
    let init: Vec<f32> = vals(32, 3).into_iter().chain(vals(8, 4)).collect();
    assert!(
        reference
            .iter()
            .zip(&init)
            .any(|(a, b)| (a - b).abs() > 1e-2),
        "training moved nothing"
    );
    for stage in 0..=3u8 {
        for ws in [1usize, 2, 3] {
            for (r, got) in train(stage, ws, 15, DType::F32).iter().enumerate() {
                let d = got
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-5, "stage {stage} ws {ws} rank {r}: {d:e}");
            }
        }
    }
}

#[test]
fn bf16_vars_receive_the_bf16_copies_of_the_masters() {
    let runs = train(2, 2, 5, DType::BF16);
    assert_eq!(runs[0], runs[1]);
    // Every value is exactly a bf16 number.
    for v in &runs[0] {
        assert_eq!(half::bf16::from_f32(*v).to_f32(), *v);
    }
    // And it trains like fp32 to bf16's precision.
    let f = train(2, 2, 5, DType::F32).remove(0);
    let d = runs[0]
        .iter()
        .zip(&f)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 2e-2, "{d}");
}
