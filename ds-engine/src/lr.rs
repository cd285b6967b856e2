//! DeepSpeed's learning-rate schedulers (`deepspeed/runtime/lr_schedules.py`), as closed
//! forms of the step index.
//!
//! A scheduler keeps `last_batch_iteration` (-1 before the first step). Its learning rate at
//! iteration `t` is [`LrSchedule::lr_at`]; the engine calls [`LrScheduler::step`] once per
//! *applied* optimizer step (not on a skipped, overflowed one), as DeepSpeed does.

use ds_config::{OptimizerConfig, SchedulerConfig};

use crate::EngineError;

/// Warmup shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupType {
    /// `log(t+1) / log(N)`.
    Log,
    /// `t / N`.
    Linear,
}

/// A schedule as a pure function of the iteration.
#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    /// The optimizer's lr, unchanged.
    Constant {
        /// The lr.
        lr: f64,
    },
    /// WarmupLR.
    Warmup {
        /// Start.
        min_lr: f64,
        /// End of warmup (and after).
        max_lr: f64,
        /// Warmup length (DeepSpeed uses max(2, given)).
        num_steps: u64,
        /// Shape.
        kind: WarmupType,
    },
    /// WarmupDecayLR: warmup then linear decay to 0 at `total_steps`.
    WarmupDecay {
        /// Start.
        min_lr: f64,
        /// Peak.
        max_lr: f64,
        /// Warmup length.
        num_steps: u64,
        /// Total steps.
        total_steps: u64,
        /// Shape.
        kind: WarmupType,
    },
    /// WarmupCosineLR: ratios of the optimizer's base lr.
    WarmupCosine {
        /// The optimizer's base lr.
        base_lr: f64,
        /// Ratio at the start of warmup.
        warmup_min_ratio: f64,
        /// Warmup length.
        num_steps: u64,
        /// Total steps.
        total_steps: u64,
        /// Floor ratio of the cosine.
        cos_min_ratio: f64,
        /// Shape.
        kind: WarmupType,
    },
    /// OneCycle (lr part).
    OneCycle {
        /// Cycle floor.
        min_lr: f64,
        /// Cycle peak.
        max_lr: f64,
        /// Decay rate after the cycle.
        decay_lr_rate: f64,
        /// First half length.
        first_step_size: u64,
        /// Second half length.
        second_step_size: u64,
        /// Stair count in the first half (0 = continuous).
        first_stair_count: u64,
        /// Stair count in the second half.
        second_stair_count: u64,
        /// Decay interval after the cycle.
        decay_step_size: u64,
    },
    /// LRRangeTest.
    RangeTest {
        /// Start.
        min_lr: f64,
        /// Interval length.
        step_size: u64,
        /// Growth per interval.
        step_rate: f64,
        /// Staircase (floor) instead of continuous.
        staircase: bool,
    },
}

fn warmup_gamma(kind: WarmupType, t: i64, n: u64) -> f64 {
    let n = n.max(2) as f64;
    let t = t as f64;
    if t >= n {
        return 1.0;
    }
    match kind {
        WarmupType::Log => (t + 1.0).ln() / n.ln(),
        WarmupType::Linear => t / n,
    }
}

