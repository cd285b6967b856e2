//! ds-precision benches: the fused unscale / inf-nan / squared-norm pass against this
//! machine's read bandwidth on the same buffer (a plain vectorised sum) and a read-modify-write
//! baseline (scale in place), and against the three-pass version done with candle ops; plus
//! candle's f16/bf16 vs f32 matmul speed on the CPU.
//!
//! `cargo bench -p ds-benches --bench precision`

use candle_core::{DType, Device, Tensor};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ds_precision::{check_norm_f32, scale_in_place, unscale_check_norm_f32, unscale_into_f32};
use half::f16;
use std::time::Duration;

/// 16 Mi f32 = 64 MiB: far larger than the caches.
const N: usize = 16 << 20;

fn data(n: usize) -> Vec<f32> {
    let mut s = 7u64;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The read-bandwidth reference: a plain sum, 16 independent lanes so it vectorises.
fn read_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

/// The three-pass candle version: unscale (affine), isfinite check, sqr().sum().
fn candle_three_pass(t: &Tensor, inv: f64) -> candle_core::Result<(Tensor, bool, f32)> {
    let u = t.affine(inv, 0.0)?;
    let finite = u.sum_all()?.to_scalar::<f32>()?.is_finite();
    let sq = u.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((u, finite, sq))
}

fn fused(c: &mut Criterion) {
    let mut g = c.benchmark_group("grad_pass_64MiB_f32");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes((N * 4) as u64));
    let mut buf = data(N);
    g.bench_function("read_sum (read bandwidth)", |b| {
        b.iter(|| black_box(read_sum(black_box(&buf))))
    });
    g.bench_function("scale_in_place (read+write bandwidth)", |b| {
        b.iter(|| scale_in_place(black_box(&mut buf), black_box(1.0)))
    });
    g.bench_function("fused unscale+check+norm (in place)", |b| {
        b.iter(|| black_box(unscale_check_norm_f32(black_box(&mut buf), black_box(1.0))))
    });
    g.bench_function("fused check+norm (read only)", |b| {
        b.iter(|| black_box(check_norm_f32(black_box(&buf))))
    });
    let t = Tensor::from_slice(&buf, N, &Device::Cpu).expect("tensor");
    g.bench_function("candle three-pass (affine, sum isfinite, sqr.sum)", |b| {
        b.iter(|| black_box(candle_three_pass(black_box(&t), 1.0).expect("candle")))
    });
    let h: Vec<f16> = buf.iter().map(|&x| f16::from_f32(x)).collect();
    let mut dst = vec![0f32; N];
    g.throughput(Throughput::Bytes((N * 2) as u64));
    g.bench_function("fused f16 -> f32 master grads (bytes = f16 input)", |b| {
        b.iter(|| black_box(unscale_into_f32(black_box(&h), &mut dst, black_box(1.0))))
    });
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("candle_cpu_matmul");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for &n in &[256usize, 1024] {
        let a = Tensor::from_vec(data(n * n), (n, n), &Device::Cpu).expect("a");
        let b = Tensor::from_vec(data(n * n), (n, n), &Device::Cpu).expect("b");
        g.throughput(Throughput::Elements((2 * n * n * n) as u64)); // FLOP per matmul
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let (a, b) = (a.to_dtype(dt).expect("cast"), b.to_dtype(dt).expect("cast"));
            g.bench_with_input(BenchmarkId::new(format!("{dt:?}"), n), &n, |bch, _| {
                bch.iter(|| black_box(a.matmul(&b).expect("matmul")))
            });
        }
        // an elementwise op for contrast (the DESIGN's 10-70x claim)
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let a = a.to_dtype(dt).expect("cast");
            g.throughput(Throughput::Elements((n * n) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{dt:?} elementwise mul"), n),
                &n,
                |bch, _| bch.iter(|| black_box((&a * &a).expect("mul"))),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, fused, matmul);
criterion_main!(benches);
