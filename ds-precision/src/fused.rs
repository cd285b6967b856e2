//! One fused pass over a gradient buffer: unscale, detect inf/nan, accumulate the squared L2
//! norm; plus DeepSpeed's combined unscale-and-clip rule and the plain `clip_grad_norm` rule.
//!
//! The kernels work on blocks of [`BLOCK`] elements with [`LANES`] independent `f32`
//! accumulators (so the compiler vectorises them) and add each block's partial sum into an
//! `f64` total: the rounding error is that of ~`BLOCK / LANES` f32 additions, not of `n`.
//! inf/nan are detected with an integer compare of `bits & 0x7fff_ffff` against `f32::MAX`'s
//! pattern (NaN and inf are the larger ones), OR-ed into per-lane flags: it vectorises and,
//! unlike a float max, never drops a NaN. On x86-64 the f32 kernels are also compiled for
//! AVX2 and picked at run time when the CPU has it.

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::error::{PrecisionError, Result};

/// Independent accumulators per block (a multiple of every SIMD width up to 512 bits).
pub const LANES: usize = 16;
/// Elements per block whose partial squared norm is summed in `f32` before going to `f64`.
pub const BLOCK: usize = 1024;

/// The epsilon DeepSpeed adds to the norm in both clipping rules.
pub const CLIP_EPS: f64 = 1e-6;

const ABS_MASK: u32 = 0x7fff_ffff;
/// `f32::MAX`'s bit pattern: any larger `bits & 0x7fff_ffff` is inf or nan.
const MAX_FINITE: i32 = 0x7f7f_ffff;

/// What one pass over a gradient buffer found. Merge the stats of several buffers (or ranks)
/// with [`GradStats::merge`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GradStats {
    /// Sum of squares of the (unscaled, when the pass unscales) gradients.
    pub sq_norm: f64,
    /// Whether any input element was inf or nan.
    pub has_inf_or_nan: bool,
    /// Number of elements seen.
    pub numel: usize,
}

impl GradStats {
    /// The L2 norm, `sqrt(sq_norm)` (inf/nan when the gradients were not finite).
    pub fn norm(&self) -> f64 {
        if self.has_inf_or_nan {
            f64::INFINITY
        } else {
            self.sq_norm.sqrt()
        }
    }
    /// Combine the stats of two disjoint buffers.
    pub fn merge(self, other: GradStats) -> GradStats {
        GradStats {
            sq_norm: self.sq_norm + other.sq_norm,
            has_inf_or_nan: self.has_inf_or_nan || other.has_inf_or_nan,
            numel: self.numel + other.numel,
        }
    }
}

