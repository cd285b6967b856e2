//! `ds bench gemm`: the matrix products of a GPT training step measured on every GEMM
//! backend at hand, side by side in one run, and the machine's measured f32 matrix peak.
//!
//! The backends are the `gemm` crate (what the explicit kernels call; pure Rust, runtime
//! dispatch to AVX2/AVX-512) and any CBLAS library named with `--blas NAME=PATH` (MKL's
//! `libmkl_rt.so`, BLIS, OpenBLAS, ...), loaded at run time with `dlopen`: the build stays
//! pure `cargo`, with no system library linked. Each product of a GPT step appears in the
//! three layouts training runs: the forward `X W^T` (NT), the input gradient `dY W` (NN) and
//! the weight gradient `dY^T X` (TN). Every backend's result is checked against the `gemm`
//! crate's before it is timed, so a mis-declared library cannot report a fast wrong answer.
//!
//! The libraries run as the kernels run them under `DS_BLAS` ([`ds_models::blas`]):
//! single-threaded, each product split into `--threads` bands on rayon's pool (one thread
//! pool for everything: a library's own pool spinning beside rayon's made a GPT-2-small step
//! 2.3x slower on 2 cores).
//!
//! ```no_run
//! let shapes = ds_cli::gemm::gpt_shapes(768, 3072, 50304, 1024, 12);
//! let r = ds_cli::gemm::gemm_bench(&shapes, 2, &[], 0.3)?;
//! println!("gemm crate peak {:.1} GFLOP/s", r.peak_gflops);
//! # Ok::<(), String>(())
//! ```

use std::time::Instant;

use ds_engine::data::Rng;
use ds_models::bf16mm::Operand;
use ds_models::blas::Blas;
use serde::Serialize;

/// How a product's operands are stored (row-major), as training runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Layout {
    /// `C[m,n] = A[m,k] B[k,n]` (the input gradient `dY W`).
    NN,
    /// `C[m,n] = A[m,k] B[n,k]^T` (the forward `X W^T`; W stored (out, in)).
    NT,
    /// `C[m,n] = A[k,m]^T B[k,n]` (the weight gradient `dY^T X`).
    TN,
}

/// One matrix product of a training step.
#[derive(Debug, Clone, Serialize)]
pub struct GemmShape {
    /// What it is (e.g. `fc forward`).
    pub name: String,
    /// Rows of C.
    pub m: usize,
    /// The reduced dimension.
    pub k: usize,
    /// Columns of C.
    pub n: usize,
    /// Operand layout.
    pub layout: Layout,
    /// How many times one micro-batch runs it (layers for a block's products).
    pub count: usize,
}

impl GemmShape {
    /// Floating-point operations of one product.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The products of one GPT micro-batch of `rows` tokens (batch x sequence): the four linear
/// layers of each of `layers` blocks (hidden `c`, MLP width `ff`) and the tied head over
/// `vocab`, each forward (NT), input gradient (NN) and weight gradient (TN). The attention's
/// own products are not included (they run on the blocked attention kernel).
pub fn gpt_shapes(c: usize, ff: usize, vocab: usize, rows: usize, layers: usize) -> Vec<GemmShape> {
    let mut v = Vec::new();
    for (name, din, dout, count) in [
        ("qkv", c, 3 * c, layers),
        ("proj", c, c, layers),
        ("fc", c, ff, layers),
        ("fc2", ff, c, layers),
        ("head", c, vocab, 1),
    ] {
        let mk = |what: &str, m, k, n, layout| GemmShape {
            name: format!("{name} {what}"),
            m,
            k,
            n,
            layout,
            count,
        };
        v.push(mk("forward", rows, din, dout, Layout::NT));
        v.push(mk("input grad", rows, dout, din, Layout::NN));
        v.push(mk("weight grad", dout, rows, din, Layout::TN));
    }
    v
}

/// A CBLAS library loaded at run time, named on the command line; run as the kernels run it
/// under `DS_BLAS` (single-threaded in each of `threads` bands: [`Blas::product`]).
pub struct Cblas {
    name: String,
    blas: Blas,
}

impl Cblas {
    /// Loads `cblas_sgemm` from the shared library at `path` (LP64: 32-bit integers).
    pub fn load(name: &str, path: &str) -> Result<Cblas, String> {
        let blas = Blas::open(path, 1).map_err(|e| format!("--blas {name}={path}: {e}"))?;
        Ok(Cblas {
            name: name.to_string(),
            blas,
        })
    }

    /// The name given on the command line.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn run(
        &self,
        s: &GemmShape,
        threads: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
    ) -> Result<(), String> {
        let ((ars, acs), (brs, bcs)) = strides(s);
        let op = |data, rs, cs| Operand {
            data,
            off: 0,
            rs,
            cs,
        };
        let done = self.blas.product(
            threads,
            false,
            s.m,
            s.n,
            s.k,
            c,
            0,
            s.n,
            false,
            &op(a, ars, acs),
            &op(b, brs, bcs),
            1.0,
        );
        if done {
            Ok(())
        } else {
            Err(format!(
                "{}: {} declined {}",
                self.name,
                self.blas.path(),
                s.name
            ))
        }
    }
}

