//! Explicit forward and backward kernels for the GPT (the llm.c way): every layer is a
//! hand-written kernel over flat `f32` buffers with its own backward, matrix products go straight
//! to `gemm` (AVX-512 where the CPU has it), and the only state kept between the forward and the
//! backward pass is what each backward needs. Tensors stay candle tensors at the model boundary
//! (parameters are read in place from their `Var`s, gradients come back as tensors), so ZeRO,
//! activation checkpointing, the profiler and the checkpoint store are unchanged.
//!
//! The candle-autograd forms in `model.rs` (with the custom ops of `kernels.rs`) stay as the
//! reference these kernels are tested against, and as the path for anything this file does not
//! cover.

use super::{BlockEvent, FwdBwd, Gpt, GptBlock, BLOCK_PARAMS};
use crate::bf16mm::{self, Bf16Units};
use candle_core::{CpuStorage, Device, Storage, Tensor, Var};
use ds_ckpt_act::Policy;
use rayon::prelude::*;
use std::time::Instant;

type R<T> = candle_core::Result<T>;

const LN_EPS: f32 = 1e-5;
const GELU_C: f32 = 0.797_884_6; // sqrt(2/pi)
const GELU_K: f32 = 0.044_715;

// ------------------------------------------------------------------ elementwise math

/// `e^x` in f32 without libm: Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial, 2^n
/// through the exponent bits. Branch-free so that loops over it vectorise; relative error
/// about 2 ulp on [-87, 88] (tested against f64).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let kf = x * LOG2E + MAGIC;
    let n = kf - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let r2 = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * r2
        + r
        + 1.0;
    // The low mantissa bits of `kf` hold n (two's complement); 2^n = (n + 127) << 23.
    let ni = (kf.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits((ni.wrapping_add(127) << 23) as u32)
}

/// tanh through one exp.
#[inline(always)]
fn tanh_f32(u: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0)
}

// Reductions in 16 independent lanes: a plain `iter().sum()` over f32 is one serial chain
// (the compiler may not reassociate it), these vectorise.

#[inline(always)]
fn sum16_body(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let rem = ch.remainder();
    for c in ch {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

#[inline(always)]
fn dot16_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max16_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let ch = x.chunks_exact(16);
    let rem = ch.remainder();
    for c in ch {
        for i in 0..16 {
            if c[i] > acc[i] {
                acc[i] = c[i];
            }
        }
    }
    acc.iter()
        .chain(rem)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `x <- exp(x - shift)` in place; returns the sum of the results.
#[inline(always)]
fn exp_shift_sum_body(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp_f32(*v - shift);
    }
    sum16_body(x)
}

// The kernels below are `#[inline(always)]` bodies compiled for AVX-512, AVX2+FMA and the
// baseline by `ds_simd::dispatch!` (the level detected once, `DS_SIMD` lowers it): the crate is
// built for baseline x86-64, where loops vectorise to 4-lane SSE only. Each `*_at` variant runs
// a chosen level (the tests compare every level with the scalar path).
ds_simd::dispatch!(
    /// Sum of `x` (16 lanes).
    fn sum16, sum16_at => sum16_body(x: &[f32]) -> f32
);
ds_simd::dispatch!(
    /// Dot product (16 lanes).
    fn dot16, dot16_at => dot16_body(a: &[f32], b: &[f32]) -> f32
);
ds_simd::dispatch!(
    /// Maximum of `x` (16 lanes).
    fn max16, max16_at => max16_body(x: &[f32]) -> f32
);
ds_simd::dispatch!(
    /// `x <- exp(x - shift)` in place; returns the sum of the results.
    fn exp_shift_sum, exp_shift_sum_at => exp_shift_sum_body(x: &mut [f32], shift: f32) -> f32
);
ds_simd::dispatch!(
    /// GELU of a row.
    fn gelu_row, gelu_row_at => gelu_row_body(h: &[f32], out: &mut [f32])
);
ds_simd::dispatch!(
    /// `d <- d * gelu'(h)` over a row.
    fn gelu_grad_row, gelu_grad_row_at => gelu_grad_row_body(h: &[f32], d: &mut [f32])
);

/// Every SIMD level this CPU has gives the scalar path's bits, kernel by kernel (the bodies
/// keep their lanes explicit and use no fused multiply-add). Levels above the CPU's are clamped
/// by `ds_simd`, so this runs everywhere and covers what the machine can run.
#[cfg(test)]
#[allow(clippy::items_after_test_module)] // kept beside the dispatch it tests
mod simd_levels {
    use super::*;
    use ds_simd::Level;

    fn data(n: usize, salt: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + salt) * 0.731).sin() * 3.0)
            .collect()
    }

    #[test]
    fn every_level_equals_scalar_bitwise() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for n in [0usize, 1, 15, 16, 17, 1000, 4099] {
            let (x, y) = (data(n, 0.0), data(n, 7.0));
            let s = Level::Scalar;
            for l in ds_simd::available() {
                assert_eq!(
                    sum16_at(l, &x).to_bits(),
                    sum16_at(s, &x).to_bits(),
                    "{l} {n}"
                );
                assert_eq!(dot16_at(l, &x, &y).to_bits(), dot16_at(s, &x, &y).to_bits());
                assert_eq!(max16_at(l, &x).to_bits(), max16_at(s, &x).to_bits());
                let (mut a, mut b) = (x.clone(), x.clone());
                let (ra, rb) = (
                    exp_shift_sum_at(l, &mut a, 1.5),
                    exp_shift_sum_at(s, &mut b, 1.5),
                );
                assert_eq!(
                    (ra.to_bits(), bits(&a)),
                    (rb.to_bits(), bits(&b)),
                    "{l} {n}"
                );
                let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                gelu_row_at(l, &x, &mut a);
                gelu_row_at(s, &x, &mut b);
                assert_eq!(bits(&a), bits(&b), "{l} {n}");
                let (mut a, mut b) = (y.clone(), y.clone());
                gelu_grad_row_at(l, &x, &mut a);
                gelu_grad_row_at(s, &x, &mut b);
                assert_eq!(bits(&a), bits(&b), "{l} {n}");
                // The transpose (AVX registers at Avx2 and above), one and two threads.
                for (rows, cols) in [(8, 8), (13, 21), (64, 40)] {
                    let a = data(rows * cols, 3.0);
                    for threads in [1, 2] {
                        let cx = Ctx::new(threads);
                        let (mut t1, mut t2) = (vec![0f32; a.len()], vec![0f32; a.len()]);
                        transpose_into_at(l, cx, &a, rows, cols, &mut t1);
                        transpose_into_at(s, cx, &a, rows, cols, &mut t2);
                        assert_eq!(bits(&t1), bits(&t2), "{l} {rows}x{cols}");
                        // t (cols, rows) = a (rows, cols)^T
                        assert_eq!(t2[rows], a[1]);
                        assert_eq!(t2[cols * rows - 1], a[rows * cols - 1]);
                        assert_eq!(t2[(cols - 1) * rows], a[cols - 1]);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn gelu_row_body(h: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(h) {
        let t = tanh_f32(GELU_C * (v + GELU_K * v * v * v));
        *o = 0.5 * v * (1.0 + t);
    }
}

#[inline(always)]
fn gelu_grad_row_body(h: &[f32], d: &mut [f32]) {
    for (d, &v) in d.iter_mut().zip(h) {
        let u = GELU_C * (v + GELU_K * v * v * v);
        let t = tanh_f32(u);
        let du = GELU_C * (1.0 + 3.0 * GELU_K * v * v);
        *d *= 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du;
    }
}

/// The vectorised row helpers for the fused candle ops of [`crate::kernels`] (the same code
/// as the explicit kernels, so the two paths round alike).
pub(crate) mod rows {
    /// Maximum of `x`.
    pub(crate) fn max(x: &[f32]) -> f32 {
        super::max16(x)
    }
    /// `x <- exp(x - shift)`; returns the sum.
    pub(crate) fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        super::exp_shift_sum(x, shift)
    }
    /// Dot product.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot16(a, b)
    }
    /// `out <- gelu(h)`.
    pub(crate) fn gelu(h: &[f32], out: &mut [f32]) {
        super::gelu_row(h, out)
    }
    /// `d <- d * gelu'(h)`.
    pub(crate) fn gelu_grad(h: &[f32], d: &mut [f32]) {
        super::gelu_grad_row(h, d)
    }
}

// ------------------------------------------------------------------ threads and matmul

/// How a rank runs its kernels: `threads` > 1 splits rows over rayon's pool and runs matrix
/// products with that many threads; 1 runs everything on the calling thread (ranks that are
/// threads of one process each get their share of the cores: no oversubscription). `bf16`:
/// the units every matrix product runs on in bf16 ([`Bf16Units::None`]: f32 through `gemm`).
#[derive(Debug, Clone, Copy)]
struct Ctx {
    threads: usize,
    bf16: Bf16Units,
}

impl Ctx {
    /// f32 matrix products on `threads` threads.
    fn new(threads: usize) -> Ctx {
        Ctx {
            threads,
            bf16: Bf16Units::None,
        }
    }

    /// The kernels of `gpt`: its threads and bf16 setting.
    fn of(gpt: &Gpt) -> Ctx {
        Ctx {
            threads: gpt.threads.max(1),
            bf16: gpt.bf16,
        }
    }

    /// The same products on the calling thread only (inside a parallel task).
    fn serial(&self) -> Ctx {
        Ctx {
            threads: 1,
            ..*self
        }
    }

    fn par(&self) -> gemm::Parallelism {
        if self.threads > 1 {
            gemm::Parallelism::Rayon(self.threads)
        } else {
            gemm::Parallelism::None
        }
    }

    /// `f(row_index, row)` over the rows of `out` (`cols` wide).
    fn rows<F>(&self, out: &mut [f32], cols: usize, f: F)
    where
        F: Fn(usize, &mut [f32]) + Sync + Send,
    {
        if self.threads > 1 && out.len() >= 4096 {
            out.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(i, r)| f(i, r));
        } else {
            out.chunks_mut(cols).enumerate().for_each(|(i, r)| f(i, r));
        }
    }

    /// `f(i)` for i in 0..n, in parallel when allowed.
    fn each<F>(&self, n: usize, f: F)
    where
        F: Fn(usize) + Sync + Send,
    {
        if self.threads > 1 {
            (0..n).into_par_iter().for_each(f);
        } else {
            (0..n).for_each(f);
        }
    }
}

/// A strided matrix operand: element (i, j) at `data[off + i * rs + j * cs]` (the one operand
/// type of the f32 and bf16 products).
type M<'a> = bf16mm::Operand<'a>;

fn mat(data: &[f32], off: usize, rs: usize, cs: usize) -> M<'_> {
    M { data, off, rs, cs }
}

