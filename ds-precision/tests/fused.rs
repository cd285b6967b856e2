//! The fused unscale / inf-nan / squared-norm pass and the clipping rules, against f64
//! references and hand-computed values.

use candle_core::{DType, Device, Tensor, Var};
use ds_precision::*;
use half::{bf16, f16};

fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn f32_pass_matches_f64_reference() {
    for &n in &[0usize, 1, 15, 16, 17, 1023, 1024, 1025, 5000, 100_003] {
        let orig: Vec<f32> = lcg(n, n as u64 + 1).iter().map(|x| x * 512.0).collect();
        let mut g = orig.clone();
        let st = unscale_check_norm_f32(&mut g, 1.0 / 512.0);
        let want: f64 = orig.iter().map(|&x| (x as f64 / 512.0).powi(2)).sum();
        assert_eq!(st.numel, n);
        assert!(!st.has_inf_or_nan);
        assert!(
            (st.sq_norm - want).abs() <= 1e-6 * want.max(1e-30),
            "n={n}: {} vs {want}",
            st.sq_norm
        );
        for (a, b) in g.iter().zip(&orig) {
            assert_eq!(*a, b / 512.0); // power-of-two scale: exact
        }
        let ro = check_norm_f32(&orig);
        let want_scaled: f64 = orig.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!((ro.sq_norm - want_scaled).abs() <= 1e-6 * want_scaled.max(1e-30));
    }
}

#[test]
fn detects_inf_and_nan_anywhere() {
    let n = 3000;
    for pos in [0usize, 7, 16, 1023, 1024, 2047, 2990, 2999] {
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN] {
            let mut g = lcg(n, 3);
            g[pos] = bad;
            assert!(
                unscale_check_norm_f32(&mut g.clone(), 0.5).has_inf_or_nan,
                "pos {pos} {bad}"
            );
            assert!(check_norm_f32(&g).has_inf_or_nan);
            let h: Vec<f16> = g.iter().map(|&x| f16::from_f32(x)).collect();
            let b: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
            assert!(unscale_check_norm(&mut h.clone(), 0.5).has_inf_or_nan);
            assert!(unscale_check_norm(&mut b.clone(), 0.5).has_inf_or_nan);
            let mut d = vec![0f32; n];
            assert!(unscale_into_f32(&h, &mut d, 0.5).unwrap().has_inf_or_nan);
        }
    }
    let mut big = vec![f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 0.0, -0.0];
    assert!(!unscale_check_norm_f32(&mut big, 1.0 / 65536.0).has_inf_or_nan);
}

#[test]
fn half_passes_match_widened_reference() {
    let vals = lcg(4099, 11);
    let h: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x * 1024.0)).collect();
    let b: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x * 1024.0)).collect();
    // f16 -> fp32 master grads
    let mut d = vec![0f32; h.len()];
    let st = unscale_into_f32(&h, &mut d, 1.0 / 1024.0).unwrap();
    let want: f64 = h.iter().map(|x| (x.to_f64() / 1024.0).powi(2)).sum();
    assert!((st.sq_norm - want).abs() <= 1e-6 * want);
    for (x, y) in h.iter().zip(&d) {
        assert_eq!(*y, x.to_f32() / 1024.0);
    }
    // in place, bf16 and f16
    let mut bb = b.clone();
    let st = unscale_check_norm(&mut bb, 1.0 / 1024.0);
    let want: f64 = b.iter().map(|x| (x.to_f64() / 1024.0).powi(2)).sum();
    assert!((st.sq_norm - want).abs() <= 1e-6 * want);
    for (x, y) in b.iter().zip(&bb) {
        assert_eq!(y.to_f32(), x.to_f32() / 1024.0);
    }
    let mut hh = h.clone();
    unscale_check_norm(&mut hh, 0.5);
    for (x, y) in h.iter().zip(&hh) {
        assert_eq!(*y, f16::from_f32(x.to_f32() * 0.5));
    }
    assert!(matches!(
        unscale_into_f32(&h, &mut [0f32; 3], 1.0),
        Err(PrecisionError::LengthMismatch { .. })
    ));
}

#[test]
fn clip_rules_hand_values() {
    // scaled norm 1024 at scale 256 -> true norm 4; clip_grad 1 -> clip = 4.000001
    let c = deepspeed_combined_scale(1024.0, 256.0, 1.0);
    assert!((c - 4.000001 * 256.0).abs() < 1e-9);
    assert_eq!(deepspeed_combined_scale(1024.0, 256.0, 10.0), 256.0);
    assert_eq!(deepspeed_combined_scale(1024.0, 256.0, 0.0), 256.0);
    assert!((clip_coef(4.0, 1.0) - 1.0 / 4.000001).abs() < 1e-12);
    assert_eq!(clip_coef(0.5, 1.0), 1.0);
    assert_eq!(clip_coef(4.0, 0.0), 1.0);
}