#[inline(always)]
fn block_unscale(block: &mut [f32], inv_scale: f32, mx: &mut [u32; LANES]) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = block.chunks_exact_mut(LANES);
    for c in &mut chunks {
        if let Ok(c) = <&mut [f32; LANES]>::try_from(c) {
            for i in 0..LANES {
                let x = c[i];
                mx[i] |= (((x.to_bits() & ABS_MASK) as i32) > MAX_FINITE) as u32;
                let v = x * inv_scale;
                c[i] = v;
                acc[i] += v * v;
            }
        }
    }
    let mut tail = 0f64;
    for x in chunks.into_remainder() {
        mx[0] |= (((x.to_bits() & ABS_MASK) as i32) > MAX_FINITE) as u32;
        let v = *x * inv_scale;
        *x = v;
        tail += (v as f64) * (v as f64);
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

#[inline(always)]
fn block_check(block: &[f32], mx: &mut [u32; LANES]) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = block.chunks_exact(LANES);
    for c in &mut chunks {
        if let Ok(c) = <&[f32; LANES]>::try_from(c) {
            for i in 0..LANES {
                let x = c[i];
                mx[i] |= (((x.to_bits() & ABS_MASK) as i32) > MAX_FINITE) as u32;
                acc[i] += x * x;
            }
        }
    }
    let mut tail = 0f64;
    for &x in chunks.remainder() {
        mx[0] |= (((x.to_bits() & ABS_MASK) as i32) > MAX_FINITE) as u32;
        tail += (x as f64) * (x as f64);
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

fn finish(mx: &[u32; LANES], sq_norm: f64, numel: usize) -> GradStats {
    GradStats {
        sq_norm,
        has_inf_or_nan: mx.iter().any(|&m| m != 0),
        numel,
    }
}

/// The fused pass over fp32 gradients: `g *= inv_scale` in place, inf/nan check (on the
/// input values) and the squared L2 norm of the unscaled values, in one sweep.
///
/// `inv_scale` is `1 / scale_used`, the reciprocal of the loss scale used for this step's
/// backward pass (see the crate docs on DeepSpeed issue #2686).
pub fn unscale_check_norm_f32(grads: &mut [f32], inv_scale: f32) -> GradStats {
    unscale_check_norm_f32_simd(grads, inv_scale)
}

// Compiled for each `ds_simd` level (AVX-512, AVX2+FMA, baseline), run at `ds_simd::level()`;
// every level gives the same bits (explicit lanes, no fused multiply-add).
ds_simd::dispatch!(
    fn unscale_check_norm_f32_simd, unscale_check_norm_f32_at =>
        unscale_check_norm_f32_generic(grads: &mut [f32], inv_scale: f32) -> GradStats
);

#[inline(always)]
fn unscale_check_norm_f32_generic(grads: &mut [f32], inv_scale: f32) -> GradStats {
    let mut mx = [0u32; LANES];
    let mut total = 0f64;
    for block in grads.chunks_mut(BLOCK) {
        total += block_unscale(block, inv_scale, &mut mx);
    }
    finish(&mx, total, grads.len())
}

/// Read-only pass: inf/nan check and squared norm of the values as they are (DeepSpeed's order:
/// the norm of the still-scaled gradients, then [`deepspeed_combined_scale`]).
pub fn check_norm_f32(grads: &[f32]) -> GradStats {
    check_norm_f32_simd(grads)
}

ds_simd::dispatch!(
    fn check_norm_f32_simd, check_norm_f32_at => check_norm_f32_generic(grads: &[f32]) -> GradStats
);

/// Every SIMD level this CPU has gives the scalar path's bits (gradients, squared norm,
/// overflow flag); levels above the CPU's are clamped by `ds_simd`.
#[cfg(test)]
#[allow(clippy::items_after_test_module)] // kept beside the dispatch it tests
mod simd_levels {
    use super::*;
    use ds_simd::Level;

    #[test]
    fn every_level_equals_scalar_bitwise() {
        for n in [0usize, 1, 7, 64, 1000, 70_001] {
            for bad in [None, Some(f32::INFINITY), Some(f32::NAN)] {
                let mut g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
                if let (Some(b), true) = (bad, n > 3) {
                    g[n / 2] = b;
                }
                let s = Level::Scalar;
                let want = check_norm_f32_at(s, &g);
                let mut gs = g.clone();
                let want_u = unscale_check_norm_f32_at(s, &mut gs, 1.0 / 1024.0);
                for l in ds_simd::available() {
                    let got = check_norm_f32_at(l, &g);
                    assert_eq!(got.sq_norm.to_bits(), want.sq_norm.to_bits(), "{l} {n}");
                    assert_eq!(got.has_inf_or_nan, want.has_inf_or_nan, "{l} {n}");
                    let mut gl = g.clone();
                    let got_u = unscale_check_norm_f32_at(l, &mut gl, 1.0 / 1024.0);
                    assert_eq!(got_u.sq_norm.to_bits(), want_u.sq_norm.to_bits(), "{l} {n}");
                    assert_eq!(got_u.has_inf_or_nan, want_u.has_inf_or_nan, "{l} {n}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&gl), bits(&gs), "{l} {n}");
                }
                assert_eq!(want.has_inf_or_nan, bad.is_some() && n > 3);
            }
        }
    }
}

#[inline(always)]
fn check_norm_f32_generic(grads: &[f32]) -> GradStats {
    let mut mx = [0u32; LANES];
    let mut total = 0f64;
    for block in grads.chunks(BLOCK) {
        total += block_check(block, &mut mx);
    }
    finish(&mx, total, grads.len())
}

/// A gradient element type handled by the fused pass: `f32`, `f16` or `bf16`.
pub trait GradElement: Copy + Send + Sync + 'static {
    /// Widen a slice into `f32` (`dst.len() == src.len()`).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Narrow `f32` values into this type (round to nearest even).
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl GradElement for f32 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl GradElement for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl GradElement for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        // bf16 -> f32 is a 16-bit shift: written out so that it vectorises.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

/// The fused pass over gradients of any [`GradElement`] type, in place. For `f16`/`bf16` the
/// values are widened block by block, unscaled and checked in `f32`, and narrowed back.
/// Note that unscaled fp16 gradients may underflow in fp16: prefer
/// [`unscale_into_f32`] into the fp32 master-gradient buffer.
pub fn unscale_check_norm<T: GradElement>(grads: &mut [T], inv_scale: f32) -> GradStats {
    let mut mx = [0u32; LANES];
    let mut total = 0f64;
    let mut buf = [0f32; BLOCK];
    for block in grads.chunks_mut(BLOCK) {
        let b = &mut buf[..block.len()];
        T::widen(block, b);
        total += block_unscale(b, inv_scale, &mut mx);
        T::narrow(b, block);
    }
    finish(&mx, total, grads.len())
}

/// The fused pass from model-dtype gradients into an fp32 buffer (e.g. fp16 grads into the
/// flat fp32 master gradients): `dst = src * inv_scale`, with the inf/nan check and the
/// squared norm, in one sweep.
pub fn unscale_into_f32<T: GradElement>(
    src: &[T],
    dst: &mut [f32],
    inv_scale: f32,
) -> Result<GradStats> {
    if src.len() != dst.len() {
        return Err(PrecisionError::LengthMismatch {
            what: "unscale_into_f32 (src vs dst)",
            expected: src.len(),
            got: dst.len(),
        });
    }
    let mut mx = [0u32; LANES];
    let mut total = 0f64;
    for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        T::widen(s, d);
        total += block_unscale(d, inv_scale, &mut mx);
    }
    Ok(finish(&mx, total, src.len()))
}

/// Multiply every gradient by `factor` (the clipping pass, when clipping binds).
pub fn scale_in_place(grads: &mut [f32], factor: f32) {
    for g in grads.iter_mut() {
        *g *= factor;
    }
}

/// DeepSpeed's combined unscale-and-clip scale (`unscale_and_clip_grads`):
/// `clip = ((scaled_norm / loss_scale) + 1e-6) / clip_grad`; if `clip > 1` the combined scale
/// is `clip * loss_scale`, else `loss_scale`. Gradients are then multiplied by
/// `1 / combined`. `clip_grad <= 0` means no clipping (returns `loss_scale`).
pub fn deepspeed_combined_scale(scaled_norm: f64, loss_scale: f64, clip_grad: f64) -> f64 {
    if clip_grad > 0.0 {
        let clip = ((scaled_norm / loss_scale) + CLIP_EPS) / clip_grad;
        if clip > 1.0 {
            return clip * loss_scale;
        }
    }
    loss_scale
}

/// The plain `clip_grad_norm` coefficient: `min(1, max_norm / (norm + 1e-6))`.
/// `max_norm <= 0` means no clipping (returns 1).
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + CLIP_EPS)).min(1.0)
    } else {
        1.0
    }
}
