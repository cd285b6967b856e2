//! Forward of a small instrumented transformer-like MLP stack: no profiler calls vs profiler
//! compiled in but disabled vs enabled.
//!
//! `CARGO_TARGET_DIR=/work/main/target-prof cargo bench -p ds-profiler --bench overhead`

use candle_core::{DType, Device, Result, Tensor, D};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ds_profiler::{Activation, FlopsProfiler};

struct Block {
    w1: Tensor,
    w2: Tensor,
    g: Tensor,
}

struct Model {
    blocks: Vec<Block>,
}

impl Model {
    fn new(layers: usize, h: usize, dev: &Device) -> Result<Self> {
        let blocks = (0..layers)
            .map(|_| {
                Ok(Block {
                    w1: (Tensor::randn(0f32, 1f32, (4 * h, h), dev)? * 0.02)?,
                    w2: (Tensor::randn(0f32, 1f32, (h, 4 * h), dev)? * 0.02)?,
                    g: Tensor::ones(h, DType::F32, dev)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    fn layer_norm(x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(g)
    }

    /// Forward with optional profiler calls (`None` = no calls compiled into the path).
    fn forward(&self, x: &Tensor, prof: Option<&FlopsProfiler>) -> Result<Tensor> {
        let _m = prof.map(|p| p.scope("model", "Model"));
        let mut x = x.clone();
        for (i, b) in self.blocks.iter().enumerate() {
            let name = BLOCK_NAMES[i % BLOCK_NAMES.len()];
            let _g = prof.map(|p| p.scope(name, "Block"));
            if let Some(p) = prof {
                p.set_params((b.w1.elem_count() + b.w2.elem_count() + b.g.elem_count()) as u64);
                p.record_layer_norm(x.dims(), true);
            }
            let h = Self::layer_norm(&x, &b.g)?;
            if let Some(p) = prof {
                p.record_linear(h.dims(), b.w1.dims()[0]);
            }
            let h = h.broadcast_matmul(&b.w1.t()?)?;
            if let Some(p) = prof {
                p.record_activation(Activation::Gelu, h.dims());
            }
            let h = h.gelu()?;
            if let Some(p) = prof {
                p.record_linear(h.dims(), b.w2.dims()[0]);
            }
            let h = h.broadcast_matmul(&b.w2.t()?)?;
            if let Some(p) = prof {
                p.record_elementwise(x.dims(), h.dims());
            }
            x = (x + h)?;
        }
        Ok(x)
    }
}

const BLOCK_NAMES: [&str; 4] = ["block0", "block1", "block2", "block3"];

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let model = match Model::new(4, 128, &dev) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("model: {e}");
            return;
        }
    };
    let x = match Tensor::randn(0f32, 1f32, (8, 32, 128), &dev) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("input: {e}");
            return;
        }
    };
    let disabled = FlopsProfiler::new();
    let enabled = FlopsProfiler::enabled_new();
    let mut g = c.benchmark_group("forward_4x128_b8_s32");
    g.bench_function("no_profiler", |b| {
        b.iter(|| black_box(model.forward(black_box(&x), None).ok()))
    });
    g.bench_function("profiler_disabled", |b| {
        b.iter(|| black_box(model.forward(black_box(&x), Some(&disabled)).ok()))
    });
    g.bench_function("profiler_enabled", |b| {
        b.iter(|| black_box(model.forward(black_box(&x), Some(&enabled)).ok()))
    });
    g.finish();
    // Per-call cost of the disabled path, isolated.
    c.bench_function("disabled_record_linear_x1000", |b| {
        b.iter(|| {
            for _ in 0..1000 {
                disabled.record_linear(black_box(&[8, 32, 128]), black_box(512));
                let _s = disabled.scope(black_box("blk"), "Block");
            }
        })
    });
    c.bench_function("enabled_scope_record_linear_x1000", |b| {
        b.iter(|| {
            for _ in 0..1000 {
                let _s = enabled.scope(black_box("blk"), "Block");
                enabled.record_linear(black_box(&[8, 32, 128]), black_box(512));
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
