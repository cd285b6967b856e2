//! The device engine (model, gradients and optimizer on a candle device) on the CPU device:
//! at every ZeRO stage it trains as the host engine does (itself checked against single-rank
//! training), offload equals the on-device optimizer, bf16 follows fp32, fp16 overflows skip
//! steps on every rank, and what it cannot run is refused by name.

use candle_core::{DType, Device};
use ds_comm::{Communicator, LocalComm};
use ds_config::{DeepSpeedConfig, ResolvedConfig};
use ds_engine::data::{BigramLanguage, DataLoader};
use ds_engine::device::DeviceEngine;
use ds_engine::engine::Engine;
use ds_engine::model::{Gpt, ModelShape};
use serde_json::{json, Value};

const SHAPE: ModelShape = ModelShape {
    layers: 2,
    hidden: 32,
    heads: 2,
    seq: 16,
    vocab: 64,
};

fn cfg(ws: usize, extra: Value) -> ResolvedConfig {
    let mut v = json!({
        "train_batch_size": 4 * ws,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
        "zero_optimization": {"stage": 0},
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    DeepSpeedConfig::from_value(v).resolve(ws).unwrap()
}

/// Per rank: final flat f32 master weights and the losses, from the device engine.
fn run_device(cfg: &ResolvedConfig, ws: usize, steps: u64) -> Vec<(Vec<f32>, Vec<f32>, u64)> {
    run_device_then(cfg, ws, steps, |e, master, losses| {
        (master, losses, e.skipped_steps())
    })
}

/// Per rank: `then(engine, final flat f32 master weights, losses)` after `steps` steps of the
/// device engine.
fn run_device_then<T: Send>(
    cfg: &ResolvedConfig,
    ws: usize,
    steps: u64,
    then: impl Fn(&DeviceEngine, Vec<f32>, Vec<f32>) -> T + Sync,
) -> Vec<T> {
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let (dl, then) = (&dl, &then);
                s.spawn(move || {
                    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    let mut e = DeviceEngine::initialize(cfg, model, &Device::Cpu, &comm).unwrap();
                    let micro = e.micro_batch_size();
                    let mut losses = vec![];
                    for step in 0..steps {
                        let (l, _) = e
                            .train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                            .unwrap();
                        losses.push(l);
                    }
                    let master = e.gather_master().unwrap();
                    then(&e, master, losses)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    })
}

/// The host engine on the same data.
fn run_host(cfg: &ResolvedConfig, ws: usize, steps: u64) -> Vec<(Vec<f32>, Vec<f64>)> {
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let dl = &dl;
                s.spawn(move || {
                    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    let mut e = Engine::initialize(cfg, model, &comm).unwrap();
                    let micro = e.micro_batch_size();
                    let mut losses = vec![];
                    for step in 0..steps {
                        let r = e
                            .train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                            .unwrap();
                        losses.push(r.loss);
                    }
                    (e.gather_full_params().unwrap(), losses)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn device_engine_trains_as_the_host_engine_at_every_stage() {
    let ws = 2;
    for stage in 0..=3u8 {
        let c = cfg(ws, json!({"zero_optimization": {"stage": stage}}));
        let dev = run_device(&c, ws, 4);
        let host = run_host(&c, ws, 4);
        for r in 0..ws {
            // Same weights on every rank, equal to the host engine's to float rounding (the
            // host runs fused kernels, the device engine candle's generic ops).
            assert_eq!(dev[r].0, dev[0].0, "stage {stage}: ranks disagree");
            let d = max_diff(&dev[r].0, &host[r].0);
            assert!(d < 2e-5, "stage {stage} rank {r}: weights differ by {d}");
            for (a, b) in dev[r].1.iter().zip(&host[r].1) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * b.abs(),
                    "stage {stage}: loss {a} vs host {b}"
                );
            }
        }
        // Training moved the weights (the comparison is not of two unchanged models).
        let init: Vec<f32> = Gpt::new(SHAPE, 7, &Device::Cpu)
            .unwrap()
            .params()
            .iter()
            .flat_map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        assert!(max_diff(&dev[0].0, &init) > 1e-3);
    }
}

/// To float rounding: the host optimizer is the fused kernel, the device one candle ops.
#[test]
fn offload_equals_the_device_optimizer() {
    let ws = 2;
    for stage in [1u8, 3] {
        let on = cfg(ws, json!({"zero_optimization": {"stage": stage}}));
        let off = cfg(
            ws,
            json!({"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}}}),
        );
        let a = run_device(&on, ws, 3);
        let b = run_device(&off, ws, 3);
        let d = max_diff(&a[0].0, &b[0].0);
        assert!(d < 1e-5, "stage {stage}: offload differs by {d}");
    }
}

#[test]
fn bf16_follows_fp32_and_holds_16_bit_weights() {
    let ws = 2;
    let steps = 12;
    let f32run = run_device(
        &cfg(ws, json!({"zero_optimization": {"stage": 2}})),
        ws,
        steps,
    );
    let c = cfg(
        ws,
        json!({"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}}),
    );
    let bf = run_device(&c, ws, steps);
    let (l32, l16) = (&f32run[0].1, &bf[0].1);
    assert!(
        l16[steps as usize - 1] < l16[0] - 0.05,
        "bf16 loss did not go down: {l16:?}"
    );
    for (a, b) in l16.iter().zip(l32) {
        assert!((a - b).abs() < 0.03 * b, "bf16 loss {a} vs fp32 {b}");
    }
    // The model on the device is bf16; the masters are f32 and moved.
    let comm = LocalComm::create(1).remove(0);
    let c1 = cfg(
        1,
        json!({"zero_optimization": {"stage": 3}, "bf16": {"enabled": true}}),
    );
    let e = DeviceEngine::initialize(
        &c1,
        Gpt::new(SHAPE, 7, &Device::Cpu).unwrap(),
        &Device::Cpu,
        &comm,
    )
    .unwrap();
    assert_eq!(e.dtype(), DType::BF16);
    assert!(e
        .model()
        .params()
        .iter()
        .all(|p| p.var.dtype() == DType::BF16));
    // Stage 3: between steps only the persistent parameters (embeddings, final LayerNorm) and
    // this rank's 16-bit partition are resident.
    let total: usize = e
        .model()
        .param_shapes()
        .iter()
        .map(|s| s.iter().product::<usize>())
        .sum();
    let persistent = SHAPE.vocab * SHAPE.hidden + SHAPE.seq * SHAPE.hidden + 2 * SHAPE.hidden;
    let m = e.memory();
    assert_eq!(m.model_bytes, 2 * (persistent + total));
    assert_eq!(m.master_bytes, 4 * total);
    assert_eq!(m.optimizer_bytes, 8 * total);
}

/// Checkpointing blocks, with the saved inputs in host memory (`cpu_checkpointing`),
/// recomputes what the plain pass computed: the same training to float rounding (gradient
/// sums are added in another order).
#[test]
fn activation_checkpointing_with_cpu_checkpointing_equals_the_plain_pass() {
    let ws = 2;
    let plain = cfg(ws, json!({"zero_optimization": {"stage": 2}}));
    let ck = cfg(
        ws,
        json!({"zero_optimization": {"stage": 2},
               "activation_checkpointing": {"number_checkpoints": 2, "cpu_checkpointing": true}}),
    );
    let a = run_device(&plain, ws, 3);
    let b = run_device(&ck, ws, 3);
    let d = max_diff(&a[0].0, &b[0].0);
    assert!(d < 1e-5, "checkpointed training differs by {d}");
    for (x, y) in a[0].1.iter().zip(&b[0].1) {
        assert!((x - y).abs() < 1e-5, "loss {x} vs {y}");
    }
}

#[test]
fn stage3_releases_blocks_and_partitions_state() {
    let ws = 2;
    let c = cfg(ws, json!({"zero_optimization": {"stage": 3}}));
    std::thread::scope(|s| {
        for comm in LocalComm::create(ws) {
            let c = &c;
            s.spawn(move || {
                let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                let total: usize = model
                    .param_shapes()
                    .iter()
                    .map(|s| s.iter().product::<usize>())
                    .sum();
                let mut e = DeviceEngine::initialize(c, model, &Device::Cpu, &comm).unwrap();
                let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
                let micro = e.micro_batch_size();
                e.train_batch(|m| dl.micro_batch(0, m, comm.rank(), ws, micro))
                    .unwrap();
                assert!(e.model().blocks().iter().all(|b| !b.is_gathered()));
                let m = e.memory();
                let part = ds_comm::partition_range(total, ws, comm.rank());
                assert_eq!(m.master_bytes, 4 * (part.1 - part.0));
                assert_eq!(m.optimizer_bytes, 8 * (part.1 - part.0));
                assert_eq!(
                    m.grad_bytes, 0,
                    "the gradient partition is consumed by the step"
                );
            });
        }
    });
}

#[test]
fn fp16_overflow_skips_the_step_on_every_rank() {
    let ws = 2;
    // A loss scale of 2^40 overflows fp16 gradients: steps are skipped and the scale falls
    // until the gradients fit; then training proceeds.
    let c = cfg(
        ws,
        json!({"zero_optimization": {"stage": 2},
               "fp16": {"enabled": true, "initial_scale_power": 40, "hysteresis": 1}}),
    );
    let out = run_device(&c, ws, 30);
    for (_, losses, skipped) in &out {
        assert!(
            *skipped >= 20,
            "expected >= 20 skipped steps from 2^40 (max fp16 65504), got {skipped}"
        );
        assert!(*skipped < 30, "never recovered");
        assert!(losses.iter().all(|l| l.is_finite()));
    }
    assert_eq!(out[0].2, out[1].2, "ranks skipped different steps");
    assert_eq!(out[0].0, out[1].0);
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    let comm = LocalComm::create(1).remove(0);
    for (extra, key) in [
        (
            json!({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}),
            "optimizer.type",
        ),
        (
            json!({"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}),
            "optimizer.type",
        ),
        (
            json!({"activation_checkpointing": {"partition_activations": true}}),
            "partition_activations",
        ),
        (json!({"prescale_gradients": true}), "prescale_gradients"),
        (
            json!({"communication_data_type": "fp16"}),
            "communication_data_type",
        ),
    ] {
        let c = cfg(1, extra);
        let err = DeviceEngine::initialize(
            &c,
            Gpt::new(SHAPE, 7, &Device::Cpu).unwrap(),
            &Device::Cpu,
            &comm,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    // SGD runs with offload (the host optimizer).
    let c = cfg(
        1,
        json!({"optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
               "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}),
    );
    assert!(DeviceEngine::initialize(
        &c,
        Gpt::new(SHAPE, 7, &Device::Cpu).unwrap(),
        &Device::Cpu,
        &comm
    )
    .is_ok());
    let _ = comm.world_size();
}

/// Trains `steps` steps from `start` on `ws` ranks with the device engine, optionally loading
/// `resume` first and saving into `save` at the end; returns rank 0's gathered masters.
fn device_ranks(
    c: &ResolvedConfig,
    ws: usize,
    start: u64,
    steps: u64,
    resume: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> Vec<f32> {
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let mut out = std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let dl = &dl;
                s.spawn(move || {
                    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    let mut e = DeviceEngine::initialize(c, model, &Device::Cpu, &comm).unwrap();
                    if let Some(dir) = resume {
                        let store = ds_checkpoint::FsCheckpointStore::new(dir).unwrap();
                        let t = e.load_checkpoint(&store.open(None).unwrap()).unwrap();
                        assert_eq!(t.global_step, start);
                        assert_eq!(e.global_steps(), start);
                    }
                    let micro = e.micro_batch_size();
                    for step in start..start + steps {
                        e.train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                            .unwrap();
                    }
                    if let Some(dir) = save {
                        let store = ds_checkpoint::FsCheckpointStore::new(dir).unwrap();
                        e.save_checkpoint(&store, &format!("global_step{}", e.global_steps()), 8)
                            .unwrap();
                    }
                    e.gather_master().unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    out.swap_remove(0)
}

/// A device-engine checkpoint (ZeRO-2, 2 ranks) resumes on the device engine at ZeRO-3 and on
/// the host engine at ZeRO-1 as if training had not stopped; a host-engine checkpoint resumes
/// on the device engine.
#[test]
fn checkpoints_move_between_the_device_and_host_engines() {
    let ws = 2;
    let dir = std::env::temp_dir().join(format!("ds-device-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let z = |stage: u8| cfg(ws, json!({"zero_optimization": {"stage": stage}}));
    let straight = device_ranks(&z(2), ws, 0, 5, None, None);
    let (a, b) = (dir.join("a"), dir.join("b"));
    device_ranks(&z(2), ws, 0, 3, None, Some(&a));
    // Device ZeRO-2 -> device ZeRO-3.
    let resumed = device_ranks(&z(3), ws, 3, 2, Some(&a), None);
    let d = max_diff(&resumed, &straight);
    assert!(d < 1e-5, "device resume differs by {d}");
    // Device ZeRO-2 -> host ZeRO-1.
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let c1 = z(1);
    let host: Vec<Vec<f32>> = std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let (dl, c1, a, b) = (&dl, &c1, &a, &b);
                s.spawn(move || {
                    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    let mut e = Engine::initialize(c1, model, &comm).unwrap();
                    let store = ds_checkpoint::FsCheckpointStore::new(a).unwrap();
                    e.load_checkpoint(&store.open(None).unwrap()).unwrap();
                    let micro = e.micro_batch_size();
                    for step in 3..5 {
                        e.train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                            .unwrap();
                    }
                    // ... and the host engine's checkpoint for the last leg.
                    let store_b = ds_checkpoint::FsCheckpointStore::new(b).unwrap();
                    e.save_checkpoint(&store_b, "global_step5", 8).unwrap();
                    e.gather_full_params().unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    let d = max_diff(&host[0], &straight);
    assert!(d < 5e-5, "host resume differs by {d}");
    // Host ZeRO-1 -> device ZeRO-0: the same weights come back.
    let back = device_ranks(&z(0), ws, 5, 0, Some(&b), None);
    assert_eq!(
        back, host[0],
        "the device engine loads the host engine's checkpoint exactly"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The step report's timers (`wall_clock_breakdown`): forward, backward and step are each
/// positive, and together they fit inside the wall time of `train_batch` (they time disjoint
/// parts of it).
#[test]
fn step_timers_are_disjoint_parts_of_the_step() {
    let c = cfg(1, json!({"wall_clock_breakdown": true}));
    let comm = LocalComm::create(1).pop().unwrap();
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
    let mut e = DeviceEngine::initialize(&c, model, &Device::Cpu, &comm).unwrap();
    let micro = e.micro_batch_size();
    for step in 0..2 {
        let t0 = std::time::Instant::now();
        let (_, r) = e
            .train_batch(|m| dl.micro_batch(step, m, 0, 1, micro))
            .unwrap();
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        assert!(r.fwd_ms > 0.0 && r.bwd_ms > 0.0 && r.step_ms > 0.0, "{r:?}");
        assert!(
            r.fwd_ms + r.bwd_ms + r.step_ms <= wall + 1e-6,
            "{r:?} vs {wall} ms"
        );
    }
}

/// ZeRO-3 with every block checkpointed gathers one block at a time (each from the ranks that
/// own its slice of the flat partition) and trains exactly as stage 0 with the same
/// checkpointing; without checkpointing every block is gathered for the micro-step.
#[test]
fn stage3_with_checkpointing_gathers_one_block_at_a_time() {
    let ws = 2;
    let ckpt = json!({"number_checkpoints": SHAPE.layers});
    let run = |c: &ResolvedConfig| {
        run_device_then(c, ws, 3, |e, master, _| (master, e.peak_gathered_blocks()))
    };
    let z3 = |extra: Value| {
        let mut v = json!({"zero_optimization": {"stage": 3}});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        cfg(ws, v)
    };
    let stage0 = run(&cfg(ws, json!({"activation_checkpointing": ckpt.clone()})));
    let per_block = run(&z3(json!({"activation_checkpointing": ckpt})));
    let whole = run(&z3(json!({})));
    for r in 0..ws {
        assert_eq!(per_block[r].1, 1, "rank {r}: one block at a time");
        assert_eq!(
            whole[r].1, SHAPE.layers,
            "rank {r}: all blocks without checkpointing"
        );
        assert_eq!(stage0[r].1, 0, "stages 0-2 keep the weights whole");
        let (a, b) = (&stage0[r].0, &per_block[r].0);
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 2e-5,
            "rank {r}: stage 3 per block vs stage 0: {worst}"
        );
    }
}
