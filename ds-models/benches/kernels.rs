//! One criterion bench per explicit GPT kernel at the reference shape (batch 8, seq 128,
//! hidden 256, 4 heads, vocab 8192), forward and backward, throughput in FLOP/s ("elements"
//! are floating-point operations) for matrix products and bytes for memory-bound kernels.
//! `cargo bench -p ds-models --bench kernels`; `ds bench kernels` prints the same kernels
//! against the machine's matmul peak and memcpy bandwidth in one table.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ds_engine::data::Rng;
use ds_models::fast::{self, Threads};

const B: usize = 8;
const T: usize = 128;
const C: usize = 256;
const H: usize = 4;
const V: usize = 8192;

fn threads() -> Threads {
    Threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn linear(c: &mut Criterion) {
    let th = threads();
    let n = B * T;
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("linear");
    for (name, din, dout) in [
        ("qkv", C, 3 * C),
        ("fc", C, 4 * C),
        ("fc2", 4 * C, C),
        ("head", C, V),
    ] {
        let x = rng.normal_vec(n * din, 1.0);
        let w = rng.normal_vec(dout * din, 0.02);
        let b = vec![0f32; dout];
        let dy = rng.normal_vec(n * dout, 1.0);
        let mut y = vec![0f32; n * dout];
        let (mut dx, mut dw, mut db) = (
            vec![0f32; n * din],
            vec![0f32; dout * din],
            vec![0f32; dout],
        );
        let flops = 2 * (n * din * dout) as u64;
        g.throughput(Throughput::Elements(flops));
        g.bench_function(format!("{name} forward"), |bn| {
            bn.iter(|| fast::linear_forward_into(th, &x, &w, &b, n, din, dout, &mut y).unwrap())
        });
        g.throughput(Throughput::Elements(2 * flops));
        g.bench_function(format!("{name} backward"), |bn| {
            bn.iter(|| {
                fast::linear_backward(th, &dy, &x, &w, n, din, dout, &mut dx, &mut dw, &mut db)
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let th = threads();
    let n = B * T;
    let mut rng = Rng::new(2);
    let qkv = rng.normal_vec(n * 3 * C, 1.0);
    let dy = rng.normal_vec(n * C, 1.0);
    let (y, lse) = fast::attention_forward(th, &qkv, B, T, C, H).unwrap();
    // The causal half of the scores; backward 5 products (FlashAttention's 2.5 x forward).
    let flops = 4 * (B * H * (C / H) * (T * (T + 1) / 2)) as u64;
    let mut g = c.benchmark_group("attention");
    g.throughput(Throughput::Elements(flops));
    g.bench_function("forward", |bn| {
        bn.iter(|| fast::attention_forward(th, &qkv, B, T, C, H).unwrap())
    });
    g.throughput(Throughput::Elements(5 * flops / 2));
    g.bench_function("backward", |bn| {
        bn.iter(|| fast::attention_backward(th, &dy, &qkv, &y, &lse, B, T, C, H).unwrap())
    });
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let th = threads();
    let n = B * T;
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("elementwise");
    let x = rng.normal_vec(n * C, 1.0);
    let w = vec![1f32; C];
    let b = vec![0f32; C];
    let dy = rng.normal_vec(n * C, 1.0);
    let (_, mean, rstd) = fast::layer_norm_forward(th, &x, &w, &b, C).unwrap();
    let (mut dx, mut dw, mut db) = (vec![0f32; n * C], vec![0f32; C], vec![0f32; C]);
    g.throughput(Throughput::Bytes(2 * (n * C * 4) as u64));
    g.bench_function("layer norm forward", |bn| {
        bn.iter(|| fast::layer_norm_forward(th, &x, &w, &b, C).unwrap())
    });
    g.throughput(Throughput::Bytes(3 * (n * C * 4) as u64));
    g.bench_function("layer norm backward", |bn| {
        bn.iter(|| {
            fast::layer_norm_backward(th, &dy, &x, &w, &mean, &rstd, C, &mut dx, &mut dw, &mut db)
                .unwrap()
        })
    });
    let h = rng.normal_vec(n * 4 * C, 1.0);
    let mut dg = rng.normal_vec(n * 4 * C, 1.0);
    g.throughput(Throughput::Bytes(2 * (n * 4 * C * 4) as u64));
    g.bench_function("gelu forward", |bn| bn.iter(|| fast::gelu_forward(th, &h)));
    g.throughput(Throughput::Bytes(3 * (n * 4 * C * 4) as u64));
    g.bench_function("gelu backward", |bn| {
        bn.iter(|| fast::gelu_backward(th, &h, &mut dg).unwrap())
    });
    let mut logits = rng.normal_vec(n * V, 1.0);
    let tg: Vec<u32> = (0..n).map(|i| (i % V) as u32).collect();
    g.throughput(Throughput::Bytes(2 * (n * V * 4) as u64));
    g.bench_function("softmax cross-entropy", |bn| {
        bn.iter(|| fast::softmax_cross_entropy(th, &mut logits, &tg, V).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = linear, attention, elementwise
}
criterion_main!(benches);
