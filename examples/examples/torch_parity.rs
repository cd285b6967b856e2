//! Training-curve parity with PyTorch: the same initial weights and batches, fp32 AdamW, the
//! first steps' losses must match within 1e-4 relative.
//!
//! ```text
//! python benches/peer/torch_parity.py /tmp/parity        # with the peer venv (PyTorch)
//! cargo run --release --example torch_parity -- /tmp/parity
//! ```

use std::path::PathBuf;

use candle_core::{DType, Device};
use ds_comm::LocalComm;
use ds_config::DeepSpeedConfig;
use ds_engine::engine::Engine;
use ds_models::{Gpt, ModelShape};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: torch_parity DIR")?);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("torch.json"))?)?;
    let g = |k: &str| {
        meta["shape"][k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or(format!("torch.json: no shape.{k}"))
    };
    let shape = ModelShape {
        layers: g("layers")?,
        hidden: g("hidden")?,
        heads: g("heads")?,
        seq: g("seq")?,
        vocab: g("vocab")?,
    };
    let (steps, batch) = (g("steps")?, g("batch")?);
    let want: Vec<f64> = meta["losses"]
        .as_array()
        .ok_or("torch.json: no losses")?
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    let cfg = DeepSpeedConfig::from_value(serde_json::json!({
        "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "steps_per_print": null,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 0}
    }))
    .resolve(1)?;
    let model = Gpt::new(shape, 0, &Device::Cpu)?;
    model.load_safetensors(&dir.join("init.safetensors"))?;
    let batches = candle_core::safetensors::load(dir.join("batches.safetensors"), &Device::Cpu)?;
    let comm = LocalComm::create(1).remove(0);
    let mut engine = Engine::initialize(&cfg, model, &comm)?;
    let mut worst = 0f64;
    for (s, &want_s) in want.iter().enumerate().take(steps) {
        let get = |k: String| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
            let t = batches
                .get(&k)
                .ok_or(format!("batches.safetensors: no {k}"))?;
            Ok(t.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?)
        };
        let (x, y) = (get(format!("x{s}"))?, get(format!("y{s}"))?);
        let r = engine.train_batch(|_| (x.clone(), y.clone()))?;
        let rel = (r.loss - want_s).abs() / want_s.abs();
        worst = worst.max(rel);
        println!(
            "step {s}: ds {:.7}  torch {:.7}  rel diff {rel:.2e}",
            r.loss, want_s
        );
    }
    if worst > 1e-4 {
        return Err(format!("losses differ from PyTorch by {worst:.2e} relative (> 1e-4)").into());
    }
    println!("parity: max relative difference {worst:.2e} <= 1e-4 over {steps} steps");
    Ok(())
}