/// `dst[rows m, cols n] (row stride ldd, offset doff) = (acc ? dst : 0) + scale * A[m,k] B[k,n]`:
/// f32 through `gemm`, or on `cx.bf16`'s units with both operands rounded to bf16.
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    cx: Ctx,
    mm: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    doff: usize,
    ldd: usize,
    acc: bool,
    a: M<'_>,
    b: M<'_>,
    scale: f32,
) {
    bf16mm::check_operands("matmul", dst.len(), doff, ldd, mm, n, k, &a, &b);
    if cx.bf16.active() {
        bf16mm::gemm(
            cx.bf16, cx.threads, mm, n, k, dst, doff, ldd, acc, a, b, scale,
        );
        return;
    }
    if bf16mm::empty_product(dst, doff, ldd, mm, n, k, acc) {
        return;
    }
    if let Some(blas) = crate::blas::for_product(mm, k, n) {
        if blas.product(
            cx.threads, false, mm, n, k, dst, doff, ldd, acc, &a, &b, scale,
        ) {
            return;
        }
    }
    let par = cx.par();
    // SAFETY: the three operands were checked to lie inside their slices; `dst` is borrowed
    // mutably and cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            mm,
            n,
            k,
            dst.as_mut_ptr().add(doff),
            1,
            ldd as isize,
            acc,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// A raw pointer that may cross threads: each task writes a disjoint region.
struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint regions of one buffer to parallel tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

// ------------------------------------------------------------------ layers

/// `y[n, out] = x[n, in] W^T + b` (W is (out, in), row-major).
fn linear_fwd(
    cx: Ctx,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; n * dout];
    linear_fwd_into(cx, x, w, b, n, din, dout, &mut y);
    y
}

#[allow(clippy::too_many_arguments)]
fn linear_fwd_into(
    cx: Ctx,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    din: usize,
    dout: usize,
    y: &mut [f32],
) {
    if dout == 0 {
        return;
    }
    // `gemm` computes a row-major destination as its transpose, with `W` as the left operand,
    // and wants that operand column-major: handed `W` (out, in) row-major, and with fewer
    // rows than two of its row blocks, it packs it up front on one thread, gathering its
    // microkernel's row height (64 with AVX-512) of rows at a power-of-two stride per column.
    // Transposing `W` here (in tiles, over the threads) hands it the operand layout, and the
    // overwritten destination, of the backward's `dx` products.
    let mut wt = WT.with(|l| std::mem::take(&mut *l.borrow_mut()));
    wt.resize(din * dout, 0.0);
    transpose_into(cx, w, dout, din, &mut wt);
    gemm_into(
        cx,
        n,
        dout,
        din,
        y,
        0,
        dout,
        false,
        mat(x, 0, din, 1),
        mat(&wt, 0, dout, 1),
        1.0,
    );
    WT.with(|l| *l.borrow_mut() = wt);
    // The bias after the product, so that the product overwrites `y` as the backward's
    // products do. Bit for bit the previous result (bias-prefilled `y`, accumulated into)
    // while `din` fits one of gemm's depth blocks; for deeper products (fc2 at the reference
    // shape) the bias joins the sum last instead of first: an f32 rounding difference
    // (1.2e-7 relative at most, measured there).
    cx.rows(y, dout, |_, row| {
        row.iter_mut().zip(b).for_each(|(o, &v)| *o += v)
    });
}

thread_local! {
    /// Scratch for [`linear_fwd_into`]'s transposed weight, kept per thread between calls.
    static WT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `t (cols, rows) = a (rows, cols)^T`, both row-major: 8 x 8 blocks (transposed in AVX
/// registers at `ds_simd` level AVX2 and above), so that each block reads and writes eight
/// cache lines; strips of eight rows of `t` split over the threads.
fn transpose_into(cx: Ctx, a: &[f32], rows: usize, cols: usize, t: &mut [f32]) {
    transpose_into_at(ds_simd::level(), cx, a, rows, cols, t)
}

/// [`transpose_into`] at a chosen SIMD level (clamped to what the CPU supports).
fn transpose_into_at(
    level: ds_simd::Level,
    cx: Ctx,
    a: &[f32],
    rows: usize,
    cols: usize,
    t: &mut [f32],
) {
    const B: usize = 8;
    assert!(a.len() == rows * cols && t.len() == rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    // `Level::Avx2` and above mean AVX (with AVX2 and FMA) was detected.
    let avx = cfg!(target_arch = "x86_64") && ds_simd::clamp(level) >= ds_simd::Level::Avx2;
    let strip = |si: usize, out: &mut [f32]| {
        // `out` holds rows c0.. of `t`, i.e. columns c0.. of `a`.
        let c0 = si * B;
        let nc = out.len() / rows;
        for r0 in (0..rows).step_by(B) {
            let nr = B.min(rows - r0);
            if avx && nr == B && nc == B {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX was detected (`avx`); the block's eight rows of eight values lie inside
                // `a` (r0 + 8 <= rows, c0 + 8 <= cols) and inside `out` (8 rows of `rows`).
                unsafe {
                    transpose8x8_avx(
                        a.as_ptr().add(r0 * cols + c0),
                        cols,
                        out.as_mut_ptr().add(r0),
                        rows,
                    );
                }
                continue;
            }
            for j in 0..nc {
                for k in 0..nr {
                    out[j * rows + r0 + k] = a[(r0 + k) * cols + c0 + j];
                }
            }
        }
    };
    if cx.threads > 1 && t.len() >= 4096 {
        t.par_chunks_mut(B * rows)
            .enumerate()
            .for_each(|(si, out)| strip(si, out));
    } else {
        t.chunks_mut(B * rows)
            .enumerate()
            .for_each(|(si, out)| strip(si, out));
    }
}

/// `dst[j * ds + i] = src[i * ss + j]` for i, j < 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8_avx(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees 8 rows of 8 values at `src` (stride `ss`)
    // and at `dst` (stride `ds`).
    unsafe {
        let r = [
            _mm256_loadu_ps(src),
            _mm256_loadu_ps(src.add(ss)),
            _mm256_loadu_ps(src.add(2 * ss)),
            _mm256_loadu_ps(src.add(3 * ss)),
            _mm256_loadu_ps(src.add(4 * ss)),
            _mm256_loadu_ps(src.add(5 * ss)),
            _mm256_loadu_ps(src.add(6 * ss)),
            _mm256_loadu_ps(src.add(7 * ss)),
        ];
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, v) in o.into_iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * ds), v);
        }
    }
}

/// Backward of [`linear_fwd`]: adds into `dx` (when given) and writes `dw`, `db`.
#[allow(clippy::too_many_arguments)]
fn linear_bwd(
    cx: Ctx,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    din: usize,
    dout: usize,
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    if let Some((dx, acc)) = dx {
        gemm_into(
            cx,
            n,
            din,
            dout,
            dx,
            0,
            din,
            acc,
            mat(dy, 0, dout, 1),
            mat(w, 0, din, 1),
            1.0,
        );
    }
    gemm_into(
        cx,
        dout,
        din,
        n,
        dw,
        0,
        din,
        false,
        mat(dy, 0, 1, dout),
        mat(x, 0, din, 1),
        1.0,
    );
    col_sum(cx, dy, dout, db);
}

/// `out[j] = sum_i a[i, j]`.
fn col_sum(cx: Ctx, a: &[f32], cols: usize, out: &mut [f32]) {
    let rows = a.len() / cols.max(1);
    row_sums(cx, rows, &mut [out], |i, acc| {
        acc[0]
            .iter_mut()
            .zip(&a[i * cols..(i + 1) * cols])
            .for_each(|(s, &v)| *s += v);
    });
}

/// Sums over rows `0..rows` into `outs` (overwritten; `K` outputs of any widths): `add(i, acc)`
/// adds row `i`'s terms into `acc`, zeroed accumulators shaped like `outs`. With threads, each
/// takes one contiguous range of rows and the partial sums are added in range order, so the
/// result depends on the thread count only, never on scheduling.
fn row_sums<const K: usize, F>(cx: Ctx, rows: usize, outs: &mut [&mut [f32]; K], add: F)
where
    F: Fn(usize, &mut [Vec<f32>; K]) + Sync + Send,
{
    let parts = if cx.threads > 1 && rows >= 64 {
        cx.threads
    } else {
        1
    };
    let per = rows.div_ceil(parts).max(1);
    let widths: [usize; K] = std::array::from_fn(|j| outs[j].len());
    let partial = |r0: usize| {
        let mut acc: [Vec<f32>; K] = std::array::from_fn(|j| vec![0f32; widths[j]]);
        for i in r0..(r0 + per).min(rows) {
            add(i, &mut acc);
        }
        acc
    };
    let starts: Vec<usize> = (0..parts).map(|p| p * per).filter(|&s| s < rows).collect();
    let partials: Vec<[Vec<f32>; K]> = if starts.len() > 1 {
        starts.par_iter().map(|&s| partial(s)).collect()
    } else {
        starts.iter().map(|&s| partial(s)).collect()
    };
    for o in outs.iter_mut() {
        o.fill(0.0);
    }
    for p in partials {
        for (o, v) in outs.iter_mut().zip(p) {
            o.iter_mut().zip(v).for_each(|(o, v)| *o += v);
        }
    }
}

/// LayerNorm forward: `y`, and per row the mean and 1/std.
fn ln_fwd(cx: Ctx, x: &[f32], w: &[f32], b: &[f32], c: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let mut y = vec![0f32; x.len()];
    let mut stats = vec![0f32; rows * 2];
    {
        let sp = SendPtr(stats.as_mut_ptr());
        cx.rows(&mut y, c, |i, yr| {
            let xr = &x[i * c..(i + 1) * c];
            let mean = sum16(xr) / c as f32;
            let mut dev = [0f32; 16];
            for ch in xr.chunks(16) {
                for (a, &v) in dev.iter_mut().zip(ch) {
                    *a += (v - mean) * (v - mean);
                }
            }
            let var = dev.iter().sum::<f32>() / c as f32;
            let rstd = 1.0 / (var + LN_EPS).sqrt();
            for (((o, &v), &g), &bb) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * rstd * g + bb;
            }
            // SAFETY: row i writes only stats[2i], stats[2i+1].
            unsafe {
                *sp.get().add(2 * i) = mean;
                *sp.get().add(2 * i + 1) = rstd;
            }
        });
    }
    let mean = stats.iter().step_by(2).copied().collect();
    let rstd = stats.iter().skip(1).step_by(2).copied().collect();
    (y, mean, rstd)
}

/// LayerNorm backward: `dx (+)= ...`, `dw`, `db` written.
#[allow(clippy::too_many_arguments)]
fn ln_bwd(
    cx: Ctx,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
    dx: &mut [f32],
    acc: bool,
    dw: &mut [f32],
    db: &mut [f32],
) {
    cx.rows(dx, c, |i, dxr| {
        let (mu, rs) = (mean[i], rstd[i]);
        let xr = &x[i * c..(i + 1) * c];
        let dyr = &dy[i * c..(i + 1) * c];
        let mut s1 = 0f32;
        let mut s2 = 0f32;
        for ((&v, &g), &d) in xr.iter().zip(w).zip(dyr) {
            let dn = g * d;
            s1 += dn;
            s2 += dn * (v - mu) * rs;
        }
        let (s1, s2) = (s1 / c as f32, s2 / c as f32);
        for (((o, &v), &g), &d) in dxr.iter_mut().zip(xr).zip(w).zip(dyr) {
            let xhat = (v - mu) * rs;
            let t = (g * d - s1 - xhat * s2) * rs;
            *o = if acc { *o + t } else { t };
        }
    });
    // dw = sum_i xhat_i * dy_i, db = sum_i dy_i.
    let rows = x.len() / c;
    row_sums(cx, rows, &mut [dw, db], |i, acc| {
        let (mu, rs) = (mean[i], rstd[i]);
        let xr = &x[i * c..(i + 1) * c];
        let dyr = &dy[i * c..(i + 1) * c];
        let [pw, pb] = acc;
        for (((a, bb), &v), &d) in pw.iter_mut().zip(pb.iter_mut()).zip(xr).zip(dyr) {
            *a += (v - mu) * rs * d;
            *bb += d;
        }
    });
}

