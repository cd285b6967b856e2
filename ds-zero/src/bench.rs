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
    /// Median milliseconds of the whole accumulation-boundary phase on one rank as the engine
    /// runs it (`ZeroOptimizer::reduce_gradients_swap_stats` + `step_with`: the gradients
    /// handed over with the norm their accumulation pass took, as the engine's backward does
    /// while copying them out; then the AdamW update with averaging and clipping fused in,
    /// each updated piece written in the same pass into a separate model tensor in place, as
    /// the engine installs weights into the model's variables).
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
    // The model's weights: a tensor of its own, written in place by the update pass.
    let model =
        candle_core::Tensor::zeros(numel, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let failed = std::sync::atomic::AtomicBool::new(false);
    let publish = |at: usize, v: &[f32]| {
        let r = crate::zero::with_f32_mut(&model, |d| d[at..at + v.len()].copy_from_slice(v));
        if r.is_err() {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    for i in 0..steps + 2 {
        // Outside the timed phase: in the engine the backward's gradient copy takes the norm.
        let st = crate::GradStats::of(&local);
        let t0 = Instant::now();
        z.reduce_gradients_swap_stats(&mut local, Some(st), &comm)?;
        z.step_with(1e-3, &comm, Some(&publish))?;
        if i >= 2 {
            t_boundary.push(t0.elapsed().as_secs_f64());
        }
    }
    if failed.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ZeroError::Shape(
            "writing the model tensor in place failed".into(),
        ));
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

/// Result of [`offload_bench`] (the `ds bench offload` tool).
#[derive(Debug, Clone, Serialize)]
pub struct OffloadBench {
    /// Directory of the swap files (and of the disk probe).
    pub path: String,
    /// Whether the files used `O_DIRECT` (no page cache: the disk itself was measured).
    pub direct: bool,
    /// Elements of the swapped part (fp32 masters + AdamW's two moments: 12 bytes each).
    pub numel: u64,
    /// Elements per swapped chunk, chunk buffers in flight, I/O threads, request size.
    pub chunk_elems: u64,
    /// Chunk buffers.
    pub buffer_count: u64,
    /// I/O threads (`aio.thread_count`).
    pub thread_count: u64,
    /// Bytes per request (`aio.block_size`).
    pub block_size: u64,
    /// Median seconds of one NVMe-offloaded optimizer step (read, AdamW update, write back).
    pub step_s: f64,
    /// Bytes the step reads and writes (12 bytes per element each way).
    pub step_bytes_each_way: u64,
    /// Seconds of the step spent waiting for I/O (not hidden behind the update).
    pub step_io_wait_s: f64,
    /// `2 * step_bytes_each_way / step_s`.
    #[serde(rename = "swap_GBps")]
    pub swap_gbps: f64,
    /// The same AdamW update with everything in memory: the step's floor without I/O.
    pub update_only_s: f64,
    /// Sequential direct-I/O write of the same bytes, one 8 MiB request at a time (dd-style).
    #[serde(rename = "disk_write_GBps")]
    pub disk_write_gbps: f64,
    /// Sequential direct-I/O read of them.
    #[serde(rename = "disk_read_GBps")]
    pub disk_read_gbps: f64,
    /// Seconds the disk alone needs to read then write the step's bytes, over the step's
    /// seconds: the fraction of the disk's read+write bandwidth the pipeline reaches.
    pub disk_fraction: f64,
}

/// Direct-I/O sequential write then read of `bytes` under `dir`, 8 MiB per request: the
/// disk's own bandwidth (bytes per second each way), and whether `O_DIRECT` held.
pub fn disk_bandwidth(dir: &std::path::Path, bytes: u64) -> Result<(f64, f64, bool), ZeroError> {
    use crate::swap::{AioOptions, AlignedBuf, Swapper};
    let sw = Swapper::new(
        dir,
        0,
        AioOptions {
            block_size: 8 << 20,
            queue_depth: 1,
            thread_count: 1,
            single_submit: true,
            direct: true,
        },
    )?;
    let blk = 8usize << 20;
    let n = (bytes as usize).div_ceil(blk).max(1);
    let f = sw.create_file("disk_probe", n * blk / 4, 4)?;
    let direct = sw.direct().unwrap_or(false);
    let mut buf = AlignedBuf::zeroed(blk);
    buf.as_f32_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = i as f32);
    let t = Instant::now();
    for k in 0..n {
        buf = sw.write(&f, k * blk / 4, buf, blk / 4)?.wait()?;
    }
    // The data on the device, not in a write-back cache of the filesystem.
    let _ = std::fs::File::open(f.path()).and_then(|h| h.sync_all());
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for k in 0..n {
        buf = sw.read(&f, k * blk / 4, buf, blk / 4)?.wait()?;
    }
    let r = t.elapsed().as_secs_f64();
    let total = (n * blk) as f64;
    Ok((total / w, total / r, direct))
}

/// Times the NVMe-offloaded AdamW step over `numel` elements with swap files under `dir`
/// (median of `steps`), against the same update in memory and the disk's own direct-I/O
/// bandwidth for the same bytes, measured in the same run.
pub fn offload_bench(
    dir: &std::path::Path,
    numel: usize,
    steps: usize,
    nvme: crate::NvmeOptions,
) -> Result<OffloadBench, ZeroError> {
    use std::borrow::Cow;
    if numel == 0 || steps == 0 {
        return Err(ZeroError::Option("numel and steps must be >= 1".into()));
    }
    let comm = ds_comm::LocalComm::create(1)
        .pop()
        .ok_or_else(|| ZeroError::Option("no communicator".into()))?;
    let spec = OptimizerSpec::Adam(AdamParams {
        weight_decay: 0.01,
        ..Default::default()
    });
    let opts = crate::ZeroOptions {
        stage: 1,
        gradient_clipping: 0.0,
        ..Default::default()
    };
    let nvme = crate::NvmeOptions {
        optimizer_path: Some(dir.to_path_buf()),
        param_path: None,
        ..nvme
    };
    // The parameters in pieces of at most 16M elements (no whole-size init vector).
    let piece = 1usize << 24;
    let sizes: Vec<usize> = (0..numel.div_ceil(piece))
        .map(|k| piece.min(numel - k * piece))
        .collect();
    let mut init = |i: usize| -> Result<Cow<'static, [f32]>, ZeroError> {
        Ok(Cow::Owned(
            (0..sizes[i])
                .map(|j| ((i * piece + j) % 1000) as f32 * 1e-3)
                .collect(),
        ))
    };
    let sizes2 = sizes.clone();
    let mut z = crate::ZeroOptimizer::with_precision_streamed(
        &sizes2,
        &mut init,
        spec,
        opts,
        crate::ZeroPrecision::F32,
        nvme.clone(),
        &comm,
    )?;
    let direct = z.swap_dir().is_some_and(|(_, d)| d);
    let g: Vec<f32> = (0..numel)
        .map(|i| ((i % 777) as f32 - 388.0) * 1e-4)
        .collect();
    let mut times = Vec::with_capacity(steps);
    let mut waits = Vec::with_capacity(steps);
    for _ in 0..steps {
        z.reduce_gradients(&g, &comm)?;
        let before = z.swap_stats().map_or(0.0, |s| s.step_io_wait_s);
        let t = Instant::now();
        z.step(1e-3, &comm)?;
        times.push(t.elapsed().as_secs_f64());
        waits.push(z.swap_stats().map_or(0.0, |s| s.step_io_wait_s) - before);
    }
    drop(z);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let step_s = median(&mut times);
    let wait_s = median(&mut waits);
    // The same update in memory.
    let mut opt = FlatOptimizer::new(spec, numel);
    let mut p: Vec<f32> = (0..numel).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut ts = Vec::new();
    for _ in 0..steps.min(3) {
        let t = Instant::now();
        opt.step(&mut p, &g, 1e-3)?;
        ts.push(t.elapsed().as_secs_f64());
    }
    drop((opt, p, g));
    let update_only_s = median(&mut ts);
    let each = 12 * numel as u64;
    let (w, r, _) = disk_bandwidth(dir, each)?;
    let disk_s = each as f64 / r + each as f64 / w;
    Ok(OffloadBench {
        path: dir.display().to_string(),
        direct,
        numel: numel as u64,
        chunk_elems: nvme.chunk() as u64,
        buffer_count: nvme.buffer_count as u64,
        thread_count: nvme.aio.thread_count as u64,
        block_size: nvme.aio.block_size as u64,
        step_s,
        step_bytes_each_way: each,
        step_io_wait_s: wait_s,
        swap_gbps: 2.0 * each as f64 / step_s / 1e9,
        update_only_s,
        disk_write_gbps: w / 1e9,
        disk_read_gbps: r / 1e9,
        disk_fraction: disk_s / step_s,
    })
}
