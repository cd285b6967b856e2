//! `ds bench ckpt-act`: the activation-checkpointing trade-off, measured side by side.

use std::time::Instant;

use candle_core::{Device, Tensor};
use ds_ckpt_act::Policy;
use serde::Serialize;

use crate::model::{Gpt, ModelShape, Rng};
use crate::EngineError;

/// Result of [`ckpt_act_bench`] (the keys are a contract).
#[derive(Debug, Clone, Serialize)]
pub struct CkptActBench {
    /// Peak bytes above the model during a forward+backward without checkpointing.
    pub peak_bytes_without: u64,
    /// The same with every block checkpointed.
    pub peak_bytes_with: u64,
    /// Median forward+backward milliseconds without checkpointing.
    pub step_ms_without: f64,
    /// The same with every block checkpointed.
    pub step_ms_with: f64,
    /// `peak_bytes_without / peak_bytes_with`.
    pub memory_ratio: f64,
    /// `step_ms_with / step_ms_without`.
    pub time_ratio: f64,
}

/// Runs `steps` forward+backward passes of the GPT with batch `batch` per policy, measuring the
/// allocator's peak above the baseline (needs a counting allocator such as
/// `ds_profiler::CountingAlloc` installed in the binary;
/// `current`/`peak`/`reset` read it).
pub fn ckpt_act_bench(
    shape: ModelShape,
    batch: usize,
    steps: usize,
    current: fn() -> usize,
    peak: fn() -> usize,
    reset: fn(),
) -> Result<CkptActBench, EngineError> {
    let model = Gpt::new(shape, 0, &Device::Cpu)?;
    let mut rng = Rng::new(1);
    let mut toks = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (rng.next_u64() % shape.vocab as u64) as u32)
            .collect()
    };
    let ids = Tensor::from_vec(toks(batch * shape.seq), (batch, shape.seq), &Device::Cpu)?;
    let tg = Tensor::from_vec(toks(batch * shape.seq), (batch, shape.seq), &Device::Cpu)?;
    let run = |policy: Policy| -> Result<(u64, f64), EngineError> {
        let mut peaks = Vec::new();
        let mut times = Vec::new();
        for _ in 0..steps.max(1) + 1 {
            let base = current();
            reset();
            let t0 = Instant::now();
            let r = model.forward_backward(&ids, &tg, policy)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            peaks.push(peak().saturating_sub(base) as u64);
            drop(r);
        }
        // The first pass warms up allocations and thread pools.
        times.remove(0);
        peaks.remove(0);
        times.sort_by(f64::total_cmp);
        Ok((peaks.into_iter().max().unwrap_or(0), times[times.len() / 2]))
    };
    let (pw, tw) = run(Policy::None)?;
    let (pc, tc) = run(Policy::Every)?;
    Ok(CkptActBench {
        peak_bytes_without: pw,
        peak_bytes_with: pc,
        step_ms_without: tw,
        step_ms_with: tc,
        memory_ratio: pw as f64 / (pc.max(1)) as f64,
        time_ratio: tc / tw,
    })
}
