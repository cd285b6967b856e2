//! `ds bench ckpt-act`: the activation-checkpointing trade-off, measured side by side.

use std::time::Instant;

use candle_core::{Device, Tensor};
use ds_ckpt_act::Policy;
use serde::Serialize;

use ds_engine::data::Rng;
use ds_engine::EngineError;
use ds_models::gpt::{Gpt, ModelShape};

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

// ------------------------------------------------------------------ `ds bench kernels`

/// One kernel's figures in [`KernelBench`].
#[derive(Debug, Clone, Serialize)]
pub struct KernelResult {
    /// Kernel and direction, e.g. `linear fc forward`.
    pub kernel: String,
    /// Operand shape in words.
    pub shape: String,
    /// Median milliseconds per call.
    pub ms: f64,
    /// GFLOP/s for compute-bound kernels (matrix products inside), else `None`.
    pub gflops: Option<f64>,
    /// GB/s of the bytes the kernel must move, for memory-bound kernels, else `None`.
    pub gbps: Option<f64>,
    /// `gflops / matmul_peak_gflops` or `gbps / memcpy_GBps`.
    pub fraction: f64,
}

/// Result of [`kernels_bench`].
#[derive(Debug, Clone, Serialize)]
pub struct KernelBench {
    /// Threads the kernels ran with.
    pub threads: usize,
    /// The `gemm` crate's best rate over a GPT-2-small block's products with the same threads
    /// (`ds bench gemm`'s probe): this machine's practical f32 matrix peak.
    pub matmul_peak_gflops: f64,
    /// memcpy bandwidth of 64 MiB, measured in the same run (read + write bytes per second).
    #[serde(rename = "memcpy_GBps")]
    pub memcpy_gbps: f64,
    /// Per kernel.
    pub results: Vec<KernelResult>,
    /// The bf16 matrix product against the f32 one at a GPT-2-small shape.
    pub bf16: Bf16MatmulBench,
}

/// The bf16 matrix product of the explicit kernels (`ds_models::bf16mm`, what `ds train` runs
/// with `bf16.enabled` on the CPU) beside the f32 one, at GPT-2 small's MLP shape.
#[derive(Debug, Clone, Serialize)]
pub struct Bf16MatmulBench {
    /// The bf16 units of this CPU (`ds_models::bf16mm::units`).
    pub units: String,
    /// `m x k x n` of the product.
    pub shape: String,
    /// GFLOP/s of the f32 product.
    pub f32_gflops: f64,
    /// GFLOP/s of the bf16 product, when real bf16 units exist (not timed on the emulation).
    pub bf16_gflops: Option<f64>,
}

/// Times `C = A B` at GPT-2 small's `(1024 x 768) (768 x 3072)` in f32 and, where the CPU has
/// bf16 units, in bf16.
fn bf16_matmul_bench(
    th: ds_models::gpt::fast::Threads,
    reps: usize,
    rng: &mut Rng,
) -> Result<Bf16MatmulBench, EngineError> {
    use ds_models::{bf16mm, Bf16Units};
    let (m, k, n) = (1024, 768, 3072);
    let flops = 2.0 * (m * k * n) as f64;
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(k * n, 1.0);
    let f32_ms = median_ms(reps, || {
        ds_models::gpt::fast::matmul(th, &a, &b, m, k, n)?;
        Ok(())
    })?;
    let units = bf16mm::units();
    let bf16_gflops = if matches!(units, Bf16Units::Avx512Bf16 | Bf16Units::Blas) {
        let ms = median_ms(reps, || {
            bf16mm::matmul(units, th.0, &a, &b, m, k, n)
                .map(|_| ())
                .ok_or_else(|| EngineError::Data("bf16 matmul: the units cannot run".into()))
        })?;
        Some(flops / (ms * 1e6))
    } else {
        None
    };
    Ok(Bf16MatmulBench {
        units: units.name().to_string(),
        shape: format!("{m} x {k} x {n}"),
        f32_gflops: flops / (f32_ms * 1e6),
        bf16_gflops,
    })
}

