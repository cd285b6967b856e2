//! One engine for every device: the GPT on its explicit CPU kernels (the host fast path) and
//! on candle autograd (the generic path every non-CPU device runs, here on the CPU device)
//! train to the same weights through the same [`Engine`] at every ZeRO stage and world size,
//! in fp32 and bf16, with dropout on (its masks keyed by the micro-step), with and without
//! activation checkpointing. ZeRO-3 with every block checkpointed holds one block's full
//! weights at a time on the generic path too.

use std::cell::Cell;
use std::ops::Range;

use candle_core::Device;
use ds_comm::{Communicator, LocalComm};
use ds_config::{DeepSpeedConfig, ResolvedConfig};
use ds_engine::data::{BigramLanguage, DataLoader};
use ds_engine::engine::Engine;
use ds_engine::traits::{BlockEvent, FwdBwd, NamedParam};
use ds_engine::traits::{GradSink, Model, Policy, Tokens};
use ds_models::{Gpt, ModelShape};
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

/// The GPT with a count of how many blocks hold their weights (the most at any gather).
struct Counted {
    gpt: Gpt,
    peak: Cell<usize>,
}

impl Model for Counted {
    type Batch = Tokens;
    fn params(&self) -> Vec<NamedParam> {
        self.gpt.params()
    }
    fn param_shapes(&self) -> Vec<Vec<usize>> {
        self.gpt.param_shapes()
    }
    fn block_param_ranges(&self) -> Vec<Range<usize>> {
        Model::block_param_ranges(&self.gpt)
    }
    fn gather_block(&self, i: usize, flat: &[f32]) -> candle_core::Result<()> {
        Model::gather_block(&self.gpt, i, flat)?;
        self.peak
            .set(self.peak.get().max(self.gpt.gathered_blocks()));
        Ok(())
    }
    fn release_block(&self, i: usize) -> candle_core::Result<()> {
        Model::release_block(&self.gpt, i)
    }
    fn supports_checkpointing(&self) -> bool {
        true
    }
    fn set_step(&self, step: u64) {
        self.gpt.set_step(step)
    }
    fn device(&self) -> Device {
        self.gpt.device()
    }
    fn forward_backward_hooked(
        &self,
        batch: &Tokens,
        policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        Model::forward_backward_hooked(&self.gpt, batch, policy, hook)
    }
    fn forward_backward_streamed(
        &self,
        batch: &Tokens,
        policy: Policy,
        loss_scale: f32,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
        sink: &mut GradSink<'_>,
    ) -> candle_core::Result<FwdBwd> {
        Model::forward_backward_streamed(&self.gpt, batch, policy, loss_scale, hook, sink)
    }
}

/// What one rank ends with.
struct Run {
    params: Vec<f32>,
    /// This rank's fp32 master partition.
    master: Vec<f32>,
    losses: Vec<f64>,
    peak_blocks: usize,
}

