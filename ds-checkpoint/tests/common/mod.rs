#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use ds_checkpoint::*;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory for one test.
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ds-ckpt-test-{}-{}-{}",
        name,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Uneven parameter shapes: 53 elements in all (odd, like DeepSpeed's zero_to_fp32 test).
pub fn params() -> Vec<ParamSpec> {
    contiguous_params([
        ("embed.weight", vec![4, 5]),
        ("h0.ln.bias", vec![3]),
        ("h0.fc.weight", vec![5, 5]),
        ("head.bias", vec![5]),
    ])
}

/// Deterministic, distinct values for buffer `salt`.
pub fn flat(numel: usize, salt: u32) -> Vec<f32> {
    (0..numel)
        .map(|i| (i as f32 + 0.25) * (1.0 + salt as f32) - 3.0 * salt as f32)
        .collect()
}

/// DeepSpeed-style padded split: chunk = ceil(numel / ws), rank r owns [r*chunk, (r+1)*chunk).
pub fn padded_ranges(numel: usize, ws: usize) -> Vec<std::ops::Range<usize>> {
    let chunk = numel.div_ceil(ws);
    (0..ws).map(|r| r * chunk..(r + 1) * chunk).collect()
}

/// Buffer over `range` of `full`, zero past its end (padding).
pub fn slice_padded(full: &[f32], range: std::ops::Range<usize>) -> Vec<f32> {
    range.map(|i| full.get(i).copied().unwrap_or(0.0)).collect()
}

pub fn meta(world_size: usize, stage: u8, step: u64) -> CheckpointMeta {
    CheckpointMeta {
        world_size,
        zero_stage: stage,
        dtype: "fp32".into(),
        params: params(),
        training: TrainingState {
            global_step: step,
            skipped_steps: 2,
            global_samples: step * 32,
            lr_scheduler: serde_json::json!({"kind": "WarmupLR", "last_batch_iteration": step}),
            loss_scaler: serde_json::json!({"cur_scale": 65536.0, "cur_iter": step, "hysteresis": 2}),
            rng: serde_json::json!({"seed": 1234, "offset": [1, 2, 3]}),
            data_sampler: serde_json::json!({"epoch": 1, "index": 77}),
            client_state: serde_json::json!({"note": "hello", "best_loss": 1.5}),
        },
    }
}

pub const BUFFERS: [&str; 3] = [MASTER_BUFFER, "exp_avg", "exp_avg_sq"];

/// Saves buffers `BUFFERS` (salt = index) split over `ranges` (one per rank).
pub fn save_split(
    store: &FsCheckpointStore,
    tag: &str,
    m: &CheckpointMeta,
    ranges: &[std::ops::Range<usize>],
    with_weights: bool,
) -> Result<()> {
    let n = m.numel();
    let fulls: Vec<Vec<f32>> = (0..BUFFERS.len()).map(|s| flat(n, s as u32)).collect();
    let slices: Vec<Vec<Vec<f32>>> = ranges
        .iter()
        .map(|r| fulls.iter().map(|f| slice_padded(f, r.clone())).collect())
        .collect();
    let shards = ranges
        .iter()
        .enumerate()
        .map(|(rank, r)| {
            let mut s = RankShard::new(rank, r.clone(), m.training.global_step);
            for (b, name) in BUFFERS.iter().enumerate() {
                s = s.with_buffer(*name, &slices[rank][b]);
            }
            s
        })
        .collect();
    let weights: Option<Weights<'_>> = with_weights.then(|| {
        m.params
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    std::borrow::Cow::Owned(fulls[0][p.range()].to_vec()),
                )
            })
            .collect()
    });
    store.save(
        tag,
        &SaveRequest {
            meta: m.clone(),
            weights,
            shards,
            save_latest: true,
        },
    )
}
