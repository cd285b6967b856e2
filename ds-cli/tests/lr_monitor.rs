//! `csv_monitor`'s `Train/Samples/lr` column written by `ds train`, for each of DeepSpeed's
//! five schedulers, against values computed here from DeepSpeed's formulas
//! (`deepspeed/runtime/lr_schedules.py`), independently of `ds_engine::lr`.
//!
//! DeepSpeed's `engine.step()` steps the scheduler inside `_take_model_step`, adds
//! `train_batch_size` to `global_samples`, and only then writes
//! `("Train/Samples/lr", get_lr()[0], global_samples)`: after optimizer step `k` (1-based), the
//! row at `k * train_batch_size` samples holds the rate at `last_batch_iteration = k - 1`, the
//! rate the next step uses.

use std::f64::consts::PI;
use std::path::PathBuf;
use std::process::Command;

/// Train batch size of the runs (one rank, micro-batch 2, no accumulation).
const TBS: u64 = 2;
const STEPS: u64 = 6;

/// DeepSpeed's rate at `last_batch_iteration = t` (t >= 0) for each scheduler of the configs
/// below.
fn expected(kind: &str, t: i64) -> f64 {
    let tf = t as f64;
    match kind {
        // warmup_min_lr 0.001, warmup_max_lr 0.01, warmup_num_steps 4, linear.
        "WarmupLR" => {
            let gamma = if t < 4 { tf / 4.0 } else { 1.0 };
            0.001 + (0.01 - 0.001) * gamma
        }
        // warmup 0 -> 0.01 over 2 steps (log), then linear decay to 0 at total_num_steps 5.
        "WarmupDecayLR" => {
            let gamma = if t < 2 {
                (tf + 1.0).ln() / 2f64.ln()
            } else {
                ((5.0 - tf) / (5.0f64 - 2.0).max(1.0)).max(0.0)
            };
            0.01 * gamma
        }
        // optimizer lr 0.02; warmup_min_ratio 0.1 over 2 steps (linear), then cosine to
        // cos_min_ratio 0.01 at total_num_steps 6.
        "WarmupCosineLR" => {
            let ratio = if t < 2 {
                0.1 + (tf / 2.0) * (1.0 - 0.1)
            } else {
                let real_last = tf - 2.0 + 1.0;
                let real_total = 6.0 - 2.0;
                let r = (1.0 + (PI * real_last / real_total).cos()) / 2.0;
                (0.01 + (1.0 - 0.01) * r).max(0.0)
            };
            0.02 * ratio
        }
        // cycle 0.001 -> 0.01 -> 0.001 over 2 + 2 steps, then decay_lr_rate 0.5 every step.
        "OneCycle" => {
            let total = 4.0;
            if t < 4 {
                let b = tf + 1.0;
                let cycle = (1.0 + b / total).floor();
                let x = 1.0 + b / total - cycle;
                let ratio = 2.0 / total;
                let scale = if x <= ratio {
                    x / ratio
                } else {
                    (x - 1.0) / (ratio - 1.0)
                };
                0.001 + (0.01 - 0.001) * scale
            } else {
                let decay_interval = (tf - total + 1.0) / 1.0;
                0.001 / (1.0 + 0.5 * decay_interval)
            }
        }
        // min 0.001, step size 2, rate 0.5, staircase.
        "LRRangeTest" => 0.001 * (1.0 + 0.5 * ((tf + 1.0) / 2.0).floor()),
        other => panic!("{other}"),
    }
}

fn config(kind: &str, dir: &std::path::Path) -> PathBuf {
    let params = match kind {
        "WarmupLR" => {
            r#"{"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 4, "warmup_type": "linear"}"#
        }
        "WarmupDecayLR" => {
            r#"{"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 2, "total_num_steps": 5, "warmup_type": "log"}"#
        }
        "WarmupCosineLR" => {
            r#"{"warmup_min_ratio": 0.1, "warmup_num_steps": 2, "total_num_steps": 6, "cos_min_ratio": 0.01, "warmup_type": "linear"}"#
        }
        "OneCycle" => {
            r#"{"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 2, "cycle_second_step_size": 2, "decay_lr_rate": 0.5, "decay_step_size": 1}"#
        }
        "LRRangeTest" => {
            r#"{"lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 2, "lr_range_test_step_rate": 0.5, "lr_range_test_staircase": true}"#
        }
        other => panic!("{other}"),
    };
    let text = format!(
        r#"{{"train_batch_size": {TBS}, "steps_per_print": null,
            "optimizer": {{"type": "AdamW", "params": {{"lr": 0.02}}}},
            "scheduler": {{"type": "{kind}", "params": {params}}},
            "csv_monitor": {{"enabled": true, "output_path": "{}", "job_name": "{kind}"}}}}"#,
        dir.display()
    );
    let p = dir.join(format!("{kind}.json"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn lr_column_matches_deepspeed_for_every_scheduler() {
    let dir = std::env::temp_dir().join(format!("ds-lr-monitor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for kind in [
        "WarmupLR",
        "WarmupDecayLR",
        "WarmupCosineLR",
        "OneCycle",
        "LRRangeTest",
    ] {
        let cfg = config(kind, &dir);
        let out = Command::new(env!("CARGO_BIN_EXE_ds"))
            .args(["train", "--config", cfg.to_str().unwrap()])
            .args(["--world-size", "1", "--steps", &STEPS.to_string()])
            .args(["--layers", "1", "--hidden", "16", "--heads", "2"])
            .args(["--seq", "8", "--vocab", "16", "--task", "bigram", "--json"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{kind}: {err}");
        let csv = std::fs::read_to_string(dir.join(kind).join("Train_Samples_lr.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows[0], "step,lr", "{kind}: {csv}");
        assert_eq!(rows.len() as u64, STEPS + 1, "{kind}: {csv}");
        for (k, row) in (1..).zip(&rows[1..]) {
            let (samples, lr) = row.split_once(',').unwrap();
            assert_eq!(samples.parse::<u64>().unwrap(), k * TBS, "{kind}: {row}");
            let lr: f64 = lr.parse().unwrap();
            let want = expected(kind, k as i64 - 1);
            assert!(
                (lr - want).abs() <= 1e-12 * want.abs().max(1e-3),
                "{kind}: row {k} ({row}): DeepSpeed writes {want} (the rate after the scheduler's step {k})"
            );
        }
        // The rate changes over these steps: a column one step late would differ.
        assert!(
            (expected(kind, 0) - expected(kind, 1)).abs() > 1e-6,
            "{kind}: the schedule must move between the first steps for this test to bite"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
