//! ZeRO-Infinity placements (optimizer state and/or parameters in swap files) give the same
//! training as everything in memory: bitwise, since the arithmetic is the same element for
//! element (the bar is 1e-6).

use std::borrow::Cow;
use std::path::PathBuf;

use ds_comm::{Communicator, LocalComm};
use ds_zero::optim::{AdamParams, LambParams, OptimizerSpec, SgdParams};
use ds_zero::swap::AioOptions;
use ds_zero::{NvmeOptions, ZeroOptimizer, ZeroOptions, ZeroPrecision};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ds-nvme-test-{name}-{}", std::process::id()))
}

const SIZES: [usize; 6] = [3000, 17, 5000, 1, 2500, 4100];

fn init_of(i: usize) -> Vec<f32> {
    (0..SIZES[i])
        .map(|k| ((i * 7919 + k) as f32 * 0.013).sin())
        .collect()
}

/// A deterministic gradient for step `t`, the same on every rank before averaging differs
/// per rank (rank r adds r * 0.01).
fn grad(t: usize, rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| (k as f32 * 0.7 + t as f32).cos() * 0.1 + rank as f32 * 0.01)
        .collect()
}

#[derive(Clone)]
struct Case {
    stage: u8,
    ws: usize,
    precision: ZeroPrecision,
    spec: OptimizerSpec,
    opt: bool,
    param: bool,
    chunk: usize,
    buffers: usize,
    pipeline: bool,
    max_in_cpu: usize,
}

/// Runs 10 steps; returns every rank's gathered parameters after each step, and its final
/// (master, optimizer state).
/// Per rank: (gathered parameters after each step, final masters, final optimizer state).
type RankRun = (Vec<Vec<f32>>, Vec<f32>, Vec<Vec<f32>>);