/// Per rank, after `steps` steps of the engine: the GPT on the explicit kernels or on candle
/// autograd, with residual dropout `dropout` (per-rank masks), every block checkpointed when
/// `ckpt`.
fn run(
    cfg: &ResolvedConfig,
    ws: usize,
    steps: u64,
    explicit: bool,
    dropout: f32,
    ckpt: bool,
) -> Vec<Run> {
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let dl = &dl;
                s.spawn(move || {
                    let mut gpt = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    gpt.set_explicit_kernels(explicit);
                    gpt.set_threads(1);
                    gpt.set_dropout(dropout, 11 + comm.rank() as u64);
                    let model = Counted {
                        gpt,
                        peak: Cell::new(0),
                    };
                    let mut e = Engine::initialize(cfg, model, &comm).unwrap();
                    if ckpt {
                        e.set_checkpoint_policy(Policy::Every).unwrap();
                    }
                    let micro = e.micro_batch_size();
                    let mut losses = vec![];
                    for step in 0..steps {
                        let r = e
                            .train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                            .unwrap();
                        losses.push(r.loss);
                    }
                    Run {
                        params: e.gather_full_params().unwrap(),
                        master: e.zero().master().to_vec(),
                        losses,
                        peak_blocks: e.model().peak.get(),
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    })
}

/// The initial weights (seed 7), flat.
fn init_params() -> Vec<f32> {
    Gpt::new(SHAPE, 7, &Device::Cpu)
        .unwrap()
        .params()
        .iter()
        .flat_map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Largest |a - b|.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest |a - b| / max(1, |b|).
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// The host fast path and the generic path agree after 20 steps at ZeRO 0-3, world sizes 1-3,
/// fp32 and bf16, dropout on, with and without checkpointing: fp32 within 1e-5 (measured:
/// about 1.2e-7), bf16 within one bf16 rounding of the distance trained (measured: about a
/// sixteenth of it). The optimizer
/// is SGD with momentum: the two paths differ only in how the gradients are computed (to
/// float rounding), and Adam's normalisation would turn the rounding noise of gradients that
/// are zero in exact arithmetic (the keys' biases: softmax ignores a shift of a row of scores)
/// into updates of size `lr`; Adam itself is the same fused kernel on both paths and is
/// compared on the losses below. Dropout is live (the weights differ from a run without it).
#[test]
fn host_fast_path_and_generic_path_agree_at_every_stage() {
    let steps = 20;
    let mut worst = 0f32;
    for prec in ["fp32", "bf16"] {
        for stage in 0..=3u8 {
            for ws in 1..=3usize {
                for ckpt in [false, true] {
                    let mut extra = json!({
                        "zero_optimization": {"stage": stage},
                        "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
                    });
                    if prec == "bf16" {
                        extra["bf16"] = json!({"enabled": true});
                    }
                    let c = cfg(ws, extra);
                    let fast = run(&c, ws, steps, true, 0.1, ckpt);
                    let slow = run(&c, ws, steps, false, 0.1, ckpt);
                    for r in 0..ws {
                        assert_eq!(slow[r].params, slow[0].params, "ranks disagree");
                    }
                    // The fp32 masters of every rank's partition (in bf16 the gathered weights
                    // are their bf16 copies, where a rounding-level difference can flip one
                    // rounding), and in fp32 the gathered weights too.
                    let mut d = 0f32;
                    for r in 0..ws {
                        d = d.max(max_rel(&slow[r].master, &fast[r].master));
                    }
                    if prec == "fp32" {
                        d = d.max(max_rel(&slow[0].params, &fast[0].params));
                    }
                    // bf16 rounds the model's weights and the communicated gradients to 8
                    // significant bits: a rounding-level difference between the paths flips
                    // some roundings, and training carries the flips on. Allowed: one bf16
                    // rounding (2^-8) of the largest distance a weight moved in training.
                    let tol = if prec == "bf16" {
                        let moved = max_abs_diff(&fast[0].params, &init_params());
                        (moved / 256.0).max(1e-5)
                    } else {
                        1e-5
                    };
                    worst = worst.max(d / tol);
                    assert!(
                        d <= tol,
                        "{prec} stage {stage} ws {ws} ckpt {ckpt}: generic path differs by {d:e} (tolerance {tol:e})"
                    );
                    let ltol = if prec == "bf16" { 1e-4 } else { 1e-5 };
                    for (a, b) in slow[0].losses.iter().zip(&fast[0].losses) {
                        assert!(
                            (a - b).abs() <= ltol * b.abs().max(1.0),
                            "{prec} stage {stage} ws {ws} ckpt {ckpt}: loss {a} vs {b}"
                        );
                    }
                    let l = &fast[0].losses;
                    assert!(l[steps as usize - 1] < l[0] - 0.05, "no progress: {l:?}");
                }
            }
        }
    }
    eprintln!("largest difference, generic vs fast path (SGD), as a fraction of its tolerance: {worst:.3}");
    // AdamW: the same losses step by step.
    for stage in 0..=3u8 {
        let c = cfg(2, json!({"zero_optimization": {"stage": stage}}));
        let fast = run(&c, 2, steps, true, 0.1, false);
        let slow = run(&c, 2, steps, false, 0.1, false);
        for (a, b) in slow[0].losses.iter().zip(&fast[0].losses) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "AdamW stage {stage}: {a} vs {b}"
            );
        }
    }
    // Dropout acts: without it the weights differ.
    let c = cfg(2, json!({"zero_optimization": {"stage": 1}}));
    let with = run(&c, 2, 4, false, 0.1, false);
    let without = run(&c, 2, 4, false, 0.0, false);
    assert!(max_rel(&with[0].params, &without[0].params) > 1e-4);
}