fn gelu_fwd(cx: Ctx, h: &[f32], cols: usize) -> Vec<f32> {
    let mut g = vec![0f32; h.len()];
    cx.rows(&mut g, cols, |i, gr| {
        gelu_row(&h[i * cols..(i + 1) * cols], gr);
    });
    g
}

/// `dg <- dg * gelu'(h)` in place.
fn gelu_bwd(cx: Ctx, h: &[f32], dg: &mut [f32], cols: usize) {
    cx.rows(dg, cols, |i, dr| {
        gelu_grad_row(&h[i * cols..(i + 1) * cols], dr);
    });
}

/// Query rows x key columns of one tile of the blocked attention.
#[derive(Debug, Clone, Copy)]
struct Tiles {
    q: usize,
    k: usize,
}

/// The forward's tiles and the backward's, chosen by measurement at head dim 64 (GPT-2 small's
/// heads, T 256 to 2048; BENCHMARKS.md): within the noise of a shared machine from 64 to 256
/// keys and 64 to 128 query rows, slower below (more calls into the GEMM, each packing its
/// operands). A forward thread holds 64 x 256 scores (64 KiB), a backward thread two tiles of
/// 64 x 128 and the key tile's dk, dv: cache-resident, and independent of T. One path for every
/// T: the full-matrix form was not faster at T 128-256 either (forward+backward within the
/// noise), so short sequences take these tiles too.
const FWD_TILES: Tiles = Tiles { q: 64, k: 256 };
const BWD_TILES: Tiles = Tiles { q: 64, k: 128 };

thread_local! {
    /// Per-thread scratch of the blocked attention (tiles of scores and accumulators).
    static ATT_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` with `n` values of this thread's attention scratch (contents left from earlier calls:
/// the caller initialises what it reads).
fn with_scratch<T>(n: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
    let mut s = ATT_SCRATCH.with(|l| std::mem::take(&mut *l.borrow_mut()));
    if s.len() < n {
        s.resize(n, 0.0);
    }
    let r = f(&mut s[..n]);
    ATT_SCRATCH.with(|l| *l.borrow_mut() = s);
    r
}

/// Causal self-attention over `qkv` (B*T, 3C), blocked (FlashAttention-2's forward): returns
/// `y` (B*T, C) and the log-sum-exp of every row's scaled scores (B, H, T), all the backward
/// needs besides `qkv` and `y`. Each task takes one query tile of one head and walks the key
/// tiles up to the diagonal with an online softmax (running maximum and sum), so no more than
/// one tile of scores exists per thread: memory linear in T.
fn attn_fwd(cx: Ctx, qkv: &[f32], b: usize, t: usize, c: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
    attn_fwd_tiled(cx, qkv, b, t, c, h, FWD_TILES)
}

#[allow(clippy::too_many_arguments)]
fn attn_fwd_tiled(
    cx: Ctx,
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    tl: Tiles,
) -> (Vec<f32>, Vec<f32>) {
    let hd = c / h;
    let scale = 1.0 / (hd as f32).sqrt();
    let (tq, tk) = (tl.q.max(1), tl.k.max(1));
    let mut y = vec![0f32; b * t * c];
    let mut lse = vec![0f32; b * h * t];
    let (yp, lp) = (SendPtr(y.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let nq = t.div_ceil(tq);
    cx.each(b * h * nq, |task| {
        let (bh, qi) = (task / nq, task % nq);
        let (bi, hi) = (bh / h, bh % h);
        let (r0, r1) = (qi * tq, ((qi + 1) * tq).min(t));
        let br = r1 - r0;
        let qb = bi * t * 3 * c + hi * hd;
        let (kb, vb) = (qb + c, qb + 2 * c);
        with_scratch(br * tk + br * hd + 2 * br, |sc| {
            let (s, rest) = sc.split_at_mut(br * tk);
            let (o, rest) = rest.split_at_mut(br * hd);
            let (m, l) = rest.split_at_mut(br);
            o.fill(0.0);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            for k0 in (0..r1).step_by(tk) {
                // Keys of this tile that some row of the query tile sees.
                let kk = (k0 + tk).min(r1) - k0;
                let s = &mut s[..br * kk];
                gemm_into(
                    cx.serial(),
                    br,
                    kk,
                    hd,
                    s,
                    0,
                    kk,
                    false,
                    mat(qkv, qb + r0 * 3 * c, 3 * c, 1),
                    mat(qkv, kb + k0 * 3 * c, 1, 3 * c),
                    scale,
                );
                for (r, row) in s.chunks_mut(kk).enumerate() {
                    let live = (r0 + r + 1).saturating_sub(k0).min(kk);
                    if live == 0 {
                        row.fill(0.0);
                        continue;
                    }
                    let mx = max16(&row[..live]).max(m[r]);
                    let sum = exp_shift_sum(&mut row[..live], mx);
                    row[live..].fill(0.0);
                    if mx > m[r] && m[r] > f32::NEG_INFINITY {
                        let a = exp_f32(m[r] - mx);
                        l[r] *= a;
                        o[r * hd..(r + 1) * hd].iter_mut().for_each(|v| *v *= a);
                    }
                    l[r] += sum;
                    m[r] = mx;
                }
                gemm_into(
                    cx.serial(),
                    br,
                    hd,
                    kk,
                    o,
                    0,
                    hd,
                    true,
                    mat(s, 0, kk, 1),
                    mat(qkv, vb + k0 * 3 * c, 3 * c, 1),
                    1.0,
                );
            }
            for r in 0..br {
                let inv = 1.0 / l[r];
                let yo = (bi * t + r0 + r) * c + hi * hd;
                // SAFETY: task (bh, qi) writes only rows r0..r1 of its head's columns of y and
                // entries bh*t + r0..r1 of lse; both vectors outlive the parallel loop.
                unsafe {
                    let yr = std::slice::from_raw_parts_mut(yp.get().add(yo), hd);
                    yr.iter_mut()
                        .zip(&o[r * hd..(r + 1) * hd])
                        .for_each(|(d, &v)| *d = v * inv);
                    *lp.get().add(bh * t + r0 + r) = m[r] + l[r].ln();
                }
            }
        });
    });
    (y, lse)
}

/// Backward of [`attn_fwd`] (FlashAttention-2's): `dqkv` (B*T, 3C) from `dy` (B*T, C), the
/// forward's output `y` and log-sum-exp `lse`. Each key tile's probabilities are recomputed
/// from `q`, `k` and `lse`, tile by tile against the query rows from the key tile's first on,
/// with `D = rowsum(dy * y)` computed first; `dk`, `dv` gather in the key tile's scratch,
/// `dq` in place. One task per head, or, with fewer heads than threads, the key tiles of a
/// head dealt round-robin to several tasks whose `dq` partial sums are added afterwards in
/// task order (the result depends on the thread count only).
#[allow(clippy::too_many_arguments)]
fn attn_bwd(
    cx: Ctx,
    dy: &[f32],
    qkv: &[f32],
    y: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
) -> Vec<f32> {
    attn_bwd_tiled(cx, dy, qkv, y, lse, b, t, c, h, BWD_TILES)
}

#[allow(clippy::too_many_arguments)]
fn attn_bwd_tiled(
    cx: Ctx,
    dy: &[f32],
    qkv: &[f32],
    y: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    tl: Tiles,
) -> Vec<f32> {
    let hd = c / h;
    let scale = 1.0 / (hd as f32).sqrt();
    let (tq, tk) = (tl.q.max(1), tl.k.max(1));
    let bhn = b * h;
    let nk = t.div_ceil(tk);
    let np = if cx.threads > bhn && bhn > 0 {
        cx.threads.div_ceil(bhn).min(nk).max(1)
    } else {
        1
    };
    // D[bh, r] = dy_r . y_r over the head's columns.
    let mut dd = vec![0f32; bhn * t];
    cx.rows(&mut dd, t.max(1), |bh, row| {
        let (bi, hi) = (bh / h, bh % h);
        for (r, d) in row.iter_mut().enumerate() {
            let o = (bi * t + r) * c + hi * hd;
            *d = dot16(&dy[o..o + hd], &y[o..o + hd]);
        }
    });
    let mut dqkv = vec![0f32; b * t * 3 * c];
    let mut parts: Vec<Vec<f32>> = if np > 1 {
        (0..bhn * np).map(|_| vec![0f32; t * hd]).collect()
    } else {
        Vec::new()
    };
    let dp = SendPtr(dqkv.as_mut_ptr());
    let dlen = dqkv.len();
    let pp = SendPtr(parts.as_mut_ptr());
    let dd = &dd;
    cx.each(bhn * np, |task| {
        let (bh, p) = (task / np, task % np);
        let (bi, hi) = (bh / h, bh % h);
        let qb = bi * t * 3 * c + hi * hd;
        let (kb, vb) = (qb + c, qb + 2 * c);
        let yb = bi * t * c + hi * hd;
        // Where this task's q gradient goes: the head's q columns of dqkv when it is the head's
        // one task, else its own partial buffer.
        let (dqp, dq_len, dqoff, dqld) = if np > 1 {
            // SAFETY: `parts` holds bhn * np buffers, `task` indexes one, used by this task only.
            let part = unsafe { &mut *pp.get().add(task) };
            (SendPtr(part.as_mut_ptr()), part.len(), 0, hd)
        } else {
            (dp, dlen, qb, 3 * c)
        };
        with_scratch(2 * tq * tk + 2 * tk * hd, |sc| {
            let (s, rest) = sc.split_at_mut(tq * tk);
            let (ds, rest) = rest.split_at_mut(tq * tk);
            let (dk, dv) = rest.split_at_mut(tk * hd);
            for j in (p..nk).step_by(np) {
                let (k0, k1) = (j * tk, ((j + 1) * tk).min(t));
                let bc = k1 - k0;
                dk[..bc * hd].fill(0.0);
                dv[..bc * hd].fill(0.0);
                for r0 in (k0..t).step_by(tq) {
                    let r1 = (r0 + tq).min(t);
                    let br = r1 - r0;
                    let kk = k1.min(r1) - k0;
                    let s = &mut s[..br * kk];
                    let ds = &mut ds[..br * kk];
                    // P = exp(scale q k^T - lse), zero above the diagonal.
                    gemm_into(
                        cx.serial(),
                        br,
                        kk,
                        hd,
                        s,
                        0,
                        kk,
                        false,
                        mat(qkv, qb + r0 * 3 * c, 3 * c, 1),
                        mat(qkv, kb + k0 * 3 * c, 1, 3 * c),
                        scale,
                    );
                    for (r, row) in s.chunks_mut(kk).enumerate() {
                        let live = (r0 + r + 1).saturating_sub(k0).min(kk);
                        exp_shift_sum(&mut row[..live], lse[bh * t + r0 + r]);
                        row[live..].fill(0.0);
                    }
                    // dv += P^T dy
                    gemm_into(
                        cx.serial(),
                        kk,
                        hd,
                        br,
                        dv,
                        0,
                        hd,
                        true,
                        mat(s, 0, 1, kk),
                        mat(dy, yb + r0 * c, c, 1),
                        1.0,
                    );
                    // dP = dy v^T, then dS = P (dP - D) scale
                    gemm_into(
                        cx.serial(),
                        br,
                        kk,
                        hd,
                        ds,
                        0,
                        kk,
                        false,
                        mat(dy, yb + r0 * c, c, 1),
                        mat(qkv, vb + k0 * 3 * c, 1, 3 * c),
                        1.0,
                    );
                    for (r, (drow, prow)) in ds.chunks_mut(kk).zip(s.chunks(kk)).enumerate() {
                        let dr = dd[bh * t + r0 + r];
                        for (d, &pv) in drow.iter_mut().zip(prow) {
                            *d = pv * (*d - dr) * scale;
                        }
                    }
                    // dq += dS k ; dk += dS^T q
                    // SAFETY: task (bh, p) writes the q columns of head bh only when it is the
                    // head's one task (np == 1), else its own partial buffer; the slice lives
                    // for this one product.
                    let dq = unsafe { std::slice::from_raw_parts_mut(dqp.get(), dq_len) };
                    gemm_into(
                        cx.serial(),
                        br,
                        hd,
                        kk,
                        dq,
                        dqoff + r0 * dqld,
                        dqld,
                        true,
                        mat(ds, 0, kk, 1),
                        mat(qkv, kb + k0 * 3 * c, 3 * c, 1),
                        1.0,
                    );
                    gemm_into(
                        cx.serial(),
                        kk,
                        hd,
                        br,
                        dk,
                        0,
                        hd,
                        true,
                        mat(ds, 0, 1, kk),
                        mat(qkv, qb + r0 * 3 * c, 3 * c, 1),
                        1.0,
                    );
                }
                // SAFETY: the k and v columns of head bh in the rows of key tile j are written
                // by this task only (j = p mod np); the slice lives for this copy.
                let dqkv = unsafe { std::slice::from_raw_parts_mut(dp.get(), dlen) };
                for r in 0..bc {
                    let o = (bi * t + k0 + r) * 3 * c + hi * hd;
                    dqkv[o + c..o + c + hd].copy_from_slice(&dk[r * hd..(r + 1) * hd]);
                    dqkv[o + 2 * c..o + 2 * c + hd].copy_from_slice(&dv[r * hd..(r + 1) * hd]);
                }
            }
        });
    });
    if np > 1 {
        for (task, part) in parts.iter().enumerate() {
            let (bi, hi) = (task / np / h, task / np % h);
            for (r, row) in part.chunks(hd).enumerate() {
                let o = (bi * t + r) * 3 * c + hi * hd;
                dqkv[o..o + hd]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(d, &v)| *d += v);
            }
        }
    }
    dqkv
}

// ------------------------------------------------------------------ public kernel API

/// Threads one rank's explicit kernels may use (1 = the calling thread only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads(pub usize);

impl Threads {
    fn cx(self) -> Ctx {
        Ctx::new(self.0.max(1))
    }
}

fn check_len(what: &str, got: usize, want: usize) -> R<()> {
    if got != want {
        candle_core::bail!("{what}: expected {want} values, got {got}");
    }
    Ok(())
}

/// Linear layer `y[n, dout] = x[n, din] W^T + b` with `W` (dout, din) row-major, as PyTorch.
pub fn linear_forward(
    th: Threads,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> R<Vec<f32>> {
    check_len("linear x", x.len(), n * din)?;
    check_len("linear weight", w.len(), dout * din)?;
    check_len("linear bias", b.len(), dout)?;
    Ok(linear_fwd(th.cx(), x, w, b, n, din, dout))
}

/// [`linear_forward`] into a caller's buffer `y` (n, dout): no allocation.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward_into(
    th: Threads,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    din: usize,
    dout: usize,
    y: &mut [f32],
) -> R<()> {
    check_len("linear x", x.len(), n * din)?;
    check_len("linear weight", w.len(), dout * din)?;
    check_len("linear bias", b.len(), dout)?;
    check_len("linear y", y.len(), n * dout)?;
    linear_fwd_into(th.cx(), x, w, b, n, din, dout, y);
    Ok(())
}

/// Backward of [`linear_forward`]: overwrites `dx` (n, din), `dw` (dout, din), `db` (dout).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    th: Threads,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    din: usize,
    dout: usize,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> R<()> {
    check_len("linear dy", dy.len(), n * dout)?;
    check_len("linear x", x.len(), n * din)?;
    check_len("linear weight", w.len(), dout * din)?;
    check_len("linear dx", dx.len(), n * din)?;
    check_len("linear dw", dw.len(), dout * din)?;
    check_len("linear db", db.len(), dout)?;
    linear_bwd(th.cx(), dy, x, w, n, din, dout, Some((dx, false)), dw, db);
    Ok(())
}

/// LayerNorm over rows of `c` (eps 1e-5): `(y, mean, rstd)`, one mean and 1/std per row.
pub fn layer_norm_forward(
    th: Threads,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    c: usize,
) -> R<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    if c == 0 || !x.len().is_multiple_of(c) {
        candle_core::bail!("layer norm: {} values are not rows of {c}", x.len());
    }
    check_len("layer norm weight", w.len(), c)?;
    check_len("layer norm bias", b.len(), c)?;
    Ok(ln_fwd(th.cx(), x, w, b, c))
}

/// Backward of [`layer_norm_forward`]: overwrites `dx`, `dw`, `db`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    th: Threads,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> R<()> {
    if c == 0 || !x.len().is_multiple_of(c) {
        candle_core::bail!("layer norm: {} values are not rows of {c}", x.len());
    }
    let rows = x.len() / c;
    check_len("layer norm dy", dy.len(), x.len())?;
    check_len("layer norm dx", dx.len(), x.len())?;
    check_len("layer norm mean", mean.len(), rows)?;
    check_len("layer norm rstd", rstd.len(), rows)?;
    for (what, v) in [("weight", w), ("dw", &*dw), ("db", &*db)] {
        check_len(&format!("layer norm {what}"), v.len(), c)?;
    }
    ln_bwd(th.cx(), dy, x, w, mean, rstd, c, dx, false, dw, db);
    Ok(())
}

/// GELU, tanh form (PyTorch's `approximate="tanh"`).
pub fn gelu_forward(th: Threads, h: &[f32]) -> Vec<f32> {
    gelu_fwd(th.cx(), h, 1024.min(h.len().max(1)))
}

/// Backward of [`gelu_forward`]: `dg <- dg * gelu'(h)` in place.
pub fn gelu_backward(th: Threads, h: &[f32], dg: &mut [f32]) -> R<()> {
    check_len("gelu dg", dg.len(), h.len())?;
    gelu_bwd(th.cx(), h, dg, 1024.min(h.len().max(1)));
    Ok(())
}

fn attn_check(qkv: usize, b: usize, t: usize, c: usize, heads: usize) -> R<()> {
    if heads == 0 || !c.is_multiple_of(heads) {
        candle_core::bail!("attention: hidden {c} is not a positive multiple of {heads} heads");
    }
    check_len("attention qkv", qkv, b * t * 3 * c)
}

/// Causal self-attention of `qkv` (B*T, 3C: queries, keys, values), blocked
/// (FlashAttention-2's algorithm on the host): `(y, lse)` with `y` (B*T, C) and the log-sum-exp
/// of each row's scaled attention scores (B, heads, T), which with `qkv` and `y` is all
/// [`attention_backward`] needs. The T x T probabilities are never stored: memory is linear in
/// T (one tile of scores per thread besides the output).
pub fn attention_forward(
    th: Threads,
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
) -> R<(Vec<f32>, Vec<f32>)> {
    attn_check(qkv.len(), b, t, c, heads)?;
    Ok(attn_fwd(th.cx(), qkv, b, t, c, heads))
}

/// Backward of [`attention_forward`]: the gradient of `qkv` from `dy` (B*T, C), the forward's
/// output `y` and its `lse`; each tile's probabilities are recomputed from `q`, `k` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    th: Threads,
    dy: &[f32],
    qkv: &[f32],
    y: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
) -> R<Vec<f32>> {
    attn_check(qkv.len(), b, t, c, heads)?;
    check_len("attention dy", dy.len(), b * t * c)?;
    check_len("attention y", y.len(), b * t * c)?;
    check_len("attention lse", lse.len(), b * heads * t)?;
    Ok(attn_bwd(th.cx(), dy, qkv, y, lse, b, t, c, heads))
}

