//! Wall-clock breakdown timers, DeepSpeed's `ThroughputTimer`, and a matmul peak probe.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::ProfilerError;

/// `fwd_microstep`.
pub const FORWARD_MICRO_TIMER: &str = "fwd_microstep";
/// `fwd`.
pub const FORWARD_GLOBAL_TIMER: &str = "fwd";
/// `bwd_microstep`.
pub const BACKWARD_MICRO_TIMER: &str = "bwd_microstep";
/// `bwd`.
pub const BACKWARD_GLOBAL_TIMER: &str = "bwd";
/// `bwd_inner_microstep`.
pub const BACKWARD_INNER_MICRO_TIMER: &str = "bwd_inner_microstep";
/// `bwd_inner`.
pub const BACKWARD_INNER_GLOBAL_TIMER: &str = "bwd_inner";
/// `bwd_allreduce_microstep`.
pub const BACKWARD_ALLREDUCE_MICRO_TIMER: &str = "bwd_allreduce_microstep";
/// `bwd_allreduce`.
pub const BACKWARD_ALLREDUCE_GLOBAL_TIMER: &str = "bwd_allreduce";
/// `step_microstep`.
pub const STEP_MICRO_TIMER: &str = "step_microstep";
/// `step`.
pub const STEP_GLOBAL_TIMER: &str = "step";

/// One start/stop timer accumulating elapsed time (DeepSpeed's `CudaEventTimer`-less timer).
#[derive(Debug, Clone, Default)]
pub struct Timer {
    started: Option<Instant>,
    elapsed: Duration,
    count: u64,
}

impl Timer {
    /// Starts (a second start while running is ignored).
    pub fn start(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
    }

    /// Stops, adding the interval (a stop while stopped is ignored).
    pub fn stop(&mut self) {
        if let Some(t0) = self.started.take() {
            self.elapsed += t0.elapsed();
            self.count += 1;
        }
    }

    /// Whether running.
    pub fn is_running(&self) -> bool {
        self.started.is_some()
    }

    /// Accumulated time (a running interval included), optionally resetting to zero.
    pub fn elapsed(&mut self, reset: bool) -> Duration {
        let mut e = self.elapsed;
        if let Some(t0) = self.started {
            e += t0.elapsed();
        }
        if reset {
            self.elapsed = Duration::ZERO;
            self.count = 0;
            if self.started.is_some() {
                self.started = Some(Instant::now());
            }
        }
        e
    }

    /// Completed start/stop intervals since the last reset.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean interval since the last reset.
    pub fn mean(&self) -> Duration {
        if self.count == 0 {
            Duration::ZERO
        } else {
            self.elapsed / self.count as u32
        }
    }
}

/// Named timers (DeepSpeed's `SynchronizedWallClockTimer`): `start`/`stop` by name and
/// `log` as `time (ms) | fwd: 12.34 | bwd: 5.67`.
#[derive(Debug, Clone, Default)]
pub struct Timers {
    timers: BTreeMap<String, Timer>,
}

impl Timers {
    /// No timers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The timer `name`, created on first use.
    pub fn timer(&mut self, name: &str) -> &mut Timer {
        self.timers.entry(name.to_string()).or_default()
    }

    /// Starts timer `name`.
    pub fn start(&mut self, name: &str) {
        self.timer(name).start();
    }

    /// Stops timer `name`.
    pub fn stop(&mut self, name: &str) {
        self.timer(name).stop();
    }

    /// Elapsed time of `name` (zero if unknown), optionally resetting it.
    pub fn elapsed(&mut self, name: &str, reset: bool) -> Duration {
        self.timers
            .get_mut(name)
            .map(|t| t.elapsed(reset))
            .unwrap_or(Duration::ZERO)
    }

    /// Whether a timer named `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.timers.contains_key(name)
    }

    /// DeepSpeed's `Timers.log`: `time (ms) | name: x.xx | ...` with each elapsed time in ms
    /// divided by `normalizer` (values <= 0 are treated as 1). Unknown names are skipped.
    pub fn log(&mut self, names: &[&str], normalizer: f64, reset: bool) -> String {
        let norm = if normalizer > 0.0 { normalizer } else { 1.0 };
        let mut s = String::from("time (ms)");
        for n in names {
            if let Some(t) = self.timers.get_mut(*n) {
                let ms = t.elapsed(reset).as_secs_f64() * 1e3 / norm;
                let _ = write!(s, " | {n}: {ms:.2}");
            }
        }
        s
    }

    /// The per-micro-step line: `fwd_microstep`, `bwd_microstep`, `bwd_inner_microstep`,
    /// `bwd_allreduce_microstep`, `step_microstep`.
    pub fn log_micro_step(&mut self, reset: bool) -> String {
        self.log(
            &[
                FORWARD_MICRO_TIMER,
                BACKWARD_MICRO_TIMER,
                BACKWARD_INNER_MICRO_TIMER,
                BACKWARD_ALLREDUCE_MICRO_TIMER,
                STEP_MICRO_TIMER,
            ],
            1.0,
            reset,
        )
    }

    /// The per-global-step line: `fwd`, `bwd`, `bwd_inner`, `bwd_allreduce`, `step`.
    pub fn log_global_step(&mut self, reset: bool) -> String {
        self.log(
            &[
                FORWARD_GLOBAL_TIMER,
                BACKWARD_GLOBAL_TIMER,
                BACKWARD_INNER_GLOBAL_TIMER,
                BACKWARD_ALLREDUCE_GLOBAL_TIMER,
                STEP_GLOBAL_TIMER,
            ],
            1.0,
            reset,
        )
    }
}

