//! The Adam/AdamW update as candle tensor operations, for optimizer state that lives on the
//! model's device (a GPU: ZeRO stages 0-3 without offload). The same formula as the fused host
//! kernel of [`crate::optim`] (DeepSpeed's FusedAdam), operation for operation, so on the CPU
//! device the two agree to rounding; on CUDA every operation is one of candle's element-wise
//! kernels.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ds_zero::device::DeviceAdam;
//! use ds_zero::optim::AdamParams;
//!
//! let dev = Device::Cpu; // or Device::new_cuda(0)? with the `cuda` feature
//! let p = Tensor::new(&[1.0f32, -2.0], &dev)?;
//! let g = Tensor::new(&[0.5f32, 0.5], &dev)?;
//! let mut opt = DeviceAdam::new(AdamParams { weight_decay: 0.0, ..AdamParams::default() }, 2, &dev)?;
//! let p = opt.step(&p, &g, 0.1, 1.0)?;
//! // The first bias-corrected Adam step moves every element by lr * sign(g).
//! let v = p.to_vec1::<f32>()?;
//! assert!((v[0] - 0.9).abs() < 1e-6 && (v[1] + 2.1).abs() < 1e-6);
//! # Ok::<(), ds_zero::ZeroError>(())
//! ```

use crate::optim::AdamParams;
use crate::ZeroError;
use candle_core::{DType, Device, Tensor};

/// Adam/AdamW whose moments are f32 tensors on a device.
#[derive(Debug, Clone)]
pub struct DeviceAdam {
    params: AdamParams,
    m: Tensor,
    v: Tensor,
    step: u64,
}

