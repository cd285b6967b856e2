//! Throughput of the fused optimizer against this machine's memory bandwidth, measured in
//! the same run (the `ds bench adamw` tool).

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::optim::{AdamParams, FlatOptimizer, OptimizerSpec};
use crate::ZeroError;

/// Bytes an AdamW step moves per element: read p, g, m, v; write p, m, v (4 bytes each).
pub const ADAMW_BYTES_PER_ELEMENT: u64 = 28;

/// Result of [`adamw_bench`].
#[derive(Debug, Clone, Serialize)]
pub struct AdamwBench {
    /// Elements per step.
    pub numel: u64,
    /// Threads used.
    pub threads: usize,
    /// Median milliseconds per fused AdamW step.
    pub ms_per_step: f64,
    /// Effective bandwidth of the step (28 bytes per element).
    #[serde(rename = "GBps")]
    pub gbps: f64,
    /// The same access pattern (4 streams read, 3 written) with trivial arithmetic: what the
    /// memory system allows, measured in the same run.
    #[serde(rename = "machine_GBps")]
    pub machine_gbps: f64,
    /// `GBps / machine_GBps`.
    pub bandwidth_fraction: f64,
    /// Median milliseconds of the whole accumulation-boundary phase on one rank
    /// (`ZeroOptimizer::reduce_gradients_swap` + `step`: gradient hand-over, inf/nan check and
    /// global norm in one pass, then the AdamW update with averaging and clipping fused in).
    pub boundary_ms_per_step: f64,
    /// `boundary_ms_per_step / ms_per_step` (target <= 1.3).
    pub boundary_over_adamw: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `steps` fused AdamW steps over `numel` fp32 elements (after 2 warm-up steps) and the
/// plain read-modify-write kernel over the same buffers.
pub fn adamw_bench(numel: usize, steps: usize) -> Result<AdamwBench, ZeroError> {
    if numel == 0 || steps == 0 {
        return Err(ZeroError::Option("numel and steps must be >= 1".into()));
    }
    let spec = OptimizerSpec::Adam(AdamParams {
        weight_decay: 0.01,
        ..Default::default()
    });
    let mut opt = FlatOptimizer::new(spec, numel);
    let mut p: Vec<f32> = (0..numel).map(|i| ((i % 1000) as f32) * 1e-3).collect();
    let g: Vec<f32> = (0..numel)
        .map(|i| ((i % 777) as f32) * 1e-4 - 0.03)
        .collect();
    for _ in 0..2 {
        opt.step(&mut p, &g, 1e-3)?;
    }
    let mut t_opt = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        opt.step(&mut p, &g, 1e-3)?;
        t_opt.push(t0.elapsed().as_secs_f64());
    }
    // The roofline kernel on separate buffers of the same size and layout.
    let mut m = vec![0.5f32; numel];
    let mut v = vec![0.25f32; numel];
    let rmw = |p: &mut [f32], m: &mut [f32], v: &mut [f32]| {
        const C: usize = 1 << 15;
        p.par_chunks_mut(C)
            .zip(m.par_chunks_mut(C))
            .zip(v.par_chunks_mut(C))
            .zip(g.par_chunks(C))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let mi = m[i] + g[i];
                    let vi = v[i] + g[i];
                    m[i] = mi;
                    v[i] = vi;
                    p[i] += mi * vi;
                }
            });
    };
    for _ in 0..2 {
        rmw(&mut p, &mut m, &mut v);
    }
    let mut t_rmw = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        rmw(&mut p, &mut m, &mut v);
        t_rmw.push(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&p);
    drop((m, v));
    // The whole boundary phase through the partitioned optimizer (1 rank, stage 0, clipping on).
    let comm = ds_comm::LocalComm::create(1).remove(0);
    let sizes = [numel];
    let mut z = crate::ZeroOptimizer::new(
        &sizes,
        &p,
        spec,
        crate::ZeroOptions {
            gradient_clipping: 1.0,
            ..Default::default()
        },
        &comm,
    )?;
    let mut t_boundary = Vec::with_capacity(steps);
    let mut local = g.clone();
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        z.reduce_gradients_swap(&mut local, &comm)?;
        z.step(1e-3, &comm)?;
        if i >= 2 {
            t_boundary.push(t0.elapsed().as_secs_f64());
        }
    }
    let s_boundary = median(t_boundary);
    let bytes = numel as f64 * ADAMW_BYTES_PER_ELEMENT as f64;
    let s_opt = median(t_opt);
    let s_rmw = median(t_rmw);
    let gbps = bytes / s_opt / 1e9;
    let machine_gbps = bytes / s_rmw / 1e9;
    Ok(AdamwBench {
        numel: numel as u64,
        threads: rayon::current_num_threads(),
        ms_per_step: s_opt * 1e3,
        gbps,
        machine_gbps,
        bandwidth_fraction: gbps / machine_gbps,
        boundary_ms_per_step: s_boundary * 1e3,
        boundary_over_adamw: s_boundary / s_opt,
    })
}