/// DeepSpeed's `ThroughputTimer` plus tokens/s, achieved TFLOPS and MFU.
///
/// Call [`start`](Self::start) before each micro-step's forward and
/// [`stop`](Self::stop) after it (`global_step = true` at the accumulation boundary). The first
/// `start_step` global steps are not timed (warm-up), as in DeepSpeed.
#[derive(Debug, Clone)]
pub struct ThroughputTimer {
    batch_size: usize,
    start_step: u64,
    steps_per_output: u64,
    tokens_per_sample: usize,
    flops_per_step: f64,
    peak_flops: Option<f64>,
    started: bool,
    start_time: Option<Instant>,
    micro_step_count: u64,
    global_step_count: u64,
    epoch_count: u64,
    total_elapsed: Duration,
    step_elapsed: Duration,
    last_step_elapsed: Duration,
}

impl ThroughputTimer {
    /// `batch_size` samples per global step, `start_step` warm-up steps (DeepSpeed: 2),
    /// a report line every `steps_per_output` global steps.
    pub fn new(batch_size: usize, start_step: u64, steps_per_output: u64) -> Self {
        Self {
            batch_size: batch_size.max(1),
            start_step,
            steps_per_output: steps_per_output.max(1),
            tokens_per_sample: 0,
            flops_per_step: 0.0,
            peak_flops: None,
            started: false,
            start_time: None,
            micro_step_count: 0,
            global_step_count: 0,
            epoch_count: 0,
            total_elapsed: Duration::ZERO,
            step_elapsed: Duration::ZERO,
            last_step_elapsed: Duration::ZERO,
        }
    }

    /// Tokens per sample (sequence length) for tokens/s.
    pub fn with_tokens_per_sample(mut self, t: usize) -> Self {
        self.tokens_per_sample = t;
        self
    }

    /// FLOPs of one global step computed DeepSpeed's way:
    /// `(3 + recompute_fwd_factor) * fwd_flops_per_step`.
    pub fn with_fwd_flops(mut self, fwd_flops_per_step: f64, recompute_fwd_factor: f64) -> Self {
        self.flops_per_step = (3.0 + recompute_fwd_factor) * fwd_flops_per_step;
        self
    }

    /// Peak FLOP/s the MFU is measured against (e.g. from [`measure_matmul_peak_gflops`] x 1e9).
    pub fn with_peak_flops(mut self, peak_flops_per_sec: f64) -> Self {
        self.peak_flops = (peak_flops_per_sec > 0.0).then_some(peak_flops_per_sec);
        self
    }

    /// Marks an epoch boundary.
    pub fn update_epoch_count(&mut self) {
        self.epoch_count += 1;
        self.micro_step_count = 0;
    }

    /// Starts timing a micro-step (not timed during the warm-up steps).
    pub fn start(&mut self) {
        self.started = true;
        self.start_time = (self.global_step_count >= self.start_step).then(Instant::now);
    }

    /// Stops the micro-step; returns DeepSpeed's progress line every `steps_per_output`
    /// global steps when `report_speed`.
    pub fn stop(&mut self, global_step: bool, report_speed: bool) -> Option<String> {
        if !self.started {
            return None;
        }
        self.started = false;
        self.micro_step_count += 1;
        if global_step {
            self.global_step_count += 1;
        }
        let t0 = self.start_time.take()?;
        let d = t0.elapsed();
        self.total_elapsed += d;
        self.step_elapsed += d;
        if !global_step {
            return None;
        }
        self.last_step_elapsed = self.step_elapsed;
        self.step_elapsed = Duration::ZERO;
        if report_speed && self.global_step_count.is_multiple_of(self.steps_per_output) {
            Some(self.progress_line())
        } else {
            None
        }
    }

    /// `epoch=E/micro_step=M/global_step=G, RunningAvgSamplesPerSec=..., CurrSamplesPerSec=...`
    /// plus tokens/s, TFLOPS and MFU when configured.
    pub fn progress_line(&self) -> String {
        let mut s = format!(
            "epoch={}/micro_step={}/global_step={}, RunningAvgSamplesPerSec={:.4}, CurrSamplesPerSec={:.4}",
            self.epoch_count,
            self.micro_step_count,
            self.global_step_count,
            self.avg_samples_per_sec().unwrap_or(0.0),
            self.curr_samples_per_sec().unwrap_or(0.0),
        );
        if let Some(t) = self.avg_tokens_per_sec() {
            let _ = write!(s, ", TokensPerSec={t:.1}");
        }
        if let Some(tf) = self.avg_tflops() {
            let _ = write!(s, ", TFLOPS={tf:.3}");
        }
        if let Some(m) = self.mfu() {
            let _ = write!(s, ", MFU={:.2}%", m * 100.0);
        }
        s
    }

