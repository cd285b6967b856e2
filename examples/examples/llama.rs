//! A Llama-style decoder written with candle-nn (`examples/lib.rs`: RMSNorm in differentiable
//! form, rotary position embeddings, SwiGLU, untied head), trained through
//! `ds_models::CandleModel::sequential` at ZeRO stage 3 on 2 ranks, every block checkpointed:
//! one block's full weights at a time. Data: the embedded bigram language, whose entropy rate
//! is the floor of the loss.
//!
//! `cargo run --release --example llama`

use candle_core::Device;
use ds_config::DeepSpeedConfig;
use ds_engine::data::{BigramLanguage, DataLoader};
use ds_engine::traits::Tokens;
use ds_examples::{llama, llama_varmap, train_ranks, LlamaShape};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let s = LlamaShape {
        vocab: 64,
        hidden: 64,
        heads: 4,
        layers: 4,
        ffn: 172,
        seq: 32,
    };
    let ws = 2;
    let cfg = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 16, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.003}},
            "zero_optimization": {"stage": 3}}"#,
    )?
    .resolve(ws)?;
    let lang = BigramLanguage::new(s.vocab, 1);
    let floor = lang.entropy();
    let data = DataLoader::new(lang, 1, s.seq);
    let batch = |step: u64, m: usize, rank: usize, ws: usize, micro: usize| -> Tokens {
        data.micro_batch(step, m, rank, ws, micro).into()
    };
    let runs = train_ranks(
        &cfg,
        ws,
        150,
        true,
        || llama(llama_varmap(s, 0, &Device::Cpu)?, s),
        batch,
    );
    let r0 = runs.into_iter().next().ok_or("no rank")??;
    for (i, l) in r0.losses.iter().enumerate().step_by(25) {
        println!("step {i:4}: loss {l:.4}");
    }
    println!(
        "final loss {:.4} (the language's entropy rate, the floor: {floor:.4}); {} parameters; at most {} block(s) of weights held at once",
        r0.losses[r0.losses.len() - 1],
        r0.params.len(),
        r0.peak_blocks
    );
    Ok(())
}