/// Dropout masks follow the engine's micro-step on the generic path: one step on the same
/// batch twice gives different losses (a mask repeated every step, the old device path's bug,
/// gives the same loss for the same weights and batch, so the weights are reset in between).
#[test]
fn generic_path_dropout_masks_change_with_the_step() {
    let c = cfg(
        1,
        json!({"zero_optimization": {"stage": 0}, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}),
    );
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    let comm = LocalComm::create(1).pop().unwrap();
    let mut gpt = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
    gpt.set_explicit_kernels(false);
    gpt.set_dropout(0.3, 5);
    let mut e = Engine::initialize(&c, gpt, &comm).unwrap();
    let micro = e.micro_batch_size();
    // lr 0: the weights never change, so only the masks can change the loss.
    let a = e
        .train_batch(|m| dl.micro_batch(0, m, 0, 1, micro))
        .unwrap();
    let b = e
        .train_batch(|m| dl.micro_batch(0, m, 0, 1, micro))
        .unwrap();
    assert!(
        (a.loss - b.loss).abs() > 1e-6,
        "same loss {} twice: the dropout mask repeated",
        a.loss
    );
}

/// ZeRO-3 with every block checkpointed holds one block's full weights at a time, on both
/// paths, at world sizes 2 and 3.
#[test]
fn stage3_with_checkpointing_holds_one_block_at_a_time() {
    for ws in [2, 3] {
        let c = cfg(ws, json!({"zero_optimization": {"stage": 3}}));
        for explicit in [true, false] {
            let r = run(&c, ws, 2, explicit, 0.0, true);
            for (rank, x) in r.iter().enumerate() {
                assert_eq!(
                    x.peak_blocks, 1,
                    "ws {ws} rank {rank} explicit {explicit}: {} blocks held at once",
                    x.peak_blocks
                );
            }
        }
    }
}

/// A config that asks for what a model cannot do on its device is refused by name.
#[test]
fn cpu_checkpointing_is_refused_for_a_model_that_cannot_honour_it() {
    struct NoHost(Gpt);
    impl Model for NoHost {
        type Batch = Tokens;
        fn params(&self) -> Vec<NamedParam> {
            self.0.params()
        }
        fn param_shapes(&self) -> Vec<Vec<usize>> {
            self.0.param_shapes()
        }
        fn block_param_ranges(&self) -> Vec<Range<usize>> {
            Model::block_param_ranges(&self.0)
        }
        fn gather_block(&self, i: usize, flat: &[f32]) -> candle_core::Result<()> {
            Model::gather_block(&self.0, i, flat)
        }
        fn release_block(&self, i: usize) -> candle_core::Result<()> {
            Model::release_block(&self.0, i)
        }
        fn set_cpu_checkpointing(&mut self, _on: bool) -> bool {
            false
        }
        fn forward_backward_hooked(
            &self,
            batch: &Tokens,
            policy: Policy,
            hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
        ) -> candle_core::Result<FwdBwd> {
            Model::forward_backward_hooked(&self.0, batch, policy, hook)
        }
    }
    let c = cfg(
        1,
        json!({"activation_checkpointing": {"cpu_checkpointing": true}}),
    );
    let comm = LocalComm::create(1).pop().unwrap();
    let m = NoHost(Gpt::new(SHAPE, 1, &Device::Cpu).unwrap());
    let err = Engine::initialize(&c, m, &comm).err().expect("refused");
    assert!(
        err.to_string()
            .contains("activation_checkpointing.cpu_checkpointing"),
        "{err}"
    );
}