/// Mean softmax cross-entropy of `logits` (rows of `vocab`) against `targets`, fused with its
/// gradient: returns the loss and leaves `d loss / d logits` in `logits` (the probabilities
/// are never stored twice).
pub fn softmax_cross_entropy(
    th: Threads,
    logits: &mut [f32],
    targets: &[u32],
    vocab: usize,
) -> R<f64> {
    check_len("cross-entropy logits", logits.len(), targets.len() * vocab)?;
    if let Some(bad) = targets.iter().find(|&&k| k as usize >= vocab) {
        candle_core::bail!("target {bad} outside the vocabulary of {vocab}");
    }
    Ok(ce_in_place(th.cx(), logits, targets, vocab))
}

/// `C = A B` for row-major `A` (m, k) and `B` (k, n) through the same GEMM the kernels use:
/// the practical matrix-product peak of this machine with `th` threads is what a large square
/// product reaches.
pub fn matmul(th: Threads, a: &[f32], b: &[f32], mm: usize, k: usize, n: usize) -> R<Vec<f32>> {
    check_len("matmul a", a.len(), mm * k)?;
    check_len("matmul b", b.len(), k * n)?;
    let mut out = vec![0f32; mm * n];
    gemm_into(
        th.cx(),
        mm,
        n,
        k,
        &mut out,
        0,
        n,
        false,
        mat(a, 0, k, 1),
        mat(b, 0, n, 1),
        1.0,
    );
    Ok(out)
}

// ------------------------------------------------------------------ parameters in place

/// Read access to a `Var`'s f32 storage without copying.
struct View<'a> {
    guard: Box<dyn std::ops::Deref<Target = Storage> + 'a>,
    start: usize,
    len: usize,
}

impl<'a> View<'a> {
    fn new(v: &'a Var) -> R<Self> {
        let (guard, layout) = v.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fast path: parameter not contiguous");
        };
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("fast path: parameters must be f32 on the CPU");
        }
        Ok(View {
            guard: Box::new(guard),
            start,
            len: end - start,
        })
    }

    fn s(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => &[],
        }
    }
}

/// Whether the fast path can run this model: every parameter present is f32 on the CPU.
pub(super) fn supported(gpt: &Gpt) -> bool {
    let ok = |v: &Var| v.dtype() == candle_core::DType::F32 && v.device().is_cpu();
    ok(&gpt.wte)
        && ok(&gpt.wpe)
        && ok(&gpt.ln_f.weight)
        && gpt.blocks.iter().all(|b| b.vars().iter().all(ok))
}

// ------------------------------------------------------------------ the block

/// What a block's backward needs from its forward.
struct Acts {
    xn1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    qkv: Vec<f32>,
    /// Per (batch, head, row) log-sum-exp of the attention scores (B*H*T: linear in T).
    lse: Vec<f32>,
    y: Vec<f32>,
    x1: Vec<f32>,
    xn2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    h: Vec<f32>,
    g: Vec<f32>,
}

