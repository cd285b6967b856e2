//! Loss-scale sequences: DeepSpeed's own test sequences (reference §2,
//! `tests/unit/runtime/half_precision/test_dynamic_loss_scale.py`, `test_zero_optim_overflow.py`,
//! `test_fp16.py`) and hand traces of the algorithm (reference §1.4).

use ds_precision::*;

fn opts(
    p: i32,
    window: u64,
    hysteresis: u32,
    min_scale: f64,
    variant: ScalerVariant,
) -> LossScalerOptions {
    LossScalerOptions {
        init_scale_power: p,
        window,
        hysteresis,
        consecutive_hysteresis: false,
        min_scale,
        raise_error_at_min_scale: true,
        variant,
    }
}

fn pattern(s: &str) -> Vec<bool> {
    s.chars().map(|c| c == 'T').collect()
}

fn run(o: &LossScalerOptions, p: &str) -> (Vec<f64>, Option<PrecisionError>) {
    trace_scales(o, &pattern(p)).expect("valid options")
}

#[test]
fn defaults_are_deepspeeds() {
    let d = LossScalerOptions::default();
    assert_eq!(d.init_scale_power, 16);
    assert_eq!(d.window, 1000);
    assert_eq!(d.hysteresis, 2);
    assert!(!d.consecutive_hysteresis);
    assert_eq!(d.min_scale, 1.0);
    assert!(d.raise_error_at_min_scale);
    assert_eq!(d.variant, ScalerVariant::Zero);
    assert_eq!(DynamicLossScaler::new(d).unwrap().scale(), 65536.0);
}

// TestFused.test_no_overflow: init 2^8, window 2, 10 good steps; cur_iter == i+1.
#[test]
fn fused_no_overflow_sequence() {
    for variant in [ScalerVariant::Fp16Optimizer, ScalerVariant::Zero] {
        let mut s = DynamicLossScaler::new(opts(8, 2, 2, 1.0, variant)).unwrap();
        let mut scales = vec![];
        for i in 0..10u64 {
            let d = s.update(false).unwrap();
            assert!(d.is_step());
            assert_eq!(s.cur_iter(), i + 1);
            scales.push(s.scale());
        }
        assert_eq!(
            scales,
            [256., 256., 512., 512., 1024., 1024., 2048., 2048., 4096., 4096.]
        );
        assert_eq!(s.skipped_steps(), 0);
    }
}

// TestFused.test_all_overflow: init 2^4, hysteresis ignored, clamp at 1, no exception.
#[test]
fn fused_all_overflow_sequence() {
    let o = opts(4, 2, 2, 1.0, ScalerVariant::Fp16Optimizer);
    let (scales, err) = run(&o, "TTTTTTTT");
    assert_eq!(scales, [8., 4., 2., 1., 1., 1., 1., 1.]);
    assert!(err.is_none());
}

// TestFused.test_some_overflow: init 2^8, window 2: 2 overflows -> 64, 3 good -> 128, overflow -> 64.
#[test]
fn fused_some_overflow_sequence() {
    let o = opts(8, 2, 2, 1.0, ScalerVariant::Fp16Optimizer);
    let (scales, err) = run(&o, "TTFFFT");
    assert_eq!(scales, [128., 64., 64., 64., 128., 64.]);
    assert!(err.is_none());
}

// TestUnfused (Lamb): same, min_loss_scale 2 clamps at 2.
#[test]
fn unfused_all_overflow_clamps_at_min_2() {
    let o = opts(4, 2, 2, 2.0, ScalerVariant::Fp16Optimizer);
    let (scales, err) = run(&o, "TTTTTT");
    assert_eq!(scales, [8., 4., 2., 2., 2., 2.]);
    assert!(err.is_none());
}

// test_zero_optim_overflow: ZeRO 1/2 with hysteresis 1, init 2^8, 8 overflows -> 128..1, no
// exception because the scale reaches 1 only on the 8th; a 9th raises.
#[test]
fn zero_hysteresis1_all_overflow_then_error() {
    let o = opts(8, 1000, 1, 1.0, ScalerVariant::Zero);
    let (scales, err) = run(&o, "TTTTTTTT");
    assert_eq!(scales, [128., 64., 32., 16., 8., 4., 2., 1.]);
    assert!(err.is_none());
    let (scales, err) = run(&o, "TTTTTTTTT");
    assert_eq!(scales.len(), 8);
    assert!(matches!(
        err,
        Some(PrecisionError::MinLossScale { iteration: 8, .. })
    ));
}

