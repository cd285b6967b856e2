//! ZeRO correctness on `LocalComm`: for stages 0-3 and world sizes 1-4, with parameter counts
//! that do not divide evenly and small buckets, parameters after K steps equal single-rank
//! training on the same global batch; DeepSpeed's exact mean/sum case; communication volume.

use ds_comm::{CommsLogger, Communicator, LocalComm};
use ds_zero::optim::{AdamParams, FlatOptimizer, LambParams, OptimizerSpec, SgdParams};
use ds_zero::{ZeroOptimizer, ZeroOptions};

const SIZES: [usize; 4] = [7, 13, 1, 30]; // 51 elements
const STEPS: usize = 5;

/// The gradient sample `s` contributes at parameters `p` (a quadratic loss per sample).
fn sample_grad(p: &[f32], s: usize, step: usize) -> Vec<f32> {
    p.iter()
        .enumerate()
        .map(|(i, &x)| {
            let a = 0.5 + ((i * 7 + s * 3 + step) % 11) as f32 / 11.0;
            let b = ((i * 5 + s * 13 + step * 3) % 17) as f32 / 17.0 - 0.5;
            a * x - b
        })
        .collect()
}

fn init() -> Vec<f32> {
    (0..SIZES.iter().sum::<usize>())
        .map(|i| ((i % 9) as f32 - 4.0) * 0.1)
        .collect()
}

/// Single rank, global batch of `ws` samples (mean of the per-sample gradients).
fn reference(spec: OptimizerSpec, ws: usize, clip: f64) -> Vec<f32> {
    let mut p = init();
    let n = p.len();
    let mut opt = FlatOptimizer::new(spec, n);
    for step in 0..STEPS {
        let mut g = vec![0f32; n];
        for s in 0..ws {
            for (a, b) in g.iter_mut().zip(sample_grad(&p, s, step)) {
                *a += b / ws as f32;
            }
        }
        let norm = g.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        if clip > 0.0 && clip / (norm + 1e-6) < 1.0 {
            let c = (clip / (norm + 1e-6)) as f32;
            g.iter_mut().for_each(|x| *x *= c);
        }
        if let OptimizerSpec::Lamb(_) = spec {
            let mut segs = Vec::new();
            let mut off = 0;
            for s in SIZES {
                segs.push(off..off + s);
                off += s;
            }
            opt.step_lamb(&mut p, &g, &segs, spec.lr(), &mut |_| Ok(()))
                .unwrap();
        } else {
            opt.step(&mut p, &g, spec.lr()).unwrap();
        }
    }
    p
}

