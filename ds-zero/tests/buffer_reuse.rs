//! The buffers the optimizer keeps across steps (reduction and gather buffers, gradient
//! statistics taken by the pass that wrote the gradients, weights published during the update)
//! must not carry anything from one step into the next: three steps of very different
//! gradients, at every stage and world sizes 1-3, against an f64 trace of AdamW with clipping
//! on the same global gradients, and the published weights against `gather_params`.

use std::sync::Mutex;

use ds_comm::{Communicator, LocalComm};
use ds_zero::optim::{AdamParams, OptimizerSpec};
use ds_zero::{GradStats, ZeroOptimizer, ZeroOptions};

const SIZES: [usize; 6] = [7, 13, 1, 200_003, 5, 64];
const LR: f64 = 0.01;
const BETAS: (f64, f64) = (0.9, 0.95);
const WD: f64 = 0.1;
const EPS: f64 = 1e-8;
const CLIP: f64 = 1.0;

/// Rank `r`'s local gradient at step `k`: each step a different pattern and magnitude, and
/// step 2 zero on every third element (stale values from step 1 would show).
fn local_grad(n: usize, r: usize, k: usize) -> Vec<f32> {
    let scale = [1.0f32, 0.01, 3.0][k];
    (0..n)
        .map(|i| {
            if k == 2 && i % 3 == 0 {
                0.0
            } else {
                (((i * 7 + r * 13 + k * 29) % 23) as f32 - 11.0) * scale
            }
        })
        .collect()
}

fn init(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
}

/// The f64 trace: parameters after each of the three steps.
fn reference(n: usize, ws: usize) -> Vec<Vec<f64>> {
    let mut p: Vec<f64> = init(n).iter().map(|&x| f64::from(x)).collect();
    let (mut m, mut v) = (vec![0f64; n], vec![0f64; n]);
    let mut out = Vec::new();
    for k in 0..3 {
        let mut g = vec![0f64; n];
        for r in 0..ws {
            for (a, b) in g.iter_mut().zip(local_grad(n, r, k)) {
                *a += f64::from(b) / ws as f64;
            }
        }
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let clip = (CLIP / (norm + 1e-6)).min(1.0);
        let t = (k + 1) as i32;
        let (bc1, bc2) = (1.0 - BETAS.0.powi(t), 1.0 - BETAS.1.powi(t));
        for i in 0..n {
            let gi = g[i] * clip;
            m[i] = BETAS.0 * m[i] + (1.0 - BETAS.0) * gi;
            v[i] = BETAS.1 * v[i] + (1.0 - BETAS.1) * gi * gi;
            p[i] = p[i] * (1.0 - LR * WD) - LR / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + EPS);
        }
        out.push(p.clone());
    }
    out
}

/// One rank's three steps through the reuse paths; returns the published model after each.
fn run_rank(c: &dyn Communicator, stage: u8, streamed: bool) -> Vec<Vec<f32>> {
    let n: usize = SIZES.iter().sum();
    let ws = c.world_size();
    let r = c.rank();
    let opts = ZeroOptions {
        stage,
        gradient_clipping: CLIP,
        ..ZeroOptions::default()
    };
    let spec = OptimizerSpec::Adam(AdamParams {
        lr: LR,
        betas: BETAS,
        eps: EPS,
        weight_decay: WD,
        ..AdamParams::default()
    });
    let mut z = ZeroOptimizer::new(&SIZES, &init(n), spec, opts, c).unwrap();
    // The model's weights, written only through the publish / visit paths.
    let model = Mutex::new(vec![f32::NAN; n]);
    let mut acc = vec![0f32; n];
    let mut out = Vec::new();
    for k in 0..3 {
        let g = local_grad(n, r, k);
        if streamed {
            // Stages 2-3: reduced during "backward" in two groups, last first, the statistics
            // taken while adding the pieces.
            z.begin_streamed(true, ws).unwrap();
            let mut part = z.take_grad_part();
            let (mut st, mut cov) = (GradStats::ZERO, 0);
            for grp in [3..6, 0..3] {
                let sp = z.param_span(grp.clone()).unwrap();
                let p = z.reduce_grad_range(grp, &g[sp], 1.0, c).unwrap();
                let (s, n) = ZeroOptimizer::add_pieces_into_stats(&mut part, &p).unwrap();
                st = st.combine(s);
                cov += n;
            }
            z.restore_grad_part_with_stats(part, st, cov).unwrap();
        } else if ws == 1 && stage == 0 && k != 1 {
            // The engine's path: the accumulation buffer handed over with its statistics
            // (step 1 without them: the step must not reuse step 0's).
            acc.copy_from_slice(&g);
            let st = (k == 0 || k == 2).then(|| GradStats::of(&acc));
            z.reduce_gradients_swap_stats(&mut acc, st, c).unwrap();
        } else {
            z.reduce_gradients(&g, c).unwrap();
        }
        let base = z.flat_range().map_or(0, |r| r.start);
        let publish = |at: usize, v: &[f32]| {
            let mut m = model.lock().unwrap();
            let lo = (base + at).min(n);
            let hi = (base + at + v.len()).min(n);
            m[lo..hi].copy_from_slice(&v[..hi - lo]);
        };
        let direct = stage < 3 || ws == 1;
        let rep = if direct {
            z.step_with(LR, c, Some(&publish)).unwrap()
        } else {
            z.step(LR, c).unwrap()
        };
        assert!(rep.applied);
        let skip_own = direct;
        z.gather_params_visit(c, skip_own, &mut |at, v| {
            model.lock().unwrap()[at..at + v.len()].copy_from_slice(v);
            Ok(())
        })
        .unwrap();
        let full = z.gather_params(c).unwrap();
        let m = model.lock().unwrap().clone();
        assert_eq!(
            m, full,
            "stage {stage} ws {ws} step {k}: published weights differ from gather_params"
        );
        out.push(m);
    }
    out
}

#[test]
fn reused_buffers_leak_nothing_between_steps() {
    let n: usize = SIZES.iter().sum();
    for ws in 1..=3 {
        let want = reference(n, ws);
        for stage in 0..=3u8 {
            for streamed in [false, true] {
                if streamed && stage < 2 {
                    continue;
                }
                let comms = LocalComm::create(ws);
                let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|sc| {
                    let hs: Vec<_> = comms
                        .into_iter()
                        .map(|c| sc.spawn(move || run_rank(&c, stage, streamed)))
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                for (rank, steps) in got.iter().enumerate() {
                    for (k, p) in steps.iter().enumerate() {
                        for (i, (&a, &b)) in p.iter().zip(&want[k]).enumerate() {
                            assert!(
                                (f64::from(a) - b).abs() <= 2e-5 * b.abs().max(1.0),
                                "stage {stage} ws {ws} streamed {streamed} rank {rank} step {k} element {i}: {a} vs f64 {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
