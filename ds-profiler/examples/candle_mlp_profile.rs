//! Profile a candle-nn model: an MLP of three `candle_nn::Linear` layers, each wrapped so that
//! it opens a named scope on a `FlopsProfiler`, states its parameter count and reports its
//! matrix product. The counted FLOPs are checked against the formula of a matrix product,
//! `2 * m * n * k` for an `(m x k) . (k x n)` (plus one FLOP per ReLU element, DeepSpeed's rule),
//! layer by layer (dropout counts none); then DeepSpeed's report is printed. Then the model
//! trains two epochs of steps with `Timers` (the `wall_clock_breakdown` lines) and `ThroughputTimer` (samples/s, TFLOPS and MFU
//! from the profiled forward FLOPs), whose figures are checked against each other.
//!
//! `cargo run -p ds-profiler --example candle_mlp_profile`

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use ds_profiler::{
    measure_matmul_peak_gflops, Activation, FlopsProfiler, ProfilerOptions, ReportContext,
    ThroughputTimer, Timers, BACKWARD_GLOBAL_TIMER, BACKWARD_MICRO_TIMER, FORWARD_GLOBAL_TIMER,
    FORWARD_MICRO_TIMER, STEP_GLOBAL_TIMER, STEP_MICRO_TIMER,
};

/// A candle-nn `Linear` that reports itself to the profiler.
struct ProfiledLinear {
    name: String,
    inner: candle_nn::Linear,
    in_features: usize,
    out_features: usize,
}

impl ProfiledLinear {
    fn new(vb: VarBuilder, name: &str, i: usize, o: usize) -> candle_core::Result<Self> {
        Ok(Self {
            name: name.into(),
            inner: candle_nn::linear(i, o, vb.pp(name))?,
            in_features: i,
            out_features: o,
        })
    }

    fn forward(&self, prof: &FlopsProfiler, x: &Tensor) -> candle_core::Result<Tensor> {
        let _scope = prof.scope(&self.name, "Linear");
        prof.set_params((self.in_features * self.out_features + self.out_features) as u64);
        prof.set_extra_repr(&format!(
            "in_features={}, out_features={}, bias=True",
            self.in_features, self.out_features
        ));
        prof.record_linear(x.dims(), self.out_features);
        self.inner.forward(x)
    }
}

/// `fc1 -> relu -> dropout -> fc2 -> relu -> dropout -> fc3`.
struct Mlp {
    layers: Vec<ProfiledLinear>,
    dropout: f32,
}

impl Mlp {
    fn forward(&self, prof: &FlopsProfiler, x: &Tensor) -> candle_core::Result<Tensor> {
        let _scope = prof.scope("mlp", "Mlp");
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(prof, &h)?;
            if i + 1 < self.layers.len() {
                prof.record_activation(Activation::Relu, h.dims());
                h = h.relu()?;
                prof.record_dropout(h.dims()); // DeepSpeed counts no FLOPs for dropout
                h = candle_nn::ops::dropout(&h, self.dropout)?;
            }
        }
        Ok(h)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (m, widths) = (64usize, [128usize, 512, 512, 10]);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = Mlp {
        layers: (0..3)
            .map(|i| {
                ProfiledLinear::new(
                    vb.clone(),
                    &format!("fc{}", i + 1),
                    widths[i],
                    widths[i + 1],
                )
            })
            .collect::<candle_core::Result<_>>()?,
        dropout: 0.1,
    };
    let x = Tensor::randn(0f32, 1.0, (m, widths[0]), &dev)?;
    // Labels: which of the first 10 inputs is largest (learnable by the MLP).
    let labels = x.narrow(1, 0, 10)?.argmax(D::Minus1)?;

    // --- one profiled forward pass
    let prof = FlopsProfiler::new();
    prof.start_profile();
    let y = model.forward(&prof, &x)?;
    prof.stop_profile();
    assert_eq!(y.dims(), &[m, 10]);

    let profile = prof.profile();
    let mlp = &profile.modules[0];
    let mut want_total = 0u64;
    for (i, layer) in mlp.modules.iter().enumerate() {
        let (k, n) = (widths[i], widths[i + 1]);
        let matmul = 2 * m * n * k; // (m x k) . (k x n)
        assert_eq!(layer.name, format!("fc{}", i + 1));
        assert_eq!(layer.flops, matmul as u64, "{}", layer.name);
        assert_eq!(layer.macs, (m * n * k) as u64, "{}", layer.name);
        assert_eq!(layer.params, (k * n + n) as u64, "{}", layer.name);
        println!(
            "{}: {} FLOPs = 2 * {m} * {n} * {k}",
            layer.name, layer.flops
        );
        want_total += matmul as u64;
    }
    let relu = (m * widths[1] + m * widths[2]) as u64; // one FLOP per element
    assert_eq!(prof.total_flops(), want_total + relu);
    assert_eq!(
        prof.total_params() as usize,
        varmap
            .all_vars()
            .iter()
            .map(|v| v.elem_count())
            .sum::<usize>()
    );
    let report = prof.model_profile_report(
        &ProfilerOptions::default(),
        &ReportContext {
            batch_size_per_gpu: Some(m),
            ..Default::default()
        },
    )?;
    println!("{report}");
    assert!(report.contains("fc2"));

