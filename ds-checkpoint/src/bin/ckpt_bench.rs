//! Save/load throughput of a ~1 GB checkpoint against this disk's plain sequential
//! write (+fsync) and read bandwidth, measured in the same run.
//!
//! `cargo run --release -p ds-checkpoint --features bench --bin ckpt_bench -- [--gb 1.0] [--dir PATH]`
//! (a feature-gated binary rather than an example, so a release build does not compile the
//! test-only candle dependency)
//!
//! Page cache: before each cold read the bench drops the files from the page cache with
//! `posix_fadvise(DONTNEED)` (no root needed) so the reads come from the disk, for both the
//! baseline and the checkpoint; "warm" figures re-read from the page cache. The load baseline
//! is a plain `read_to_end` of the checkpoint's own files, timed next to each load (order
//! alternating); `median_paired_*` are medians of the per-round ratios (robust to a shared,
//! noisy machine), the other fractions ratios of medians.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ds_checkpoint::*;

fn drop_cache(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open descriptor.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

fn drop_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            drop_cache(&e.path());
        }
    }
}

fn request<'a>(
    meta: &CheckpointMeta,
    bufs: &'a [Vec<f32>],
    ws: usize,
    half: usize,
    numel: usize,
) -> SaveRequest<'a> {
    let shards = (0..ws)
        .map(|r| {
            let range = r * half..if r + 1 == ws { numel } else { (r + 1) * half };
            let mut s = RankShard::new(r, range.clone(), 1);
            for (b, name) in [MASTER_BUFFER, "exp_avg", "exp_avg_sq"].iter().enumerate() {
                s.buffers
                    .push((name.to_string(), Cow::Borrowed(&bufs[b][range.clone()])));
            }
            s
        })
        .collect();
    SaveRequest {
        meta: meta.clone(),
        weights: None,
        shards,
        save_latest: true,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let gb: f64 = get("--gb").map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    let dir = PathBuf::from(get("--dir").unwrap_or_else(|| {
        std::env::temp_dir()
            .join("ds-ckpt-bench")
            .display()
            .to_string()
    }));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bytes = (gb * 1e9) as usize;
    let ws = 2;
    let nbuf = 3; // master, exp_avg, exp_avg_sq
    let numel = bytes / 4 / nbuf;
    let total = (numel * 4 * nbuf) as f64;
    let half = numel / 2;
    let params = contiguous_params([("w0", vec![half]), ("w1", vec![numel - half])]);
    let bufs: Vec<Vec<f32>> = (0..nbuf)
        .map(|b| (0..numel).map(|i| (i as f32).sin() + b as f32).collect())
        .collect();
    let gbps = |secs: f64| total / secs / 1e9;

    let store = FsCheckpointStore::new(dir.join("store"))?;
    let meta = CheckpointMeta {
        world_size: ws,
        zero_stage: 2,
        dtype: "fp32".into(),
        params,
        training: TrainingState::default(),
    };
    let mut saver = AsyncSaver::new();
    let rounds: usize = get("--rounds").map(|s| s.parse()).transpose()?.unwrap_or(3);
    let pause_s: f64 = get("--pause")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);
    let mut rows = Vec::new();
    for round in 0..rounds {
        // Baseline: one plain file of the same size, write_all + fsync, then cold read.
        // The order of baseline and checkpoint alternates between rounds, with a pause before
        // each, because this (virtual) disk absorbs bursts faster than it sustains them.
        let plain_io = || -> Result<(f64, f64, f64), Box<dyn std::error::Error>> {
            let plain = dir.join("plain.bin");
            let t = Instant::now();
            {
                let mut f = std::fs::File::create(&plain)?;
                for b in &bufs {
                    f.write_all(bytemuck::cast_slice(b))?;
                }
                f.sync_all()?;
            }
            let plain_write = t.elapsed().as_secs_f64();
            drop_cache(&plain);
            let t = Instant::now();
            let mut v = Vec::with_capacity(total as usize);
            std::fs::File::open(&plain)?.read_to_end(&mut v)?;
            let plain_read = t.elapsed().as_secs_f64();
            drop(v);
            let t = Instant::now();
            let v = std::fs::read(&plain)?;
            let plain_read_warm = t.elapsed().as_secs_f64();
            drop(v);
            std::fs::remove_file(&plain)?;

            Ok((plain_write, plain_read, plain_read_warm))
        };
        let save_io = || -> Result<f64, Box<dyn std::error::Error>> {
            let t = Instant::now();
            store.save(
                &format!("step{round}"),
                &request(&meta, &bufs, ws, half, numel),
            )?;
            let save = t.elapsed().as_secs_f64();
            drop_dir(&store.root().join(format!("step{round}")));

            Ok(save)
        };
        let pause = || std::thread::sleep(std::time::Duration::from_secs_f64(pause_s));
        let ((plain_write, plain_read_file, plain_read_file_warm), save) = if round % 2 == 0 {
            pause();
            let p = plain_io()?;
            pause();
            (p, save_io()?)
        } else {
            pause();
            let s = save_io()?;
            pause();
            (plain_io()?, s)
        };
        pause();

        let tag_dir = store.root().join(format!("step{round}"));
        let load = |cold: bool| -> Result<f64, CheckpointError> {
            if cold {
                drop_dir(&tag_dir);
            }
            let t = Instant::now();
            let ck = store.load(None)?; // opens, checks sizes and headers; reads verify block CRCs
            let mut sum = 0.0f32;
            for name in [MASTER_BUFFER, "exp_avg", "exp_avg_sq"] {
                let v = ck.load_flat_range(name, 0..numel)?;
                sum += v[numel / 3];
            }
            let dt = t.elapsed().as_secs_f64();
            assert!(sum.is_finite());
            Ok(dt)
        };
        // The baseline for loads: a plain sequential read of the same files (every byte of
        // the checkpoint) into fresh buffers, right next to the load, order alternating.
        let plain_read_ckpt = |cold: bool| -> Result<f64, Box<dyn std::error::Error>> {
            if cold {
                drop_dir(&tag_dir);
            }
            let t = Instant::now();
            let mut n = 0usize;
            let mut files: Vec<_> = std::fs::read_dir(&tag_dir)?
                .flatten()
                .map(|e| e.path())
                .collect();
            files.sort();
            for f in files {
                let mut file = std::fs::File::open(&f)?;
                let mut v = Vec::with_capacity(file.metadata()?.len() as usize);
                file.read_to_end(&mut v)?;
                n += v.len();
            }
            assert!(n as f64 >= total);
            Ok(t.elapsed().as_secs_f64())
        };
        let (plain_read, load_cold) = if round % 2 == 0 {
            let p = plain_read_ckpt(true)?;
            (p, load(true)?)
        } else {
            let l = load(true)?;
            (plain_read_ckpt(true)?, l)
        };
        let (plain_read_warm, load_warm) = (plain_read_ckpt(false)?, load(false)?);
        let _ = (plain_read_file, plain_read_file_warm);

        // Async: time until save() returns (copy to host buffers), then the background write.
        let t = Instant::now();
        saver.save(
            &store,
            &format!("async{round}"),
            request(&meta, &bufs, ws, half, numel),
        )?;
        let async_return = t.elapsed().as_secs_f64();
        saver.wait()?;
        let async_total = t.elapsed().as_secs_f64();

        if round > 0 {
            let _ = std::fs::remove_dir_all(store.root().join(format!("step{}", round - 1)));
            let _ = std::fs::remove_dir_all(store.root().join(format!("async{}", round - 1)));
        }
        let row = serde_json::json!({
            "round": round,
            "plain_write_fsync_GBps": gbps(plain_write),
            "save_GBps": gbps(save),
            "plain_read_cold_GBps": gbps(plain_read),
            "load_cold_GBps": gbps(load_cold),
            "plain_read_warm_GBps": gbps(plain_read_warm),
            "load_warm_GBps": gbps(load_warm),
            "save_over_plain": plain_write / save,
            "load_cold_over_plain": plain_read / load_cold,
            "load_warm_over_plain": plain_read_warm / load_warm,
            "sync_save_s": save,
            "async_save_return_s": async_return,
            "async_save_total_s": async_total,
        });
        eprintln!("{row}");
        rows.push(row);
    }
    let med = |k: &str| {
        let mut v: Vec<f64> = rows.iter().filter_map(|r| r[k].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let out = serde_json::json!({
        "bytes": total as u64,
        "rounds": rounds,
        "median_plain_write_fsync_GBps": med("plain_write_fsync_GBps"),
        "median_save_GBps": med("save_GBps"),
        "save_fraction_of_plain_write": med("save_GBps") / med("plain_write_fsync_GBps"),
        "median_paired_save_fraction": med("save_over_plain"),
        "median_paired_load_cold_fraction": med("load_cold_over_plain"),
        "median_paired_load_warm_fraction": med("load_warm_over_plain"),
        "median_plain_read_cold_GBps": med("plain_read_cold_GBps"),
        "median_load_cold_GBps": med("load_cold_GBps"),
        "load_cold_fraction_of_plain_read": med("load_cold_GBps") / med("plain_read_cold_GBps"),
        "median_plain_read_warm_GBps": med("plain_read_warm_GBps"),
        "median_load_warm_GBps": med("load_warm_GBps"),
        "median_async_save_return_s": med("async_save_return_s"),
        "median_sync_save_s": med("sync_save_s"),
        "rows": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