impl DeviceAdam {
    /// Zeroed moments of `len` elements on `dev`.
    pub fn new(params: AdamParams, len: usize, dev: &Device) -> Result<Self, ZeroError> {
        Ok(DeviceAdam {
            params,
            m: Tensor::zeros(len, DType::F32, dev)?,
            v: Tensor::zeros(len, DType::F32, dev)?,
            step: 0,
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Bytes of optimizer state (two f32 moments).
    pub fn state_bytes(&self) -> usize {
        2 * 4 * self.m.elem_count()
    }

    /// The moments `(exp_avg, exp_avg_sq)`.
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.m, &self.v)
    }

    /// Restores moments and the step count (e.g. from a checkpoint): `m` and `v` must have this
    /// optimizer's length; they are moved to its device as f32.
    pub fn set_state(&mut self, m: &Tensor, v: &Tensor, step: u64) -> Result<(), ZeroError> {
        let n = self.m.elem_count();
        if m.elem_count() != n || v.elem_count() != n {
            return Err(ZeroError::State(format!(
                "device Adam holds {n} elements; got moments of {} and {}",
                m.elem_count(),
                v.elem_count()
            )));
        }
        let dev = self.m.device().clone();
        self.m = m.flatten_all()?.to_dtype(DType::F32)?.to_device(&dev)?;
        self.v = v.flatten_all()?.to_dtype(DType::F32)?.to_device(&dev)?;
        self.step = step;
        Ok(())
    }

    /// One update of the f32 master `p` from `grad_scale * g` with learning rate `lr`; returns
    /// the new master (`p`'s length and device). `g` may be any float dtype.
    pub fn step(
        &mut self,
        p: &Tensor,
        g: &Tensor,
        lr: f64,
        grad_scale: f64,
    ) -> Result<Tensor, ZeroError> {
        let n = self.m.elem_count();
        if p.elem_count() != n || g.elem_count() != n {
            return Err(ZeroError::Shape(format!(
                "device Adam holds {n} elements; got parameters of {} and gradients of {}",
                p.elem_count(),
                g.elem_count()
            )));
        }
        if p.dtype() != DType::F32 {
            return Err(ZeroError::Shape(format!(
                "device Adam updates f32 master weights, got {:?}",
                p.dtype()
            )));
        }
        self.step += 1;
        let h = &self.params;
        let (b1, b2) = h.betas;
        let t = self.step.min(i32::MAX as u64) as i32;
        let (bc1, bc2) = if h.bias_correction {
            (1.0 - b1.powi(t), 1.0 - b2.powi(t))
        } else {
            (1.0, 1.0)
        };
        // The host kernel's constants, rounded to f32 as it rounds them.
        let f = |x: f64| x as f32 as f64;
        let step_size = f(lr / bc1);
        let rsqrt_bc2 = f(1.0 / bc2.sqrt());
        let (decay, l2) = if h.adam_w_mode {
            (f(1.0 - lr * h.weight_decay), 0.0)
        } else {
            (1.0, f(h.weight_decay))
        };
        let g = g.flatten_all()?.to_dtype(DType::F32)?;
        let p = p.flatten_all()?;
        let mut gi = g.affine(f(grad_scale), 0.0)?;
        if l2 != 0.0 {
            gi = (gi + p.affine(l2, 0.0)?)?;
        }
        let m = (self.m.affine(f(b1), 0.0)? + gi.affine(f(1.0 - b1), 0.0)?)?;
        let v = (self.v.affine(f(b2), 0.0)? + gi.sqr()?.affine(f(1.0 - b2), 0.0)?)?;
        let denom = v.sqrt()?.affine(rsqrt_bc2, f(h.eps))?;
        let upd = (m.affine(step_size, 0.0)? / denom)?;
        let p = if decay != 1.0 {
            (p.affine(decay, 0.0)? - upd)?
        } else {
            (p - upd)?
        };
        self.m = m;
        self.v = v;
        Ok(p)
    }
}

/// Whether any element of `t` is inf or NaN, computed on `t`'s device with one scalar read back.
pub fn has_inf_or_nan(t: &Tensor) -> Result<bool, ZeroError> {
    if t.elem_count() == 0 {
        return Ok(false);
    }
    // x - x is 0 for finite x and NaN for inf/NaN; the sum is NaN exactly when one is not finite.
    let t = t.to_dtype(DType::F32)?;
    let s = t.sub(&t)?.sum_all()?.to_scalar::<f32>()?;
    Ok(!s.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{FlatOptimizer, OptimizerSpec};

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                    - 0.5
            })
            .collect()
    }

    /// Five steps of the tensor-op update equal the fused host kernel (the reference checked
    /// against float64 in `optim`'s tests), AdamW and L2 mode, with a gradient scale.
    #[test]
    fn device_adam_follows_the_fused_host_kernel() {
        for adam_w_mode in [true, false] {
            let h = AdamParams {
                lr: 1e-2,
                betas: (0.9, 0.95),
                eps: 1e-8,
                weight_decay: 0.1,
                bias_correction: true,
                adam_w_mode,
            };
            let n = 1000;
            let mut host_p = vals(n, 7);
            let mut host = FlatOptimizer::new(OptimizerSpec::Adam(h), n);
            let dev = Device::Cpu;
            let mut p = Tensor::from_slice(&host_p, n, &dev).unwrap();
            let mut opt = DeviceAdam::new(h, n, &dev).unwrap();
            for s in 0..5u32 {
                let g = vals(n, 100 + s);
                host.step_scaled(&mut host_p, &g, 1e-2, 0.5).unwrap();
                let gt = Tensor::from_slice(&g, n, &dev).unwrap();
                p = opt.step(&p, &gt, 1e-2, 0.5).unwrap();
            }
            let dp = p.to_vec1::<f32>().unwrap();
            for (i, (a, b)) in dp.iter().zip(&host_p).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "adam_w_mode {adam_w_mode}, element {i}: device {a} host {b}"
                );
            }
            assert_eq!(opt.step_count(), 5);
        }
    }

    #[test]
    fn overflow_detection() {
        let dev = Device::Cpu;
        let ok = Tensor::new(&[1.0f32, -3.0, 0.0], &dev).unwrap();
        assert!(!has_inf_or_nan(&ok).unwrap());
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let t = Tensor::new(&[1.0f32, bad, 0.0], &dev).unwrap();
            assert!(has_inf_or_nan(&t).unwrap(), "{bad}");
        }
        let h = Tensor::new(&[1.0f32, f32::INFINITY], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert!(has_inf_or_nan(&h).unwrap());
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let dev = Device::Cpu;
        let mut opt = DeviceAdam::new(AdamParams::default(), 3, &dev).unwrap();
        let p = Tensor::zeros(4, DType::F32, &dev).unwrap();
        assert!(matches!(
            opt.step(&p, &p, 0.1, 1.0),
            Err(ZeroError::Shape(_))
        ));
        assert_eq!(opt.step_count(), 0);
    }
}
