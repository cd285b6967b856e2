//! Save a sharded checkpoint from 4 ranks at ZeRO stage 2, resume it on 3 ranks (each rank
//! reads only its own new range, assembled from whichever old ranks hold it), and consolidate
//! the full weights into one safetensors file that candle loads.
//!
//! `cargo run -p ds-checkpoint --example save_and_reshard`

use ds_checkpoint::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("ds-ckpt-example-{}", std::process::id()));
    let store = FsCheckpointStore::new(&dir)?;
    // A model of three parameters, 1000 + 40 + 10 elements in one flat space.
    let params = contiguous_params([
        ("embed", vec![100, 10]),
        ("proj", vec![10, 4]),
        ("bias", vec![10]),
    ]);
    let numel: usize = 1050;
    let master: Vec<f32> = (0..numel).map(|i| (i as f32 * 0.37).sin()).collect();
    let exp_avg: Vec<f32> = (0..numel).map(|i| i as f32 * 1e-4).collect();
    let exp_avg_sq: Vec<f32> = (0..numel).map(|i| i as f32 * 1e-6).collect();
    let meta = |world_size: usize| CheckpointMeta {
        world_size,
        zero_stage: 2,
        dtype: "fp32".into(),
        params: params.clone(),
        training: TrainingState {
            global_step: 100,
            ..Default::default()
        },
    };
    // 4 ranks, each owning ceil(1050 / 4) = 263 elements (the last one fewer).
    let range = |rank: usize, ws: usize| {
        let per = numel.div_ceil(ws);
        (rank * per).min(numel)..((rank + 1) * per).min(numel)
    };
    let shards = (0..4)
        .map(|r| {
            let rr = range(r, 4);
            RankShard::new(r, rr.clone(), 100)
                .with_buffer(MASTER_BUFFER, &master[rr.clone()])
                .with_buffer("exp_avg", &exp_avg[rr.clone()])
                .with_buffer("exp_avg_sq", &exp_avg_sq[rr])
        })
        .collect();
    store.save(
        "global_step100",
        &SaveRequest {
            meta: meta(4),
            weights: None,
            shards,
            save_latest: true,
        },
    )?;
    println!(
        "saved {} (4 ranks, ZeRO-2)",
        dir.join("global_step100").display()
    );

    // Resume at world size 3: every rank loads its own range of every buffer.
    let ckpt = store.load(None)?;
    ckpt.verify()?; // every byte against its checksum
    for r in 0..3 {
        let rr = range(r, 3);
        for (name, want) in [
            (MASTER_BUFFER, &master),
            ("exp_avg", &exp_avg),
            ("exp_avg_sq", &exp_avg_sq),
        ] {
            assert_eq!(
                ckpt.load_flat_range(name, rr.clone())?,
                want[rr.clone()].to_vec()
            );
        }
        println!("rank {r} of 3: elements {rr:?} restored");
    }

    // Full weights for inference, as one safetensors file.
    let out = std::env::temp_dir().join(format!(
        "ds-ckpt-example-{}.safetensors",
        std::process::id()
    ));
    consolidate(&ckpt, &out, Dtype::F32)?;
    let tensors = candle_core::safetensors::load(&out, &candle_core::Device::Cpu)?;
    let embed = &tensors["embed"];
    assert_eq!(embed.dims(), &[100, 10]);
    assert_eq!(
        embed.flatten_all()?.to_vec1::<f32>()?,
        master[..1000].to_vec()
    );
    println!(
        "consolidated {} ({} tensors), loaded by candle",
        out.display(),
        tensors.len()
    );
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_file(&out)?;
    Ok(())
}