// The driver (unscale with the used scale, then the clip rule) gives DeepSpeed's combined
// unscale-and-clip result on a step where the scale does not change.
#[test]
fn driver_clip_equals_deepspeed_combined_rule() {
    let g: Vec<f32> = lcg(2000, 5).iter().map(|x| x * 0.1).collect();
    let scale = 128.0f64;
    let scaled: Vec<f32> = g.iter().map(|&x| x * scale as f32).collect();
    let scaled_norm = scaled
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    for clip_grad in [0.5, 1.0, 100.0] {
        let opts = LossScalerOptions {
            init_scale_power: 7,
            ..Default::default()
        };
        let mut mp =
            MixedPrecision::new(PrecisionPolicy::fp16(opts).with_clip_grad(clip_grad)).unwrap();
        let mut ours = scaled.clone();
        let rep = mp.step(&mut ours).unwrap();
        assert!(rep.decision.is_step());
        assert!((rep.grad_norm - scaled_norm / scale).abs() < 1e-9 * rep.grad_norm);
        let combined = deepspeed_combined_scale(scaled_norm, scale, clip_grad);
        for (a, s) in ours.iter().zip(&scaled) {
            let want = *s as f64 * (1.0 / combined);
            assert!(
                (*a as f64 - want).abs() <= 1e-6 * want.abs() + 1e-12,
                "{a} vs {want}"
            );
        }
        let new_norm = ours.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(new_norm <= clip_grad + 1e-5);
    }
}

// DeepSpeed issue #2686: on a scale-growth step DeepSpeed divides by the NEW scale (the applied
// gradient is halved). Here the applied gradient equals the fp32 reference gradient.
#[test]
fn growth_step_gradient_equals_fp32_reference() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[0.5f32, -1.25, 2.0], [1.5, 0.25, -0.75]], &dev).unwrap();
    let w = Var::from_tensor(&Tensor::new(&[[0.3f32], [-0.2], [0.1]], &dev).unwrap()).unwrap();
    let loss = x
        .matmul(w.as_tensor())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let reference = loss
        .backward()
        .unwrap()
        .get(&w)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();

    // window 1: no growth on the first call (stable 0), growth on every later good call.
    let opts = LossScalerOptions {
        init_scale_power: 4,
        window: 1,
        ..Default::default()
    };
    let mut mp = MixedPrecision::new(PrecisionPolicy::fp16(opts)).unwrap();
    let mut grew = 0;
    for _ in 0..4 {
        let scaled = mp.scale_loss(&loss).unwrap();
        let gs = scaled.backward().unwrap();
        let g = gs.get(&w).unwrap();
        let mut flat = vec![0f32; 3];
        let stats = mp.unscale_grad_tensors(&[g], &mut flat).unwrap();
        let rep = mp.finish_step(stats, &mut flat).unwrap();
        assert!(rep.decision.is_step());
        if rep.decision.new_scale() == 2.0 * rep.decision.scale_used() {
            grew += 1;
            // what DeepSpeed would apply: divided by the updated scale, i.e. half
            let ds: Vec<f32> = g
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v / rep.decision.new_scale() as f32)
                .collect();
            for (d, r) in ds.iter().zip(&reference) {
                assert!((d - r / 2.0).abs() <= 1e-6 * r.abs());
            }
        }
        for (a, r) in flat.iter().zip(&reference) {
            assert!((a - r).abs() <= 1e-6 * r.abs(), "{a} vs fp32 {r}");
        }
    }
    assert_eq!(grew, 3);
    assert_eq!(mp.loss_scale(), 128.0);
}

#[test]
fn bf16_policy_skips_and_counts_nonfinite() {
    let mut mp = MixedPrecision::new(PrecisionPolicy::bf16()).unwrap();
    assert_eq!(mp.loss_scale(), 1.0);
    let mut g = vec![1.0f32, f32::NAN];
    let rep = mp.step(&mut g).unwrap();
    assert_eq!(
        rep.decision.skip_reason(),
        Some(SkipReason::NonFiniteGradients)
    );
    assert_eq!(mp.skipped_steps(), 1);
    let mut p = PrecisionPolicy::bf16();
    p.check_grad_overflow = false;
    let mut mp = MixedPrecision::new(p).unwrap();
    assert!(mp.step(&mut [f32::INFINITY]).unwrap().decision.is_step());
    assert_eq!(mp.skipped_steps(), 0);
}

#[test]
fn policy_validation_and_master_weights() {
    let mut p = PrecisionPolicy::fp32();
    p.model_dtype = DType::U8;
    assert!(matches!(
        MixedPrecision::new(p),
        Err(PrecisionError::UnsupportedDType { .. })
    ));
    assert!(MixedPrecision::new(PrecisionPolicy::fp32().with_clip_grad(f64::NAN)).is_err());
    let mut p = PrecisionPolicy::fp32();
    p.loss_scaling = LossScaling::Static(-3.0);
    assert!(p.validate().is_err());

    let dev = Device::Cpu;
    let a = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let b = Tensor::new(&[0.1f32, 0.2, 0.3], &dev)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let mut m = MasterWeights::from_tensors(&[&a, &b]).unwrap();
    assert_eq!(m.numel(), 7);
    assert_eq!(m.range(1), Some(4..7));
    assert_eq!(m.flat()[5], f16::from_f32(0.2).to_f32());
    m.flat_mut()[0] = 1.0 + 1.0 / 1024.0; // 1 + 2^-10: below bf16 precision
    let va = Var::from_tensor(&a).unwrap();
    let vb = Var::from_tensor(&b).unwrap();
    m.copy_to_vars(&[va.clone(), vb.clone()]).unwrap();
    assert_eq!(va.dtype(), DType::BF16);
    let got = va
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got[0], 1.0); // rounded to bf16, master keeps the fp32 value
    assert_eq!(m.flat()[0], (1.0 + 1.0 / 1024.0));
    assert!(m.copy_to_vars(&[va]).is_err());
    let ts = m.to_model_tensors(DType::F16, &dev).unwrap();
    assert_eq!(ts[0].dims(), &[2, 2]);
    assert_eq!(ts[1].dtype(), DType::F16);
}
