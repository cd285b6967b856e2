//! ZeRO memory per stage: the estimator's figures beside what a live `ZeroOptimizer` holds, for
//! the reference GPT (5.3M parameters) on 4 ranks, fp32 Adam.
//!
//! `cargo run --release --example zero_memory`

use ds_comm::{Communicator, LocalComm};
use ds_models::{gpt_param_count, ModelShape};
use ds_zero::estimate::{estimate, Precision};
use ds_zero::optim::{AdamParams, OptimizerSpec};
use ds_zero::{ZeroOptimizer, ZeroOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let psi = gpt_param_count(&ModelShape::default());
    let ws = 4;
    println!(
        "reference GPT: {psi} parameters, {ws} ranks, fp32 Adam (8 bytes of state per parameter)"
    );
    println!("stage | estimate per rank (MiB) | live per rank (MiB): params + grads + optimizer");
    for stage in 0..=3u8 {
        let e = estimate(psi as u64, ws as u64, stage, Precision::Fp32, 8)?;
        let live: Vec<usize> = std::thread::scope(|s| {
            LocalComm::create(ws)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let z = ZeroOptimizer::new(
                            &[psi],
                            &vec![0.0; psi],
                            OptimizerSpec::Adam(AdamParams::default()),
                            ZeroOptions {
                                stage,
                                ..Default::default()
                            },
                            &c,
                        )
                        .map(|z| {
                            let m = z.memory();
                            m.params_bytes + m.grads_bytes + m.optimizer_bytes
                        });
                        let _ = c.rank();
                        z.unwrap_or(0)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .collect()
        });
        let mib = |b: f64| b / (1 << 20) as f64;
        println!(
            "{stage:5} | {:23.2} | {:.2}",
            mib(e.per_rank_bytes as f64),
            mib(*live.iter().max().unwrap_or(&0) as f64)
        );
    }
    Ok(())
}
