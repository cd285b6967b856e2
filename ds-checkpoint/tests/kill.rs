//! Atomicity: a child process saving a large checkpoint is SIGKILLed at several moments; the
//! previous checkpoint must still load and `latest` must point at a complete checkpoint.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;
use ds_checkpoint::*;

const CHILD_ENV: &str = "DS_CKPT_KILL_CHILD_DIR";
const BIG: usize = 6 << 20; // elements per buffer in the child's save (3 buffers: 72 MiB)

fn big_meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        world_size: 2,
        zero_stage: 2,
        dtype: "fp32".into(),
        params: contiguous_params([("a", vec![BIG / 2]), ("b", vec![BIG / 2])]),
        training: TrainingState {
            global_step: step,
            ..Default::default()
        },
    }
}

fn big_buffers(salt: u32) -> Vec<Vec<f32>> {
    (0..3)
        .map(|b| {
            (0..BIG)
                .map(|i| (i % 1000) as f32 + (salt * 10 + b) as f32)
                .collect()
        })
        .collect()
}

fn save_big(store: &FsCheckpointStore, tag: &str, step: u64, salt: u32) {
    let bufs = big_buffers(salt);
    let names = ["master", "exp_avg", "exp_avg_sq"];
    let h = BIG / 2;
    let shards = (0..2)
        .map(|r| {
            let mut s = RankShard::new(r, r * h..(r + 1) * h, step);
            for (b, n) in names.iter().enumerate() {
                s = s.with_buffer(*n, &bufs[b][r * h..(r + 1) * h]);
            }
            s
        })
        .collect();
    store
        .save(
            tag,
            &SaveRequest {
                meta: big_meta(step),
                weights: None,
                shards,
                save_latest: true,
            },
        )
        .unwrap();
}

fn verify(ck: &Checkpoint) {
    let salt = ck.training().global_step as u32;
    let bufs = big_buffers(salt);
    for (b, n) in ["master", "exp_avg", "exp_avg_sq"].iter().enumerate() {
        assert_eq!(
            ck.load_flat_range(n, 0..BIG).unwrap(),
            bufs[b],
            "{} buffer {n}",
            ck.tag()
        );
    }
}

/// In the child process (env var set): save tag "next" (step 2), announcing the start.
/// In a normal test run: does nothing.
#[test]
fn child_saver() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = FsCheckpointStore::new(dir).unwrap();
    println!("SAVING");
    save_big(&store, "next", 2, 2);
    println!("SAVED");
}

#[test]
fn killed_mid_save_leaves_previous_checkpoint_loadable() {
    let dir = tmp_dir("kill");
    let store = FsCheckpointStore::new(&dir).unwrap();
    save_big(&store, "good", 1, 1);
    // time an uninterrupted save in-process to choose kill moments across it
    let t = Instant::now();
    save_big(&store, "timing", 3, 3);
    let full = t.elapsed();
    store.set_latest("good").unwrap();
    std::fs::remove_dir_all(dir.join("timing")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut saw_tmp = 0;
    let mut saw_good = 0;
    // The in-process timing can overstate the child's save (a loaded machine while timing):
    // when no kill of a round lands inside the save, the next round tries at half the time.
    let mut full = full;
    for _round in 0..4 {
        if saw_tmp > 0 {
            break;
        }
        for frac in [0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95, 1.1] {
            let mut child = Command::new(&exe)
                .args(["child_saver", "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, &dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            loop {
                let l = lines.next().expect("child ended before SAVING").unwrap();
                if l.contains("SAVING") {
                    break;
                }
            }
            std::thread::sleep(full.mul_f64(frac));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            if dir.join(".tmp-next").exists() {
                saw_tmp += 1;
            }
            let latest = store.latest().unwrap().unwrap();
            assert!(latest == "good" || latest == "next", "latest = {latest}");
            let ck = store.load(None).unwrap();
            verify(&ck);
            if latest == "good" {
                saw_good += 1;
            } else {
                // the child finished: start the next round from "good" again
                std::fs::remove_dir_all(dir.join("next")).unwrap();
                store.set_latest("good").unwrap();
            }
            // the previous checkpoint is always intact
            verify(&store.load(Some("good")).unwrap());
            eprintln!(
                "kill at {:.0}% of a save ({full:?}): latest={latest}",
                frac * 100.0
            );
        }
        full /= 2;
    }
    assert!(
        saw_tmp >= 1,
        "no kill landed in the middle of a save; the test proved nothing"
    );
    assert!(saw_good >= 1);
    std::fs::remove_dir_all(&dir).ok();
}
