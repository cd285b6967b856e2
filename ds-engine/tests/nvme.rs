//! ZeRO-Infinity through the engine: a GPT trained with its optimizer state and/or parameters
//! in swap files (`offload_optimizer` / `offload_param` device "nvme") equals the in-memory run
//! after 10 steps (bar 1e-6; measured: bitwise) at stages 1-3, world sizes 1 and 2, fp32 and
//! bf16; checkpoints saved off the swap files resume onto and off NVMe at another world size
//! and stage; the swap files are gone when the engine is.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ds_checkpoint::FsCheckpointStore;
use ds_comm::{Communicator, LocalComm};
use ds_config::{DeepSpeedConfig, ResolvedConfig};
use ds_engine::data::{BigramLanguage, DataLoader};
use ds_engine::engine::Engine;
use ds_models::{Gpt, ModelShape};
use serde_json::{json, Value};

const SHAPE: ModelShape = ModelShape {
    layers: 3,
    hidden: 32,
    heads: 2,
    seq: 16,
    vocab: 64,
};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ds-engine-nvme-{name}-{}", std::process::id()))
}

/// `place`: "none", "opt", "param" or "both".
fn cfg(ws: usize, stage: u8, bf16: bool, place: &str, dir: &Path) -> ResolvedConfig {
    let path = dir.to_string_lossy().to_string();
    let mut z = json!({"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000,
                       "sub_group_size": 4096});
    if place == "opt" || place == "both" {
        z["offload_optimizer"] = json!({"device": "nvme", "nvme_path": path, "buffer_count": 3,
                                        "pipeline_read": true, "pipeline_write": true});
    }
    if place == "param" || place == "both" {
        z["offload_param"] = json!({"device": "nvme", "nvme_path": path, "max_in_cpu": 5000});
    }
    let v: Value = json!({
        "train_batch_size": 4 * ws,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
        "zero_optimization": z,
        "aio": {"block_size": 65536, "queue_depth": 4, "thread_count": 2},
    });
    DeepSpeedConfig::from_value(v).resolve(ws).unwrap()
}

/// Per rank: the losses and the final full parameters after `steps` steps; with `save`, a
/// checkpoint written at the end into that directory.
fn run(
    cfg: &ResolvedConfig,
    ws: usize,
    steps: u64,
    save: Option<&Path>,
) -> Vec<(Vec<f64>, Vec<f32>)> {
    let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
    std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let dl = &dl;
                s.spawn(move || {
                    let mut gpt = Gpt::new(SHAPE, 7, &Device::Cpu).unwrap();
                    gpt.set_threads(1);
                    let mut e = Engine::initialize(cfg, gpt, &comm).unwrap();
                    let micro = e.micro_batch_size();
                    let mut losses = vec![];
                    for step in 0..steps {
                        let r = e
                            .train_batch(|m| dl.micro_batch(step, m, comm.rank(), ws, micro))
                            .unwrap();
                        losses.push(r.loss);
                    }
                    if let Some(d) = save {
                        let store = FsCheckpointStore::new(d).unwrap();
                        e.save_checkpoint(&store, &format!("global_step{steps}"), 4)
                            .unwrap();
                    }
                    (losses, e.gather_full_params().unwrap())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    })
}

fn assert_no_swap_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|p| !p.to_string_lossy().contains("ds-swap-")),
        "swap directories left: {left:?}"
    );
}

#[test]
fn nvme_offload_equals_in_memory_training() {
    for stage in [1u8, 2, 3] {
        for ws in [1usize, 2] {
            for bf16 in [false, true] {
                let places: &[&str] = if stage == 3 {
                    &["opt", "param", "both"]
                } else {
                    &["opt"]
                };
                let dir = tmp(&format!("eq{stage}{ws}{bf16}"));
                let want = run(&cfg(ws, stage, bf16, "none", &dir), ws, 10, None);
                for place in places {
                    let got = run(&cfg(ws, stage, bf16, place, &dir), ws, 10, None);
                    for (r, (w, g)) in want.iter().zip(&got).enumerate() {
                        let ctx = format!("stage {stage} ws {ws} bf16 {bf16} {place} rank {r}");
                        for (a, b) in w.0.iter().zip(&g.0) {
                            assert!(
                                (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                                "{ctx}: losses {:?} vs {:?}",
                                w.0,
                                g.0
                            );
                        }
                        let d =
                            w.1.iter()
                                .zip(&g.1)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0f32, f32::max);
                        assert!(d <= 1e-6, "{ctx}: parameters differ by {d}");
                        assert!(w.0[9] < w.0[0], "{ctx}: the loss did not fall: {:?}", w.0);
                    }
                    assert_no_swap_left(&dir);
                }
                std::fs::remove_dir_all(&dir).ok();
            }
        }
    }
}

/// A checkpoint saved from swap files (stage 3, 2 ranks, both on NVMe) resumes at stage 2 on
/// one rank in memory, and at stage 1 on one rank with the optimizer on NVMe, to the same
/// parameters; the next steps then match a run resumed in memory.
#[test]
fn checkpoints_move_onto_and_off_nvme() {
    let dir = tmp("ckpt");
    let ck = dir.join("ckpt");
    let saved = run(&cfg(2, 3, false, "both", &dir), 2, 3, Some(&ck));
    assert_no_swap_left(&dir);
    let store = FsCheckpointStore::new(&ck).unwrap();
    let ckpt = store.open(None).unwrap();
    let comm = LocalComm::create(1).pop().unwrap();
    let mut params = Vec::new();
    for (stage, place) in [(2u8, "none"), (1, "opt"), (3, "both")] {
        let c = cfg(1, stage, false, place, &dir);
        let gpt = Gpt::new(SHAPE, 99, &Device::Cpu).unwrap();
        let mut e = Engine::initialize(&c, gpt, &comm).unwrap();
        e.load_checkpoint(&ckpt).unwrap();
        assert_eq!(
            e.gather_full_params().unwrap(),
            saved[0].1,
            "stage {stage} {place}: resumed weights"
        );
        let dl = DataLoader::new(BigramLanguage::new(SHAPE.vocab, 1), 1, SHAPE.seq);
        let micro = e.micro_batch_size();
        for step in 3..5 {
            e.train_batch(|m| dl.micro_batch(step, m, comm.rank(), 1, micro))
                .unwrap();
        }
        params.push(e.gather_full_params().unwrap());
    }
    assert_eq!(
        params[0], params[1],
        "stage 1 on NVMe continues as in memory"
    );
    assert_eq!(
        params[0], params[2],
        "stage 3 on NVMe continues as in memory"
    );
    assert_ne!(params[0], saved[0].1, "the resumed runs trained");
    std::fs::remove_dir_all(&dir).ok();
}