/// Every config of the corpus (`../shared/ds-configs`) gets the same verdict from the engine
/// on both paths: accepted by both, or refused by both with the same message naming the key
/// (the engine has one set of checks for every device).
#[test]
fn config_corpus_verdicts_are_the_same_on_both_paths() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/ds-configs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("skipped: no config corpus at {}", dir.display());
        return;
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let (mut accepted, mut refused, mut unresolved) = (0, 0, 0);
    for f in &files {
        // The world size that makes the config's batch triangle hold, and the values Hugging
        // Face's integration substitutes for "auto".
        let resolved = [1usize, 2, 4, 8].iter().find_map(|&ws| {
            let mut auto = std::collections::BTreeMap::new();
            auto.insert("train_micro_batch_size_per_gpu".to_string(), json!(4));
            auto.insert("gradient_accumulation_steps".to_string(), json!(2));
            auto.insert("train_batch_size".to_string(), json!(8 * ws));
            auto.insert("scheduler.params.total_num_steps".to_string(), json!(1000));
            let opts = ds_config::ResolveOptions {
                world_size: ws,
                allow_unknown_keys: false,
                auto_values: auto,
            };
            DeepSpeedConfig::from_path(f)
                .and_then(|c| c.resolve_with(&opts))
                .ok()
                .map(|c| (ws, c))
        });
        let Some((ws, cfg)) = resolved else {
            unresolved += 1;
            continue;
        };
        let verdict = |explicit: bool| -> Result<(), String> {
            std::thread::scope(|s| {
                let rs: Vec<Result<(), String>> = LocalComm::create(ws)
                    .into_iter()
                    .map(|comm| {
                        let cfg = &cfg;
                        s.spawn(move || {
                            let mut gpt = Gpt::new(SHAPE, 1, &Device::Cpu).unwrap();
                            gpt.set_explicit_kernels(explicit);
                            Engine::initialize(cfg, gpt, &comm)
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        })
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect();
                rs.into_iter().next().unwrap()
            })
        };
        let (a, b) = (verdict(true), verdict(false));
        assert_eq!(a, b, "{}: the paths disagree", f.display());
        if a.is_ok() {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    eprintln!("corpus: {accepted} accepted and {refused} refused by the engine on both paths, {unresolved} refused by the config layer");
    assert!(accepted > 0 && accepted + refused + unresolved == files.len());
}

/// ZeRO-3 recomputes every block (a block's weights are released after its forward pass), so
/// its policy is `Every` from the start and a request for another is ignored; below stage 3
/// the policy follows `number_checkpoints` and then the caller.
#[test]
fn checkpoint_policy_follows_the_config_and_stage_3_keeps_every_block() {
    let comm = LocalComm::create(1).pop().unwrap();
    for (stage, extra, want_initial) in [
        (1u8, json!({}), Policy::None),
        (
            1,
            json!({"activation_checkpointing": {"number_checkpoints": 1}}),
            Policy::Count(1),
        ),
        (3, json!({}), Policy::Every),
    ] {
        let mut extra = extra;
        extra["zero_optimization"] = json!({ "stage": stage });
        let c = cfg(1, extra);
        let gpt = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
        let mut e = Engine::initialize(&c, gpt, &comm).unwrap();
        assert_eq!(e.checkpoint_policy(), want_initial, "stage {stage}");
        e.set_checkpoint_policy(Policy::None).unwrap();
        let want = if stage == 3 {
            Policy::Every
        } else {
            Policy::None
        };
        assert_eq!(e.checkpoint_policy(), want, "stage {stage} after set(None)");
        e.set_checkpoint_policy(Policy::Every).unwrap();
        assert_eq!(e.checkpoint_policy(), Policy::Every, "stage {stage}");
    }
}