impl LrSchedule {
    /// The learning rate at iteration `t` (`t = -1` before the first step).
    pub fn lr_at(&self, t: i64) -> f64 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::Warmup {
                min_lr,
                max_lr,
                num_steps,
                kind,
            } => {
                if t < 0 {
                    return min_lr;
                }
                min_lr + (max_lr - min_lr) * warmup_gamma(kind, t, num_steps)
            }
            LrSchedule::WarmupDecay {
                min_lr,
                max_lr,
                num_steps,
                total_steps,
                kind,
            } => {
                if t < 0 {
                    return min_lr;
                }
                let n = num_steps.max(2);
                let gamma = if (t as u64) < n {
                    warmup_gamma(kind, t, num_steps)
                } else {
                    let span = (total_steps as f64 - n as f64).max(1.0);
                    ((total_steps as f64 - t as f64) / span).max(0.0)
                };
                min_lr + (max_lr - min_lr) * gamma
            }
            LrSchedule::WarmupCosine {
                base_lr,
                warmup_min_ratio,
                num_steps,
                total_steps,
                cos_min_ratio,
                kind,
            } => {
                if t < 0 {
                    return 0.0;
                }
                let n = num_steps.max(2);
                let ratio = if (t as u64) < n {
                    warmup_min_ratio + warmup_gamma(kind, t, num_steps) * (1.0 - warmup_min_ratio)
                } else {
                    let span = (total_steps as f64 - n as f64).max(1.0);
                    let p = ((t as f64 - n as f64 + 1.0) / span).min(1.0);
                    (cos_min_ratio
                        + (1.0 - cos_min_ratio) * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0)
                        .max(0.0)
                };
                base_lr * ratio
            }
            LrSchedule::OneCycle {
                min_lr,
                max_lr,
                decay_lr_rate,
                first_step_size,
                second_step_size,
                first_stair_count,
                second_stair_count,
                decay_step_size,
            } => {
                let total = (first_step_size + second_step_size) as f64;
                let t = t.max(0);
                if (t as f64) < total {
                    let ratio = first_step_size as f64 / total;
                    let b = (t + 1) as f64;
                    let x = 1.0 + b / total - (1.0 + b / total).floor();
                    let (mut scale, stairs) = if x <= ratio {
                        (x / ratio, first_stair_count)
                    } else {
                        ((x - 1.0) / (ratio - 1.0), second_stair_count)
                    };
                    if stairs > 0 {
                        scale = (scale * stairs as f64).floor() / stairs as f64;
                    }
                    min_lr + (max_lr - min_lr) * scale
                } else if decay_lr_rate == 0.0 || decay_step_size == 0 {
                    min_lr
                } else {
                    let d = t as f64 - total + 1.0;
                    min_lr / (1.0 + decay_lr_rate * d / decay_step_size as f64)
                }
            }
            LrSchedule::RangeTest {
                min_lr,
                step_size,
                step_rate,
                staircase,
            } => {
                let k = (t + 1) as f64 / step_size.max(1) as f64;
                let k = if staircase { k.floor() } else { k };
                min_lr * (1.0 + step_rate * k)
            }
        }
    }

    /// Builds the schedule from resolved config sections. `base_lr` is the optimizer's lr.
    pub fn from_config(
        scheduler: Option<&SchedulerConfig>,
        optimizer: Option<&OptimizerConfig>,
    ) -> Result<Self, EngineError> {
        let base_lr = optimizer.and_then(|o| o.param_f64("lr")).unwrap_or(1e-3);
        let Some(s) = scheduler else {
            return Ok(LrSchedule::Constant { lr: base_lr });
        };
        let f = |k: &str| -> Result<f64, EngineError> {
            s.param_f64(k).ok_or_else(|| {
                EngineError::Config(format!("scheduler.params.{k} is missing or not a number"))
            })
        };
        let u = |k: &str| -> Result<u64, EngineError> {
            s.params.get(k).and_then(|v| v.as_u64()).ok_or_else(|| {
                EngineError::Config(format!("scheduler.params.{k} is missing or not a count"))
            })
        };
        let kind = || match s.params.get("warmup_type").and_then(|v| v.as_str()) {
            Some("linear") => WarmupType::Linear,
            _ => WarmupType::Log,
        };
        Ok(match s.kind.as_str() {
            "WarmupLR" => LrSchedule::Warmup {
                min_lr: f("warmup_min_lr")?,
                max_lr: s.param_f64("warmup_max_lr").unwrap_or(base_lr),
                num_steps: u("warmup_num_steps")?,
                kind: kind(),
            },
            "WarmupDecayLR" => LrSchedule::WarmupDecay {
                min_lr: f("warmup_min_lr")?,
                max_lr: f("warmup_max_lr")?,
                num_steps: u("warmup_num_steps")?,
                total_steps: u("total_num_steps")?,
                kind: kind(),
            },
            "WarmupCosineLR" => LrSchedule::WarmupCosine {
                base_lr,
                warmup_min_ratio: f("warmup_min_ratio")?,
                num_steps: u("warmup_num_steps")?,
                total_steps: u("total_num_steps")?,
                cos_min_ratio: f("cos_min_ratio")?,
                kind: kind(),
            },
            "OneCycle" => LrSchedule::OneCycle {
                min_lr: f("cycle_min_lr")?,
                max_lr: f("cycle_max_lr")?,
                decay_lr_rate: f("decay_lr_rate")?,
                first_step_size: u("cycle_first_step_size")?,
                second_step_size: u("cycle_second_step_size")?,
                first_stair_count: u("cycle_first_stair_count")?,
                second_stair_count: u("cycle_second_stair_count")?,
                decay_step_size: u("decay_step_size")?,
            },
            "LRRangeTest" => LrSchedule::RangeTest {
                min_lr: f("lr_range_test_min_lr")?,
                step_size: u("lr_range_test_step_size")?,
                step_rate: f("lr_range_test_step_rate")?,
                staircase: s
                    .params
                    .get("lr_range_test_staircase")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            },
            other => {
                return Err(EngineError::Config(format!(
                    "scheduler type `{other}` is not implemented"
                )))
            }
        })
    }
}

/// A schedule with its position, stepped once per applied optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct LrScheduler {
    schedule: LrSchedule,
    last_batch_iteration: i64,
}

impl LrScheduler {
    /// Starts at `last_batch_iteration = -1` (DeepSpeed's default).
    pub fn new(schedule: LrSchedule) -> Self {
        LrScheduler {
            schedule,
            last_batch_iteration: -1,
        }
    }

    /// The lr to use for the next optimizer step (DeepSpeed writes the initial lr into the
    /// optimizer at construction, then the stepped value after every step).
    pub fn current_lr(&self) -> f64 {
        self.schedule.lr_at(self.last_batch_iteration)
    }