/// (row stride, column stride) of A (m x k) and B (k x n) as stored in the layout of `s`.
fn strides(s: &GemmShape) -> ((usize, usize), (usize, usize)) {
    let a = match s.layout {
        Layout::NN | Layout::NT => (s.k, 1),
        Layout::TN => (1, s.m),
    };
    let b = match s.layout {
        Layout::NN | Layout::TN => (s.n, 1),
        Layout::NT => (1, s.k),
    };
    (a, b)
}

/// The `gemm` crate's product in the layout of `s` (what the explicit kernels call).
fn gemm_crate(s: &GemmShape, threads: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    let ((ars, acs), (brs, bcs)) = strides(s);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    assert!(a.len() >= s.m * s.k && b.len() >= s.k * s.n && c.len() >= s.m * s.n);
    // SAFETY: the operands hold the elements the strides reach (asserted above); c is a
    // distinct mutable buffer.
    unsafe {
        gemm::gemm(
            s.m,
            s.n,
            s.k,
            c.as_mut_ptr(),
            1,
            s.n as isize,
            false,
            a.as_ptr(),
            acs as isize,
            ars as isize,
            b.as_ptr(),
            bcs as isize,
            brs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// One backend's time on one product.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// The backend (`gemm-crate` or a `--blas` name).
    pub backend: String,
    /// Best time of one call, ms.
    pub best_ms: f64,
    /// Median time of one call, ms.
    pub median_ms: f64,
    /// GFLOP/s at the best time.
    pub gflops: f64,
    /// Largest |C - C_gemm| / max|C_gemm| against the `gemm` crate's result.
    pub max_rel_diff: f64,
}

/// One product's results on every backend.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeResult {
    /// The product.
    pub shape: GemmShape,
    /// Every backend's timing, in the order loaded (the `gemm` crate first).
    pub timings: Vec<Timing>,
    /// The fastest backend's name.
    pub fastest: String,
}

/// A backend's total over the step's products (each weighted by how often it runs).
#[derive(Debug, Clone, Serialize)]
pub struct BackendTotal {
    /// The backend.
    pub backend: String,
    /// Matrix-product time of one micro-batch, ms.
    pub step_ms: f64,
    /// Its rate over those products, GFLOP/s.
    pub gflops: f64,
}

/// `ds bench gemm`'s report.
#[derive(Debug, Clone, Serialize)]
pub struct GemmBench {
    /// The `gemm` crate's thread count.
    pub threads: usize,
    /// The loaded libraries (name, path).
    pub libraries: Vec<(String, String)>,
    /// Per product.
    pub shapes: Vec<ShapeResult>,
    /// Per backend, over the whole step.
    pub totals: Vec<BackendTotal>,
    /// Taking the fastest backend for every product.
    pub best_per_shape: BackendTotal,
    /// The highest rate any backend reached on any product: the machine's measured f32
    /// matrix peak (at the `gemm` crate's thread count when the libraries use the same).
    pub peak_gflops: f64,
    /// Which backend and product reached it.
    pub peak_at: String,
}

/// Times `f` (one call per sample) until `min_secs` have passed and at least 3 samples were
/// taken, after one untimed warm-up call; returns (best, median) in ms.
fn time_calls(
    min_secs: f64,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<(f64, f64), String> {
    f()?;
    let mut ts = Vec::new();
    let start = Instant::now();
    while ts.len() < 3 || (start.elapsed().as_secs_f64() < min_secs && ts.len() < 1000) {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(f64::total_cmp);
    Ok((ts[0], ts[ts.len() / 2]))
}

/// Runs every product of `shapes` on the `gemm` crate (`threads` threads) and on every
/// library in `libs`, checking each against the `gemm` crate's result, timing each for at
/// least `min_secs`.
pub fn gemm_bench(
    shapes: &[GemmShape],
    threads: usize,
    libs: &[Cblas],
    min_secs: f64,
) -> Result<GemmBench, String> {
    let threads = threads.max(1);
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    for s in shapes {
        let a = rng.normal_vec(s.m * s.k, 1.0);
        let b = rng.normal_vec(s.k * s.n, 1.0);
        let mut want = vec![0f32; s.m * s.n];
        gemm_crate(s, threads, &a, &b, &mut want);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30) as f64;
        let mut c = vec![0f32; s.m * s.n];
        let mut timings = Vec::new();
        let (best, med) = time_calls(min_secs, || {
            gemm_crate(s, threads, &a, &b, &mut c);
            Ok(())
        })?;
        timings.push(Timing {
            backend: "gemm-crate".into(),
            best_ms: best,
            median_ms: med,
            gflops: s.flops() / (best * 1e6),
            max_rel_diff: 0.0,
        });
        for lib in libs {
            c.fill(f32::NAN);
            lib.run(s, threads, &a, &b, &mut c)?;
            let diff = c
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs() as f64)
                .fold(
                    0f64,
                    |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
                )
                / scale;
            if diff > 1e-3 {
                return Err(format!(
                    "{} ({}) on {} ({} x {} x {}, {:?}) differs from the gemm crate by {diff:e} of the largest value: is it an LP64 CBLAS?",
                    lib.name,
                    lib.blas.path(),
                    s.name,
                    s.m,
                    s.k,
                    s.n,
                    s.layout
                ));
            }
            let (best, med) = time_calls(min_secs, || lib.run(s, threads, &a, &b, &mut c))?;
            timings.push(Timing {
                backend: lib.name.clone(),
                best_ms: best,
                median_ms: med,
                gflops: s.flops() / (best * 1e6),
                max_rel_diff: diff,
            });
        }
        let fastest = timings
            .iter()
            .min_by(|x, y| x.best_ms.total_cmp(&y.best_ms))
            .map(|t| t.backend.clone())
            .unwrap_or_default();
        out.push(ShapeResult {
            shape: s.clone(),
            timings,
            fastest,
        });
    }
    let total_flops: f64 = shapes.iter().map(|s| s.flops() * s.count as f64).sum();
    let total = |name: &str, ms: f64| BackendTotal {
        backend: name.to_string(),
        step_ms: ms,
        gflops: total_flops / (ms * 1e6),
    };
    let mut totals = Vec::new();
    for (i, t0) in out
        .first()
        .map(|r| r.timings.clone())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let ms: f64 = out
            .iter()
            .map(|r| r.timings[i].best_ms * r.shape.count as f64)
            .sum();
        totals.push(total(&t0.backend, ms));
    }
    let best_ms: f64 = out
        .iter()
        .map(|r| {
            r.timings
                .iter()
                .map(|t| t.best_ms)
                .fold(f64::INFINITY, f64::min)
                * r.shape.count as f64
        })
        .sum();
    let (mut peak, mut peak_at) = (0f64, String::new());
    for r in &out {
        for t in &r.timings {
            if t.gflops > peak {
                peak = t.gflops;
                peak_at = format!("{} on {}", t.backend, r.shape.name);
            }
        }
    }
    Ok(GemmBench {
        threads,
        libraries: libs
            .iter()
            .map(|l| (l.name.clone(), l.blas.path().to_string()))
            .collect(),
        shapes: out,
        totals,
        best_per_shape: total("fastest per product", best_ms),
        peak_gflops: peak,
        peak_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `gemm` crate call in each layout against a plain f64 triple loop.
    #[test]
    fn gemm_crate_layouts_match_a_triple_loop() {
        let mut rng = Rng::new(3);
        for layout in [Layout::NN, Layout::NT, Layout::TN] {
            let s = GemmShape {
                name: "t".into(),
                m: 7,
                k: 13,
                n: 5,
                layout,
                count: 1,
            };
            let a = rng.normal_vec(s.m * s.k, 1.0);
            let b = rng.normal_vec(s.k * s.n, 1.0);
            let at = |i: usize, p: usize| match layout {
                Layout::TN => a[p * s.m + i],
                _ => a[i * s.k + p],
            };
            let bt = |p: usize, j: usize| match layout {
                Layout::NT => b[j * s.k + p],
                _ => b[p * s.n + j],
            };
            for threads in [1, 2] {
                let mut c = vec![0f32; s.m * s.n];
                gemm_crate(&s, threads, &a, &b, &mut c);
                for i in 0..s.m {
                    for j in 0..s.n {
                        let r: f64 = (0..s.k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                        assert!(
                            (c[i * s.n + j] as f64 - r).abs() < 1e-4,
                            "{layout:?} ({i},{j}): {} vs {r}",
                            c[i * s.n + j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gpt_shapes_count_the_step_flops() {
        // 6 * params * tokens for the linear layers (forward 2, backward 4 FLOPs per weight
        // and token): 12 layers of 12 c^2 weights and the c x vocab head.
        let (c, v, rows, l) = (64, 100, 8, 3);
        let s = gpt_shapes(c, 4 * c, v, rows, l);
        assert_eq!(s.len(), 15);
        let total: f64 = s.iter().map(|x| x.flops() * x.count as f64).sum();
        let params = (l * 12 * c * c + c * v) as f64;
        assert_eq!(total, 6.0 * params * rows as f64);
    }

    #[test]
    fn a_missing_library_is_a_message() {
        let e = Cblas::load("nope", "/nonexistent/libnope.so")
            .err()
            .unwrap();
        assert!(
            e.contains("--blas nope=/nonexistent/libnope.so: DS_BLAS="),
            "{e}"
        );
    }
}
