//! The engine end to end on LocalComm: ZeRO stages and world sizes agree with single-rank
//! training on the same global batch; the loss goes down; unsupported settings are refused.

use candle_core::Device;
use ds_comm::{Communicator, LocalComm};
use ds_config::DeepSpeedConfig;
use ds_engine::data::{BigramLanguage, DataLoader};
use ds_engine::engine::Engine;
use ds_models::{Gpt, ModelShape};
use serde_json::json;

const SHAPE: ModelShape = ModelShape {
    layers: 1,
    hidden: 32,
    heads: 2,
    seq: 16,
    vocab: 64,
};

fn config(
    stage: u8,
    ws: usize,
    gas: u64,
    opt: serde_json::Value,
    clip: f64,
) -> ds_config::ResolvedConfig {
    DeepSpeedConfig::from_value(json!({
        "train_batch_size": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": opt,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, "allgather_bucket_size": 3000},
    }))
    .resolve(ws)
    .unwrap()
}

/// [`config`] with `overlap_comm` set, and the stage-3 prefetch on with it (off without).
fn overlap_config(
    stage: u8,
    ws: usize,
    gas: u64,
    opt: serde_json::Value,
    clip: f64,
    overlap: bool,
) -> ds_config::ResolvedConfig {
    let mut v = config(stage, ws, gas, opt, clip).json().clone();
    let z = &mut v["zero_optimization"];
    z["overlap_comm"] = json!(overlap);
    z["stage3_prefetch_bucket_size"] = json!(if overlap { 100_000 } else { 0 });
    DeepSpeedConfig::from_value(v).resolve(ws).unwrap()
}

/// Trains `steps` steps on `ws` ranks; returns every rank's final flat parameters and losses.
fn run(
    stage: u8,
    ws: usize,
    gas: u64,
    opt: serde_json::Value,
    clip: f64,
    steps: u64,
) -> Vec<(Vec<f32>, Vec<f64>)> {
    run_overlapped(stage, ws, gas, opt, clip, steps, false)
}