fn distributed(spec: OptimizerSpec, ws: usize, opts: ZeroOptions) -> Vec<Vec<f32>> {
    let comms = LocalComm::create(ws);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let opts = opts.clone();
                scope.spawn(move || {
                    let mut z = ZeroOptimizer::new(&SIZES, &init(), spec, opts, &comm).unwrap();
                    let mut p = z.gather_params(&comm).unwrap();
                    for step in 0..STEPS {
                        let g = sample_grad(&p, comm.rank(), step);
                        z.reduce_gradients(&g, &comm).unwrap();
                        let r = z.step(spec.lr(), &comm).unwrap();
                        assert!(r.applied && !r.overflow);
                        p = z.gather_params(&comm).unwrap();
                    }
                    p
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs() / f64::from(y.abs()).max(1e-3))
        .fold(0.0, f64::max)
}

#[test]
fn every_stage_and_world_size_matches_single_rank_training() {
    let specs = [
        OptimizerSpec::Adam(AdamParams {
            lr: 0.01,
            weight_decay: 0.01,
            ..Default::default()
        }),
        OptimizerSpec::Sgd(SgdParams {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        }),
        OptimizerSpec::Lamb(LambParams {
            lr: 0.01,
            ..Default::default()
        }),
    ];
    for spec in specs {
        for ws in 1..=4 {
            for clip in [0.0, 0.5] {
                let want = reference(spec, ws, clip);
                for stage in 0..=3u8 {
                    for bucket in [6usize, 500_000_000] {
                        let opts = ZeroOptions {
                            stage,
                            reduce_bucket_size: bucket,
                            allgather_bucket_size: bucket,
                            gradient_clipping: clip,
                            ..Default::default()
                        };
                        let got = distributed(spec, ws, opts);
                        for (r, p) in got.iter().enumerate() {
                            let d = max_rel(p, &want);
                            assert!(
                                d <= 1e-5,
                                "{spec:?} ws={ws} stage={stage} bucket={bucket} clip={clip} rank={r}: max rel diff {d:e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// DeepSpeed's TestGradientAllreduceOp: world size 2, w = 0, loss = sum(w * x), SGD lr 1:
/// after one step w = -x with "mean" and -2x with "sum", whatever the prescale settings.
#[test]
fn deepspeed_mean_and_sum_case() {
    let x = [1.0f32, 2.0];
    for stage in 0..=3u8 {
        for (average, want) in [(true, 1.0f32), (false, 2.0)] {
            for (prescale, factor) in [(false, 1.0), (true, 1.0), (true, 2.0), (true, 8.0)] {
                let comms = LocalComm::create(2);
                let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                    comms
                        .into_iter()
                        .map(|comm| {
                            s.spawn(move || {
                                let opts = ZeroOptions {
                                    stage,
                                    average_gradients: average,
                                    prescale_gradients: prescale,
                                    gradient_predivide_factor: factor,
                                    gradient_clipping: 0.0,
                                    ..Default::default()
                                };
                                let spec = OptimizerSpec::Sgd(SgdParams {
                                    lr: 1.0,
                                    ..Default::default()
                                });
                                let mut z =
                                    ZeroOptimizer::new(&[2], &[0.0, 0.0], spec, opts, &comm)
                                        .unwrap();
                                z.reduce_gradients(&x, &comm).unwrap();
                                z.step(1.0, &comm).unwrap();
                                z.gather_params(&comm).unwrap()
                            })
                        })
                        .collect::<Vec<_>>()
                        .into_iter()
                        .map(|h| h.join().unwrap())
                        .collect()
                });
                for w in results {
                    assert_eq!(
                        w,
                        vec![-want * x[0], -want * x[1]],
                        "stage {stage} average {average} prescale {prescale} f {factor}"
                    );
                }
            }
        }
    }
}

/// inf/nan on one rank skips the step on every rank.
#[test]
fn overflow_on_one_rank_skips_everywhere() {
    for stage in 0..=3u8 {
        let comms = LocalComm::create(3);
        std::thread::scope(|s| {
            for comm in comms {
                s.spawn(move || {
                    let opts = ZeroOptions {
                        stage,
                        ..Default::default()
                    };
                    let spec = OptimizerSpec::Adam(AdamParams::default());
                    let mut z = ZeroOptimizer::new(&SIZES, &init(), spec, opts, &comm).unwrap();
                    let mut g = vec![0.1f32; 51];
                    if comm.rank() == 1 {
                        g[40] = f32::NAN;
                    }
                    z.reduce_gradients(&g, &comm).unwrap();
                    let r = z.step(1e-3, &comm).unwrap();
                    assert!(
                        r.overflow && !r.applied,
                        "stage {stage} rank {}",
                        comm.rank()
                    );
                    assert_eq!(z.gather_params(&comm).unwrap(), init());
                });
            }
        });
    }
}

/// Communication volume per step, from the comms logger: 2 x params for stages 0-2 (all-reduce
/// counted as 2S; reduce-scatter + all-gather as S each), within padding.
#[test]
fn communication_volume_is_two_psi_for_stages_0_to_2() {
    let ws = 2;
    let sizes = [1000usize, 2001];
    let psi = 3001f64 * 4.0;
    for stage in 0..=2u8 {
        let comms = LocalComm::create(ws);
        let volumes: Vec<f64> = std::thread::scope(|s| {
            comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let comm = CommsLogger::new(c);
                        let init = vec![0.5f32; 3001];
                        let opts = ZeroOptions {
                            stage,
                            reduce_bucket_size: 1000,
                            allgather_bucket_size: 1000,
                            ..Default::default()
                        };
                        let spec = OptimizerSpec::Adam(AdamParams::default());
                        let mut z = ZeroOptimizer::new(&sizes, &init, spec, opts, &comm).unwrap();
                        comm.reset();
                        z.reduce_gradients(&vec![0.01f32; 3001], &comm).unwrap();
                        z.step(1e-3, &comm).unwrap();
                        z.gather_params(&comm).unwrap();
                        comm.summary()
                            .iter()
                            .map(|o| {
                                let bytes = o.msg_size as f64 * o.count as f64;
                                match o.op.as_str() {
                                    "all_reduce" => 2.0 * bytes,
                                    "reduce_scatter" | "all_gather" => bytes * ws as f64,
                                    _ => bytes,
                                }
                            })
                            .sum()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        for v in volumes {
            let ratio = v / psi;
            // Padding (to a multiple of 2*ws) and the 16-byte norm/overflow reduction.
            assert!(
                (2.0..2.01).contains(&ratio),
                "stage {stage}: volume {v} = {ratio:.4} x params"
            );
        }
    }
}

#[test]
fn bad_options_are_errors() {
    let comm = LocalComm::create(1).remove(0);
    let spec = OptimizerSpec::Adam(AdamParams::default());
    for opts in [
        ZeroOptions {
            stage: 4,
            ..Default::default()
        },
        ZeroOptions {
            allgather_bucket_size: 5,
            ..Default::default()
        },
        ZeroOptions {
            gradient_predivide_factor: 0.0,
            ..Default::default()
        },
    ] {
        assert!(ZeroOptimizer::new(&[3], &[0.0; 3], spec, opts, &comm).is_err());
    }
    assert!(ZeroOptimizer::new(&[3], &[0.0; 2], spec, ZeroOptions::default(), &comm).is_err());
    let mut z = ZeroOptimizer::new(&[3], &[0.0; 3], spec, ZeroOptions::default(), &comm).unwrap();
    assert!(z.reduce_gradients(&[0.0; 4], &comm).is_err());
}

/// The estimator and a live optimizer agree on every stage (fp32 Adam, uneven size).
#[test]
fn estimator_matches_live_memory() {
    use ds_zero::estimate::{estimate, Precision};
    let psi = 10_007usize;
    for ws in 1..=4usize {
        for stage in 0..=3u8 {
            let e = estimate(psi as u64, ws as u64, stage, Precision::Fp32, 8).unwrap();
            let live: Vec<usize> = std::thread::scope(|s| {
                LocalComm::create(ws)
                    .into_iter()
                    .map(|c| {
                        s.spawn(move || {
                            let opts = ZeroOptions {
                                stage,
                                ..Default::default()
                            };
                            let z = ZeroOptimizer::new(
                                &[psi],
                                &vec![0.0; psi],
                                OptimizerSpec::Adam(AdamParams::default()),
                                opts,
                                &c,
                            )
                            .unwrap();
                            let m = z.memory();
                            m.params_bytes + m.grads_bytes + m.optimizer_bytes
                        })
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect()
            });
            for l in live {
                assert_eq!(l as u64, e.per_rank_bytes, "ws={ws} stage={stage}");
            }
        }
    }
}

/// Stage 3 gathers any run of parameters (a block's) from per-parameter chunks; other stages
/// slice the whole. Every rank gets the exact initial values.
#[test]
fn gather_param_range_returns_exact_values() {
    for stage in [1u8, 3] {
        for ws in 1..=4usize {
            std::thread::scope(|s| {
                for c in LocalComm::create(ws) {
                    s.spawn(move || {
                        let init = init();
                        let opts = ZeroOptions {
                            stage,
                            allgather_bucket_size: 4,
                            ..Default::default()
                        };
                        let z = ZeroOptimizer::new(
                            &SIZES,
                            &init,
                            OptimizerSpec::Adam(AdamParams::default()),
                            opts,
                            &c,
                        )
                        .unwrap();
                        // params 1..3 = elements 7..21
                        assert_eq!(
                            z.gather_param_range(1..3, &c).unwrap(),
                            init[7..21].to_vec(),
                            "stage {stage} ws {ws}"
                        );
                        assert_eq!(z.gather_param_range(0..4, &c).unwrap(), init);
                        assert_eq!(z.gather_param_range(2..2, &c).unwrap(), Vec::<f32>::new());
                        assert!(z.gather_param_range(3..9, &c).is_err());
                        if stage == 3 {
                            // Per-parameter chunks: ceil(7/ws) + ceil(13/ws) + ceil(1/ws) + ceil(30/ws).
                            let want: usize = SIZES.iter().map(|n| n.div_ceil(ws)).sum();
                            assert_eq!(z.master().len(), want);
                        }
                    });
                }
            });
        }
    }
}