struct Dims {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
}

fn mask(key: Option<super::DropKey>, n: usize, site: u64) -> Option<Vec<f32>> {
    key.filter(|k| k.p > 0.0)
        .map(|k| ds_ckpt_act::dropout_mask(n, k.p, k.seed, k.step, k.block * 2 + site))
}

/// Block forward: the output and the activations its backward needs.
fn block_fwd(
    cx: Ctx,
    blk: &GptBlock,
    x: &[f32],
    d: &Dims,
    key: Option<super::DropKey>,
) -> R<(Vec<f32>, Acts)> {
    let vars = blk.vars();
    let v = vars.iter().map(View::new).collect::<R<Vec<_>>>()?;
    if v.len() != BLOCK_PARAMS || v[0].len == 0 {
        candle_core::bail!("fast path: block parameters are not present (ZeRO-3 gather missing)");
    }
    let (n, c) = (d.b * d.t, d.c);
    let (xn1, mean1, rstd1) = ln_fwd(cx, x, v[0].s(), v[1].s(), c);
    let qkv = linear_fwd(cx, &xn1, v[2].s(), v[3].s(), n, c, 3 * c);
    let (y, lse) = attn_fwd(cx, &qkv, d.b, d.t, c, d.h);
    let mut a = linear_fwd(cx, &y, v[4].s(), v[5].s(), n, c, c);
    if let Some(mk) = mask(key, a.len(), 0) {
        a.iter_mut().zip(mk).for_each(|(a, m)| *a *= m);
    }
    let mut x1 = a;
    x1.iter_mut().zip(x).for_each(|(a, &xv)| *a += xv);
    let (xn2, mean2, rstd2) = ln_fwd(cx, &x1, v[10].s(), v[11].s(), c);
    let h = linear_fwd(cx, &xn2, v[6].s(), v[7].s(), n, c, 4 * c);
    let g = gelu_fwd(cx, &h, 4 * c);
    let mut out = linear_fwd(cx, &g, v[8].s(), v[9].s(), n, 4 * c, c);
    if let Some(mk) = mask(key, out.len(), 1) {
        out.iter_mut().zip(mk).for_each(|(a, m)| *a *= m);
    }
    out.iter_mut().zip(&x1).for_each(|(o, &xv)| *o += xv);
    Ok((
        out,
        Acts {
            xn1,
            mean1,
            rstd1,
            qkv,
            lse,
            y,
            x1,
            xn2,
            mean2,
            rstd2,
            h,
            g,
        },
    ))
}

/// Block backward: the gradient of the block input, and of its parameters (vars order).
fn block_bwd(
    cx: Ctx,
    blk: &GptBlock,
    x: &[f32],
    a: Acts,
    dout: Vec<f32>,
    d: &Dims,
    key: Option<super::DropKey>,
) -> R<(Vec<f32>, Vec<Vec<f32>>)> {
    let vars = blk.vars();
    let v = vars.iter().map(View::new).collect::<R<Vec<_>>>()?;
    if v.len() != BLOCK_PARAMS || v[0].len == 0 {
        candle_core::bail!("fast path: block parameters are not present (ZeRO-3 gather missing)");
    }
    let (n, c) = (d.b * d.t, d.c);
    let mut gr: Vec<Vec<f32>> = v.iter().map(|p| vec![0f32; p.len]).collect();
    let [g_ln1w, g_ln1b, g_qkvw, g_qkvb, g_projw, g_projb, g_fcw, g_fcb, g_fc2w, g_fc2b, g_ln2w, g_ln2b] =
        &mut gr[..]
    else {
        candle_core::bail!("fast path: a block has {BLOCK_PARAMS} parameters");
    };
    // MLP branch: out = x1 + drop(fc2(gelu(fc(ln2(x1)))))
    let mut dm = dout.clone();
    if let Some(mk) = mask(key, dm.len(), 1) {
        dm.iter_mut().zip(mk).for_each(|(a, m)| *a *= m);
    }
    let mut dg = vec![0f32; n * 4 * c];
    linear_bwd(
        cx,
        &dm,
        &a.g,
        v[8].s(),
        n,
        4 * c,
        c,
        Some((&mut dg, false)),
        g_fc2w,
        g_fc2b,
    );
    drop(dm);
    gelu_bwd(cx, &a.h, &mut dg, 4 * c);
    let mut dxn2 = vec![0f32; n * c];
    linear_bwd(
        cx,
        &dg,
        &a.xn2,
        v[6].s(),
        n,
        c,
        4 * c,
        Some((&mut dxn2, false)),
        g_fcw,
        g_fcb,
    );
    drop(dg);
    let mut dx1 = dout;
    ln_bwd(
        cx,
        &dxn2,
        &a.x1,
        v[10].s(),
        &a.mean2,
        &a.rstd2,
        c,
        &mut dx1,
        true,
        g_ln2w,
        g_ln2b,
    );
    // Attention branch: x1 = x + drop(proj(attn(qkv(ln1(x)))))
    let mut da = dx1.clone();
    if let Some(mk) = mask(key, da.len(), 0) {
        da.iter_mut().zip(mk).for_each(|(a, m)| *a *= m);
    }
    let mut dy = vec![0f32; n * c];
    linear_bwd(
        cx,
        &da,
        &a.y,
        v[4].s(),
        n,
        c,
        c,
        Some((&mut dy, false)),
        g_projw,
        g_projb,
    );
    drop(da);
    let dqkv = attn_bwd(cx, &dy, &a.qkv, &a.y, &a.lse, d.b, d.t, c, d.h);
    drop(dy);
    let mut dxn1 = dxn2;
    linear_bwd(
        cx,
        &dqkv,
        &a.xn1,
        v[2].s(),
        n,
        c,
        3 * c,
        Some((&mut dxn1, false)),
        g_qkvw,
        g_qkvb,
    );
    drop(dqkv);
    let mut dx = dx1;
    ln_bwd(
        cx,
        &dxn1,
        x,
        v[0].s(),
        &a.mean1,
        &a.rstd1,
        c,
        &mut dx,
        true,
        g_ln1w,
        g_ln1b,
    );
    Ok((dx, gr))
}

// ------------------------------------------------------------------ the model

/// Softmax cross-entropy per row, mean over rows; the logits become the gradient in place.
fn ce_in_place(cx: Ctx, logits: &mut [f32], tg: &[u32], vocab: usize) -> f64 {
    let n = tg.len();
    let inv_n = 1.0 / n as f32;
    let mut row_loss = vec![0f64; n];
    let lp = SendPtr(row_loss.as_mut_ptr());
    cx.rows(logits, vocab, |i, row| {
        let mx = max16(row);
        let target = tg[i] as usize;
        let zt = row[target];
        let sum = exp_shift_sum(row, mx);
        let r = inv_n / sum;
        row.iter_mut().for_each(|v| *v *= r);
        row[target] -= inv_n;
        // SAFETY: row i writes only row_loss[i].
        unsafe { *lp.get().add(i) = f64::from(mx) + f64::from(sum).ln() - f64::from(zt) };
    });
    row_loss.iter().sum::<f64>() / n as f64
}

/// Token plus position embedding of `ids` (sequences of `t` tokens): (B*T, C).
fn embed(gpt: &Gpt, ids: &[u32], t: usize, c: usize) -> R<Vec<f32>> {
    let mut x = vec![0f32; ids.len() * c];
    let wte = View::new(&gpt.wte)?;
    let wpe = View::new(&gpt.wpe)?;
    let (wte, wpe) = (wte.s(), wpe.s());
    for (i, row) in x.chunks_mut(c).enumerate() {
        let (tok, pos) = (ids[i] as usize, i % t);
        for ((o, &a), &p) in row
            .iter_mut()
            .zip(&wte[tok * c..(tok + 1) * c])
            .zip(&wpe[pos * c..(pos + 1) * c])
        {
            *o = a + p;
        }
    }
    Ok(x)
}

/// Held-out evaluation on the explicit kernels: the summed next-token loss over the batch's
/// positions and each position's argmax token. No dropout, nothing kept for a backward: one
/// block's activations and the batch's logits are the largest buffers.
pub(super) fn evaluate(gpt: &Gpt, ids: &[u32], targets: &[u32], b: usize) -> R<(f64, Vec<u32>)> {
    let cx = Ctx::of(gpt);
    let s = gpt.shape;
    let (c, vocab) = (s.hidden, s.vocab);
    if b == 0 || ids.is_empty() || !ids.len().is_multiple_of(b) {
        candle_core::bail!("evaluation: {} tokens do not make {b} sequences", ids.len());
    }
    let t = ids.len() / b;
    if t > s.seq {
        candle_core::bail!(
            "sequence of {t} tokens is longer than the model's {}",
            s.seq
        );
    }
    if targets.len() != ids.len() {
        candle_core::bail!("{} targets for {} inputs", targets.len(), ids.len());
    }
    if let Some(bad) = ids.iter().chain(targets).find(|&&k| k as usize >= vocab) {
        candle_core::bail!("token {bad} outside the vocabulary of {vocab}");
    }
    let d = Dims {
        b,
        t,
        c,
        h: s.heads,
    };
    let n = b * t;
    let mut x = embed(gpt, ids, t, c)?;
    for blk in &gpt.blocks {
        let (y, acts) = block_fwd(cx, blk, &x, &d, None)?;
        drop(acts);
        x = y;
    }
    let (lnw, lnb) = (View::new(&gpt.ln_f.weight)?, View::new(&gpt.ln_f.bias)?);
    let (xf, _, _) = ln_fwd(cx, &x, lnw.s(), lnb.s(), c);
    drop(x);
    let wte_v = View::new(&gpt.wte)?;
    let mut logits = vec![0f32; n * vocab];
    gemm_into(
        cx,
        n,
        vocab,
        c,
        &mut logits,
        0,
        vocab,
        false,
        mat(&xf, 0, c, 1),
        mat(wte_v.s(), 0, 1, c),
        1.0,
    );
    let mut row_loss = vec![0f64; n];
    let mut preds = vec![0u32; n];
    let (lp, pp) = (SendPtr(row_loss.as_mut_ptr()), SendPtr(preds.as_mut_ptr()));
    cx.rows(&mut logits, vocab, |i, row| {
        let mx = max16(row);
        // The first position of the largest logit, as candle's argmax picks it.
        let arg = row.iter().position(|&v| v == mx).unwrap_or(0);
        let zt = row[targets[i] as usize];
        let sum = exp_shift_sum(row, mx);
        // SAFETY: row i writes only row_loss[i] and preds[i].
        unsafe {
            *lp.get().add(i) = f64::from(mx) + f64::from(sum).ln() - f64::from(zt);
            *pp.get().add(i) = arg as u32;
        }
    });
    Ok((row_loss.iter().sum(), preds))
}

