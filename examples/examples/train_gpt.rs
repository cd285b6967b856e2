//! Train the GPT end to end through the engine's library API (what `ds train` does).
//!
//! `cargo run --release --example train_gpt`

use ds_cli::train::{train, TrainArgs};
use ds_models::ModelShape;

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
        ..TrainArgs::default() // the addition task, no progress bar, no plot
    })?;
    println!(
        "loss {:.3} -> {:.3} (loss floor {:.3}), held-out accuracy {:.1}%, {:.0} tokens/s",
        report.losses[0],
        report.final_loss,
        report.data_entropy.unwrap_or(f64::NAN),
        100.0 * report.val_accuracy.unwrap_or(f64::NAN),
        report.tokens_per_s
    );
    Ok(())
}
