//! ZeRO-Infinity through the `ds` command: the NVMe placements in `estimate-memory`, the
//! `bench offload` contract, and a training run killed mid-run (SIGKILL) that resumes from its
//! last checkpoint (the swap files are scratch, never the only copy of committed state; the
//! dead run's swap directory is removed by the next run).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ds(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ds"))
        .args(args)
        .output()
        .expect("run ds")
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ds-cli-nvme-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn json(out: &Output) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

/// 1e9 fp32 parameters at stage 3 on one rank (Adam): the estimate's 20 GB, then 12 GB of
/// master weights and moments moved to disk, read and written once a step.
#[test]
fn estimate_memory_places_on_nvme() {
    let v = json(&ds(&[
        "estimate-memory",
        "--params",
        "1e9",
        "--stage",
        "3",
        "--precision",
        "fp32",
        "--offload-optimizer",
        "nvme",
        "--json",
    ]));
    assert_eq!(v["per_rank_bytes"], 20_000_000_000u64);
    assert_eq!(v["memory_bytes"], 8_000_000_000u64);
    assert_eq!(v["disk_bytes"], 12_000_000_000u64);
    assert_eq!(v["disk_read_bytes_per_step"], 12_000_000_000u64);
    assert_eq!(v["disk_write_bytes_per_step"], 12_000_000_000u64);
    let out = ds(&[
        "estimate-memory",
        "--params",
        "1e9",
        "--stage",
        "2",
        "--offload-param",
        "nvme",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stage 3"));
}

#[test]
fn bench_offload_json_contract() {
    let d = dir("bench");
    let v = json(&ds(&[
        "bench",
        "offload",
        "--path",
        d.to_str().unwrap(),
        "--numel",
        "1M",
        "--chunk",
        "256K",
        "--steps",
        "1",
        "--json",
    ]));
    for k in [
        "step_s",
        "swap_GBps",
        "disk_read_GBps",
        "disk_write_GBps",
        "disk_fraction",
        "update_only_s",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {v}");
    }
    assert_eq!(v["step_bytes_each_way"], 12_000_000u64);
    // Nothing left behind.
    let left: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    std::fs::remove_dir_all(&d).ok();
}

fn swap_dirs(p: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("ds-swap-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_offloaded_run_resumes_from_its_checkpoint() {
    let d = dir("kill");
    let swap = d.join("swap");
    let out = d.join("run");
    let cfg = d.join("cfg.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"train_batch_size": 4, "steps_per_print": null,
               "optimizer": {{"type": "AdamW", "params": {{"lr": 0.003}}}},
               "zero_optimization": {{"stage": 3, "sub_group_size": 4096,
                 "offload_optimizer": {{"device": "nvme", "nvme_path": "{s}", "pipeline_read": true, "pipeline_write": true}},
                 "offload_param": {{"device": "nvme", "nvme_path": "{s}", "max_in_cpu": 1000}}}}}}"#,
            s = swap.display()
        ),
    )
    .unwrap();
    let common = [
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--world-size",
        "1",
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--seq",
        "16",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds"))
        .args(common)
        .args(["--steps", "100000", "--save-interval", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !out.join("latest").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mid-run, swap files open: SIGKILL (nothing can clean up).
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        swap_dirs(&swap).len(),
        1,
        "the killed run's swap directory is left"
    );
    let tag = std::fs::read_to_string(out.join("latest")).unwrap();
    let at: u64 = tag
        .trim()
        .trim_start_matches("global_step")
        .parse()
        .unwrap();
    assert!(at >= 3 && at.is_multiple_of(3), "{tag}");
    let total = (at + 2).to_string();
    let v = json(&ds(&[
        &common[..],
        &["--resume", "--steps", &total, "--json"],
    ]
    .concat()));
    assert_eq!(v["steps"], 2, "resumed from step {at} to {total}: {v}");
    assert!(v["final_loss"].as_f64().is_some_and(f64::is_finite), "{v}");
    assert!(
        v["swap"]["bytes_read"].as_u64().is_some_and(|b| b > 0),
        "{v}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("latest")).unwrap().trim(),
        format!("global_step{total}")
    );
    assert!(
        swap_dirs(&swap).is_empty(),
        "the dead run's swap directory and this run's are removed: {:?}",
        swap_dirs(&swap)
    );
    std::fs::remove_dir_all(&d).ok();
}