thread_local! {
    static LOGITS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn u32s(t: &Tensor) -> R<Vec<u32>> {
    t.flatten_all()?.to_vec1::<u32>()
}

/// [`Gpt::forward_backward_hooked`] on the explicit kernels: the same loss and gradients
/// (within f32 rounding), the same hook events (every block gathered before its forward and
/// again before its backward, released after each), the same checkpointing policy (a
/// checkpointed block keeps only its input and recomputes its activations before its backward).
pub(super) fn forward_backward(
    gpt: &Gpt,
    ids: &Tensor,
    targets: &Tensor,
    policy: Policy,
    loss_scale: f32,
    hook: &mut dyn FnMut(BlockEvent) -> R<()>,
    mut sink: Option<&mut ds_engine::traits::GradSink<'_>>,
) -> R<FwdBwd> {
    let t0 = Instant::now();
    let cx = Ctx::of(gpt);
    let (b, t) = ids.dims2()?;
    let s = gpt.shape;
    let (c, vocab) = (s.hidden, s.vocab);
    if b == 0 || t == 0 {
        candle_core::bail!("an empty batch ({b} x {t} tokens) has no loss");
    }
    if t > s.seq {
        candle_core::bail!(
            "sequence of {t} tokens is longer than the model's {}",
            s.seq
        );
    }
    let ids = u32s(ids)?;
    let tg = u32s(targets)?;
    if tg.len() != ids.len() {
        candle_core::bail!("{} targets for {} inputs", tg.len(), ids.len());
    }
    if let Some(bad) = ids.iter().chain(&tg).find(|&&k| k as usize >= vocab) {
        candle_core::bail!("token {bad} outside the vocabulary of {vocab}");
    }
    let d = Dims {
        b,
        t,
        c,
        h: s.heads,
    };
    let n = b * t;
    let nblocks = gpt.blocks.len();

    // Embedding.
    let mut x = embed(gpt, &ids, t, c)?;

    // Blocks forward.
    enum Kept {
        Input(Vec<f32>),
        All(Vec<f32>, Box<Acts>),
    }
    let mut kept: Vec<Kept> = Vec::with_capacity(nblocks);
    let mut seg_fwd = vec![0f64; nblocks];
    for (i, blk) in gpt.blocks.iter().enumerate() {
        let key = gpt.drop_key(i);
        hook(BlockEvent::Gather(i))?;
        let ts = Instant::now();
        let (y, acts) = block_fwd(cx, blk, &x, &d, key)?;
        let xin = std::mem::replace(&mut x, y);
        if policy.checkpointed(i, nblocks) {
            drop(acts);
            seg_fwd[i] = ts.elapsed().as_secs_f64() * 1e3;
            kept.push(Kept::Input(xin));
        } else {
            kept.push(Kept::All(xin, Box::new(acts)));
        }
        hook(BlockEvent::Release(i))?;
    }

    // Head: final LayerNorm, tied LM head, fused softmax cross-entropy whose probabilities
    // become the logits' gradient in place.
    let mut grads: Vec<Option<Tensor>> = vec![None; gpt.names.len()];
    let (lnw, lnb) = (View::new(&gpt.ln_f.weight)?, View::new(&gpt.ln_f.bias)?);
    let (xf, meanf, rstdf) = ln_fwd(cx, &x, lnw.s(), lnb.s(), c);
    let wte_v = View::new(&gpt.wte)?;
    let wte = wte_v.s();
    // The logits are the largest buffer of the step (B*T x V): each rank thread keeps its own
    // between steps, so that it is not handed back to the kernel and faulted in again.
    let mut logits = LOGITS.with(|l| std::mem::take(&mut *l.borrow_mut()));
    logits.resize(n * vocab, 0.0);
    gemm_into(
        cx,
        n,
        vocab,
        c,
        &mut logits,
        0,
        vocab,
        false,
        mat(&xf, 0, c, 1),
        mat(wte, 0, 1, c),
        1.0,
    );
    let loss = ce_in_place(cx, &mut logits, &tg, vocab) as f32;
    let fwd_ms = t0.elapsed().as_secs_f64() * 1e3;
    if loss_scale != 1.0 {
        // fp16 loss scaling: d(loss * s)/dlogits.
        logits.iter_mut().for_each(|g| *g *= loss_scale);
    }
    let dlogits = logits;
    let mut dxf = vec![0f32; n * c];
    gemm_into(
        cx,
        n,
        c,
        vocab,
        &mut dxf,
        0,
        c,
        false,
        mat(&dlogits, 0, vocab, 1),
        mat(wte, 0, c, 1),
        1.0,
    );
    let mut dwte = vec![0f32; vocab * c];
    gemm_into(
        cx,
        vocab,
        c,
        n,
        &mut dwte,
        0,
        c,
        false,
        mat(&dlogits, 0, 1, vocab),
        mat(&xf, 0, c, 1),
        1.0,
    );
    LOGITS.with(|l| *l.borrow_mut() = dlogits);
    let mut dx = vec![0f32; n * c];
    let mut dlnw = vec![0f32; c];
    let mut dlnb = vec![0f32; c];
    ln_bwd(
        cx,
        &dxf,
        &x,
        lnw.s(),
        &meanf,
        &rstdf,
        c,
        &mut dx,
        false,
        &mut dlnw,
        &mut dlnb,
    );
    drop((xf, dxf, lnw, lnb, wte_v));
    let nparams = gpt.names.len();
    grads[nparams - 2] = Some(Tensor::from_vec(dlnw, c, &Device::Cpu)?);
    grads[nparams - 1] = Some(Tensor::from_vec(dlnb, c, &Device::Cpu)?);
    if let Some(sink) = sink.as_deref_mut() {
        let g = vec![grads[nparams - 2].take(), grads[nparams - 1].take()];
        sink(nparams - 2..nparams, g)?;
    }

    // Blocks backward.
    let mut segments = Vec::new();
    for (i, (blk, k)) in gpt.blocks.iter().zip(kept).enumerate().rev() {
        let key = gpt.drop_key(i);
        hook(BlockEvent::Gather(i))?;
        let ts = Instant::now();
        let (xin, acts, ckpt) = match k {
            Kept::All(xin, acts) => (xin, *acts, false),
            Kept::Input(xin) => {
                let (_, acts) = block_fwd(cx, blk, &xin, &d, key)?;
                (xin, acts, true)
            }
        };
        let (dxin, pg) = block_bwd(cx, blk, &xin, acts, dx, &d, key)?;
        if ckpt {
            segments.push((i, seg_fwd[i], ts.elapsed().as_secs_f64() * 1e3));
        }
        dx = dxin;
        let first = Gpt::block_param_start(i);
        for (j, (g, sh)) in pg.into_iter().zip(blk.param_shapes()).enumerate() {
            grads[first + j] = Some(Tensor::from_vec(g, sh, &Device::Cpu)?);
        }
        if let Some(sink) = sink.as_deref_mut() {
            let np = blk.param_shapes().len();
            let g = grads[first..first + np]
                .iter_mut()
                .map(Option::take)
                .collect();
            sink(first..first + np, g)?;
        }
        hook(BlockEvent::Release(i))?;
    }

    // Embedding backward: scatter-add into the (tied) token table, sum over the batch for
    // positions.
    let mut dwpe = vec![0f32; s.seq * c];
    for (i, row) in dx.chunks(c).enumerate() {
        let tok = ids[i] as usize;
        let pos = i % t;
        dwte[tok * c..(tok + 1) * c]
            .iter_mut()
            .zip(row)
            .for_each(|(o, &v)| *o += v);
        dwpe[pos * c..(pos + 1) * c]
            .iter_mut()
            .zip(row)
            .for_each(|(o, &v)| *o += v);
    }
    grads[0] = Some(Tensor::from_vec(dwte, (vocab, c), &Device::Cpu)?);
    grads[1] = Some(Tensor::from_vec(dwpe, (s.seq, c), &Device::Cpu)?);
    let grads = match sink {
        Some(sink) => {
            sink(0..2, vec![grads[0].take(), grads[1].take()])?;
            Vec::new()
        }
        None => grads,
    };
    Ok(FwdBwd {
        loss,
        grads,
        fwd_ms,
        bwd_ms: t0.elapsed().as_secs_f64() * 1e3 - fwd_ms,
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_match_f64() {
        let mut worst_exp = 0f64;
        let mut worst_tanh = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = f64::from(exp_f32(x));
            let r = f64::from(x).exp();
            worst_exp = worst_exp.max(((e - r) / r).abs());
            x += 0.0137;
        }
        let mut u = -12.0f32;
        while u < 12.0 {
            let e = f64::from(tanh_f32(u));
            let r = f64::from(u).tanh();
            worst_tanh = worst_tanh.max((e - r).abs());
            u += 0.00091;
        }
        assert!(worst_exp < 4e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 3e-7, "tanh absolute error {worst_tanh}");
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// f64 reference matmul over strided operands.
    fn ref_mm(mm: usize, n: usize, k: usize, a: M<'_>, b: M<'_>) -> Vec<f64> {
        let mut out = vec![0f64; mm * n];
        for i in 0..mm {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| {
                        f64::from(a.data[a.off + i * a.rs + l * a.cs])
                            * f64::from(b.data[b.off + l * b.rs + j * b.cs])
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_matmul_matches_f64_on_odd_shapes() {
        let mut rng = super::super::Rng::new(3);
        for &(mm, n, k) in &[(1, 1, 1), (7, 5, 3), (33, 17, 65), (64, 130, 9)] {
            let a = rng.normal_vec(mm * k * 2 + 5, 1.0);
            let b = rng.normal_vec(k * n * 3 + 2, 1.0);
            // A transposed with an offset and a padded row stride; B with stride 3 rows.
            let am = mat(&a, 5, 1, mm + 1);
            let bm = mat(&b, 2, 3 * n, 1);
            let r = ref_mm(mm, n, k, am, bm);
            for cx in [Ctx::new(1), Ctx::new(2)] {
                let mut d = vec![1f32; mm * n];
                gemm_into(cx, mm, n, k, &mut d, 0, n, true, am, bm, 0.5);
                for (x, y) in d.iter().zip(&r) {
                    assert!((f64::from(*x) - (1.0 + 0.5 * y)).abs() < 1e-4 * (1.0 + y.abs()));
                }
            }
        }
    }

    #[test]
    fn transpose_and_linear_forward_match_reference_on_odd_shapes() {
        for &(rows, cols) in &[
            (1, 1),
            (3, 70),
            (37, 5),
            (100, 33),
            (64, 64),
            (40, 24),
            (8, 8),
        ] {
            let a: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            for threads in [1, 2] {
                let mut t = vec![-1f32; rows * cols];
                transpose_into(Ctx::new(threads), &a, rows, cols, &mut t);
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(t[c * rows + r], a[r * cols + c], "{rows}x{cols} ({r}, {c})");
                    }
                }
            }
        }
        let mut rng = super::super::Rng::new(5);
        // The scratch buffer is reused across calls of different sizes, larger first.
        for &(n, din, dout) in &[(64, 48, 80), (5, 7, 3), (33, 20, 70), (1, 1, 1)] {
            let x = rng.normal_vec(n * din, 1.0);
            let w = rng.normal_vec(dout * din, 1.0);
            let b = rng.normal_vec(dout, 1.0);
            let r = ref_mm(n, dout, din, mat(&x, 0, din, 1), mat(&w, 0, 1, din));
            for threads in [1, 2] {
                let y = linear_fwd(Ctx::new(threads), &x, &w, &b, n, din, dout);
                for (i, (yv, rv)) in y.iter().zip(&r).enumerate() {
                    let want = rv + f64::from(b[i % dout]);
                    assert!((f64::from(*yv) - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
        }
    }

    use super::super::{ModelShape, Rng};

    fn odd_model(seed: u64) -> Gpt {
        // Odd sizes everywhere: hidden 12 over 3 heads (head dim 4), seq 7, vocab 19.
        let s = ModelShape {
            layers: 2,
            hidden: 12,
            heads: 3,
            seq: 7,
            vocab: 19,
        };
        let g = Gpt::new(s, seed, &Device::Cpu).unwrap();
        // Random values for every parameter (LayerNorm weights away from 1, biases away from 0)
        // so that no term of any backward hides behind an identity.
        let mut rng = Rng::new(seed + 100);
        for (i, p) in g.params().iter().enumerate() {
            let v = rng.normal_vec(p.var.elem_count(), 0.3);
            g.set_param(i, &v).unwrap();
        }
        g
    }

    fn batch(g: &Gpt, b: usize, t: usize, seed: u64) -> (Tensor, Tensor) {
        let v = g.shape().vocab as u64;
        let mut rng = Rng::new(seed);
        let mut draw = || -> Vec<u32> { (0..b * t).map(|_| (rng.next_u64() % v) as u32).collect() };
        let ids = Tensor::from_vec(draw(), (b, t), &Device::Cpu).unwrap();
        let tg = Tensor::from_vec(draw(), (b, t), &Device::Cpu).unwrap();
        (ids, tg)
    }

    #[test]
    fn evaluation_matches_candle_forward_without_dropout() {
        // The explicit-kernel evaluation against the candle-op forward of the same weights,
        // with the loss recomputed in f64 from the candle logits; dropout set on the model
        // must not act (Gpt::logits without dropout is the reference).
        for (b, t) in [(3, 7), (1, 1), (2, 5)] {
            let mut g = odd_model(11);
            g.set_dropout(0.3, 5);
            let (ids, tg) = batch(&g, b, t, 40 + b as u64);
            let (ids_v, tg_v) = (u32s(&ids).unwrap(), u32s(&tg).unwrap());
            let (sum, preds) = evaluate(&g, &ids_v, &tg_v, b).unwrap();
            g.set_dropout(0.0, 5);
            let logits = g.logits(&ids).unwrap().to_vec2::<f32>().unwrap();
            let mut want = 0f64;
            for (i, row) in logits.iter().enumerate() {
                let mx = row
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
                let lse = mx
                    + row
                        .iter()
                        .map(|&v| (f64::from(v) - mx).exp())
                        .sum::<f64>()
                        .ln();
                want += lse - f64::from(row[tg_v[i] as usize]);
                let best = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |a, (j, &v)| if v > a.1 { (j, v) } else { a },
                    );
                // An argmax may differ only between logits equal to f32 rounding.
                let got = preds[i] as usize;
                assert!(
                    got == best.0 || (row[got] - best.1).abs() <= 1e-5 * best.1.abs().max(1.0),
                    "row {i}: argmax {got} vs {}",
                    best.0
                );
            }
            assert!(
                (sum - want).abs() <= 1e-5 * want.abs().max(1.0),
                "b={b} t={t}: loss sum {sum} vs {want}"
            );
            // The candle fallback of Gpt::evaluate_tokens gives the same.
            g.set_explicit_kernels(false);
            let (sum2, preds2) = g.evaluate_tokens(&ids_v, &tg_v, b).unwrap();
            assert!((sum2 - want).abs() <= 1e-5 * want.abs().max(1.0));
            assert_eq!(preds2.len(), preds.len());
        }
        // Bad input is an error, not a panic.
        let g = odd_model(1);
        assert!(evaluate(&g, &[1, 2, 3], &[1, 2, 3], 2).is_err());
        assert!(evaluate(&g, &[1, 2], &[1, 99], 1).is_err());
        assert!(
            evaluate(&g, &[0; 8], &[0; 8], 1).is_err(),
            "longer than seq 7"
        );
    }

    fn assert_close(a: &FwdBwd, r: &FwdBwd, names: &[String]) {
        assert!(
            (a.loss - r.loss).abs() <= 1e-5 * r.loss.abs(),
            "loss {} vs reference {}",
            a.loss,
            r.loss
        );
        for (k, (ga, gr)) in a.grads.iter().zip(&r.grads).enumerate() {
            let gr = gr
                .as_ref()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ga = ga
                .as_ref()
                .unwrap_or_else(|| panic!("no gradient for {}", names[k]))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ga.len(), gr.len(), "{}", names[k]);
            let scale = gr.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{}: zero reference gradient", names[k]);
            let worst = ga
                .iter()
                .zip(&gr)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-4 * scale,
                "{}: max |explicit - autograd| = {worst} (max |g| = {scale})",
                names[k]
            );
        }
    }

    /// The whole GPT on the explicit kernels against candle autograd (over the fused custom
    /// ops, themselves tested against candle's generic ops): loss and every gradient, for a
    /// batch shorter than the model's context, with residual dropout and each checkpointing
    /// policy.
    #[test]
    fn explicit_gpt_matches_autograd() {
        for (policy, dropout) in [
            (Policy::None, 0.0),
            (Policy::Every, 0.0),
            (Policy::Count(1), 0.2),
            (Policy::None, 0.2),
        ] {
            let mut g = odd_model(7);
            g.set_dropout(dropout, 3);
            g.set_step(5);
            let (ids, tg) = batch(&g, 3, 5, 11);
            let names: Vec<String> = g.params().iter().map(|p| p.name.clone()).collect();
            for threads in [1, 2] {
                g.set_threads(threads);
                g.set_explicit_kernels(true);
                let fast = g.forward_backward(&ids, &tg, policy).unwrap();
                g.set_explicit_kernels(false);
                let reference = g.forward_backward(&ids, &tg, Policy::None).unwrap();
                assert_close(&fast, &reference, &names);
                if policy != Policy::None {
                    let ckpt: Vec<usize> = fast.segments.iter().map(|s| s.0).collect();
                    assert!(
                        !ckpt.is_empty(),
                        "{policy:?}: no checkpointed segment timed"
                    );
                }
            }
        }
    }

    fn flat(t: &Option<Tensor>) -> Vec<f32> {
        t.as_ref()
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .unwrap_or_default()
    }

    /// bf16 compute (every matrix product on the emulated `vdpbf16ps`) against the f32 path:
    /// the loss and every gradient within bf16 rounding, for the training step (with and
    /// without checkpointing, one and two threads) and the evaluation; the products really
    /// ran in bf16 (the results differ from f32's); switched back to `None`, the f32 bits.
    #[test]
    fn bf16_compute_matches_f32_within_bf16_rounding() {
        println!("units: {}", Bf16Units::Emulated);
        let mut g = odd_model(7);
        let (ids, tg) = batch(&g, 3, 7, 11);
        let names: Vec<String> = g.params().iter().map(|p| p.name.clone()).collect();
        assert_eq!(g.bf16_compute(), Bf16Units::None);
        let f32_run = g.forward_backward(&ids, &tg, Policy::None).unwrap();
        let (ids_v, tg_v) = (u32s(&ids).unwrap(), u32s(&tg).unwrap());
        let f32_eval = evaluate(&g, &ids_v, &tg_v, 3).unwrap();
        // bf16's unit roundoff; the operands of every product are rounded once, so errors of
        // a few units relative to the largest gradient, through two blocks and the head.
        let u = 2f32.powi(-8);
        for (policy, threads) in [(Policy::None, 1), (Policy::Every, 2)] {
            g.set_threads(threads);
            g.set_bf16_compute(Bf16Units::Emulated).unwrap();
            let bf = g.forward_backward(&ids, &tg, policy).unwrap();
            let rel = (bf.loss - f32_run.loss).abs() / f32_run.loss.abs();
            assert!(
                rel <= u,
                "loss {} vs f32 {} ({rel:e})",
                bf.loss,
                f32_run.loss
            );
            let mut differs = bf.loss != f32_run.loss;
            for (k, (gb, gf)) in bf.grads.iter().zip(&f32_run.grads).enumerate() {
                let (gb, gf) = (flat(gb), flat(gf));
                assert_eq!(gb.len(), gf.len(), "{}", names[k]);
                let scale = gf.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = gb
                    .iter()
                    .zip(&gf)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    worst <= 8.0 * u * scale,
                    "{} ({policy:?}, {threads} threads): max |bf16 - f32| = {worst:e}, max |g| = {scale:e}",
                    names[k]
                );
                differs |= worst > 0.0;
            }
            assert!(
                differs,
                "bf16 compute gave the f32 bits: the products did not run in bf16"
            );
            let (sum, preds) = evaluate(&g, &ids_v, &tg_v, 3).unwrap();
            assert!((sum - f32_eval.0).abs() <= 4.0 * f64::from(u) * f32_eval.0.abs());
            assert_ne!(sum, f32_eval.0);
            assert_eq!(preds.len(), f32_eval.1.len());
        }
        // Units `None`: the f32 path, bit for bit.
        g.set_threads(1);
        g.set_bf16_compute(Bf16Units::None).unwrap();
        let again = g.forward_backward(&ids, &tg, Policy::None).unwrap();
        assert_eq!(again.loss.to_bits(), f32_run.loss.to_bits());
        for (a, b) in again.grads.iter().zip(&f32_run.grads) {
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits(flat(a)), bits(flat(b)));
        }
        assert_eq!(evaluate(&g, &ids_v, &tg_v, 3).unwrap(), f32_eval);
        // AVX-512 BF16 where the CPU lacks it is an error, not a panic, and changes nothing.
        if !bf16mm::cpu_has_avx512bf16() {
            assert!(g.set_bf16_compute(Bf16Units::Avx512Bf16).is_err());
            assert_eq!(g.bf16_compute(), Bf16Units::None);
        }
    }

    /// The f32 products with units `None` are `gemm`'s, bit for bit: the same call as before
    /// the bf16 path existed.
    #[test]
    fn f32_products_are_gemms_bits() {
        let mut rng = super::super::Rng::new(5);
        let (mm, n, k) = (33, 70, 65);
        let a = rng.normal_vec(mm * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        for threads in [1, 2] {
            let mut d = vec![0f32; mm * n];
            gemm_into(
                Ctx::new(threads),
                mm,
                n,
                k,
                &mut d,
                0,
                n,
                false,
                mat(&a, 0, k, 1),
                mat(&b, 0, n, 1),
                1.0,
            );
            let mut want = vec![0f32; mm * n];
            // SAFETY: the three buffers hold the shapes given.
            unsafe {
                gemm::gemm(
                    mm,
                    n,
                    k,
                    want.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Ctx::new(threads).par(),
                );
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&d), bits(&want));
        }
    }

    /// ZeRO-3's use of the hook: blocks released between uses and gathered back from a copy
    /// give the same gradients, and the events come in DeepSpeed's order.
    #[test]
    fn hook_gathers_every_block_before_each_use() {
        let g = odd_model(9);
        let (ids, tg) = batch(&g, 2, 7, 4);
        let names: Vec<String> = g.params().iter().map(|p| p.name.clone()).collect();
        let plain = g.forward_backward(&ids, &tg, Policy::None).unwrap();
        let saved: Vec<Vec<f32>> = g
            .blocks()
            .iter()
            .map(|b| {
                b.vars()
                    .iter()
                    .flat_map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect()
            })
            .collect();
        for b in g.blocks() {
            b.release().unwrap();
        }
        let mut events = Vec::new();
        let mut hook = |ev: BlockEvent| -> R<()> {
            events.push(ev);
            match ev {
                BlockEvent::Gather(i) => g.blocks()[i].set_data(&saved[i]),
                BlockEvent::Release(i) => g.blocks()[i].release(),
            }
        };
        let hooked = g
            .forward_backward_hooked(&ids, &tg, Policy::None, &mut hook)
            .unwrap();
        assert_close(&hooked, &plain, &names);
        use BlockEvent::{Gather as G, Release as Rl};
        assert_eq!(
            events,
            vec![G(0), Rl(0), G(1), Rl(1), G(1), Rl(1), G(0), Rl(0)]
        );
        assert!(g.blocks().iter().all(|b| !b.is_gathered()));
        // Without the gather the fast path refuses instead of reading empty parameters.
        let err = g.forward_backward(&ids, &tg, Policy::None).unwrap_err();
        assert!(err.to_string().contains("not present"), "{err}");
    }

    #[test]
    fn out_of_vocabulary_tokens_are_an_error() {
        let g = odd_model(1);
        let ids = Tensor::from_vec(vec![0u32, 19], (1, 2), &Device::Cpu).unwrap();
        let tg = Tensor::from_vec(vec![1u32, 2], (1, 2), &Device::Cpu).unwrap();
        let err = g.forward_backward(&ids, &tg, Policy::None).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    /// Central differences of `f` at `x` against `g` on a sample of coordinates: catches a
    /// wrong formula (the forward is f32, so the tolerance is loose but far below any error a
    /// wrong term makes).
    fn fd_check(what: &str, f: &dyn Fn(&[f32]) -> f64, x: &[f32], g: &[f32]) {
        let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        assert!(scale > 0.0, "{what}: zero gradient");
        let mut rng = Rng::new(17);
        for _ in 0..24 {
            let i = (rng.next_u64() % x.len() as u64) as usize;
            let e = 1e-2f32;
            let (mut a, mut b) = (x.to_vec(), x.to_vec());
            a[i] += e;
            b[i] -= e;
            let num = (f(&a) - f(&b)) / (2.0 * f64::from(e));
            let err = (num - f64::from(g[i])).abs();
            assert!(
                err <= 2e-2 * scale,
                "{what}[{i}]: numeric {num} vs analytic {}",
                g[i]
            );
        }
    }

    fn weighted(out: &[f32], r: &[f32]) -> f64 {
        out.iter()
            .zip(r)
            .map(|(&o, &w)| f64::from(o) * f64::from(w))
            .sum()
    }

    /// Naive causal attention in f64 over the full T x T matrix: `y`, and the gradient of
    /// `qkv` for the output gradient `dy` (the analytic softmax backward).
    fn attn_ref(
        qkv: &[f32],
        dy: &[f32],
        b: usize,
        t: usize,
        c: usize,
        h: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let hd = c / h;
        let sc = 1.0 / (hd as f64).sqrt();
        let x = |r: usize, col: usize| f64::from(qkv[r * 3 * c + col]);
        let mut y = vec![0f64; b * t * c];
        let mut g = vec![0f64; b * t * 3 * c];
        for bi in 0..b {
            for hi in 0..h {
                let (q0, k0, v0) = (hi * hd, c + hi * hd, 2 * c + hi * hd);
                let row = |i: usize| bi * t + i;
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|e| x(row(i), q0 + e) * x(row(j), k0 + e))
                                .sum::<f64>()
                                * sc
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                    let p: Vec<f64> = s.iter().map(|v| (v - mx).exp() / z).collect();
                    let dyr = |e: usize| f64::from(dy[row(i) * c + hi * hd + e]);
                    for e in 0..hd {
                        y[row(i) * c + hi * hd + e] =
                            (0..=i).map(|j| p[j] * x(row(j), v0 + e)).sum();
                    }
                    // dP_j = dy_i . v_j ; dS_j = P_j (dP_j - sum_k P_k dP_k)
                    let dpv: Vec<f64> = (0..=i)
                        .map(|j| (0..hd).map(|e| dyr(e) * x(row(j), v0 + e)).sum())
                        .collect();
                    let dot: f64 = p.iter().zip(&dpv).map(|(a, b)| a * b).sum();
                    for j in 0..=i {
                        let ds = p[j] * (dpv[j] - dot) * sc;
                        for e in 0..hd {
                            g[row(i) * 3 * c + q0 + e] += ds * x(row(j), k0 + e);
                            g[row(j) * 3 * c + k0 + e] += ds * x(row(i), q0 + e);
                            g[row(j) * 3 * c + v0 + e] += p[j] * dyr(e);
                        }
                    }
                }
            }
        }
        (y, g)
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        got.iter()
            .zip(want)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0f64, f64::max)
            / scale
    }

    #[test]
    fn blocked_attention_matches_f64_reference() {
        let mut rng = Rng::new(11);
        // (B, T, C, heads, spread of qkv): T = 1, T not a multiple of any tile, odd head dims,
        // several heads, several key tiles of the default size with large scores (the running
        // maximum moves: the online softmax rescales).
        for &(b, t, c, h, sd) in &[
            (1, 1, 3, 1, 1.5),
            (2, 7, 6, 2, 1.5),
            (1, 13, 15, 3, 1.5),
            (2, 33, 8, 2, 1.5),
            (1, 130, 64, 2, 1.5),
            (3, 70, 12, 1, 1.5),
            (1, 300, 16, 2, 3.0),
        ] {
            let qkv = rng.normal_vec(b * t * 3 * c, sd);
            let dy = rng.normal_vec(b * t * c, 1.0);
            let (yr, gr) = attn_ref(&qkv, &dy, b, t, c, h);
            let same = |q, k| (Tiles { q, k }, Tiles { q, k });
            for (ft, bt) in [
                (FWD_TILES, BWD_TILES),
                same(1, 1),
                same(3, 5),
                same(5, 3),
                same(64, 16),
                same(16, 128),
            ] {
                // Threads 3 with fewer heads than threads deals key tiles to several tasks.
                for threads in [1, 3] {
                    let cx = Ctx::new(threads);
                    let (y, lse) = attn_fwd_tiled(cx, &qkv, b, t, c, h, ft);
                    assert_eq!(lse.len(), b * h * t);
                    let ey = max_rel(&y, &yr);
                    let g = attn_bwd_tiled(cx, &dy, &qkv, &y, &lse, b, t, c, h, bt);
                    let eg = max_rel(&g, &gr);
                    assert!(
                        ey < 2e-6 && eg < 5e-6,
                        "B {b} T {t} C {c} H {h} {ft:?} {bt:?} threads {threads}: y {ey:e}, dqkv {eg:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn public_kernels_match_central_differences() {
        let th = Threads(1);
        let mut rng = Rng::new(5);
        // Attention: B 2, T 5, C 6 over 2 heads.
        let (b, t, c, h) = (2, 5, 6, 2);
        let qkv = rng.normal_vec(b * t * 3 * c, 1.0);
        let r = rng.normal_vec(b * t * c, 1.0);
        let (y, lse) = attention_forward(th, &qkv, b, t, c, h).unwrap();
        let g = attention_backward(th, &r, &qkv, &y, &lse, b, t, c, h).unwrap();
        let f = |x: &[f32]| weighted(&attention_forward(th, x, b, t, c, h).unwrap().0, &r);
        fd_check("attention", &f, &qkv, &g);
        // Causality: a later token's query/key/value never changes an earlier output.
        let mut q2 = qkv.clone();
        for v in &mut q2[(t - 1) * 3 * c..t * 3 * c] {
            *v += 1.0;
        }
        let (y1, _) = attention_forward(th, &qkv, b, t, c, h).unwrap();
        let (y2, _) = attention_forward(th, &q2, b, t, c, h).unwrap();
        assert_eq!(y1[..(t - 1) * c], y2[..(t - 1) * c]);

        // LayerNorm: rows of 7.
        let c = 7;
        let x = rng.normal_vec(3 * c, 2.0);
        let w = rng.normal_vec(c, 1.0);
        let bias = rng.normal_vec(c, 1.0);
        let r = rng.normal_vec(3 * c, 1.0);
        let (_, mean, rstd) = layer_norm_forward(th, &x, &w, &bias, c).unwrap();
        let (mut dx, mut dw, mut db) = (vec![0f32; 3 * c], vec![0f32; c], vec![0f32; c]);
        layer_norm_backward(th, &r, &x, &w, &mean, &rstd, c, &mut dx, &mut dw, &mut db).unwrap();
        let f = |x: &[f32]| weighted(&layer_norm_forward(th, x, &w, &bias, c).unwrap().0, &r);
        fd_check("layer norm x", &f, &x, &dx);
        let f = |w: &[f32]| weighted(&layer_norm_forward(th, &x, w, &bias, c).unwrap().0, &r);
        fd_check("layer norm w", &f, &w, &dw);

        // GELU.
        let hv = rng.normal_vec(37, 2.0);
        let r = rng.normal_vec(37, 1.0);
        let mut dg = r.clone();
        gelu_backward(th, &hv, &mut dg).unwrap();
        let f = |x: &[f32]| weighted(&gelu_forward(th, x), &r);
        fd_check("gelu", &f, &hv, &dg);

        // Cross-entropy: 4 rows over a vocabulary of 11; the loss against f64.
        let v = 11;
        let z = rng.normal_vec(4 * v, 3.0);
        let tg = [0u32, 10, 3, 3];
        let mut d = z.clone();
        let loss = softmax_cross_entropy(th, &mut d, &tg, v).unwrap();
        let exact: f64 = z
            .chunks(v)
            .zip(&tg)
            .map(|(row, &k)| {
                let s: f64 = row.iter().map(|&q| f64::from(q).exp()).sum();
                s.ln() - f64::from(row[k as usize])
            })
            .sum::<f64>()
            / 4.0;
        assert!(
            (loss - exact).abs() < 1e-5 * exact.abs(),
            "{loss} vs {exact}"
        );
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            softmax_cross_entropy(th, &mut y, &tg, v).unwrap()
        };
        fd_check("cross-entropy", &f, &z, &d);
        assert!(softmax_cross_entropy(th, &mut d, &[11, 0, 0, 0], v).is_err());

        // Linear.
        let (n, din, dout) = (3, 5, 4);
        let x = rng.normal_vec(n * din, 1.0);
        let w = rng.normal_vec(dout * din, 1.0);
        let bias = rng.normal_vec(dout, 1.0);
        let r = rng.normal_vec(n * dout, 1.0);
        let (mut dx, mut dw, mut db) = (
            vec![0f32; n * din],
            vec![0f32; dout * din],
            vec![0f32; dout],
        );
        linear_backward(th, &r, &x, &w, n, din, dout, &mut dx, &mut dw, &mut db).unwrap();
        let f = |x: &[f32]| weighted(&linear_forward(th, x, &w, &bias, n, din, dout).unwrap(), &r);
        fd_check("linear x", &f, &x, &dx);
        let f = |w: &[f32]| weighted(&linear_forward(th, &x, w, &bias, n, din, dout).unwrap(), &r);
        fd_check("linear w", &f, &w, &dw);
        let f = |b: &[f32]| weighted(&linear_forward(th, &x, &w, b, n, din, dout).unwrap(), &r);
        fd_check("linear b", &f, &bias, &db);
        assert!(linear_forward(th, &x, &w, &bias, n, din + 1, dout).is_err());
    }
}
