//! Train the GPT end to end through the engine's library API (what `ds train` does).
//!
//! `cargo run --release --example train_gpt`

use ds_engine::model::ModelShape;
use ds_engine::train::{train, TrainArgs};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let report = train(&TrainArgs {
        config: None, // the embedded examples/configs/gpt_zero2.json
        world_size: 2,
        backend: "local".into(),
        steps: 100,
        data: None,
        seed: 0,
        shape: ModelShape {
            layers: 2,
            hidden: 128,
            heads: 4,
            seq: 64,
            vocab: 512,
        },
        batch: None,
        ckpt: false,
        dropout: 0.0,
        out: None,
        resume: false,
        save_interval: None,
    })?;
    println!(
        "loss {:.3} -> {:.3} (data entropy {:.3}), {:.0} tokens/s",
        report.losses[0],
        report.final_loss,
        report.data_entropy.unwrap_or(f64::NAN),
        report.tokens_per_s
    );
    Ok(())
}
