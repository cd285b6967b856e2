//! The `ds` binary's contract: exit 0 with only JSON on stdout, exit 2 with the reason on
//! stderr, never a panic (exit 101).

use std::path::PathBuf;
use std::process::{Command, Output};

fn ds(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ds"))
        .args(args)
        .output()
        .expect("run ds")
}

fn tmp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ds-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_prints_the_resolved_config() {
    let p = tmp(
        "ok.json",
        r#"{"train_batch_size": 32, "zero_optimization": {"stage": 2, "cpu_offload": true}, "fp16": {"enabled": true}}"#,
    );
    let out = ds(&["check-config", p.to_str().unwrap(), "--world-size", "4"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(v["train_batch_size"], 32);
    assert_eq!(v["train_micro_batch_size_per_gpu"], 8);
    assert_eq!(v["gradient_accumulation_steps"], 1);
    assert_eq!(v["zero_optimization"]["stage"], 2);
    assert_eq!(v["zero_optimization"]["offload_optimizer"]["device"], "cpu");
    assert_eq!(v["fp16"]["initial_scale_power"], 16);
    assert_eq!(v["fp16"]["loss_scale_window"], 1000);
    assert_eq!(v["bf16"]["enabled"], false);
    assert_eq!(v["gradient_clipping"], 1.0);
    assert!(v["optimizer"].is_null() && v["scheduler"].is_null());
    // The deprecation note goes to stderr, never stdout.
    assert!(String::from_utf8_lossy(&out.stderr).contains("deprecated"));
}

#[test]
fn check_config_toml_and_auto_values() {
    let p = tmp("ok.toml", "train_batch_size = \"auto\"\ntrain_micro_batch_size_per_gpu = \"auto\"\n[optimizer]\ntype = \"AdamW\"\n");
    let out = ds(&[
        "check-config",
        p.to_str().unwrap(),
        "--world-size",
        "2",
        "--auto",
        "train_micro_batch_size_per_gpu=3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["train_batch_size"], 6);
    assert_eq!(v["optimizer"]["type"], "AdamW");
}

#[test]
fn check_config_bad_config_exits_2_with_the_key_path() {
    let p = tmp(
        "bad.json",
        r#"{"train_batch_size": 33, "train_micro_batch_size_per_gpu": 17, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 4}}"#,
    );
    let out = ds(&["check-config", p.to_str().unwrap(), "--world-size", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("33 != 17 * 2 * 2"), "{err}");
    assert!(err.contains("zero_optimization.stage"), "{err}");
}

#[test]
fn bad_invocations_exit_2_never_101() {
    for args in [
        vec!["check-config", "/nonexistent/ds_config.json"],
        vec!["check-config"],
        vec!["check-config", "x.json", "--world-size", "0"],
        vec!["check-config", "x.json", "--world-size", "many"],
        vec!["no-such-subcommand"],
    ] {
        let out = ds(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    let p = tmp(
        "syntax.json",
        "{\n \"train_batch_size\": CONFIG_BATCH_SIZE\n}",
    );
    let out = ds(&["check-config", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
    let out = ds(&["check-config", p.to_str().unwrap(), "--auto", "novalue"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn train_json_contract() {
    let out = ds(&[
        "train",
        "--steps",
        "3",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--seq",
        "8",
        "--vocab",
        "32",
        "--world-size",
        "2",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    for key in [
        "steps",
        "final_loss",
        "median_step_ms",
        "tokens_per_s",
        "skipped_steps",
        "peak_bytes_per_rank",
        "checkpoint_dir",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["steps"], 3);
    assert_eq!(v["skipped_steps"], 0);
    let loss = v["final_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0 && loss < 5.0, "{loss}");
    // Refusals exit 2 with the reason.
    for args in [
        vec!["train", "--resume"], // --resume without --out
        vec!["train", "--backend", "mpi", "--steps", "1"],
        vec!["train", "--hidden", "30", "--heads", "4"],
    ] {
        let out = ds(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let p = tmp(
        "fp16.json",
        r#"{"train_batch_size": 4, "optimizer": {"type": "Adam"}, "fp16": {"enabled": true}, "communication_data_type": "bf16"}"#,
    );
    let out = ds(&["train", "--config", p.to_str().unwrap(), "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("communication_data_type"));
}

#[test]
fn estimate_memory_json_contract() {
    let out = ds(&[
        "estimate-memory",
        "--params",
        "7.5e9",
        "--world-size",
        "64",
        "--stage",
        "3",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // ZeRO paper: 7.5B params, 64 GPUs, stage 3 = 16 * 7.5e9 / 64 bytes = 1.875 GB.
    assert_eq!(v["per_rank_bytes"], 1_875_000_000u64);
    assert_eq!(
        v["params_bytes"].as_u64().unwrap()
            + v["grads_bytes"].as_u64().unwrap()
            + v["optimizer_bytes"].as_u64().unwrap(),
        1_875_000_000
    );
    let out = ds(&["estimate-memory", "--params", "1000", "--stage", "4"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bench_adamw_json_contract() {
    let out = ds(&[
        "bench", "adamw", "--numel", "100000", "--steps", "2", "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["ms_per_step", "GBps", "machine_GBps", "bandwidth_fraction"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
}

#[test]
fn train_on_a_text_file() {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    let p = tmp("corpus.txt", &text);
    let out = ds(&[
        "train",
        "--data",
        p.to_str().unwrap(),
        "--steps",
        "2",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--seq",
        "16",
        "--vocab",
        "256",
        "--world-size",
        "1",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["data_entropy"].is_null());
    // Bytes need a vocabulary of at least 256.
    let out = ds(&[
        "train",
        "--data",
        p.to_str().unwrap(),
        "--steps",
        "1",
        "--vocab",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vocab"));
}

#[test]
fn bench_comm_json_contract() {
    let out = ds(&[
        "bench",
        "comm",
        "--world-size",
        "2",
        "--sizes",
        "4K,64K",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["memcpy_GBps"].as_f64().is_some_and(|x| x > 0.0));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 6); // 3 ops x 2 sizes
    for r in results {
        for key in ["op", "bytes", "time_ms", "algbw_GBps", "busbw_GBps"] {
            assert!(r.get(key).is_some(), "missing {key}: {r}");
        }
        // DeepSpeed's formulas (comms logger): all_reduce algbw = 2S/t, busbw = S/t * 2(n-1)/n;
        // gathers/scatters algbw = nS/t, busbw = algbw (n-1)/n: at n = 2, busbw = algbw / 2.
        let alg = r["algbw_GBps"].as_f64().unwrap();
        let bus = r["busbw_GBps"].as_f64().unwrap();
        let want = alg / 2.0;
        assert!((bus - want).abs() <= 1e-9 * want.max(1.0), "{r}");
    }
    let out = ds(&["bench", "comm", "--op", "bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bench_ckpt_act_json_contract_and_ckpt_training_is_identical() {
    let out = ds(&[
        "bench", "ckpt-act", "--layers", "4", "--hidden", "32", "--heads", "2", "--seq", "32",
        "--batch", "4", "--vocab", "64", "--steps", "1", "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "peak_bytes_without",
        "peak_bytes_with",
        "step_ms_without",
        "step_ms_with",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    // Checkpointing keeps fewer activations.
    assert!(
        v["peak_bytes_with"].as_u64() < v["peak_bytes_without"].as_u64(),
        "{v}"
    );
    // Training with every block checkpointed gives the same losses.
    let flags = [
        "train", "--steps", "3", "--layers", "2", "--hidden", "16", "--heads", "2", "--seq", "8",
        "--vocab", "32", "--json",
    ];
    let plain: serde_json::Value = serde_json::from_slice(&ds(&flags).stdout).unwrap();
    let mut with = flags.to_vec();
    with.push("--ckpt");
    let ckpt: serde_json::Value = serde_json::from_slice(&ds(&with).stdout).unwrap();
    assert_eq!(plain["losses"], ckpt["losses"]);
    // With dropout on, too (the recompute draws the same masks); and dropout changes the run.
    let mut drop = flags.to_vec();
    drop.extend(["--dropout", "0.1"]);
    let d_plain: serde_json::Value = serde_json::from_slice(&ds(&drop).stdout).unwrap();
    drop.push("--ckpt");
    let d_ckpt: serde_json::Value = serde_json::from_slice(&ds(&drop).stdout).unwrap();
    assert_eq!(d_plain["losses"], d_ckpt["losses"]);
    assert_ne!(d_plain["losses"], plain["losses"]);
}

#[test]
fn profile_json_contract() {
    let out = ds(&[
        "profile", "--layers", "2", "--hidden", "16", "--heads", "2", "--seq", "8", "--vocab",
        "32", "--batch", "2", "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["flops", "macs", "params", "fwd_latency_ms", "modules"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    // DeepSpeed's rules, analytically (see model.rs): b=2, t=8, d=16, v=32, h=2, 2 layers.
    let (b, t, d, vo, h) = (2u64, 8u64, 16u64, 32u64, 2u64);
    let per_block =
        2 * b * t * 12 * d * d + 4 * b * t * t * d + b * h * t * t + 10 * b * t * d + 4 * b * t * d;
    assert_eq!(
        v["flops"],
        2 * per_block + 5 * b * t * d + 2 * b * t * d * vo
    );
    assert_eq!(v["modules"][0]["type"], "GPT");
    let text = ds(&[
        "profile", "--layers", "1", "--hidden", "16", "--heads", "2", "--seq", "8", "--vocab", "32",
    ]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("DeepSpeed Flops Profiler"));
}

fn losses(out: &Output) -> Vec<f64> {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Train N+M == train N, save, resume, train M: bit-identical at the same world size and stage;
/// within fp32 rounding after resharding to another world size and stage.
#[test]
fn train_save_resume_exact_and_resharded() {
    let dir = std::env::temp_dir().join(format!("ds-cli-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let model = [
        "--layers", "1", "--hidden", "16", "--heads", "2", "--seq", "8", "--vocab", "32", "--json",
    ];
    let cfg = |stage: u8| {
        tmp(
            &format!("resume{stage}.json"),
            &format!(
                r#"{{"train_batch_size": 12, "optimizer": {{"type": "AdamW", "params": {{"lr": 0.001}}}},
                   "scheduler": {{"type": "WarmupDecayLR", "params": {{"warmup_num_steps": 2, "total_num_steps": 10}}}},
                   "zero_optimization": {{"stage": {stage}}}}}"#
            ),
        )
    };
    let run = |stage: u8, ws: &str, steps: &str, extra: &[&str]| {
        let c = cfg(stage);
        let mut a = vec![
            "train",
            "--config",
            c.to_str().unwrap(),
            "--world-size",
            ws,
            "--steps",
            steps,
        ];
        a.extend_from_slice(&model);
        a.extend_from_slice(extra);
        losses(&ds(&a))
    };
    let straight = run(2, "2", "6", &[]);
    let first = run(2, "2", "3", &["--out", d]);
    assert_eq!(first[..], straight[..3]);
    // --steps is the total: the resumed run trains steps 4-6.
    let resumed = run(2, "2", "6", &["--out", d, "--resume"]);
    assert_eq!(
        resumed[..],
        straight[3..],
        "same world size and stage: bit-identical"
    );
    assert!(dir.join("latest").exists() && dir.join("global_step6").exists());
    // Saved by 2 ranks at stage 2 (after step 3), resumed on 3 ranks at stage 1.
    let _ = std::fs::remove_dir_all(&dir);
    run(2, "2", "3", &["--out", d]);
    let straight3 = run(1, "3", "6", &[]);
    let resharded = run(1, "3", "6", &["--out", d, "--resume"]);
    for (a, b) in resharded.iter().zip(&straight3[3..]) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{resharded:?} vs {:?}",
            &straight3[3..]
        );
    }
    // Nothing to resume: a clear error.
    let empty = std::env::temp_dir().join(format!("ds-cli-empty-{}", std::process::id()));
    let mut a = vec![
        "train",
        "--steps",
        "1",
        "--out",
        empty.to_str().unwrap(),
        "--resume",
    ];
    a.extend_from_slice(&model);
    let out = ds(&a);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}

/// `ds consolidate`: one safetensors file of full weights, loadable by candle, equal to what
/// the run trained (the checkpoint's model file) in f32, and within bf16 rounding in bf16.
#[test]
fn consolidate_contract() {
    let dir = std::env::temp_dir().join(format!("ds-cli-consol-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let out = ds(&[
        "train", "--steps", "2", "--layers", "1", "--hidden", "16", "--heads", "2", "--seq", "8",
        "--vocab", "32", "--out", d, "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f32_path = dir.join("full.safetensors");
    let out = ds(&["consolidate", d, f32_path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = candle_core::safetensors::load(&f32_path, &candle_core::Device::Cpu).unwrap();
    assert_eq!(w.len(), 2 + 12 + 2); // wte, wpe, one block, ln_f
    assert_eq!(w["wte.weight"].dims(), &[32, 16]);
    let bf = dir.join("full_bf16.safetensors");
    let out = ds(&[
        "consolidate",
        d,
        bf.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--tag",
        "global_step2",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let b = candle_core::safetensors::load(&bf, &candle_core::Device::Cpu).unwrap();
    assert_eq!(b["wte.weight"].dtype(), candle_core::DType::BF16);
    let x = w["wte.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let y = b["wte.weight"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(x
        .iter()
        .zip(&y)
        .all(|(a, c)| (a - c).abs() <= a.abs() / 128.0 + 1e-6));
    // A tag that does not exist: a clear error, exit 2.
    let out = ds(&[
        "consolidate",
        d,
        f32_path.to_str().unwrap(),
        "--tag",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// CRC32 (IEEE, reflected, polynomial 0xEDB88320), bit by bit: an implementation independent
/// of the library's.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Recomputes a manifest's `manifest_crc32` after an edit, by the documented rule (the CRC32
/// of the file without its second line, `  "manifest_crc32": "<8 hex digits>",`): how a
/// deliberate hand edit is made loadable.
fn reseal_manifest(path: &std::path::Path) {
    const SEAL: &[u8] = b"{\n  \"manifest_crc32\": \"";
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(SEAL),
        "manifest without its checksum line"
    );
    let mut body = b"{\n".to_vec();
    body.extend_from_slice(&bytes[SEAL.len() + 8 + 3..]);
    let mut out = format!("{{\n  \"manifest_crc32\": \"{:08x}\",\n", crc32(&body)).into_bytes();
    out.extend_from_slice(&body[2..]);
    std::fs::write(path, out).unwrap();
}

/// Copies a checkpoint directory tree (files and directories only).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `ds consolidate` on a checkpoint that lies (an edited manifest byte, an edited parameter
/// offset, a deleted parameter entry, a corrupt byte of optimizer state it does not copy)
/// exits 2 naming the file or the parameter, and writes nothing; the untouched copy
/// consolidates.
#[test]
fn consolidate_refuses_checkpoints_that_lie() {
    let dir = std::env::temp_dir().join(format!("ds-cli-lie-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = dir.join("run");
    // About 660,000 parameters on one rank: its file (master, exp_avg, exp_avg_sq; 7.9 MB)
    // spans 2 blocks of 4 MiB, so a byte of exp_avg_sq lies in a block that opening and copying the master
    // weights never read.
    let flags = [
        "--world-size",
        "1",
        "--layers",
        "2",
        "--hidden",
        "128",
        "--heads",
        "2",
        "--seq",
        "8",
        "--vocab",
        "2048",
    ];
    let mut args = vec![
        "train",
        "--steps",
        "1",
        "--out",
        src.to_str().unwrap(),
        "--json",
    ];
    args.extend(flags);
    let out = ds(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tag = "global_step1";
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join(tag).join("manifest.json")).unwrap())
            .unwrap();
    let p3 = manifest["meta"]["params"][3]["name"]
        .as_str()
        .unwrap()
        .to_string();
    type Tamper = Box<dyn Fn(&std::path::Path)>;
    let edit = |f: Box<dyn Fn(&mut serde_json::Value)>| -> Tamper {
        Box::new(move |t: &std::path::Path| {
            let m = t.join("manifest.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        })
    };
    let cases: Vec<(&str, Tamper, Vec<String>)> = vec![
        ("untouched", Box::new(|_: &std::path::Path| {}), vec![]),
        (
            "manifest byte",
            Box::new(|t: &std::path::Path| {
                let m = t.join("manifest.json");
                let s = std::fs::read_to_string(&m).unwrap();
                assert!(s.contains("\"dtype\": \"fp32\""));
                std::fs::write(
                    &m,
                    s.replacen("\"dtype\": \"fp32\"", "\"dtype\": \"fp33\"", 1),
                )
                .unwrap();
            }),
            vec!["manifest.json".into(), "manifest_crc32".into()],
        ),
        (
            "param offset",
            edit(Box::new(|v| {
                let o = v["meta"]["params"][3]["offset"].as_u64().unwrap();
                v["meta"]["params"][3]["offset"] = (o + 1).into();
            })),
            vec![format!("\"{p3}\"")],
        ),
        (
            "deleted param",
            edit(Box::new(|v| {
                v["meta"]["params"].as_array_mut().unwrap().remove(3);
            })),
            vec![format!("\"{p3}\"")],
        ),
        (
            "corrupt optimizer state",
            Box::new(|t: &std::path::Path| {
                let f = t.join("rank_00000.safetensors");
                let mut b = std::fs::read(&f).unwrap();
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
                let sq = h["exp_avg_sq"]["data_offsets"][0].as_u64().unwrap() as usize;
                let master = h["master"]["data_offsets"][1].as_u64().unwrap() as usize;
                let at = b.len() - 3;
                const BLOCK: usize = 4 << 20;
                assert!(at > 8 + n + sq && at / BLOCK > (8 + n + master) / BLOCK);
                b[at] ^= 0x20;
                std::fs::write(&f, b).unwrap();
            }),
            vec!["rank_00000.safetensors".into()],
        ),
    ];
    for (i, (what, tamper, expect)) in cases.iter().enumerate() {
        let root = dir.join(format!("case{i}"));
        copy_tree(&src, &root);
        tamper(&root.join(tag));
        let dst = dir.join(format!("out{i}.safetensors"));
        let out = ds(&["consolidate", root.to_str().unwrap(), dst.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        if expect.is_empty() {
            assert_eq!(out.status.code(), Some(0), "{what}: {err}");
            assert!(dst.is_file(), "{what}");
            continue;
        }
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        for e in expect {
            assert!(err.contains(e.as_str()), "{what}: {e} not in {err}");
        }
        assert!(!dst.exists(), "{what}: an output was written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// nanoGPT token directory, TensorBoard monitor and loss-curve PNG in one small run; the
/// default addition task reports held-out accuracy keys.
#[test]
fn train_tokens_tensorboard_and_plot() {
    let dir = std::env::temp_dir().join(format!("ds-cli-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toks: Vec<u8> = (0..4000u16).flat_map(|i| (i % 50).to_le_bytes()).collect();
    std::fs::write(dir.join("train.bin"), &toks).unwrap();
    std::fs::write(dir.join("val.bin"), &toks[..800]).unwrap();
    let cfg = tmp(
        "tb.json",
        &format!(
            r#"{{"train_batch_size": 4, "optimizer": {{"type": "AdamW", "params": {{"lr": 0.001}}}},
               "tensorboard": {{"enabled": true, "output_path": "{}", "job_name": "tbjob"}}}}"#,
            dir.join("tb").display()
        ),
    );
    let png = dir.join("loss.png");
    let small = [
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--seq",
        "16",
        "--world-size",
        "2",
    ];
    let mut args = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        dir.to_str().unwrap(),
        "--vocab",
        "64",
        "--steps",
        "3",
        "--plot",
        png.to_str().unwrap(),
        "--json",
    ];
    args.extend(small);
    let out = ds(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["task"], "tokens");
    let val = v["val_loss"].as_f64().unwrap();
    assert!(val.is_finite() && val > 0.0, "{v}");
    assert!(v["val_accuracy"].is_null());
    assert_eq!(v["loss_curve_png"], png.to_str().unwrap());
    // A compressed PNG of the expected size with a drawn plot area, and an SVG beside it.
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() < 100_000, "{} bytes", bytes.len());
    let mut dec = png::Decoder::new(std::io::Cursor::new(&bytes[..]))
        .read_info()
        .unwrap();
    let mut rgb = vec![0; dec.output_buffer_size().unwrap()];
    let info = dec.next_frame(&mut rgb).unwrap();
    assert_eq!((info.width, info.height), (960, 600));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let (w, h) = (info.width as usize, info.height as usize);
    // The plot area (inside the axes and labels): many non-white pixels in many colours.
    let mut colours = std::collections::HashSet::new();
    let mut inked = 0;
    for y in h / 6..h * 5 / 6 {
        for x in w / 8..w * 7 / 8 {
            let p = &rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
            colours.insert([p[0], p[1], p[2]]);
            inked += usize::from(p != [255, 255, 255]);
        }
    }
    assert!(colours.len() > 30, "{} colours", colours.len());
    assert!(inked > 2000, "{inked} non-white pixels");
    let svg = std::fs::read_to_string(png.with_extension("svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("ZeRO stage"),
        "{svg:.300}"
    );
    let tb = v["tensorboard_file"].as_str().unwrap();
    assert!(tb.contains("tbjob/events.out.tfevents."), "{tb}");
    assert!(std::fs::metadata(tb).unwrap().len() > 100);
    // Tokens >= vocab and odd lengths are refused with the file named.
    let mut bad = args.clone();
    bad[6] = "40";
    let out = ds(&bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("train.bin"));
    std::fs::write(dir.join("val.bin"), [0u8; 5]).unwrap();
    let out = ds(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("odd length"));
    // The default task: addition, with held-out accuracy keys.
    let mut add = vec![
        "train", "--steps", "2", "--seq", "32", "--vocab", "16", "--json",
    ];
    add.extend(&small[..6]);
    let out = ds(&add);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["task"], "addition");
    assert_eq!(v["val_problems"], 256); // 2 complete problems per 32-token sequence, 128 sequences
    let acc = v["val_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let floor = v["data_entropy"].as_f64().unwrap();
    assert!(floor > 0.5 && floor < 1.5, "{floor}");
    // --task and --data together are refused; the addition task needs 13 tokens.
    let out = ds(&["train", "--task", "bigram", "--data", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = ds(&["train", "--vocab", "8", "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vocab >= 13"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--model mlp` trains the library's MLP through the same engine (ZeRO-3 here) and refuses
/// what it does not have.
#[test]
fn train_mlp_model() {
    let base = [
        "train",
        "--model",
        "mlp",
        "--task",
        "bigram",
        "--steps",
        "30",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--seq",
        "16",
        "--vocab",
        "32",
        "--world-size",
        "2",
    ];
    let cfg = tmp(
        "mlp.json",
        r#"{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
           "zero_optimization": {"stage": 3}}"#,
    );
    let mut args = base.to_vec();
    args.extend(["--config", cfg.to_str().unwrap(), "--json"]);
    let out = ds(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 2 * V * H + L * (H * H + H) + V parameters.
    assert_eq!(v["params"], 2 * 32 * 32 + (32 * 32 + 32) + 32);
    let losses: Vec<f64> = serde_json::from_value(v["losses"].clone()).unwrap();
    assert!(
        losses[29] < losses[0] - 0.5,
        "{} -> {}",
        losses[0],
        losses[29]
    );
    for extra in [vec!["--ckpt"], vec!["--dropout", "0.1"]] {
        let mut a = base.to_vec();
        a.extend(extra);
        let out = ds(&a);
        assert_eq!(out.status.code(), Some(2));
    }
    let out = ds(&["profile", "--model", "mlp"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `flops_profiler` during training: DeepSpeed's report once, at `profile_step`, with the same
/// forward FLOPs `ds profile` counts for the shape; refused for the MLP (no module tree).
#[test]
fn train_prints_the_flops_profile_once() {
    let shape = [
        "--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64",
    ];
    let cfg = tmp(
        "flops.json",
        r#"{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.001}},
           "flops_profiler": {"enabled": true, "profile_step": 3, "detailed": false}}"#,
    );
    let mut args = vec![
        "train",
        "--task",
        "bigram",
        "--steps",
        "4",
        "--world-size",
        "2",
    ];
    args.extend(shape);
    args.extend(["--config", cfg.to_str().unwrap(), "--json"]);
    let out = ds(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err.matches("Profile Summary at step 3").count(), 1, "{err}");
    assert!(
        err.contains("bwd latency:") && err.contains("step latency:"),
        "{err}"
    );
    // The forward FLOPs equal `ds profile`'s for the same shape and micro-batch.
    let mut p = vec!["profile", "--batch", "4", "--json"];
    p.extend(shape);
    let prof: serde_json::Value = serde_json::from_slice(&ds(&p).stdout).unwrap();
    let flops = prof["flops"].as_f64().unwrap();
    let line = err
        .lines()
        .find(|l| l.starts_with("fwd flops per GPU:"))
        .unwrap_or_else(|| panic!("{err}"));
    let shown = line.split(':').nth(1).unwrap().trim();
    let (num, unit) = shown.split_once(' ').unwrap();
    let scale = match unit {
        "G" => 1e9,
        "M" => 1e6,
        "K" => 1e3,
        _ => 1.0,
    };
    let v: f64 = num.parse::<f64>().unwrap() * scale;
    assert!((v - flops).abs() <= 0.01 * flops, "{shown} vs {flops}");
    // The MLP has no module tree: refused, not ignored.
    let out = ds(&[
        "train",
        "--model",
        "mlp",
        "--task",
        "bigram",
        "--steps",
        "2",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--seq",
        "8",
        "--vocab",
        "16",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flops_profiler"));
}

fn resume_cfg(name: &str, stage: u8, extra: &str) -> std::path::PathBuf {
    tmp(
        name,
        &format!(
            r#"{{"train_batch_size": 12, "optimizer": {{"type": "AdamW", "params": {{"lr": 0.001, "weight_decay": 0.01}}}},
               "scheduler": {{"type": "WarmupDecayLR", "params": {{"warmup_num_steps": 2, "total_num_steps": 10}}}},
               "zero_optimization": {{"stage": {stage}}}{extra}}}"#
        ),
    )
}

fn run_losses(cfg: &std::path::Path, ws: &str, steps: &str, extra: &[&str]) -> Vec<f64> {
    let mut a = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--world-size",
        ws,
        "--steps",
        steps,
        "--layers",
        "2",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--seq",
        "8",
        "--vocab",
        "32",
        "--json",
    ];
    a.extend_from_slice(extra);
    losses(&ds(&a))
}

/// ZeRO-3: train N+M == train N, save, resume, train M bit for bit at the same world size
/// (dropout on: the micro-step that keys its masks is restored); a stage-3 checkpoint of 2 ranks resumes on 3 ranks at stages 1 and 2 within
/// fp32 rounding.
#[test]
fn stage3_save_resume_exact_and_resharded() {
    let dir = std::env::temp_dir().join(format!("ds-cli-s3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let c3 = resume_cfg("s3.json", 3, "");
    let drop = ["--dropout", "0.1"];
    let straight = run_losses(&c3, "2", "6", &drop);
    let first = run_losses(&c3, "2", "3", &["--out", d, "--dropout", "0.1"]);
    assert_eq!(first[..], straight[..3]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("global_step3/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["meta"]["zero_stage"], 3);
    assert!(m["ranks"][1]["segments"].as_array().unwrap().len() > 1);
    let resumed = run_losses(&c3, "2", "6", &["--out", d, "--resume", "--dropout", "0.1"]);
    assert_eq!(resumed[..], straight[3..], "stage 3 ws 2: bit-identical");
    for stage in [1u8, 2] {
        let _ = std::fs::remove_dir_all(&dir);
        run_losses(&c3, "2", "3", &["--out", d]);
        let c = resume_cfg(&format!("s3to{stage}.json"), stage, "");
        // No dropout here: its masks are drawn per rank, so runs at different world sizes
        // would differ anyway; the global batch is the same.
        let straight3 = run_losses(&c, "3", "6", &[]);
        let resharded = run_losses(&c, "3", "6", &["--out", d, "--resume"]);
        for (a, b) in resharded.iter().zip(&straight3[3..]) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "stage 3 ws 2 -> stage {stage} ws 3: {resharded:?} vs {:?}",
                &straight3[3..]
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Decoupled saves (`checkpoint.writer.decoupled`) every step: training is unchanged, every
/// checkpoint is committed, and resuming from the last one is bit-identical.
#[test]
fn decoupled_saves_commit_and_resume_exactly() {
    let dir = std::env::temp_dir().join(format!("ds-cli-async-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    for stage in [2u8, 3] {
        let _ = std::fs::remove_dir_all(&dir);
        let c = resume_cfg(
            &format!("async{stage}.json"),
            stage,
            r#", "checkpoint": {"writer": {"decoupled": true}}"#,
        );
        let straight = run_losses(&c, "2", "6", &[]);
        let first = run_losses(&c, "2", "3", &["--out", d, "--save-interval", "1"]);
        assert_eq!(first[..], straight[..3]);
        for s in 1..=3 {
            assert!(
                dir.join(format!("global_step{s}/manifest.json")).is_file(),
                "stage {stage}: global_step{s} committed"
            );
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("latest")).unwrap(),
            "global_step3"
        );
        let resumed = run_losses(&c, "2", "6", &["--out", d, "--resume"]);
        assert_eq!(resumed[..], straight[3..], "stage {stage}");
    }
    // A mock writer writes nothing: refused, not ignored.
    let c = resume_cfg(
        "mock.json",
        2,
        r#", "checkpoint": {"writer": {"type": "mock"}}"#,
    );
    let out = ds(&["train", "--config", c.to_str().unwrap(), "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint.writer.type"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The GPU path (the GPT on candle autograd, `--autograd`) runs on the CPU device from the CLI
/// and trains as the explicit kernels do (same losses to 3 decimals over the first steps);
/// without CUDA, `--backend nccl` and `--device cuda` say how to get a CUDA build (exit 2) for
/// `train` and `bench comm`, and a malformed `--device` is refused naming what is allowed.
#[test]
fn autograd_path_from_the_cli_and_cuda_without_cuda() {
    let run = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--steps",
            "8",
            "--world-size",
            "2",
            "--layers",
            "1",
            "--hidden",
            "64",
            "--seq",
            "32",
            "--json",
        ];
        a.extend_from_slice(extra);
        let out = ds(&a);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
        v["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let host = run(&[]);
    let dev = run(&["--autograd", "--device", "cpu"]);
    assert_eq!(host.len(), 8);
    for (a, b) in host.iter().zip(&dev) {
        assert!((a - b).abs() < 1e-3, "explicit kernels {a} vs autograd {b}");
    }
    assert!(dev[7] < dev[0], "no progress: {dev:?}");
    if !cfg!(feature = "cuda") {
        for args in [
            &["train", "--backend", "nccl", "--steps", "1"][..],
            &["train", "--device", "cuda:1", "--steps", "1"][..],
            &["bench", "comm", "--backend", "nccl"][..],
        ] {
            let out = ds(args);
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("scripts/cuda-build.sh"), "{args:?}: {err}");
        }
    }
    let out = ds(&["train", "--steps", "0"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--steps 0 reported a NaN loss with exit 0 before"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--steps must be >= 1"));
    let out = ds(&["train", "--device", "gpu0", "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--device gpu0: allowed: cpu, cuda, cuda:N"),
        "{err}"
    );
}

/// The candle-autograd path of `ds train` (what a GPU runs) honours the config's monitors,
/// timers and flops profiler through the one engine: `csv_monitor` rows equal the reported
/// losses at DeepSpeed's sample counts, `wall_clock_breakdown` and `memory_breakdown` print
/// their lines, the flops profile is printed once at `profile_step` with all three latencies,
/// `activation_checkpointing.profile` times the checkpointed block, and ZeRO-3 with
/// `offload_param` trains (the partitions live in host memory on every device).
#[test]
fn autograd_path_monitors_timers_and_offload_param() {
    let dir = std::env::temp_dir().join(format!("ds-cli-devmon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = |zero: &str| {
        tmp(
            &format!("devmon{}.json", zero.len()),
            &format!(
                r#"{{"train_batch_size": 4, "steps_per_print": 2, "wall_clock_breakdown": true,
                   "memory_breakdown": true, "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01}}}},
                   "zero_optimization": {zero},
                   "flops_profiler": {{"enabled": true, "profile_step": 3, "detailed": false}},
                   "activation_checkpointing": {{"profile": true, "number_checkpoints": 1}},
                   "csv_monitor": {{"enabled": true, "output_path": "{}", "job_name": "dev"}}}}"#,
                dir.display()
            ),
        )
    };
    let ok = cfg(r#"{"stage": 2}"#);
    let args = |c: &PathBuf| {
        [
            "train",
            "--config",
            c.to_str().unwrap(),
            "--autograd",
            // one rank: the monitor's rank-0 loss is the reported (rank-mean) loss
            "--world-size",
            "1",
            "--steps",
            "4",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--seq",
            "16",
            "--vocab",
            "16",
            "--json",
        ]
        .map(String::from)
    };
    let out = Command::new(env!("CARGO_BIN_EXE_ds"))
        .args(args(&ok))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let losses: Vec<f64> = v["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 4);
    let csv = std::fs::read_to_string(dir.join("dev/Train_Samples_train_loss.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "step,train_loss");
    assert_eq!(rows.len(), 5, "{csv}");
    for (i, (row, want)) in rows[1..].iter().zip(&losses).enumerate() {
        let (samples, loss) = row.split_once(',').unwrap();
        assert_eq!(samples.parse::<u64>().unwrap(), 4 * (i as u64 + 1), "{row}");
        let loss: f64 = loss.parse().unwrap();
        assert!((loss - want).abs() < 1e-5, "{row} vs {want}");
    }
    // The held-out results of the addition task close the CSV monitor.
    assert!(dir.join("dev/Eval_Samples_val_accuracy.csv").exists());
    // Every 2 steps (steps_per_print): the timers' and the memory line.
    assert_eq!(err.matches("time (ms) | fwd: ").count(), 2, "{err}");
    assert_eq!(
        err.matches("MemAllocated (process RSS)=").count(),
        2,
        "{err}"
    );
    assert_eq!(err.matches("Profile Summary at step 3").count(), 1, "{err}");
    for key in [
        "fwd latency:",
        "bwd latency:",
        "step latency:",
        "fwd flops per GPU:",
    ] {
        assert!(err.contains(key), "{key}: {err}");
    }
    assert_eq!(
        err.matches("checkpoint profile | block 0 | forward: ")
            .count(),
        2,
        "{err}"
    );
    let bad = cfg(r#"{"stage": 3, "offload_param": {"device": "cpu"}}"#);
    let out = Command::new(env!("CARGO_BIN_EXE_ds"))
        .args(args(&bad))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("zero_optimization.offload_param"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--steps` is the total step count: a resumed run trains up to it (re-running an
/// interrupted job's own command line ends where it was meant to), and one whose checkpoint is
/// already there, or that a corrupt manifest puts near 2^64, is refused (exit 2) instead of
/// wrapping the step counter.
#[test]
fn steps_is_the_total_on_resume() {
    let dir = std::env::temp_dir().join(format!("ds-cli-gstep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let flags = [
        "--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64", "--json",
    ];
    let run = |steps: &str, resume: bool| {
        let mut a = vec!["train", "--steps", steps, "--out", d];
        if resume {
            a.push("--resume");
        }
        a.extend(flags);
        ds(&a)
    };
    let out = run("2", false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("5", true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"], 3, "steps 3-5 of 5");
    assert_eq!(v["losses"].as_array().unwrap().len(), 3);
    assert!(dir.join("global_step5").exists());
    let out = run("5", true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("already at step 5: nothing to train"), "{err}");
    let m = dir.join("global_step5/manifest.json");
    let text = std::fs::read_to_string(&m).unwrap();
    assert!(text.contains("\"global_step\": 5"), "{text}");
    std::fs::write(
        &m,
        text.replace(
            "\"global_step\": 5",
            "\"global_step\": 18446744073709551614",
        ),
    )
    .unwrap();
    // A deliberate edit: resealed, or the manifest's checksum refuses it first.
    reseal_manifest(&m);
    let out = run("6", true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nothing to train"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--data` naming a device or FIFO (read without end before) is refused at once, naming it.
#[test]
fn data_that_is_a_stream_is_refused() {
    let out = ds(&["train", "--data", "/dev/zero", "--steps", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--data /dev/zero: not a regular file"),
        "{err}"
    );
}

/// `--out DIR` over an existing run without `--resume` is refused (it replaced the run's
/// checkpoints and `latest` silently before); `--overwrite` replaces it; both flags conflict.
#[test]
fn out_over_an_existing_run_needs_resume_or_overwrite() {
    let dir = std::env::temp_dir().join(format!("ds-cli-overwrite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec![
            "train", "--steps", "1", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq",
            "16", "--vocab", "64", "--out", d,
        ];
        a.extend_from_slice(extra);
        ds(&a)
    };
    assert_eq!(run(&[]).status.code(), Some(0));
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("already holds a run") && err.contains("global_step1"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap(),
        "global_step1",
        "the refused run left the checkpoint alone"
    );
    assert_eq!(run(&["--overwrite"]).status.code(), Some(0));
    // (--steps is the total: resuming at step 1 with --steps 1 has nothing to train.)
    assert_eq!(run(&["--resume"]).status.code(), Some(2));
    let a = [
        "train", "--steps", "2", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "16",
        "--vocab", "64", "--out", d, "--resume",
    ];
    assert_eq!(ds(&a).status.code(), Some(0));
    assert_eq!(run(&["--resume", "--overwrite"]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint resumed with another head count (same parameter shapes) is refused naming
/// both configurations; it resumed silently as a different model before.
#[test]
fn resume_with_other_heads_is_refused() {
    let dir = std::env::temp_dir().join(format!("ds-cli-heads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let run = |steps: &str, heads: &str, resume: bool| {
        let mut a = vec![
            "train", "--steps", steps, "--layers", "1", "--hidden", "32", "--heads", heads,
            "--seq", "16", "--vocab", "64", "--out", d,
        ];
        if resume {
            a.push("--resume");
        }
        ds(&a)
    };
    assert_eq!(run("1", "2", false).status.code(), Some(0));
    let out = run("2", "4", true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"heads\":2") && err.contains("\"heads\":4"),
        "{err}"
    );
    assert_eq!(run("2", "2", true).status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--keep-last N` (and the config's `checkpoint.keep_last`) keeps the newest N checkpoints of
/// a run: with a save every step, only they remain, `latest` names the newest, and the run
/// resumes from it; 0 is refused.
#[test]
fn keep_last_keeps_the_newest_checkpoints() {
    let dir = std::env::temp_dir().join(format!("ds-cli-keep-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let base = [
        "train",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--seq",
        "16",
        "--vocab",
        "64",
        "--out",
        d,
        "--save-interval",
        "1",
    ];
    let tags = || {
        let mut t: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("global_step"))
            .collect();
        t.sort();
        t
    };
    let _ = std::fs::remove_dir_all(&dir);
    let mut a = base.to_vec();
    a.extend(["--steps", "4", "--keep-last", "2"]);
    let out = ds(&a);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tags(), ["global_step3", "global_step4"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap(),
        "global_step4"
    );
    // The config key, on resume.
    let c = tmp(
        "keep1.json",
        r#"{"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "zero_optimization": {"stage": 2}, "checkpoint": {"keep_last": 1}}"#,
    );
    let mut a = base.to_vec();
    a.extend(["--steps", "6", "--resume", "--config", c.to_str().unwrap()]);
    let out = ds(&a);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tags(), ["global_step6"]);
    let mut a = base.to_vec();
    a.extend(["--steps", "8", "--resume", "--keep-last", "0"]);
    assert_eq!(ds(&a).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sizes that would abort on allocation (exit 134) or grow until killed are refused up front
/// (exit 2) with the memory they need and the memory available.
#[test]
fn runs_that_cannot_fit_in_memory_are_refused_up_front() {
    for flags in [
        &["--batch", "1000000000"][..],
        // The CPU's blocked attention is linear in T, on the explicit kernels and on candle
        // autograd alike (a sequence of 100000 trains in a few GB): 10^8 tokens cannot fit.
        &["--seq", "100000000"][..],
        &["--seq", "100000000", "--autograd"][..],
        &["--vocab", "100000000000"][..],
        &["--layers", "1000000000"][..],
    ] {
        let mut a = vec!["train", "--steps", "1"];
        a.extend_from_slice(flags);
        let t = std::time::Instant::now();
        let out = ds(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(
            err.contains("needs at least") && err.contains("available"),
            "{flags:?}: {err}"
        );
        assert!(
            t.elapsed().as_secs() < 30,
            "{flags:?} took {:?}",
            t.elapsed()
        );
    }
    let out = ds(&["profile", "--seq", "100000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("profiling this model needs at least"), "{err}");
}

/// `ds plot` overlays several csv_monitor folders in one PNG and SVG, the runs named in the
/// legend; a folder with no monitor CSV is refused with exit 2.
#[test]
fn plot_overlays_csv_monitor_runs() {
    let dir = std::env::temp_dir().join(format!("ds-cli-plot-{}", std::process::id()));
    for (job, lr, rate) in [("lr-small", 1e-4, 300.0), ("lr-large", 1e-3, 80.0)] {
        let d = dir.join("monitor").join(job);
        std::fs::create_dir_all(&d).unwrap();
        let mut loss = String::from("step,train_loss\n");
        let mut lrs = String::from("step,lr\n");
        for step in 1..=400u64 {
            let v = 3.0 * (-(step as f64) / rate).exp() + 0.5 + 0.05 * ((step * 7919) % 13) as f64;
            loss += &format!("{},{v}\n", step * 8);
            lrs += &format!("{},{lr}\n", step * 8);
        }
        std::fs::write(d.join("Train_Samples_train_loss.csv"), loss).unwrap();
        std::fs::write(d.join("Train_Samples_lr.csv"), lrs).unwrap();
        std::fs::write(
            d.join("Eval_Samples_val_loss.csv"),
            "step,val_loss\n3200,0.9\n",
        )
        .unwrap();
    }
    let png = dir.join("cmp.png");
    let out = ds(&[
        "plot",
        dir.join("monitor").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() < 100_000, "{} bytes", bytes.len());
    let svg = std::fs::read_to_string(png.with_extension("svg")).unwrap();
    assert!(svg.contains("lr-small") && svg.contains("lr-large"));
    let out = ds(&["plot", dir.to_str().unwrap(), "-o", png.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("csv_monitor"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `DS_BLAS`: the explicit kernels' products on a CBLAS library opened at run time train to
/// the same loss as the `gemm` crate within f32 rounding of a different summation order
/// (Debian's OpenBLAS or BLIS; skipped with a message when neither is installed), and a path
/// that is not a library stops the run with exit 2 naming it.
#[test]
fn ds_blas_library_trains_like_the_gemm_crate() {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "/usr/lib/x86_64-linux-gnu/libblis.so.4",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    let bad = Command::new(env!("CARGO_BIN_EXE_ds"))
        .args(["train", "--steps", "1"])
        .env("DS_BLAS", "/nonexistent/libnope.so")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("DS_BLAS=/nonexistent/libnope.so"), "{err}");
    let Some(lib) = lib else {
        eprintln!("no system CBLAS (libopenblas0 / libblis4): skipped");
        return;
    };
    // fc2's depth (4 x 192 = 768) and the weight gradients' (2 x 4 x 64 tokens) are longer
    // than one accumulation chain, so the libraries really sum in another order.
    let args = [
        "train",
        "--steps",
        "6",
        "--hidden",
        "192",
        "--heads",
        "3",
        "--world-size",
        "1",
        "--json",
    ];
    let run = |blas: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ds"));
        c.args(args).env_remove("DS_BLAS");
        if let Some(b) = blas {
            c.env("DS_BLAS", b);
        }
        let out = c.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["final_loss"].as_f64().unwrap(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (own, _) = run(None);
    let (lib_loss, notes) = run(Some(lib));
    assert!(
        notes.contains(&format!("DS_BLAS={lib}")),
        "no note naming the library: {notes}"
    );
    assert!(
        (own - lib_loss).abs() <= 1e-4 * own.abs(),
        "final loss {own} (gemm crate) vs {lib_loss} ({lib})"
    );
}

/// `bf16.enabled` on the CPU: `ds train` says which bf16 units its matrix products use; with
/// `DS_BF16_UNITS=emulate` they run on the emulated `vdpbf16ps` and the run trains to nearly
/// the f32-product run's loss (`none`), and an unknown value is a warning naming the allowed
/// ones, not a failure.
#[test]
fn train_bf16_compute_units_note() {
    let cfg = tmp(
        "bf16.json",
        r#"{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
           "bf16": {"enabled": true}}"#,
    );
    let args = [
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "8",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--seq",
        "16",
        "--vocab",
        "64",
        "--eval-samples",
        "0",
        "--world-size",
        "1",
        "--json",
    ];
    let run = |units: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_ds"))
            .args(args)
            .env("DS_BF16_UNITS", units)
            .output()
            .expect("run ds");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["final_loss"].as_f64().unwrap(), err)
    };
    let (f32_loss, err) = run("none");
    assert!(
        err.contains("note: bf16 compute: no AVX-512 BF16 units"),
        "{err}"
    );
    let (bf_loss, err) = run("emulate");
    assert!(err.contains("emulation of vdpbf16ps"), "{err}");
    assert!(
        (bf_loss - f32_loss).abs() <= 1e-2 * f32_loss,
        "{bf_loss} vs {f32_loss}"
    );
    // MKL's bf16 GEMM through DS_BLAS (when benches/gemm_backends.sh fetched MKL into
    // target/blas; skipped with a message otherwise).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/blas/mkl");
    let mkl = std::fs::read_dir(&root).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.path().join("data/lib/libmkl_rt.so.3"))
            .find(|p| p.exists())
    });
    match mkl {
        Some(mkl) => {
            let out = Command::new(env!("CARGO_BIN_EXE_ds"))
                .args(args)
                .env("DS_BF16_UNITS", "blas")
                .env("DS_BLAS", &mkl)
                .output()
                .expect("run ds");
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert_eq!(out.status.code(), Some(0), "{err}");
            assert!(
                err.contains("runs on the bf16 GEMM of the DS_BLAS library"),
                "{err}"
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let l = v["final_loss"].as_f64().unwrap();
            assert!(
                (l - f32_loss).abs() <= 1e-2 * f32_loss,
                "MKL bf16 {l} vs {f32_loss}"
            );
        }
        None => eprintln!("no MKL under target/blas/mkl: the DS_BLAS bf16 run is skipped"),
    }
    let (_, err) = run("tpu");
    assert!(
        err.contains("DS_BF16_UNITS=tpu") && err.contains("avx512bf16, blas, emulate, none"),
        "{err}"
    );
}