fn median_ms(
    reps: usize,
    mut f: impl FnMut() -> Result<(), EngineError>,
) -> Result<f64, EngineError> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Times every explicit kernel of the GPT at `shape` with `batch` sequences on `threads`
/// threads, against this machine's matrix-product peak and memory bandwidth measured in the
/// same run.
pub fn kernels_bench(
    shape: ModelShape,
    batch: usize,
    threads: usize,
    reps: usize,
) -> Result<KernelBench, EngineError> {
    use ds_models::gpt::fast::{self, Threads};
    let th = Threads(threads.max(1));
    let reps = reps.max(1);
    let (b, t, c, h, v) = (batch, shape.seq, shape.hidden, shape.heads, shape.vocab);
    let n = b * t;
    let mut rng = Rng::new(1);
    let mut results = Vec::new();
    let mut push = |kernel: &str, shape: String, ms: f64, flops: f64, bytes: f64| {
        results.push((kernel.to_string(), shape, ms, flops, bytes));
    };
    // Matrix-product peak.
    // The matrix-product peak: the best rate of the `gemm` crate over a GPT-2-small block's
    // products (1024 tokens, hidden 768, MLP 3072; the three layouts training runs), each
    // called repeatedly into a kept output. A single 1024^3 product timed by its median with
    // a fresh output each call under-read it (108 against 146 GFLOP/s reached by a training
    // step on the same machine).
    let probe = crate::gemm::gpt_shapes(768, 3072, 768, 1024, 1);
    let matmul_peak_gflops = crate::gemm::gemm_bench(&probe, threads, &[], 0.1)
        .map_err(EngineError::Data)?
        .peak_gflops;
    let memcpy_gbps = 2.0 * ds_comm::bench::measure_memcpy(64 << 20);
    let bf16 = bf16_matmul_bench(th, reps, &mut Rng::new(2))?;
    // Linear layers of a block and the head.
    for (name, din, dout) in [
        ("qkv", c, 3 * c),
        ("proj", c, c),
        ("fc", c, 4 * c),
        ("fc2", 4 * c, c),
        ("head (tied wte)", c, v),
    ] {
        let x = rng.normal_vec(n * din, 1.0);
        let w = rng.normal_vec(dout * din, 0.02);
        let bias = vec![0f32; dout];
        let dy = rng.normal_vec(n * dout, 1.0);
        let (mut dx, mut dw, mut db) = (
            vec![0f32; n * din],
            vec![0f32; dout * din],
            vec![0f32; dout],
        );
        let f = 2.0 * (n * din * dout) as f64;
        let sh = format!("({n} x {din}) W^T ({dout} x {din})");
        let mut y = vec![0f32; n * dout];
        let ms = median_ms(reps, || {
            Ok(fast::linear_forward_into(
                th, &x, &w, &bias, n, din, dout, &mut y,
            )?)
        })?;
        push(&format!("linear {name} forward"), sh.clone(), ms, f, 0.0);
        let ms = median_ms(reps, || {
            Ok(fast::linear_backward(
                th, &dy, &x, &w, n, din, dout, &mut dx, &mut dw, &mut db,
            )?)
        })?;
        push(&format!("linear {name} backward"), sh, ms, 2.0 * f, 0.0);
    }
    // Attention (blocked, causal): the work counted is the causal half of the score matrix,
    // 2 products of 2 hd FLOPs per (query, visible key) forward; backward 5 products (the
    // scores recomputed, then dv, dP, dq, dk), FlashAttention's convention (2.5 x forward).
    let qkv = rng.normal_vec(n * 3 * c, 1.0);
    let dy = rng.normal_vec(n * c, 1.0);
    let hd = c / h.max(1);
    let f_att = 4.0 * (b * h * hd) as f64 * (t * (t + 1) / 2) as f64;
    let sh = format!("B {b}, heads {h}, T {t}, head dim {hd}");
    let (y, lse) = fast::attention_forward(th, &qkv, b, t, c, h)?;
    let ms = median_ms(reps, || {
        fast::attention_forward(th, &qkv, b, t, c, h)?;
        Ok(())
    })?;
    push("causal attention forward", sh.clone(), ms, f_att, 0.0);
    let ms = median_ms(reps, || {
        fast::attention_backward(th, &dy, &qkv, &y, &lse, b, t, c, h)?;
        Ok(())
    })?;
    push("causal attention backward", sh, ms, 2.5 * f_att, 0.0);
    // LayerNorm.
    let x = rng.normal_vec(n * c, 1.0);
    let w = vec![1f32; c];
    let bias = vec![0f32; c];
    let (_, mean, rstd) = fast::layer_norm_forward(th, &x, &w, &bias, c)?;
    let (mut dx, mut dw, mut db) = (vec![0f32; n * c], vec![0f32; c], vec![0f32; c]);
    let bytes = (n * c * 4) as f64;
    let ms = median_ms(reps, || {
        fast::layer_norm_forward(th, &x, &w, &bias, c)?;
        Ok(())
    })?;
    push(
        "layer norm forward",
        format!("{n} x {c}"),
        ms,
        0.0,
        2.0 * bytes,
    );
    let dyl = rng.normal_vec(n * c, 1.0);
    let ms = median_ms(reps, || {
        Ok(fast::layer_norm_backward(
            th, &dyl, &x, &w, &mean, &rstd, c, &mut dx, &mut dw, &mut db,
        )?)
    })?;
    push(
        "layer norm backward",
        format!("{n} x {c}"),
        ms,
        0.0,
        3.0 * bytes,
    );
    // GELU.
    let hv = rng.normal_vec(n * 4 * c, 1.0);
    let mut dg = rng.normal_vec(n * 4 * c, 1.0);
    let bytes = (n * 4 * c * 4) as f64;
    let ms = median_ms(reps, || {
        fast::gelu_forward(th, &hv);
        Ok(())
    })?;
    push(
        "gelu forward",
        format!("{n} x {}", 4 * c),
        ms,
        0.0,
        2.0 * bytes,
    );
    let ms = median_ms(reps, || Ok(fast::gelu_backward(th, &hv, &mut dg)?))?;
    push(
        "gelu backward",
        format!("{n} x {}", 4 * c),
        ms,
        0.0,
        3.0 * bytes,
    );
    // Softmax cross-entropy (in place; re-filled each call is not needed: the gradient is a
    // valid input row too).
    let mut logits = rng.normal_vec(n * v, 1.0);
    let tg: Vec<u32> = (0..n).map(|i| (i % v) as u32).collect();
    let ms = median_ms(reps, || {
        fast::softmax_cross_entropy(th, &mut logits, &tg, v)?;
        Ok(())
    })?;
    push(
        "softmax cross-entropy (+grad)",
        format!("{n} x {v}"),
        ms,
        0.0,
        2.0 * (n * v * 4) as f64,
    );
    let results = results
        .into_iter()
        .map(|(kernel, shape, ms, flops, bytes)| {
            let (gflops, gbps) = if flops > 0.0 {
                (Some(flops / (ms * 1e6)), None)
            } else {
                (None, Some(bytes / (ms * 1e6)))
            };
            let fraction = match (gflops, gbps) {
                (Some(g), _) => g / matmul_peak_gflops,
                (_, Some(g)) => g / memcpy_gbps,
                _ => 0.0,
            };
            KernelResult {
                kernel,
                shape,
                ms,
                gflops,
                gbps,
                fraction,
            }
        })
        .collect();
    Ok(KernelBench {
        threads: th.0,
        matmul_peak_gflops,
        memcpy_gbps,
        results,
        bf16,
    })
}
