//! Train your own candle-nn model: an MLP classifier written with plain candle-nn
//! (`examples/lib.rs`: `mlp_varmap`, `mlp_classifier`) on an embedded data set (three
//! interleaved spirals), at ZeRO stage 3 on 2 ranks, through `ds_models::CandleModel`: the
//! network is built once from a `VarMap`, and the adapter rebuilds it from its own variable
//! table on every pass, so ZeRO-3 gathers and releases each hidden block without any code of
//! yours.
//!
//! `cargo run --release --example candle_mlp`

use candle_core::Device;
use ds_config::DeepSpeedConfig;
use ds_examples::{mlp_accuracy, mlp_classifier, mlp_varmap, points_batch, spirals, train_ranks};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (xs, ys) = spirals(200, 3);
    let ws = 2;
    let cfg = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 64, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "zero_optimization": {"stage": 3}}"#,
    )?
    .resolve(ws)?;
    let n = ys.len();
    let batch = points_batch(&xs, &ys, 1);
    let runs = train_ranks(
        &cfg,
        ws,
        400,
        true,
        || mlp_classifier(mlp_varmap(0, &Device::Cpu)?),
        batch,
    );
    let r0 = runs.into_iter().next().ok_or("no rank")??;
    for (i, l) in r0.losses.iter().enumerate().step_by(50) {
        println!("step {i:4}: loss {l:.4}");
    }
    println!(
        "final loss {:.4}; training accuracy {:.1}% of {n} points; at most {} block(s) of weights held at once",
        r0.losses[r0.losses.len() - 1],
        100.0 * mlp_accuracy(&r0.params, &xs, &ys)?,
        r0.peak_blocks
    );
    Ok(())
}