    /// Advances one iteration (call after an applied step).
    pub fn step(&mut self) {
        self.last_batch_iteration += 1;
    }

    /// The position (for checkpoints).
    pub fn last_batch_iteration(&self) -> i64 {
        self.last_batch_iteration
    }

    /// Restores the position.
    pub fn set_last_batch_iteration(&mut self, t: i64) {
        self.last_batch_iteration = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} != {b}");
    }

    #[test]
    fn warmup_lr_log_and_linear() {
        let s = LrSchedule::Warmup {
            min_lr: 0.0,
            max_lr: 0.01,
            num_steps: 100,
            kind: WarmupType::Log,
        };
        close(s.lr_at(-1), 0.0);
        close(s.lr_at(0), 0.0); // log(1) = 0
        close(s.lr_at(9), 0.01 * 10f64.ln() / 100f64.ln());
        close(s.lr_at(99), 0.01 * 100f64.ln() / 100f64.ln());
        close(s.lr_at(100), 0.01);
        close(s.lr_at(5000), 0.01);
        let s = LrSchedule::Warmup {
            min_lr: 0.001,
            max_lr: 0.011,
            num_steps: 10,
            kind: WarmupType::Linear,
        };
        close(s.lr_at(5), 0.001 + 0.01 * 0.5);
        // warmup_num_steps 0 -> N = 2 (DeepSpeed's max(2, n)).
        let s = LrSchedule::Warmup {
            min_lr: 0.0,
            max_lr: 1.0,
            num_steps: 0,
            kind: WarmupType::Linear,
        };
        close(s.lr_at(1), 0.5);
        close(s.lr_at(2), 1.0);
    }

    #[test]
    fn warmup_decay_lr() {
        let s = LrSchedule::WarmupDecay {
            min_lr: 0.0,
            max_lr: 0.001,
            num_steps: 10,
            total_steps: 110,
            kind: WarmupType::Linear,
        };
        close(s.lr_at(9), 0.001 * 0.9);
        close(s.lr_at(10), 0.001); // (110-10)/100
        close(s.lr_at(60), 0.001 * 0.5);
        close(s.lr_at(109), 0.001 * 0.01);
        close(s.lr_at(110), 0.0);
        close(s.lr_at(500), 0.0);
    }

    #[test]
    fn warmup_cosine_lr() {
        let s = LrSchedule::WarmupCosine {
            base_lr: 0.1,
            warmup_min_ratio: 0.0,
            num_steps: 10,
            total_steps: 110,
            cos_min_ratio: 0.0001,
            kind: WarmupType::Linear,
        };
        close(s.lr_at(-1), 0.0);
        close(s.lr_at(5), 0.1 * 0.5);
        // t = N: p = 1/100.
        let p = 1.0 / 100.0;
        close(
            s.lr_at(10),
            0.1 * (0.0001 + 0.9999 * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0),
        );
        // t = T-1: p = 1 -> cos_min_ratio.
        close(s.lr_at(109), 0.1 * 0.0001);
    }

    #[test]
    fn one_cycle_and_range_test() {
        let s = LrSchedule::OneCycle {
            min_lr: 0.1,
            max_lr: 1.0,
            decay_lr_rate: 0.5,
            first_step_size: 10,
            second_step_size: 10,
            first_stair_count: 0,
            second_stair_count: 0,
            decay_step_size: 5,
        };
        // t = 4: b = 5, x = 0.25, ratio 0.5 -> scale 0.5.
        close(s.lr_at(4), 0.1 + 0.9 * 0.5);
        // t = 9: x = 0.5 -> peak.
        close(s.lr_at(9), 1.0);
        // t = 14: x = 0.75 -> (0.75-1)/(0.5-1) = 0.5.
        close(s.lr_at(14), 0.55);
        // after the cycle: t = 24 -> d = 5 -> 0.1 / (1 + 0.5 * 1).
        close(s.lr_at(24), 0.1 / 1.5);
        let r = LrSchedule::RangeTest {
            min_lr: 0.001,
            step_size: 10,
            step_rate: 2.0,
            staircase: true,
        };
        close(r.lr_at(8), 0.001);
        close(r.lr_at(9), 0.001 * 3.0);
        let r = LrSchedule::RangeTest {
            min_lr: 0.001,
            step_size: 10,
            step_rate: 2.0,
            staircase: false,
        };
        close(r.lr_at(4), 0.001 * 2.0);
    }

    #[test]
    fn scheduler_steps_from_minus_one() {
        let mut s = LrScheduler::new(LrSchedule::Warmup {
            min_lr: 0.0,
            max_lr: 1.0,
            num_steps: 4,
            kind: WarmupType::Linear,
        });
        let mut seen = vec![s.current_lr()];
        for _ in 0..5 {
            s.step();
            seen.push(s.current_lr());
        }
        assert_eq!(seen, vec![0.0, 0.0, 0.25, 0.5, 0.75, 1.0]);
    }
}
