//! Round trip, resharding, multi-rank protocol, corruption, tags, async, consolidation.
mod common;

use std::borrow::Cow;
use std::sync::{Arc, Barrier};

use common::*;
use ds_checkpoint::*;

#[test]
fn round_trip_everything() {
    let dir = tmp_dir("roundtrip");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let m = meta(2, 2, 42);
    let n = m.numel();
    assert_eq!(n, 53);
    save_split(&store, "global_step42", &m, &padded_ranges(n, 2), true).unwrap();
    assert_eq!(store.latest().unwrap().as_deref(), Some("global_step42"));
    assert_eq!(store.list().unwrap(), vec!["global_step42".to_string()]);

    let ck = store.load(None).unwrap();
    assert_eq!(ck.meta(), &m);
    assert_eq!(ck.training(), &m.training);
    assert_eq!(ck.optimizer_step(), 42);
    assert_eq!(ck.numel(), n);
    assert_eq!(ck.manifest().format_version, FORMAT_VERSION);
    // ranges clipped to numel: [0,27), [27,53)
    let rr: Vec<_> = ck
        .manifest()
        .ranks
        .iter()
        .map(|r| (r.start, r.end))
        .collect();
    assert_eq!(rr, vec![(0, 27), (27, 53)]);
    for (s, name) in BUFFERS.iter().enumerate() {
        assert_eq!(
            ck.load_flat_range(name, 0..n).unwrap(),
            flat(n, s as u32),
            "buffer {name}"
        );
    }
    let master = flat(n, 0);
    for p in &m.params {
        assert_eq!(
            ck.read_weight(&p.name).unwrap(),
            master[p.range()].to_vec(),
            "weight {}",
            p.name
        );
    }
    let all = ck.read_all_weights().unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[2].1, vec![5, 5]);
    assert!(matches!(
        ck.read_weight("nope"),
        Err(CheckpointError::NotFound { .. })
    ));
    assert!(matches!(
        ck.load_flat_range("nope", 0..1),
        Err(CheckpointError::NotFound { .. })
    ));

    // A second save moves latest; overwriting an existing tag works too.
    let m2 = meta(2, 2, 43);
    save_split(&store, "global_step43", &m2, &padded_ranges(n, 2), false).unwrap();
    save_split(&store, "global_step43", &m2, &padded_ranges(n, 2), false).unwrap();
    assert_eq!(store.latest().unwrap().as_deref(), Some("global_step43"));
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(
        store
            .load(Some("global_step42"))
            .unwrap()
            .training()
            .global_step,
        42
    );
    // no model file: weights come from the master buffer
    let ck2 = store.load(None).unwrap();
    assert!(ck2.manifest().model_file.is_none());
    assert_eq!(
        ck2.read_weight("head.bias").unwrap(),
        master[48..53].to_vec()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reshard_every_pair_of_world_sizes_and_stages() {
    let dir = tmp_dir("reshard");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let n = meta(1, 0, 1).numel();
    for save_ws in 1..=4 {
        for save_stage in 0..=3u8 {
            let m = meta(save_ws, save_stage, 7);
            // stage 0: every rank holds the whole space; else padded shards
            let ranges = if save_stage == 0 {
                vec![0..n; save_ws]
            } else {
                padded_ranges(n, save_ws)
            };
            let tag = format!("ws{save_ws}_s{save_stage}");
            save_split(&store, &tag, &m, &ranges, false).unwrap();
            let ck = store.load(Some(&tag)).unwrap();
            for load_ws in 1..=4 {
                for load_stage in 0..=3u8 {
                    let new = if load_stage == 0 {
                        vec![0..n; load_ws]
                    } else {
                        padded_ranges(n, load_ws)
                    };
                    for r in new {
                        for (s, name) in BUFFERS.iter().enumerate() {
                            let got = ck.load_flat_range(name, r.clone()).unwrap();
                            assert_eq!(
                                got,
                                slice_padded(&flat(n, s as u32), r.clone()),
                                "{tag} -> ws{load_ws} s{load_stage} {name} {r:?}"
                            );
                        }
                    }
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reshard_two_uneven_ranks_into_three_way_split() {
    let dir = tmp_dir("reshard23");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let m = meta(2, 1, 3);
    let n = m.numel();
    let k = 20; // [0,20), [20,53)
    save_split(&store, "t", &m, &[0..k, k..n], false).unwrap();
    let ck = store.load(Some("t")).unwrap();
    let full = flat(n, 1);
    let mut joined = Vec::new();
    for r in padded_ranges(n, 3) {
        joined.extend(ck.load_flat_range("exp_avg", r).unwrap());
    }
    assert_eq!(joined.len(), 54);
    assert_eq!(&joined[..n], &full[..]);
    assert_eq!(joined[n], 0.0);
    // A range that crosses the rank boundary.
    assert_eq!(
        ck.load_flat_range("exp_avg", 15..25).unwrap(),
        full[15..25].to_vec()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_coverage_is_refused_at_save_not_read_as_zeros() {
    let dir = tmp_dir("cover");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let m = meta(2, 1, 3);
    let n = m.numel();
    // rank 1 holds nothing: [10, 10); elements [10, 53) are held by no one
    let master = flat(n, 0);
    let shards = vec![
        RankShard::new(0, 0..10, 3).with_buffer(MASTER_BUFFER, &master[0..10]),
        RankShard::new(1, 10..10, 3).with_buffer(MASTER_BUFFER, &[]),
    ];
    let e = store
        .save(
            "t",
            &SaveRequest {
                meta: m,
                weights: None,
                shards,
                save_latest: true,
            },
        )
        .unwrap_err();
    match &e {
        CheckpointError::IncompleteSave { tag, reason } => {
            assert_eq!(tag, "t");
            // [10, 53) holds the rest of "embed.weight" (20 elements) and the 3 others.
            assert!(reason.contains("[10, 53)"), "{e}");
            assert!(reason.contains("\"embed.weight\""), "{e}");
        }
        other => panic!("expected IncompleteSave, got {other:?}"),
    }
    assert_eq!(store.latest().unwrap(), None);
    assert!(matches!(
        store.load(Some("t")),
        Err(CheckpointError::TagNotFound { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn multi_rank_threads_with_barrier() {
    let dir = tmp_dir("threads");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let ws = 3;
    let m = meta(ws, 3, 9);
    let n = m.numel();
    let barrier = Arc::new(Barrier::new(ws));
    let handles: Vec<_> = padded_ranges(n, ws)
        .into_iter()
        .enumerate()
        .map(|(rank, range)| {
            let (store, m, barrier) = (store.clone(), m.clone(), barrier.clone());
            std::thread::spawn(move || {
                let master = slice_padded(&flat(n, 0), range.clone());
                let shard = RankShard::new(rank, range, 9).with_buffer(MASTER_BUFFER, &master);
                let weights: Weights<'_> = m
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), Cow::Owned(flat(n, 0)[p.range()].to_vec())))
                    .collect();
                store.save_collective("step9", &m, &shard, Some(&weights), true, &mut || {
                    barrier.wait();
                    Ok(())
                })
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let ck = store.load(None).unwrap();
    assert_eq!(ck.meta().world_size, 3);
    assert_eq!(ck.load_flat_range(MASTER_BUFFER, 0..n).unwrap(), flat(n, 0));
    assert!(ck.manifest().model_file.is_some());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn finalize_refuses_an_incomplete_save() {
    let dir = tmp_dir("incomplete");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let n = meta(1, 0, 1).numel();
    save_split(&store, "good", &meta(2, 1, 1), &padded_ranges(n, 2), false).unwrap();
    let m = meta(2, 1, 2);
    let master = flat(n, 0);
    store.prepare("bad").unwrap();
    store
        .save_rank(
            "bad",
            &m,
            &RankShard::new(0, 0..27, 2).with_buffer(MASTER_BUFFER, &slice_padded(&master, 0..27)),
        )
        .unwrap();
    let err = store.finalize("bad", &m, None, true).unwrap_err();
    assert!(
        matches!(err, CheckpointError::IncompleteSave { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("rank 1"), "{err}");
    assert_eq!(store.latest().unwrap().as_deref(), Some("good"));
    assert!(matches!(
        store.load(Some("bad")),
        Err(CheckpointError::TagNotFound { .. })
    ));
    assert_eq!(store.list().unwrap(), vec!["good".to_string()]);
    // save_rank without prepare, wrong buffer length, rank out of range
    let e = store
        .save_rank(
            "other",
            &m,
            &RankShard::new(0, 0..1, 2).with_buffer(MASTER_BUFFER, &master[..1]),
        )
        .unwrap_err();
    assert!(matches!(e, CheckpointError::IncompleteSave { .. }), "{e}");
    store.prepare("other").unwrap();
    let e = store
        .save_rank(
            "other",
            &m,
            &RankShard::new(0, 0..5, 2).with_buffer(MASTER_BUFFER, &master[..4]),
        )
        .unwrap_err();
    assert!(matches!(e, CheckpointError::InvalidInput(_)), "{e}");
    let e = store
        .save_rank(
            "other",
            &m,
            &RankShard::new(2, 0..4, 2).with_buffer(MASTER_BUFFER, &master[..4]),
        )
        .unwrap_err();
    assert!(matches!(e, CheckpointError::InvalidInput(_)), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

fn corrupt_setup(name: &str) -> (std::path::PathBuf, FsCheckpointStore) {
    let dir = tmp_dir(name);
    let store = FsCheckpointStore::new(&dir).unwrap();
    let n = meta(1, 0, 1).numel();
    save_split(&store, "t", &meta(2, 2, 5), &padded_ranges(n, 2), true).unwrap();
    store.load(Some("t")).unwrap();
    (dir, store)
}

#[test]
fn corrupt_byte_is_a_checksum_error_naming_the_file() {
    let (dir, store) = corrupt_setup("flip");
    let f = dir.join("t").join(rank_file_name(1));
    let mut b = std::fs::read(&f).unwrap();
    let last = b.len() - 3;
    b[last] ^= 0x40;
    std::fs::write(&f, &b).unwrap();
    let e = store.load(Some("t")).unwrap_err();
    assert!(
        matches!(e, CheckpointError::ChecksumMismatch { ref path, .. } if path == &f),
        "{e}"
    );
    assert!(e.to_string().contains("rank_00001.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn truncated_file_is_a_size_error() {
    let (dir, store) = corrupt_setup("trunc");
    let f = dir.join("t").join(MODEL_FILE);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let e = store.load(Some("t")).unwrap_err();
    match &e {
        CheckpointError::SizeMismatch {
            path,
            expected,
            actual,
        } => {
            assert_eq!(path, &f);
            assert_eq!((*expected, *actual), (len, len - 10));
        }
        other => panic!("expected SizeMismatch, got {other}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn deleted_file_is_a_missing_file_error() {
    let (dir, store) = corrupt_setup("delete");
    let f = dir.join("t").join(rank_file_name(0));
    std::fs::remove_file(&f).unwrap();
    let e = store.load(None).unwrap_err();
    assert!(
        matches!(e, CheckpointError::MissingFile { ref path } if path == &f),
        "{e}"
    );
    std::fs::remove_file(dir.join("t").join(MANIFEST_FILE)).unwrap();
    let e = store.load(Some("t")).unwrap_err();
    assert!(matches!(e, CheckpointError::TagNotFound { .. }), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn other_format_version_and_bad_manifest() {
    let (dir, store) = corrupt_setup("version");
    let mf = dir.join("t").join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&mf).unwrap()).unwrap();
    v["format_version"] = serde_json::json!(FORMAT_VERSION + 1);
    std::fs::write(&mf, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = store.load(Some("t")).unwrap_err();
    assert!(
        matches!(e, CheckpointError::VersionMismatch { found, expected, .. } if found == FORMAT_VERSION + 1 && expected == FORMAT_VERSION),
        "{e}"
    );
    assert!(e.to_string().contains("manifest.json"), "{e}");
    std::fs::write(&mf, b"{ not json").unwrap();
    let e = store.load(Some("t")).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Malformed { ref path, .. } if path == &mf),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unknown_tag_and_empty_store() {
    let dir = tmp_dir("unknown");
    let store = FsCheckpointStore::new(&dir).unwrap();
    assert!(matches!(
        store.load(None),
        Err(CheckpointError::NoLatest { .. })
    ));
    assert_eq!(store.latest().unwrap(), None);
    assert!(store.list().unwrap().is_empty());
    let e = store.load(Some("global_step5")).unwrap_err();
    assert!(matches!(e, CheckpointError::TagNotFound { .. }), "{e}");
    assert!(e.to_string().contains("global_step5"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn path_escaping_tags_are_rejected() {
    let dir = tmp_dir("tags");
    let store = FsCheckpointStore::new(dir.join("inner")).unwrap();
    let n = meta(1, 0, 1).numel();
    for tag in [
        "",
        "..",
        ".",
        "../escape",
        "a/b",
        "/abs",
        "a\\b",
        "x..y",
        ".hidden",
        "latest",
        "a\nb",
    ] {
        assert!(
            matches!(validate_tag(tag), Err(CheckpointError::InvalidTag { .. })),
            "{tag:?}"
        );
        let e = save_split(&store, tag, &meta(1, 0, 1), &padded_ranges(n, 1), false).unwrap_err();
        assert!(
            matches!(e, CheckpointError::InvalidTag { .. }),
            "{tag:?}: {e}"
        );
        assert!(
            matches!(
                store.load(Some(tag)),
                Err(CheckpointError::InvalidTag { .. })
            ),
            "{tag:?}"
        );
    }
    assert!(!dir.join("escape").exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    validate_tag("global_step100").unwrap();
    validate_tag("epoch-3.step_7").unwrap();
    assert_eq!(tag_fingerprint("a"), tag_fingerprint("a"));
    assert_ne!(tag_fingerprint("a"), tag_fingerprint("b"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn async_save_and_error_surfacing() {
    let dir = tmp_dir("async");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let m = meta(1, 0, 11);
    let n = m.numel();
    let mut master = flat(n, 0);
    let mut saver = AsyncSaver::new();
    let req = SaveRequest {
        meta: m.clone(),
        weights: None,
        shards: vec![RankShard::new(0, 0..n, 11).with_buffer(MASTER_BUFFER, &master)],
        save_latest: true,
    };
    saver.save(&store, "async11", req).unwrap();
    // The saver copied: mutating the training state now does not change the checkpoint.
    master.iter_mut().for_each(|x| *x = -1.0);
    saver.wait().unwrap();
    assert!(!saver.in_flight());
    let ck = store.load(None).unwrap();
    assert_eq!(ck.tag(), "async11");
    assert_eq!(ck.load_flat_range(MASTER_BUFFER, 0..n).unwrap(), flat(n, 0));

    // A failing write surfaces at wait() ...
    let bad = SaveRequest {
        meta: m.clone(),
        weights: None,
        shards: vec![RankShard::new(0, 0..n, 11).with_buffer(MASTER_BUFFER, &master[..3])],
        save_latest: true,
    };
    saver.save(&store, "bad", bad.clone()).unwrap();
    assert!(matches!(
        saver.wait(),
        Err(CheckpointError::InvalidInput(_))
    ));
    // ... or at the next save, which is then not started.
    saver.save(&store, "bad", bad).unwrap();
    let good = SaveRequest {
        meta: m,
        weights: None,
        shards: vec![RankShard::new(0, 0..n, 11).with_buffer(MASTER_BUFFER, &master)],
        save_latest: true,
    };
    assert!(saver.save(&store, "good2", good).is_err());
    saver.wait().unwrap();
    assert_eq!(store.latest().unwrap().as_deref(), Some("async11"));
    // A job that fails with an I/O error.
    saver
        .submit(Box::new(|| {
            Err(CheckpointError::Io {
                path: "/x".into(),
                source: std::io::Error::other("disk full"),
            })
        }))
        .unwrap();
    let e = saver.wait().unwrap_err();
    assert!(e.to_string().contains("disk full"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn consolidate_loads_in_candle_and_python() {
    let dir = tmp_dir("consolidate");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let m = meta(3, 3, 4);
    let n = m.numel();
    save_split(&store, "t", &m, &padded_ranges(n, 3), false).unwrap();
    let ck = store.load(None).unwrap();
    let master = flat(n, 0);
    for (dtype, tol) in [
        (Dtype::F32, 0.0f32),
        (Dtype::BF16, 1.0 / 128.0),
        (Dtype::F16, 1.0 / 1024.0),
    ] {
        let out = dir.join(format!("full_{dtype:?}.safetensors"));
        consolidate(&ck, &out, dtype).unwrap();
        let tensors = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
        assert_eq!(tensors.len(), m.params.len());
        for p in &m.params {
            let t = &tensors[&p.name];
            assert_eq!(t.dims(), p.shape.as_slice(), "{}", p.name);
            let want_dtype = match dtype {
                Dtype::F32 => candle_core::DType::F32,
                Dtype::BF16 => candle_core::DType::BF16,
                Dtype::F16 => candle_core::DType::F16,
            };
            assert_eq!(t.dtype(), want_dtype);
            let got: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, w) in got.iter().zip(&master[p.range()]) {
                assert!(
                    (g - w).abs() <= tol * w.abs().max(1.0),
                    "{} {dtype:?}: {g} vs {w}",
                    p.name
                );
            }
        }
    }
    // Python, when its safetensors package is importable.
    let py_ok = std::process::Command::new("python3")
        .args(["-c", "import safetensors.numpy, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !py_ok {
        eprintln!("SKIPPED: python3 with `safetensors` and `numpy` not importable; the Python load check did not run");
    } else {
        let out = dir.join("full_F32.safetensors");
        let script = "import sys, json, safetensors.numpy as st\nd = st.load_file(sys.argv[1])\nprint(json.dumps({k: [list(v.shape), [float(x) for x in v.reshape(-1)]] for k, v in d.items()}))";
        let o = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for p in &m.params {
            let shape: Vec<usize> = serde_json::from_value(v[&p.name][0].clone()).unwrap();
            let vals: Vec<f32> = serde_json::from_value(v[&p.name][1].clone()).unwrap();
            assert_eq!(shape, p.shape);
            assert_eq!(vals, master[p.range()].to_vec());
        }
        eprintln!("python safetensors loaded the consolidated file and matched");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A checkpoint whose rank files span several checksum blocks: (dir, store, numel, master).
fn big_setup(name: &str) -> (std::path::PathBuf, FsCheckpointStore, usize, Vec<f32>) {
    let dir = tmp_dir(name);
    let store = FsCheckpointStore::new(&dir).unwrap();
    // 2.5 blocks of f32 per buffer: every read crosses whole and partial blocks.
    let numel = (5 * BLOCK_BYTES as usize / 4) / 2 + 7;
    let m = CheckpointMeta {
        world_size: 1,
        zero_stage: 0,
        dtype: "fp32".into(),
        params: contiguous_params([("w", vec![numel])]),
        training: TrainingState::default(),
    };
    let master = flat(numel, 1);
    let shard = RankShard::new(0, 0..numel, 1).with_buffer(MASTER_BUFFER, &master);
    store
        .save(
            "t",
            &SaveRequest {
                meta: m,
                weights: None,
                shards: vec![shard],
                save_latest: true,
            },
        )
        .unwrap();
    (dir, store, numel, master)
}

#[test]
fn block_checksums_catch_corruption_where_it_is_read() {
    let (dir, store, numel, master) = big_setup("blocks");
    let ck = store.load(None).unwrap();
    let rec = &ck.manifest().files[&rank_file_name(0)];
    assert_eq!(rec.block_bytes, BLOCK_BYTES);
    assert_eq!(
        rec.block_crc32.len() as u64,
        rec.bytes.div_ceil(BLOCK_BYTES)
    );
    // Every partial/whole block split reads back exactly.
    for r in [
        0..numel,
        3..numel - 5,
        1_000_000..1_048_577,
        numel - 3..numel + 4,
    ] {
        let got = ck.load_flat_range(MASTER_BUFFER, r.clone()).unwrap();
        let want: Vec<f32> = r
            .clone()
            .map(|i| master.get(i).copied().unwrap_or(0.0))
            .collect();
        assert_eq!(got, want, "{r:?}");
    }
    ck.verify().unwrap();
    drop(ck);
    // Flip one byte in the third block (element ~2.2M): opening succeeds (header block is
    // intact), reading a range that avoids the block succeeds, reading it fails naming the
    // file and the block, and verify() fails.
    let f = dir.join("t").join(rank_file_name(0));
    let mut b = std::fs::read(&f).unwrap();
    let at = 2 * BLOCK_BYTES as usize + 12345;
    b[at] ^= 0x08;
    std::fs::write(&f, &b).unwrap();
    let ck = store.load(None).unwrap();
    ck.load_flat_range(MASTER_BUFFER, 0..1_000_000).unwrap();
    let e = ck.load_flat_range(MASTER_BUFFER, 0..numel).unwrap_err();
    match &e {
        CheckpointError::ChecksumMismatch { path, region, .. } => {
            assert_eq!(path, &f);
            assert!(region.contains("block 2"), "{region}");
        }
        other => panic!("expected ChecksumMismatch, got {other}"),
    }
    // A range inside the bad block but not covering it whole is also refused.
    let elem = (at - 200) / 4; // roughly, the data starts after a short header
    let e = ck
        .load_flat_range(MASTER_BUFFER, elem..elem + 1)
        .unwrap_err();
    assert!(matches!(e, CheckpointError::ChecksumMismatch { .. }), "{e}");
    assert!(matches!(
        ck.verify().unwrap_err(),
        CheckpointError::ChecksumMismatch { .. }
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn format_version_1_checkpoints_still_load_and_are_verified_whole() {
    let (dir, store, numel, master) = big_setup("v1");
    // Rewrite the manifest as version 1 wrote it: no block checksums.
    let mf = dir.join("t").join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&mf).unwrap()).unwrap();
    v["format_version"] = serde_json::json!(1);
    // Version 1 had no checksum of the manifest either.
    assert!(v
        .as_object_mut()
        .unwrap()
        .remove(MANIFEST_CHECKSUM_FIELD)
        .is_some());
    for (_, rec) in v["files"].as_object_mut().unwrap().iter_mut() {
        let o = rec.as_object_mut().unwrap();
        o.remove("block_bytes");
        o.remove("block_crc32");
    }
    std::fs::write(&mf, serde_json::to_vec(&v).unwrap()).unwrap();
    let ck = store.load(None).unwrap();
    assert_eq!(ck.manifest().format_version, 1);
    assert_eq!(ck.manifest_checksum(), None);
    assert_eq!(ck.load_flat_range(MASTER_BUFFER, 0..numel).unwrap(), master);
    drop(ck);
    // Version 1 has only the whole-file CRC: corruption anywhere fails at open.
    let f = dir.join("t").join(rank_file_name(0));
    let mut b = std::fs::read(&f).unwrap();
    let last = b.len() - 2;
    b[last] ^= 1;
    std::fs::write(&f, &b).unwrap();
    let e = store.load(None).unwrap_err();
    assert!(
        matches!(e, CheckpointError::ChecksumMismatch { ref path, ref region, .. } if path == &f && region == "whole file"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// ZeRO-3 layout: parameter i of n_i elements cut into ceil(n_i/ws) chunks, rank r's buffer
/// is its chunk of every parameter, padded.
fn stage3_shard(
    params: &[ParamSpec],
    ws: usize,
    r: usize,
    full: &[f32],
) -> (Vec<f32>, Vec<Segment>) {
    let mut buf = Vec::new();
    let mut segs = Vec::new();
    for p in params {
        let n = p.numel();
        let c = n.div_ceil(ws);
        let lo = (r * c).min(n);
        let hi = ((r + 1) * c).min(n);
        if lo < hi {
            segs.push(Segment {
                buffer_offset: buf.len(),
                flat: p.offset + lo..p.offset + hi,
            });
        }
        buf.extend_from_slice(&full[p.offset + lo..p.offset + hi]);
        buf.resize(buf.len() + c - (hi - lo), -7.0); // padding, never read back
    }
    (buf, segs)
}

#[test]
fn segmented_stage3_shards_reshard_into_any_range() {
    let params = params();
    let numel = 53;
    let full = flat(numel, 2);
    let avg = flat(numel, 3);
    for ws in 1..=4 {
        let dir = tmp_dir("seg");
        let store = FsCheckpointStore::new(&dir).unwrap();
        let m = CheckpointMeta {
            world_size: ws,
            zero_stage: 3,
            dtype: "fp32".into(),
            params: params.clone(),
            training: TrainingState::default(),
        };
        let bufs: Vec<_> = (0..ws)
            .map(|r| {
                (
                    stage3_shard(&params, ws, r, &full),
                    stage3_shard(&params, ws, r, &avg).0,
                )
            })
            .collect();
        let shards = bufs
            .iter()
            .enumerate()
            .map(|(r, ((b, segs), a))| {
                RankShard::segmented(r, b.len(), segs.clone(), 3)
                    .with_buffer(MASTER_BUFFER, b)
                    .with_buffer("exp_avg", a)
            })
            .collect();
        store
            .save(
                "s3",
                &SaveRequest {
                    meta: m,
                    weights: None,
                    shards,
                    save_latest: true,
                },
            )
            .unwrap();
        let ck = store.load(None).unwrap();
        assert_eq!(ck.meta().zero_stage, 3);
        // Every range, including padding past numel, reads back (flat or another stage-3 ws).
        for lo in 0..numel {
            for hi in [lo, lo + 1, (lo + 9).min(numel), numel, numel + 3] {
                let want: Vec<f32> = (lo..hi)
                    .map(|i| full.get(i).copied().unwrap_or(0.0))
                    .collect();
                assert_eq!(ck.load_flat_range(MASTER_BUFFER, lo..hi).unwrap(), want);
            }
        }
        assert_eq!(ck.load_flat_range("exp_avg", 0..numel).unwrap(), avg);
        assert_eq!(
            ck.read_weight("h0.fc.weight").unwrap(),
            full[23..48].to_vec()
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn segments_that_overlap_or_overflow_are_refused() {
    let dir = tmp_dir("segbad");
    let store = FsCheckpointStore::new(&dir).unwrap();
    let m = meta(1, 3, 1);
    store.prepare("x").unwrap();
    let b = vec![0f32; 10];
    for segs in [
        vec![
            Segment {
                buffer_offset: 0,
                flat: 0..5,
            },
            Segment {
                buffer_offset: 4,
                flat: 10..12,
            },
        ],
        vec![Segment {
            buffer_offset: 8,
            flat: 0..5,
        }],
        vec![Segment {
            buffer_offset: 0,
            flat: 50..60,
        }],
    ] {
        let e = store
            .save_rank(
                "x",
                &m,
                &RankShard::segmented(0, 10, segs, 1).with_buffer(MASTER_BUFFER, &b),
            )
            .unwrap_err();
        assert!(matches!(e, CheckpointError::InvalidInput(_)), "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A `latest` that is huge, a symbolic link (to /etc/passwd, say) or holds a bad tag is an
/// error naming the file and the rule, without echoing its content.
#[test]
fn odd_latest_files_are_refused_without_printing_them() {
    use ds_checkpoint::CheckpointStore;
    let dir = std::env::temp_dir().join(format!("ds-ckpt-latest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = ds_checkpoint::FsCheckpointStore::new(&dir).unwrap();
    let latest = dir.join("latest");
    std::fs::write(&latest, "x".repeat(10_000)).unwrap();
    let e = store.latest().unwrap_err().to_string();
    assert!(
        e.contains("10000 bytes") && !e.contains("xxxxxxxxxx"),
        "{e}"
    );
    std::fs::remove_file(&latest).unwrap();
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, "root:x:0:0").unwrap();
    std::os::unix::fs::symlink(&secret, &latest).unwrap();
    let e = store.latest().unwrap_err().to_string();
    assert!(
        e.contains("not a regular file") && !e.contains("root:x"),
        "{e}"
    );
    std::fs::remove_file(&latest).unwrap();
    std::fs::write(&latest, "../../etc").unwrap();
    let e = store.latest().unwrap_err().to_string();
    assert!(e.contains("latest") && e.contains(".."), "{e}");
    std::fs::write(&latest, "global_step4\n").unwrap();
    assert_eq!(store.latest().unwrap().as_deref(), Some("global_step4"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A FIFO in place of a rank file (or of the manifest) is an error naming it, at once: opening
/// a FIFO for reading would block until a writer came, so `--resume` and `ds consolidate` hung.
#[test]
fn a_fifo_in_place_of_a_checkpoint_file_is_an_error_not_a_hang() {
    let (dir, store) = corrupt_setup("fifo");
    for victim in [rank_file_name(1), MANIFEST_FILE.to_string()] {
        let f = dir.join("t").join(&victim);
        let saved = std::fs::read(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        let ok = std::process::Command::new("mkfifo")
            .arg(&f)
            .status()
            .unwrap();
        assert!(ok.success(), "mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = store.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s2.load(Some("t")).map(|_| ()).map_err(|e| e.to_string()));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("loading a checkpoint with a FIFO in it hung");
        let e = got.unwrap_err();
        assert!(
            e.contains("not a regular file") && e.contains(&victim),
            "{e}"
        );
        std::fs::remove_file(&f).unwrap();
        std::fs::write(&f, saved).unwrap();
    }
    store.load(Some("t")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Consolidating into the checkpoint's own directory (over its model file, say) is refused
/// and leaves the checkpoint loadable; the store root beside it is fine.
#[test]
fn consolidate_refuses_to_write_into_the_checkpoint() {
    let (dir, store) = corrupt_setup("consol-self");
    let ck = store.load(Some("t")).unwrap();
    let target = dir.join("t").join(MODEL_FILE);
    let e = consolidate(&ck, &target, Dtype::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("inside the checkpoint directory"), "{e}");
    store.load(Some("t")).unwrap();
    consolidate(&ck, &dir.join("weights.safetensors"), Dtype::F32).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
