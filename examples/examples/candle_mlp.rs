//! Train your own candle-nn model: an MLP classifier written with plain candle-nn
//! (`examples/lib.rs`: `mlp_varmap`, `mlp_classifier`) on an embedded data set (three
//! interleaved spirals), at ZeRO stage 3 on 2 ranks, through `ds_models::CandleModel`: the
//! network is built once from a `VarMap`, and the adapter rebuilds it from its own variable
//! table on every pass, so ZeRO-3 gathers and releases each hidden block without any code of
//! yours.
//!
//! `cargo run --release --example candle_mlp`

use candle_core::{Device, Tensor};
use ds_config::DeepSpeedConfig;
use ds_examples::{mlp_accuracy, mlp_classifier, mlp_varmap, spirals, train_ranks, Points};

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
    let batch = |step: u64, _m: usize, rank: usize, ws: usize, micro: usize| {
        // A fresh permutation-like walk over the data set each step; rank r takes its slice.
        let base = step as usize * micro * ws;
        let idx: Vec<usize> = (rank * micro..(rank + 1) * micro)
            .map(|j| ((base + j) * 7919) % n)
            .collect();
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| [xs[2 * i], xs[2 * i + 1]])
            .collect();
        let y: Vec<u32> = idx.iter().map(|&i| ys[i]).collect();
        Points {
            x: Tensor::from_vec(x, (micro, 2), &Device::Cpu).expect("shape"),
            y: Tensor::from_vec(y, micro, &Device::Cpu).expect("shape"),
        }
    };
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
