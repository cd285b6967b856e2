//! The files ds-checkpoint writes are valid safetensors as the reference `safetensors` crate
//! (Hugging Face's, the version candle uses) reads them: each rank's flat buffers and the
//! consolidated full weights, names, dtypes, shapes and values.

use ds_checkpoint::*;
use safetensors::{Dtype as StDtype, SafeTensors};

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn rank_files_and_consolidated_weights_read_with_the_safetensors_crate() {
    let dir = std::env::temp_dir().join(format!("ds-ckpt-st-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = FsCheckpointStore::new(&dir).unwrap();
    let params = contiguous_params([("w", vec![2, 3]), ("b", vec![3])]);
    let master: Vec<f32> = (0..9).map(|i| i as f32 * 0.5 - 1.0).collect();
    let exp_avg: Vec<f32> = (0..9).map(|i| 0.01 * i as f32).collect();
    let meta = CheckpointMeta {
        world_size: 2,
        zero_stage: 2,
        dtype: "fp32".into(),
        params,
        training: TrainingState {
            global_step: 3,
            ..Default::default()
        },
    };
    let ranges = [0..5, 5..9];
    let shards = ranges
        .iter()
        .enumerate()
        .map(|(r, range)| {
            RankShard::new(r, range.clone(), 9)
                .with_buffer(MASTER_BUFFER, &master[range.clone()])
                .with_buffer("exp_avg", &exp_avg[range.clone()])
        })
        .collect();
    store
        .save(
            "global_step3",
            &SaveRequest {
                meta,
                weights: None,
                shards,
                save_latest: true,
            },
        )
        .unwrap();
    // Each rank's file: its named flat buffers over its range.
    for (r, range) in ranges.iter().enumerate() {
        let bytes = std::fs::read(
            dir.join("global_step3")
                .join(format!("rank_{r:05}.safetensors")),
        )
        .unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let m = st.tensor(MASTER_BUFFER).unwrap();
        assert_eq!(m.dtype(), StDtype::F32);
        assert_eq!(m.shape(), &[range.len()]);
        assert_eq!(f32s(m.data()), master[range.clone()].to_vec());
        assert_eq!(
            f32s(st.tensor("exp_avg").unwrap().data()),
            exp_avg[range.clone()].to_vec()
        );
    }
    // The consolidated full weights, in f32 and bf16.
    let ckpt = store.load(None).unwrap();
    let out = std::env::temp_dir().join(format!("ds-ckpt-st-{}-full", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    consolidate(&ckpt, &out.join("f32.safetensors"), Dtype::F32).unwrap();
    let bytes = std::fs::read(out.join("f32.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["b", "w"]);
    let w = st.tensor("w").unwrap();
    assert_eq!((w.dtype(), w.shape()), (StDtype::F32, &[2usize, 3][..]));
    assert_eq!(f32s(w.data()), master[..6].to_vec());
    assert_eq!(f32s(st.tensor("b").unwrap().data()), master[6..].to_vec());
    consolidate(&ckpt, &out.join("bf16.safetensors"), Dtype::BF16).unwrap();
    let bytes = std::fs::read(out.join("bf16.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let b = st.tensor("b").unwrap();
    assert_eq!((b.dtype(), b.shape()), (StDtype::BF16, &[3usize][..]));
    let vals: Vec<f32> = b
        .data()
        .chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(vals, master[6..].to_vec()); // 2.0, 2.5, 3.0 are exact in bf16
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&out);
}