#[test]
fn zero_hysteresis1_some_overflow() {
    let o = opts(8, 2, 1, 1.0, ScalerVariant::Zero);
    let (scales, _) = run(&o, "TTFFFT");
    assert_eq!(scales, [128., 64., 64., 64., 128., 64.]);
}

// Hand trace, default hysteresis 2 from 2^4: the first overflow is absorbed, then hysteresis
// is not refilled after a halving, so every further overflow halves; at 1 the next raises.
#[test]
fn zero_default_hysteresis_trace() {
    let o = opts(4, 1000, 2, 1.0, ScalerVariant::Zero);
    let (scales, err) = run(&o, "TTTTTT");
    assert_eq!(scales, [16., 8., 4., 2., 1.]);
    let e = err.expect("error at the minimum");
    let msg = e.to_string();
    assert!(
        msg.contains("Current loss scale already at minimum"),
        "{msg}"
    );
    assert!(msg.contains("bf16"), "{msg}");
    assert!(msg.contains("min_loss_scale"), "{msg}");
    assert!(msg.contains("learning rate"), "{msg}");
}

#[test]
fn zero_no_error_at_min_when_disabled() {
    let mut o = opts(2, 1000, 2, 1.0, ScalerVariant::Zero);
    o.raise_error_at_min_scale = false;
    let (scales, err) = run(&o, "TTTTTT");
    assert_eq!(scales, [4., 2., 1., 1., 1., 1.]);
    assert!(err.is_none());
}

// Error leaves the state unchanged (DeepSpeed raises before touching anything).
#[test]
fn error_leaves_state_unchanged() {
    let o = opts(0, 1000, 1, 1.0, ScalerVariant::Zero);
    let mut s = DynamicLossScaler::new(o).unwrap();
    let before = s.state();
    assert!(s.update(true).is_err());
    assert_eq!(s.state(), before);
}

// Hand trace: consecutive hysteresis refills on every good step.
#[test]
fn consecutive_hysteresis_trace() {
    let mut o = opts(4, 1000, 2, 1.0, ScalerVariant::Zero);
    o.consecutive_hysteresis = true;
    assert_eq!(run(&o, "TFTFT").0, [16., 16., 16., 16., 16.]);
    o.consecutive_hysteresis = false;
    assert_eq!(run(&o, "TFTFT").0, [16., 16., 8., 8., 4.]);
}

// Hand trace: growth refills the hysteresis (C=false); the window counts from the last overflow.
// T(iter0, hyst->1) F(stable0) F(stable1) F(stable2 -> x2, refill) T(hyst->1) T(halve).
#[test]
fn growth_refills_hysteresis_trace() {
    let o = opts(4, 2, 2, 1.0, ScalerVariant::Zero);
    let (scales, _) = run(&o, "TFFFTT");
    assert_eq!(scales, [16., 16., 16., 32., 32., 16.]);
}

// Fresh state: the first doubling happens on the (W+1)-th good call.
#[test]
fn first_growth_on_window_plus_one() {
    let o = opts(0, 3, 2, 1.0, ScalerVariant::Zero);
    assert_eq!(run(&o, "FFFFFFF").0, [1., 1., 1., 2., 2., 2., 4.]);
}

#[test]
fn decisions_and_messages() {
    let mut s = DynamicLossScaler::new(opts(8, 1000, 2, 1.0, ScalerVariant::Zero)).unwrap();
    let d = s.update(true).unwrap();
    assert_eq!(
        d,
        StepDecision::Skip {
            reason: SkipReason::OverflowHysteresis { hysteresis_left: 1 },
            scale_used: 256.0,
            new_scale: 256.0
        }
    );
    assert!(d.to_string().contains("Reducing hysteresis to 1"));
    let d = s.update(true).unwrap();
    assert_eq!(d.skip_reason(), Some(SkipReason::Overflow));
    assert_eq!(
        d.to_string(),
        "OVERFLOW! Skipping step. Attempted loss scale: 256, reducing to 128"
    );
    assert_eq!(s.skipped_steps(), 2);
    let d = s.update(false).unwrap();
    assert!(d.is_step());
    assert_eq!(d.scale_used(), 128.0);
}