    /// Global steps counted so far.
    pub fn global_step_count(&self) -> u64 {
        self.global_step_count
    }

    /// Timed global steps (after the warm-up).
    pub fn timed_steps(&self) -> u64 {
        self.global_step_count.saturating_sub(self.start_step)
    }

    /// Running average samples/s over the timed steps (None before any).
    pub fn avg_samples_per_sec(&self) -> Option<f64> {
        let n = self.timed_steps();
        let t = self.total_elapsed.as_secs_f64();
        (n > 0 && t > 0.0).then(|| self.batch_size as f64 * n as f64 / t)
    }

    /// Samples/s of the last timed global step.
    pub fn curr_samples_per_sec(&self) -> Option<f64> {
        let t = self.last_step_elapsed.as_secs_f64();
        (t > 0.0).then(|| self.batch_size as f64 / t)
    }

    /// Running average tokens/s (needs tokens per sample).
    pub fn avg_tokens_per_sec(&self) -> Option<f64> {
        if self.tokens_per_sample == 0 {
            return None;
        }
        self.avg_samples_per_sec()
            .map(|s| s * self.tokens_per_sample as f64)
    }

    /// Achieved FLOP/s: `(3 + r) * fwd flops` per step over the average step time.
    pub fn avg_flops_per_sec(&self) -> Option<f64> {
        if self.flops_per_step <= 0.0 {
            return None;
        }
        let n = self.timed_steps();
        let t = self.total_elapsed.as_secs_f64();
        (n > 0 && t > 0.0).then(|| self.flops_per_step * n as f64 / t)
    }

    /// Achieved TFLOPS.
    pub fn avg_tflops(&self) -> Option<f64> {
        self.avg_flops_per_sec().map(|f| f / 1e12)
    }

    /// Model FLOPs utilization (0..1) against the configured peak.
    pub fn mfu(&self) -> Option<f64> {
        let peak = self.peak_flops?;
        self.avg_flops_per_sec().map(|f| f / peak)
    }
}

/// Times `iters` f32 `n x n` matmuls on `device` after one warm-up and returns GFLOP/s
/// (`2 n^3` per matmul) — the machine's practical matmul peak for MFU.
pub fn measure_matmul_peak_gflops(
    device: &Device,
    n: usize,
    iters: usize,
) -> Result<f64, ProfilerError> {
    if n == 0 || iters == 0 {
        return Err(ProfilerError::Invalid(
            "matmul peak probe needs n > 0 and iters > 0".into(),
        ));
    }
    let a = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(DType::F32)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(DType::F32)?;
    let _ = a.matmul(&b)?;
    device.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        let c = a.matmul(&b)?;
        drop(c);
    }
    device.synchronize()?;
    let s = t0.elapsed().as_secs_f64();
    let flops = 2.0 * (n as f64).powi(3) * iters as f64;
    Ok(if s > 0.0 { flops / s / 1e9 } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_log_format() {
        let mut t = Timers::new();
        t.start("fwd");
        t.stop("fwd");
        t.start("bwd");
        t.stop("bwd");
        let s = t.log(&["fwd", "bwd", "missing"], 1.0, true);
        assert!(s.starts_with("time (ms) | fwd: "), "{s}");
        assert!(s.contains(" | bwd: "));
        assert!(!s.contains("missing"));
        assert_eq!(t.elapsed("fwd", false), Duration::ZERO);
    }

    #[test]
    fn throughput_excludes_warmup() {
        let mut tt = ThroughputTimer::new(8, 2, 1)
            .with_tokens_per_sample(4)
            .with_fwd_flops(1e6, 0.0)
            .with_peak_flops(1e12);
        for step in 0..5 {
            tt.start();
            std::thread::sleep(Duration::from_millis(2));
            let line = tt.stop(true, true);
            if step < 2 {
                assert!(tt.avg_samples_per_sec().is_none());
            } else {
                assert!(line.is_some_and(|l| l.contains("RunningAvgSamplesPerSec")));
            }
        }
        assert_eq!(tt.timed_steps(), 3);
        let sps = tt.avg_samples_per_sec().unwrap_or(0.0);
        assert!(sps > 0.0 && sps < 8.0 / 0.002 * 1.01);
        let tps = tt.avg_tokens_per_sec().unwrap_or(0.0);
        assert!((tps - sps * 4.0).abs() < 1e-6);
        let f = tt.avg_flops_per_sec().unwrap_or(0.0);
        assert!((f - 3e6 * sps / 8.0).abs() / f < 1e-9);
        assert!(tt.mfu().is_some());
    }

    #[test]
    fn peak_probe_runs() {
        let g = measure_matmul_peak_gflops(&Device::Cpu, 64, 2).unwrap_or(0.0);
        assert!(g > 0.0);
        assert!(measure_matmul_peak_gflops(&Device::Cpu, 0, 1).is_err());
    }
}
