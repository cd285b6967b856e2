//! Thread CPU time of the explicit causal attention (forward, backward) on one thread, against
//! a 1024^3 matrix product through the same GEMM measured in the same run: on a machine shared
//! with other work, CPU time is steadier than wall time.
//!
//! `cargo run --release -p ds-models --example attention_cpu_time -- B T HEADS HEAD_DIM REPS`
//! prints one JSON line: milliseconds (minimum over REPS) and GFLOP/s, the forward counted as
//! the causal half of the two score products (4 hd T(T+1)/2 per head), the backward as 2.5x
//! that (FlashAttention's convention: the scores recomputed, then dv, dP, dq, dk).

use ds_engine::data::Rng;
use ds_models::fast::{self, Threads};

/// This thread's CPU time in seconds.
fn cpu_s() -> f64 {
    #[repr(C)]
    struct Timespec {
        s: i64,
        ns: i64,
    }
    extern "C" {
        fn clock_gettime(id: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { s: 0, ns: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.s as f64 + ts.ns as f64 * 1e-9
}

fn min_s(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t0 = cpu_s();
            f();
            cpu_s() - t0
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let [b, t, h, hd, reps] = a[..] else {
        eprintln!("usage: attention_cpu_time B T HEADS HEAD_DIM REPS");
        std::process::exit(2);
    };
    let c = h * hd;
    let th = Threads(1);
    let mut rng = Rng::new(1);
    let qkv = rng.normal_vec(b * t * 3 * c, 1.0);
    let dy = rng.normal_vec(b * t * c, 1.0);
    let (y, lse) = fast::attention_forward(th, &qkv, b, t, c, h).expect("shapes");
    let fwd = min_s(reps, || {
        fast::attention_forward(th, &qkv, b, t, c, h).expect("shapes");
    });
    let bwd = min_s(reps, || {
        fast::attention_backward(th, &dy, &qkv, &y, &lse, b, t, c, h).expect("shapes");
    });
    let n = 1024;
    let m = rng.normal_vec(n * n, 1.0);
    let mm = min_s(3, || {
        fast::matmul(th, &m, &m, n, n, n).expect("shapes");
    });
    let f = 4.0 * (b * h * hd) as f64 * (t * (t + 1) / 2) as f64;
    let peak = 2.0 * (n as f64).powi(3) / mm / 1e9;
    println!(
        "{{\"b\":{b},\"t\":{t},\"heads\":{h},\"head_dim\":{hd},\"fwd_ms\":{:.3},\"bwd_ms\":{:.3},\"fwd_gflops\":{:.1},\"bwd_gflops\":{:.1},\"matmul_1thread_gflops\":{:.1},\"fwd_fraction\":{:.2},\"bwd_fraction\":{:.2}}}",
        fwd * 1e3,
        bwd * 1e3,
        f / fwd / 1e9,
        2.5 * f / bwd / 1e9,
        peak,
        f / fwd / 1e9 / peak,
        2.5 * f / bwd / 1e9 / peak
    );
}