    // --- training with the wall-clock breakdown and the throughput timer
    prof.set_enabled(false); // one relaxed atomic load per record from here on
    let fwd_flops = (want_total + relu) as f64;
    let peak = measure_matmul_peak_gflops(&dev, 256, 10)? * 1e9;
    let (epochs, steps_per_epoch) = (2u64, 15u64);
    let steps = epochs * steps_per_epoch;
    let mut tput = ThroughputTimer::new(m, 2, 10)
        .with_fwd_flops(fwd_flops, 0.0)
        .with_peak_flops(peak);
    let mut timers = Timers::new();
    let mut opt = SGD::new(varmap.all_vars(), 0.1)?;
    let mut losses = vec![];
    // One micro-step per optimizer step here: DeepSpeed's engine times both the micro-step
    // (`fwd_microstep`, ...) and the global step (`fwd`, ...) timers around each phase.
    let phase = |timers: &mut Timers, micro: &str, global: &str, start: bool| {
        for name in [micro, global] {
            if start {
                timers.start(name)
            } else {
                timers.stop(name)
            }
        }
    };
    for epoch in 0..epochs {
        for _ in 0..steps_per_epoch {
            tput.start();
            phase(&mut timers, FORWARD_MICRO_TIMER, FORWARD_GLOBAL_TIMER, true);
            assert!(timers.timer(FORWARD_GLOBAL_TIMER).is_running());
            let logits = model.forward(&prof, &x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            phase(
                &mut timers,
                FORWARD_MICRO_TIMER,
                FORWARD_GLOBAL_TIMER,
                false,
            );
            phase(
                &mut timers,
                BACKWARD_MICRO_TIMER,
                BACKWARD_GLOBAL_TIMER,
                true,
            );
            let grads = loss.backward()?;
            phase(
                &mut timers,
                BACKWARD_MICRO_TIMER,
                BACKWARD_GLOBAL_TIMER,
                false,
            );
            phase(&mut timers, STEP_MICRO_TIMER, STEP_GLOBAL_TIMER, true);
            opt.step(&grads)?;
            phase(&mut timers, STEP_MICRO_TIMER, STEP_GLOBAL_TIMER, false);
            assert!(!timers.timer(STEP_GLOBAL_TIMER).is_running());
            losses.push(loss.to_scalar::<f32>()?);
            if let Some(line) = tput.stop(true, true) {
                println!("{line}");
            }
        }
        // The micro-step timers summed over the epoch, then reset.
        println!("epoch {epoch}: {}", timers.log_micro_step(true));
        tput.update_epoch_count();
    }
    println!("{}", timers.log_global_step(false));
    assert_eq!(
        prof.total_flops(),
        want_total + relu,
        "disabled: nothing recorded"
    );
    assert_eq!(tput.timed_steps(), steps - 2); // the first 2 are warm-up, as DeepSpeed
                                               // FLOP/s over samples/s is the FLOPs of one sample: 3 x forward (forward + 2 x backward).
    let (fps, sps) = (
        tput.avg_flops_per_sec().unwrap(),
        tput.avg_samples_per_sec().unwrap(),
    );
    let per_sample = 3.0 * fwd_flops / m as f64;
    assert!((fps / sps - per_sample).abs() <= 1e-9 * per_sample);
    let mfu = tput.mfu().unwrap();
    assert!(mfu > 0.0, "MFU {mfu}");
    for t in [
        FORWARD_GLOBAL_TIMER,
        BACKWARD_GLOBAL_TIMER,
        STEP_GLOBAL_TIMER,
    ] {
        assert!(timers.elapsed(t, false) > std::time::Duration::ZERO, "{t}");
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < first, "the loss did not fall: {first} -> {last}");
    println!(
        "{:.1} samples/s, {:.2} GFLOP/s achieved = {:.1}% of the {:.1} GFLOP/s matmul peak; loss {first:.3} -> {last:.3}",
        sps,
        fps / 1e9,
        mfu * 100.0,
        peak / 1e9
    );
    Ok(())
}