fn run(c: &Case, dir: Option<PathBuf>) -> Vec<RankRun> {
    let comms = LocalComm::create(c.ws);
    std::thread::scope(|sc| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let c = c.clone();
                let dir = dir.clone();
                sc.spawn(move || {
                    let nvme = match &dir {
                        Some(d) => NvmeOptions {
                            optimizer_path: c.opt.then(|| d.clone()),
                            param_path: c.param.then(|| d.join("params")),
                            chunk_elems: c.chunk,
                            buffer_count: c.buffers,
                            pipeline_read: c.pipeline,
                            pipeline_write: c.pipeline,
                            max_in_cpu: c.max_in_cpu,
                            aio: AioOptions {
                                block_size: 8192,
                                thread_count: 2,
                                ..Default::default()
                            },
                        },
                        None => NvmeOptions::default(),
                    };
                    let opts = ZeroOptions {
                        stage: c.stage,
                        reduce_bucket_size: 3000,
                        allgather_bucket_size: 4000,
                        gradient_clipping: 1.0,
                        ..Default::default()
                    };
                    let mut init = |i: usize| Ok(Cow::Owned(init_of(i)));
                    let mut z = ZeroOptimizer::with_precision_streamed(
                        &SIZES,
                        &mut init,
                        c.spec,
                        opts,
                        c.precision.clone(),
                        nvme,
                        &comm,
                    )
                    .unwrap();
                    assert_eq!(z.optimizer_on_disk(), dir.is_some() && c.opt);
                    assert_eq!(z.params_on_disk(), dir.is_some() && c.param);
                    let n: usize = SIZES.iter().sum();
                    let mut seen = Vec::new();
                    for t in 0..10 {
                        let s = z.loss_scale() as f32;
                        let g: Vec<f32> = grad(t, comm.rank(), n).iter().map(|x| x * s).collect();
                        z.reduce_gradients(&g, &comm).unwrap();
                        z.step(1e-2, &comm).unwrap();
                        // Block-wise gathers as the engine does at stage 3 (with a prefetch of
                        // the next range), the whole model otherwise.
                        if c.stage == 3 {
                            let mut v = Vec::new();
                            for (a, b) in [(0usize, 2usize), (2, 3), (3, 6)] {
                                if b < 6 {
                                    z.prefetch_param_range(b..6).unwrap();
                                }
                                v.extend(z.gather_param_range(a..b, &comm).unwrap());
                            }
                            seen.push(v);
                        } else {
                            seen.push(z.gather_params(&comm).unwrap());
                        }
                    }
                    let st = z.optimizer_state();
                    (
                        seen,
                        z.master().to_vec(),
                        st.buffers.into_iter().map(|(_, b)| b).collect(),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn adam() -> OptimizerSpec {
    OptimizerSpec::Adam(AdamParams {
        lr: 1e-2,
        weight_decay: 0.01,
        ..Default::default()
    })
}

#[test]
fn offloaded_training_equals_in_memory() {
    let base = Case {
        stage: 1,
        ws: 1,
        precision: ZeroPrecision::F32,
        spec: adam(),
        opt: true,
        param: false,
        chunk: 2048,
        buffers: 4,
        pipeline: true,
        max_in_cpu: 0,
    };
    let mut cases = Vec::new();
    for stage in [1u8, 2, 3] {
        for ws in [1usize, 2] {
            for precision in [ZeroPrecision::F32, ZeroPrecision::bf16()] {
                let places: &[(bool, bool)] = if stage == 3 {
                    &[(true, false), (false, true), (true, true)]
                } else {
                    &[(true, false)]
                };
                for &(opt, param) in places {
                    cases.push(Case {
                        stage,
                        ws,
                        precision: precision.clone(),
                        opt,
                        param,
                        ..base.clone()
                    });
                }
            }
        }
    }
    // Pipeline variations, one buffer, chunks larger than the part, parameters partly
    // resident, SGD with momentum and Lion.
    for (buffers, pipeline, chunk) in [
        (1usize, false, 2048usize),
        (2, true, 4096),
        (3, false, 1 << 20),
    ] {
        cases.push(Case {
            stage: 3,
            ws: 2,
            opt: true,
            param: true,
            buffers,
            pipeline,
            chunk,
            max_in_cpu: 3100,
            ..base.clone()
        });
    }
    cases.push(Case {
        stage: 2,
        spec: OptimizerSpec::Sgd(SgdParams {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        }),
        ..base.clone()
    });
    cases.push(Case {
        stage: 3,
        param: true,
        spec: OptimizerSpec::Lion(Default::default()),
        ..base.clone()
    });
    for (k, c) in cases.iter().enumerate() {
        let ctx = format!(
            "case {k}: stage {} ws {} {:?} opt {} param {} buffers {} pipeline {} chunk {}",
            c.stage, c.ws, c.precision, c.opt, c.param, c.buffers, c.pipeline, c.chunk
        );
        let want = run(c, None);
        let dir = tmp(&format!("eq{k}"));
        let got = run(c, Some(dir.clone()));
        for (r, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w.0.len(), 10);
            for (t, (a, b)) in w.0.iter().zip(&g.0).enumerate() {
                assert_eq!(a.len(), b.len(), "{ctx}: rank {r} step {t}");
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d == 0.0, "{ctx}: rank {r} step {t}: max difference {d}");
            }
            assert_eq!(w.1, g.1, "{ctx}: rank {r} masters");
            assert_eq!(w.2, g.2, "{ctx}: rank {r} optimizer state");
            // The run moved the weights (the comparison is not of two untouched inits).
            assert_ne!(w.0[0], w.0[9], "{ctx}");
        }
        // Scratch removed at drop.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.iter().all(|p| p.ends_with("params")),
            "{ctx}: swap files left behind: {left:?}"
        );
        let params_left: Vec<_> = std::fs::read_dir(dir.join("params"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(params_left.is_empty(), "{ctx}: {params_left:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Checkpoint state out of one offloaded optimizer and into another (in memory, and
/// offloaded) continues identically.
#[test]
fn state_moves_onto_and_off_disk() {
    let comm = LocalComm::create(1).remove(0);
    let n: usize = SIZES.iter().sum();
    let opts = ZeroOptions {
        stage: 3,
        gradient_clipping: 0.0,
        ..Default::default()
    };
    let dir = tmp("ckpt");
    let nvme = |d: &str| NvmeOptions {
        optimizer_path: Some(dir.join(d)),
        param_path: Some(dir.join(d)),
        chunk_elems: 2048,
        max_in_cpu: 100,
        ..Default::default()
    };
    let mk = |nv: NvmeOptions| {
        let mut init = |i: usize| Ok(Cow::Owned(init_of(i)));
        ZeroOptimizer::with_precision_streamed(
            &SIZES,
            &mut init,
            adam(),
            opts.clone(),
            ZeroPrecision::F32,
            nv,
            &comm,
        )
        .unwrap()
    };
    let mut a = mk(nvme("a"));
    for t in 0..3 {
        a.reduce_gradients(&grad(t, 0, n), &comm).unwrap();
        a.step(1e-2, &comm).unwrap();
    }
    let (master, state) = (a.master().to_vec(), a.optimizer_state());
    assert_eq!(state.step, 3);
    a.release_swap_views();
    let mut b = mk(nvme("b"));
    let mut c = mk(NvmeOptions::default());
    b.load_state(&master, &state).unwrap();
    c.load_state(&master, &state).unwrap();
    for t in 3..6 {
        for z in [&mut a, &mut b, &mut c] {
            z.reduce_gradients(&grad(t, 0, n), &comm).unwrap();
            z.step(1e-2, &comm).unwrap();
        }
    }
    let pa = a.gather_params(&comm).unwrap();
    assert_eq!(pa, b.gather_params(&comm).unwrap());
    assert_eq!(pa, c.gather_params(&comm).unwrap());
    let s = a.swap_stats().unwrap();
    assert!(s.bytes_read > 0 && s.bytes_written > 0, "{s:?}");
    drop((a, b, c));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn refusals_name_the_reason() {
    let comm = LocalComm::create(1).remove(0);
    let dir = tmp("refuse");
    let nvme = NvmeOptions {
        optimizer_path: Some(dir.clone()),
        ..Default::default()
    };
    let opts = |stage| ZeroOptions {
        stage,
        ..Default::default()
    };
    let mut init = |_i: usize| -> Result<Cow<'static, [f32]>, ds_zero::ZeroError> {
        panic!("nothing should be initialised")
    };
    // A part larger than the disk: refused before anything is allocated or written.
    let e = ZeroOptimizer::with_precision_streamed(
        &[1 << 45],
        &mut init,
        adam(),
        opts(1),
        ZeroPrecision::F32,
        nvme.clone(),
        &comm,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bytes") && e.contains("free"), "{e}");
    let e = ZeroOptimizer::with_precision_streamed(
        &[10],
        &mut init,
        OptimizerSpec::Lamb(LambParams::default()),
        opts(2),
        ZeroPrecision::F32,
        nvme.clone(),
        &comm,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Lamb"), "{e}");
    let e = ZeroOptimizer::with_precision_streamed(
        &[10],
        &mut init,
        adam(),
        opts(0),
        ZeroPrecision::F32,
        nvme.clone(),
        &comm,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("stage 1, 2 or 3"), "{e}");
    let e = ZeroOptimizer::with_precision_streamed(
        &[10],
        &mut init,
        adam(),
        opts(2),
        ZeroPrecision::F32,
        NvmeOptions {
            param_path: Some(dir.clone()),
            ..Default::default()
        },
        &comm,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("stage 3"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