/// [`run`], with `overlap`: `overlap_comm` on and a second communicator group for the
/// engine's communication thread (gradient buckets reduced on it, stage-3 prefetch).
fn run_overlapped(
    stage: u8,
    ws: usize,
    gas: u64,
    opt: serde_json::Value,
    clip: f64,
    steps: u64,
    overlap: bool,
) -> Vec<(Vec<f32>, Vec<f64>)> {
    let cfg = overlap_config(stage, ws, gas, opt, clip, overlap);
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let comms2: Vec<Option<LocalComm>> = if overlap {
        LocalComm::create(ws).into_iter().map(Some).collect()
    } else {
        (0..ws).map(|_| None).collect()
    };
    std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .zip(comms2)
            .map(|(comm, comm2)| {
                let (cfg, dl) = (&cfg, &dl);
                s.spawn(move || {
                    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    let mut e = match &comm2 {
                        Some(c2) => Engine::initialize_overlapped(cfg, model, &comm, c2).unwrap(),
                        None => Engine::initialize(cfg, model, &comm).unwrap(),
                    };
                    if overlap {
                        // The engine says what the communication thread does, not that it is off.
                        assert!(
                            e.notes()
                                .iter()
                                .all(|n| !n.contains("no second communicator")),
                            "{:?}",
                            e.notes()
                        );
                    }
                    let micro = e.micro_batch_size();
                    let mut losses = vec![];
                    for step in 0..steps {
                        let r = e
                            .train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                            .unwrap();
                        assert!(r.step.applied);
                        losses.push(r.loss);
                    }
                    let flat = e.gather_full_params().unwrap();
                    if stage < 3 {
                        // Stages 0-2 keep the full model: it equals the gathered parameters.
                        let mut held = vec![];
                        for p in e.model().params() {
                            held.extend(p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                        }
                        assert_eq!(held, flat);
                    } else {
                        // Stage 3 released every block between steps.
                        assert!(e.model().blocks().iter().all(|b| !b.is_gathered()));
                    }
                    (flat, losses)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    })
}

#[test]
fn stages_and_world_sizes_match_single_rank_training() {
    // SGD is linear in the gradient, so the only differences are summation-order roundings.
    let sgd = json!({"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9}});
    // Reference: one rank, the global batch of 4 as 4 accumulation steps of 1.
    let (want, _) = run(0, 1, 4, sgd.clone(), 1.0, 3).remove(0);
    let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
    for (ws, gas) in [(1usize, 1u64), (2, 1), (2, 2), (4, 1)] {
        for (stage, overlap) in [
            (0u8, false),
            (1, false),
            (2, false),
            (3, false),
            (2, true),
            (3, true),
        ] {
            let runs = run_overlapped(stage, ws, gas, sgd.clone(), 1.0, 3, overlap);
            for (r, (got, _)) in runs.iter().enumerate() {
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d <= 1e-5 * scale,
                    "ws={ws} gas={gas} stage={stage} overlap={overlap} rank={r}: max diff {d:e} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn loss_goes_down_towards_the_data_entropy() {
    let adamw = json!({"type": "AdamW", "params": {"lr": 0.01}});
    let out = run(2, 2, 1, adamw, 1.0, 40);
    let losses = &out[0].1;
    let first = losses[0];
    let last = losses[losses.len() - 1];
    let h = BigramLanguage::new(SHAPE.vocab, 1).entropy();
    assert!(
        (first - (SHAPE.vocab as f64).ln()).abs() < 0.2,
        "initial loss {first}"
    );
    // A clear drop, and never below what the data allows (with a margin for batch noise).
    assert!(last < first - 1.0, "loss {first} -> {last}");
    assert!(last > h - 0.3, "loss {last} below the entropy {h}");
    // Ranks agree on the parameters.
    assert_eq!(out[0].0, out[1].0);
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    let comm = LocalComm::create(1).remove(0);
    for (cfg, key) in [
        (
            json!({"train_batch_size": 4, "optimizer": {"type": "Adam"}, "fp16": {"enabled": true}, "communication_data_type": "fp32"}),
            "communication_data_type",
        ),
        (
            json!({"train_batch_size": 4, "optimizer": {"type": "Adam"}, "communication_data_type": "bf16"}),
            "communication_data_type",
        ),
        (json!({"train_batch_size": 4}), "optimizer"),
    ] {
        let r = DeepSpeedConfig::from_value(cfg).resolve(1).unwrap();
        let model = Gpt::new(SHAPE, 0, &Device::Cpu).unwrap();
        let err = Engine::initialize(&r, model, &comm)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(key), "{err}");
    }
    // World size mismatch between config and communicator.
    let r = config(0, 2, 1, json!({"type": "SGD", "params": {"lr": 0.1}}), 1.0);
    let model = Gpt::new(SHAPE, 0, &Device::Cpu).unwrap();
    assert!(Engine::initialize(&r, model, &comm).is_err());
    assert_eq!(comm.world_size(), 1);
}

/// ZeRO-3 in the engine: per step, every block's parameters are all-gathered twice (forward,
/// and recompute + backward), all gradients reduce-scattered once, and the persistent
/// parameters (embeddings, final LayerNorm) gathered once after the update: 3 Psi_blocks +
/// 2 Psi_persistent, DeepSpeed's 3 Psi when blocks dominate. Stages 1-2 move 2 Psi.
#[test]
fn stage3_communication_volume() {
    use ds_comm::CommsLogger;
    let ws = 2;
    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
    let shapes = model.param_shapes();
    let numel = |r: std::ops::Range<usize>| -> f64 {
        shapes[r]
            .iter()
            .map(|s| s.iter().product::<usize>() as f64)
            .sum()
    };
    let np = shapes.len();
    let (psi_p, psi_b) = (numel(0..2) + numel(np - 2..np), numel(2..np - 2));
    for (stage, want, overlap) in [
        (2u8, 2.0 * (psi_p + psi_b), false),
        (3, 3.0 * psi_b + 2.0 * psi_p, false),
        (2, 2.0 * (psi_p + psi_b), true),
        (3, 3.0 * psi_b + 2.0 * psi_p, true),
    ] {
        let sgd = json!({"type": "SGD", "params": {"lr": 0.1}});
        let cfg = overlap_config(stage, ws, 1, sgd, 0.0, overlap);
        let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
        let volume = |comm: &CommsLogger<LocalComm>| -> f64 {
            comm.summary()
                .iter()
                .map(|o| {
                    let b = o.msg_size as f64 * o.count as f64;
                    match o.op.as_str() {
                        "all_reduce" => 2.0 * b,
                        "reduce_scatter" | "all_gather" => b * ws as f64,
                        _ => b,
                    }
                })
                .sum()
        };
        let vols: Vec<(f64, f64)> = std::thread::scope(|s| {
            LocalComm::create(ws)
                .into_iter()
                .zip(LocalComm::create(ws))
                .map(|(c, c2)| {
                    let (cfg, dl, volume) = (&cfg, &dl, &volume);
                    s.spawn(move || {
                        let comm = CommsLogger::new(c);
                        let comm2 = CommsLogger::new(c2);
                        let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                        let mut e = if overlap {
                            Engine::initialize_overlapped(cfg, model, &comm, &comm2).unwrap()
                        } else {
                            Engine::initialize(cfg, model, &comm).unwrap()
                        };
                        let micro = e.micro_batch_size();
                        comm.reset();
                        e.train_batch(|m| dl.micro_batch(0, m, comm.rank(), ws, micro))
                            .unwrap();
                        (volume(&comm), volume(&comm2))
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        for (v1, v2) in vols {
            let v = v1 + v2;
            if overlap {
                // The communication thread carried the gradient reduction (and at stage 3 the
                // prefetched block gathers): more than a third of the traffic.
                assert!(v2 > v / 3.0, "stage {stage}: thread moved {v2} of {v}");
            } else {
                assert_eq!(v2, 0.0);
            }
            // A correctly predicted prefetch moves nothing extra.
            let ratio = v / (4.0 * want);
            // Padding of each parameter to a multiple of the world size, and the norm reduction.
            assert!(
                (1.0..1.01).contains(&ratio),
                "stage {stage} overlap {overlap}: moved {v} bytes, expected {} ({ratio:.4})",
                4.0 * want
            );
        }
    }
}

/// `offload_optimizer.device: cpu` runs the same code path on a CPU-only machine (the state is
/// already in host memory): the training is identical, and the engine says so once.
/// `activation_checkpointing.profile` reports per-block timings of the checkpointed segments.
#[test]
fn cpu_offload_is_the_same_path_and_checkpoint_profile_reports() {
    let run = |extra: serde_json::Value| -> (Vec<f64>, Vec<String>, usize) {
        let mut cfg = json!({
            "train_batch_size": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "zero_optimization": {"stage": 2},
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let cfg = DeepSpeedConfig::from_value(cfg).resolve(1).unwrap();
        let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
        let comm = LocalComm::create(1).remove(0);
        let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
        let mut e = Engine::initialize(&cfg, model, &comm).unwrap();
        let micro = e.micro_batch_size();
        let losses = (0..3)
            .map(|s| {
                e.train_batch(|m| dl.micro_batch(s, m, 0, 1, micro))
                    .unwrap()
                    .loss
            })
            .collect();
        (losses, e.notes().to_vec(), e.segment_times().len())
    };
    let (plain, _, seg0) = run(json!({}));
    let (off, notes, _) =
        run(json!({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}));
    assert_eq!(plain, off);
    assert!(
        notes.iter().any(|n| n.contains("offload_optimizer")),
        "{notes:?}"
    );
    assert_eq!(seg0, 0);
    let (ck, _, segs) =
        run(json!({"activation_checkpointing": {"number_checkpoints": 1, "profile": true}}));
    assert_eq!(ck, plain);
    assert_eq!(segs, 1);
}

/// DeepSpeed's custom loop (`forward`, `backward`, `step` every micro-batch): the update
/// happens at the accumulation boundary only, and equals `train_batch` on the same data.
#[test]
fn custom_loop_steps_at_the_accumulation_boundary() {
    let adamw = json!({"type": "AdamW", "params": {"lr": 0.01}});
    let cfg = config(2, 1, 4, adamw, 1.0);
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let comm = LocalComm::create(1).remove(0);
    let mut a = Engine::initialize(&cfg, Gpt::new(SHAPE, 7, &Device::Cpu).unwrap(), &comm).unwrap();
    let mut b = Engine::initialize(&cfg, Gpt::new(SHAPE, 7, &Device::Cpu).unwrap(), &comm).unwrap();
    assert_eq!(a.gradient_accumulation_steps(), 4);
    assert!(
        a.step_micro().is_err(),
        "a step with nothing accumulated is refused"
    );
    let micro = a.micro_batch_size();
    for step in 0..2u64 {
        let before = a.gather_full_params().unwrap();
        for m in 0..4 {
            a.forward_backward(dl.micro_batch(step, m, 0, 1, micro))
                .unwrap();
            assert_eq!(a.is_gradient_accumulation_boundary(), m == 3);
            let r = a.step_micro().unwrap();
            assert_eq!(r.is_some(), m == 3, "micro-batch {m}");
            if m < 3 {
                // No update between boundaries.
                assert_eq!(a.gather_full_params().unwrap(), before);
                assert_eq!(a.global_steps(), step);
            }
        }
        assert_eq!(a.global_steps(), step + 1);
        b.train_batch(|m| dl.micro_batch(step, m, 0, 1, micro))
            .unwrap();
    }
    assert_eq!(
        a.gather_full_params().unwrap(),
        b.gather_full_params().unwrap()
    );
}

/// The engine is generic over `Model`: the MLP trained on 2 ranks at ZeRO stage 3 (blocks
/// gathered around each pass) ends with the parameters of 1-rank stage-0 training on the same
/// global batch, and checkpointing is refused for a model that does not implement it.
#[test]
fn mlp_trains_through_the_engine_at_every_stage() {
    use ds_engine::traits::Model;
    use ds_models::{Mlp, MlpShape};
    let shape = MlpShape {
        layers: 2,
        hidden: 16,
        seq: SHAPE.seq,
        vocab: SHAPE.vocab,
    };
    let adamw = json!({"type": "AdamW", "params": {"lr": 0.01}});
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let train = |stage: u8, ws: usize| -> (Vec<f32>, f64, f64) {
        let cfg = config(stage, ws, 2, adamw.clone(), 1.0);
        let mut out = std::thread::scope(|s| {
            LocalComm::create(ws)
                .into_iter()
                .map(|comm| {
                    let (cfg, dl) = (&cfg, &dl);
                    s.spawn(move || {
                        let mut e =
                            Engine::initialize(cfg, Mlp::new(shape, 3).unwrap(), &comm).unwrap();
                        let micro = e.micro_batch_size();
                        let mut losses = vec![];
                        for step in 0..20 {
                            let r = e
                                .train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                                .unwrap();
                            losses.push(r.loss);
                        }
                        if stage == 3 {
                            // Blocks are released between passes.
                            assert_eq!(e.model().params()[1].var.elem_count(), 0);
                        }
                        (e.gather_full_params().unwrap(), losses[0], losses[19])
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        out.remove(0)
    };
    let (want, first, last) = train(0, 1);
    assert!(last < first - 0.5, "loss {first} -> {last}");
    for (stage, ws) in [(2, 2), (3, 2)] {
        let (got, _, _) = train(stage, ws);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5 * scale, "stage {stage} ws {ws}: max diff {d:e}");
    }
    let cfg = DeepSpeedConfig::from_value(json!({
        "train_batch_size": 4, "optimizer": adamw,
        "activation_checkpointing": {"number_checkpoints": 1},
    }))
    .resolve(1)
    .unwrap();
    let comm = LocalComm::create(1).remove(0);
    let err = Engine::initialize(&cfg, Mlp::new(shape, 3).unwrap(), &comm)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("number_checkpoints"), "{err}");
}

/// `checkpoint.tag_validation` across LocalComm ranks: equal tags pass in every mode; when
/// rank 2 passes another tag, Fail errors on every rank (naming both tags), Warn returns rank
/// 0's tag on every rank, Ignore returns each rank's own tag without a collective.
#[test]
fn tag_validation_across_ranks() {
    use ds_engine::engine::{validate_tag_across_ranks, TagValidation};
    let run = |tags: [&'static str; 3], mode: TagValidation| {
        let comms = ds_comm::LocalComm::create(3);
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .zip(tags)
                .map(|(c, t)| s.spawn(move || validate_tag_across_ranks(&c, t, mode)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    };
    for mode in [
        TagValidation::Ignore,
        TagValidation::Warn,
        TagValidation::Fail,
    ] {
        let r = run(["step5", "step5", "step5"], mode);
        assert!(
            r.iter().all(|t| t.as_deref().ok() == Some("step5")),
            "{mode:?}"
        );
    }
    let bad = ["step5", "step5", "step6"];
    for (rank, r) in run(bad, TagValidation::Fail).into_iter().enumerate() {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("differ") && e.contains("step5"),
            "rank {rank}: {e}"
        );
        if rank == 2 {
            assert!(e.contains("step6"), "{e}");
        }
    }
    let warned = run(bad, TagValidation::Warn);
    assert!(warned.iter().all(|t| t.as_deref().ok() == Some("step5")));
    let ignored: Vec<String> = run(bad, TagValidation::Ignore)
        .into_iter()
        .map(|t| t.unwrap())
        .collect();
    assert_eq!(ignored, ["step5", "step5", "step6"]);
    assert!(TagValidation::parse("FAIL").is_ok() && TagValidation::parse("nope").is_err());
}

/// Stages 2-3 reduce gradients into the shard during the backward pass: the engine holds no
/// full-size gradient buffer (only the optimizer's shard), where stages 0-1 hold one.
#[test]
fn partitioned_gradients_hold_only_the_shard() {
    let ws = 2;
    let n = ds_models::gpt_param_count(&SHAPE);
    for stage in 0..=3u8 {
        let cfg = config(
            stage,
            ws,
            1,
            json!({"type": "SGD", "params": {"lr": 0.1}}),
            0.0,
        );
        let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
        let grads: Vec<usize> = std::thread::scope(|s| {
            LocalComm::create(ws)
                .into_iter()
                .map(|c| {
                    let (cfg, dl) = (&cfg, &dl);
                    s.spawn(move || {
                        let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                        let mut e = Engine::initialize(cfg, model, &c).unwrap();
                        let micro = e.micro_batch_size();
                        e.train_batch(|m| dl.micro_batch(0, m, c.rank(), ws, micro))
                            .unwrap();
                        e.memory().grads_bytes
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        for g in grads {
            let elems = g / 4;
            match stage {
                // Full reduced gradient + the accumulation buffer.
                0 => assert!(elems >= 2 * n, "stage 0: {elems}"),
                // The accumulation buffer + the reduced shard.
                1 => assert!(
                    elems >= n + n / ws && elems < n + n / ws + 64,
                    "stage 1: {elems}"
                ),
                // Only the shard (padding: a few elements per parameter at stage 3).
                _ => assert!(
                    elems >= n / ws && elems < n / ws + 64,
                    "stage {stage}: {elems}"
                ),
            }
        }
    }
}

/// Trains `steps` steps of a `precision` section (`fp16`/`bf16` JSON, or null for fp32) on
/// `ws` ranks; returns rank 0's per-step reports and its final model parameters.
fn run_precision(
    stage: u8,
    ws: usize,
    precision: serde_json::Value,
    scheduler: serde_json::Value,
    steps: u64,
) -> (Vec<ds_engine::engine::TrainStep>, Vec<f32>, u64) {
    let mut v = json!({
        "train_batch_size": 4,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, "allgather_bucket_size": 3000},
    });
    for (k, val) in precision.as_object().into_iter().flatten() {
        v[k] = val.clone();
    }
    if !scheduler.is_null() {
        v["scheduler"] = scheduler;
    }
    let cfg = DeepSpeedConfig::from_value(v).resolve(ws).unwrap();
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let mut out: Vec<_> = std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let (cfg, dl) = (&cfg, &dl);
                s.spawn(move || {
                    let model = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    let mut e = Engine::initialize(cfg, model, &comm).unwrap();
                    let micro = e.micro_batch_size();
                    let reports: Vec<_> = (0..steps)
                        .map(|step| {
                            e.train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                                .unwrap()
                        })
                        .collect();
                    let mut held = vec![];
                    if stage < 3 {
                        for p in e.model().params() {
                            held.extend(p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                        }
                    }
                    (reports, held, e.skipped_steps())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    out.remove(0)
}

/// fp16 and bf16 training (fp32 masters, 16-bit weights and gradient communication, loss
/// scaling) follows the fp32 run closely at stages 0-3 on 2 ranks, and the model's weights are
/// exactly representable in the 16-bit dtype.
#[test]
fn mixed_precision_trains_like_fp32() {
    let steps = 25;
    for stage in [0u8, 2, 3] {
        let (fp32, _, _) = run_precision(stage, 2, json!({}), json!(null), steps);
        let l32 = fp32.last().unwrap().loss;
        assert!(
            l32 < fp32[0].loss - 0.3,
            "fp32 did not learn: {} -> {l32}",
            fp32[0].loss
        );
        for (name, section, tol) in [
            (
                "fp16",
                json!({"fp16": {"enabled": true, "initial_scale_power": 12}}),
                0.02,
            ),
            ("bf16", json!({"bf16": {"enabled": true}}), 0.05),
        ] {
            let (r, held, skipped) = run_precision(stage, 2, section, json!(null), steps);
            let l = r.last().unwrap().loss;
            assert!(
                (l - l32).abs() <= tol,
                "stage {stage} {name}: final loss {l} vs fp32 {l32}"
            );
            assert_eq!(skipped, 0, "stage {stage} {name}");
            if name == "fp16" {
                assert!(
                    r.iter().all(|s| s.step.loss_scale == 4096.0),
                    "stage {stage}"
                );
            }
            for x in held {
                let back = if name == "fp16" {
                    half::f16::from_f32(x).to_f32()
                } else {
                    half::bf16::from_f32(x).to_f32()
                };
                assert_eq!(back, x, "stage {stage} {name}: {x} is not a {name} value");
            }
        }
    }
}

/// fp16 overflow handling traced against DeepSpeed's ZeRO loss scaler: an initial scale of
/// 2^40 overflows fp16 (65504); with hysteresis 2 the first overflow keeps the scale and each
/// later one halves it, every overflowing step is skipped on every rank and counted, the LR
/// schedule does not advance on a skipped step, and training then proceeds.
#[test]
fn fp16_overflow_skips_follow_deepspeed() {
    let sched = json!({"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 100}});
    for stage in [1u8, 2] {
        let (r, _, skipped) = run_precision(
            stage,
            2,
            json!({"fp16": {"enabled": true, "initial_scale_power": 40, "hysteresis": 2}}),
            sched.clone(),
            40,
        );
        let first_applied = r
            .iter()
            .position(|s| s.step.applied)
            .expect("never applied");
        assert!(first_applied >= 2, "stage {stage}: {first_applied}");
        assert_eq!(
            skipped,
            first_applied as u64
                + r[first_applied..]
                    .iter()
                    .filter(|s| !s.step.applied)
                    .count() as u64
        );
        let mut scale = 2f64.powi(40);
        let mut hysteresis = 2;
        for (i, s) in r[..first_applied].iter().enumerate() {
            assert!(s.step.overflow && !s.step.applied, "step {i}");
            assert_eq!(s.step.loss_scale, scale, "stage {stage} step {i}");
            // DeepSpeed: the scale halves once the hysteresis is used up.
            if hysteresis == 1 {
                scale /= 2.0;
            } else {
                hysteresis -= 1;
            }
            assert_eq!(s.step.next_loss_scale, scale, "stage {stage} step {i}");
            // The schedule held: every skipped step ran at the warmup's first LR.
            assert_eq!(s.lr, r[0].lr);
        }
        assert_eq!(r[first_applied].lr, r[0].lr);
        // The first applied scale no longer overflows: grads * scale < 65504.
        assert!(
            r[first_applied].step.loss_scale * r[first_applied].step.grad_norm < 65504.0 * 64.0
        );
        // The schedule moves only after applied steps (DeepSpeed's WarmupLR starts at its
        // minimum for two steps: iterations -1 and 0), and it does move.
        let lrs: Vec<(f64, bool)> = r.iter().map(|s| (s.lr, s.step.applied)).collect();
        for w in r.windows(2) {
            if !w[0].step.applied {
                assert_eq!(w[1].lr, w[0].lr, "stage {stage}: {lrs:?}");
            }
        }
        assert!(r.last().unwrap().lr > r[0].lr, "stage {stage}: {lrs:?}");
        assert!(
            r.last().unwrap().loss < r[0].loss,
            "stage {stage}: no learning"
        );
    }
}

/// The engine saves through any [`ds_checkpoint::CheckpointStore`]: a store that wraps the
/// filesystem one and counts the protocol's calls sees one prepare and one finalize (rank 0)
/// and one shard per rank, for the plain and the decoupled (background) writer, and what it
/// saved resumes to the same weights.
#[test]
fn checkpoints_go_through_any_checkpoint_store() {
    use ds_checkpoint::{
        CheckpointMeta, CheckpointStore, FsCheckpointStore, RankShard, SaveRequest, Weights,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Clone)]
    struct Counting {
        inner: FsCheckpointStore,
        calls: Arc<[AtomicUsize; 3]>,
    }
    impl CheckpointStore for Counting {
        fn save(&self, tag: &str, r: &SaveRequest<'_>) -> ds_checkpoint::Result<()> {
            self.inner.save(tag, r)
        }
        fn load(&self, tag: Option<&str>) -> ds_checkpoint::Result<ds_checkpoint::Checkpoint> {
            CheckpointStore::load(&self.inner, tag)
        }
        fn latest(&self) -> ds_checkpoint::Result<Option<String>> {
            CheckpointStore::latest(&self.inner)
        }
        fn list(&self) -> ds_checkpoint::Result<Vec<String>> {
            self.inner.list()
        }
        fn prepare(&self, tag: &str) -> ds_checkpoint::Result<()> {
            self.calls[0].fetch_add(1, Ordering::SeqCst);
            self.inner.prepare(tag)
        }
        fn save_rank(
            &self,
            tag: &str,
            meta: &CheckpointMeta,
            shard: &RankShard<'_>,
        ) -> ds_checkpoint::Result<()> {
            self.calls[1].fetch_add(1, Ordering::SeqCst);
            self.inner.save_rank(tag, meta, shard)
        }
        fn finalize(
            &self,
            tag: &str,
            meta: &CheckpointMeta,
            weights: Option<&Weights<'_>>,
            save_latest: bool,
        ) -> ds_checkpoint::Result<()> {
            self.calls[2].fetch_add(1, Ordering::SeqCst);
            self.inner.finalize(tag, meta, weights, save_latest)
        }
        fn location(&self, tag: &str) -> String {
            format!("counting:{}", self.inner.location(tag))
        }
    }
    for decoupled in [false, true] {
        let dir = std::env::temp_dir().join(format!(
            "ds-engine-store-{}-{decoupled}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Counting {
            inner: FsCheckpointStore::new(&dir).unwrap(),
            calls: Arc::new([
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ]),
        };
        let mut v = config(
            2,
            2,
            1,
            json!({"type": "AdamW", "params": {"lr": 0.01}}),
            1.0,
        )
        .json()
        .clone();
        v["checkpoint"] = json!({"writer": {"type": "fast", "decoupled": decoupled}});
        let cfg = DeepSpeedConfig::from_value(v).resolve(2).unwrap();
        let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
        let saved: Vec<Vec<f32>> = std::thread::scope(|s| {
            LocalComm::create(2)
                .into_iter()
                .map(|comm| {
                    let (cfg, dl, store) = (&cfg, &dl, &store);
                    s.spawn(move || {
                        let m = Gpt::new(SHAPE, 3, &Device::Cpu).unwrap();
                        let mut e = Engine::initialize(cfg, m, &comm).unwrap();
                        let micro = e.micro_batch_size();
                        for step in 0..2 {
                            e.train_batch(|m| dl.micro_batch(step, m, comm.rank(), 2, micro))
                                .unwrap();
                        }
                        e.save_checkpoint(store, "global_step2", 4).unwrap();
                        e.wait_checkpoint().unwrap();
                        e.gather_full_params().unwrap()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        let c: Vec<usize> = store
            .calls
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        assert_eq!(
            c,
            vec![1, 2, 1],
            "decoupled {decoupled}: prepare, save_rank, finalize"
        );
        assert_eq!(store.latest().unwrap().as_deref(), Some("global_step2"));
        // Resume on one rank from the custom store: the same weights.
        let ckpt = store.load(None).unwrap();
        let comm = LocalComm::create(1).pop().unwrap();
        let cfg1 = config(
            0,
            1,
            2,
            json!({"type": "AdamW", "params": {"lr": 0.01}}),
            1.0,
        );
        let mut e =
            Engine::initialize(&cfg1, Gpt::new(SHAPE, 9, &Device::Cpu).unwrap(), &comm).unwrap();
        e.load_checkpoint(&ckpt).unwrap();
        assert_eq!(e.gather_full_params().unwrap(), saved[0]);
        assert!(store.location("x").starts_with("counting:"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