// Static scale 138 stays 138; overflow still skips and is counted.
#[test]
fn static_138_stays() {
    let mut s = StaticLossScaler::new(138.0).unwrap();
    assert!(!s.is_dynamic());
    for (i, o) in pattern("FTTFTFFF").into_iter().enumerate() {
        let d = s.update(o).unwrap();
        assert_eq!(d.is_skip(), o, "step {i}");
        assert_eq!(s.scale(), 138.0);
    }
    assert_eq!(s.skipped_steps(), 3);
    assert!(StaticLossScaler::new(0.0).is_err());
    assert!(StaticLossScaler::new(f64::NAN).is_err());
}

#[test]
fn no_scaler_bf16_check_grad_overflow() {
    let mut s = NoLossScaler::new(true);
    assert_eq!(
        s.update(true).unwrap().skip_reason(),
        Some(SkipReason::NonFiniteGradients)
    );
    assert!(s.update(false).unwrap().is_step());
    assert_eq!(s.skipped_steps(), 1);
    let mut s = NoLossScaler::new(false);
    assert!(s.update(true).unwrap().is_step());
    assert_eq!(s.skipped_steps(), 0);
}

#[test]
fn state_roundtrip_continues_identically() {
    let mut o = opts(6, 3, 2, 1.0, ScalerVariant::Zero);
    o.raise_error_at_min_scale = false;
    let p = pattern("FTFFFFTTFFFFFFTFFFFFFF");
    let mut a = DynamicLossScaler::new(o.clone()).unwrap();
    let mut full = vec![];
    for &x in &p {
        a.update(x).unwrap();
        full.push(a.scale());
    }
    let mut b = DynamicLossScaler::new(o.clone()).unwrap();
    let mut resumed = vec![];
    for &x in &p[..9] {
        b.update(x).unwrap();
        resumed.push(b.scale());
    }
    let json = serde_json::to_string(&b.state()).unwrap();
    let mut c = DynamicLossScaler::new(o).unwrap();
    c.load_state(&serde_json::from_str(&json).unwrap()).unwrap();
    for &x in &p[9..] {
        c.update(x).unwrap();
        resumed.push(c.scale());
    }
    assert_eq!(full, resumed);
    assert_eq!(a.state(), c.state());
}

#[test]
fn bad_options_and_states_are_errors() {
    let base = LossScalerOptions::default();
    for o in [
        LossScalerOptions {
            window: 0,
            ..base.clone()
        },
        LossScalerOptions {
            hysteresis: 0,
            ..base.clone()
        },
        LossScalerOptions {
            min_scale: 0.0,
            ..base.clone()
        },
        LossScalerOptions {
            min_scale: f64::INFINITY,
            ..base.clone()
        },
        LossScalerOptions {
            init_scale_power: 5000,
            ..base.clone()
        },
    ] {
        assert!(matches!(
            DynamicLossScaler::new(o),
            Err(PrecisionError::InvalidOption { .. })
        ));
    }
    let mut s = DynamicLossScaler::new(base).unwrap();
    let mut st = s.state();
    st.cur_hysteresis = 7;
    assert!(s.load_state(&st).is_err());
    let mut st = s.state();
    st.cur_scale = -1.0;
    assert!(s.load_state(&st).is_err());
}

// The `loss_scale_trace` example's logic (compiled from its source file).
#[allow(dead_code)]
#[path = "../../examples/examples/loss_scale_trace.rs"]
mod loss_scale_trace;

#[test]
fn loss_scale_trace_example() {
    let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let out = loss_scale_trace::run(&a(
        "--init-scale-power 8 --window 2 --hysteresis 1 --min-scale 1 --overflows FFFFF",
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["scales"],
        serde_json::json!([256.0, 256.0, 512.0, 512.0, 1024.0])
    );
    assert!(v["error"].is_null());
    let out = loss_scale_trace::run(&a(
        "--init-scale-power 4 --window 1000 --hysteresis 2 --min-scale 1 --overflows TTTTTT",
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["scales"], serde_json::json!([16.0, 8.0, 4.0, 2.0, 1.0]));
    assert!(v["error"].as_str().unwrap().contains("bf16"));
    let out = loss_scale_trace::run(&a(
        "--init-scale-power 4 --window 2 --hysteresis 2 --min-scale 1 --no-error-at-min --variant fp16-optimizer --overflows TTTTTTTT",
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["scales"],
        serde_json::json!([8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    );
    for bad in [
        "--window 0 --overflows F",
        "--window x --overflows F",
        "--overflows FXT",
        "--bogus",
        "--window 2",
    ] {
        assert!(loss_scale_trace::run(&a(bad)).is_err(), "{bad}");
    }
}
