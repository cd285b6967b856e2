//! [`CommsLogger`]: DeepSpeed's `comms_logger` as a decorator over any [`Communicator`].
//!
//! Every call is timed (wall clock around the blocking call) and recorded per op and message
//! size. Bandwidths follow DeepSpeed's `calc_bw_log` exactly ([`calc_bw`]); averages are 10 %
//! trimmed means ([`trim_mean`]); [`CommsLogger::summary_table`] prints DeepSpeed's
//! `log_summary` table.
//!
//! Message size (`S`, bytes) is what DeepSpeed logs for the op's tensor argument: the tensor for
//! `all_reduce`, `broadcast`, `send` and `recv`; the per-rank input for `all_gather` and the
//! per-rank (padded) output partition for `reduce_scatter` (both then scaled by `n` inside
//! [`calc_bw`], giving the whole buffer); 0 for `barrier`.

use crate::error::Result;
use crate::{Communicator, ReduceOp};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

/// DeepSpeed's `calc_bw_log`: `(algbw, busbw)` in Gbit/s for `size` bytes moved in
/// `duration_ms` milliseconds by `op` over `n` ranks.
///
/// * `all_gather`, `reduce_scatter` (and `_tensor`/`_coalesced` variants): `S <- S*n`;
///   algbw = S/t, busbw = S/t * (n-1)/n
/// * `all_reduce` (and variants): algbw = 2S/t, busbw = S/t * 2(n-1)/n
/// * `all_to_all_single`: algbw = S/t, busbw = S/t * (n-1)/n
/// * anything else (`send`, `recv`, `broadcast`, `barrier`, ...): algbw = busbw = S/t
///
/// then `x * 8 / 1e6` (bytes per millisecond to Gbit/s). A zero duration gives 0.
pub fn calc_bw(op: &str, size: f64, duration_ms: f64, n: usize) -> (f64, f64) {
    if duration_ms <= 0.0 || n == 0 {
        return (0.0, 0.0);
    }
    let nf = n as f64;
    let (alg, bus) = match op {
        "all_to_all_single" => (size / duration_ms, size / duration_ms * ((nf - 1.0) / nf)),
        "all_gather"
        | "all_gather_into_tensor"
        | "reduce_scatter"
        | "reduce_scatter_tensor"
        | "all_gather_coalesced"
        | "reduce_scatter_coalesced" => {
            let s = size * nf;
            (s / duration_ms, s / duration_ms * ((nf - 1.0) / nf))
        }
        "all_reduce" | "all_reduce_coalesced" | "inference_all_reduce" => (
            size * 2.0 / duration_ms,
            size / duration_ms * (2.0 * (nf - 1.0) / nf),
        ),
        _ => (size / duration_ms, size / duration_ms),
    };
    (alg * 8.0 / 1e6, bus * 8.0 / 1e6)
}

/// DeepSpeed's `trim_mean`: sorts a copy, drops `round(trim * n)` values (round half to even,
/// as Python does) from each end and returns the mean of the rest (0 for no data).
pub fn trim_mean(data: &[f64], trim: f64) -> f64 {
    let n = data.len();
    if n == 0 {
        return 0.0;
    }
    let mut v = data.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let k = ((n as f64) * trim.clamp(0.0, 1.0)).round_ties_even() as usize;
    let kept = if 2 * k >= n { &v[..] } else { &v[k..n - k] };
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// DeepSpeed's `convert_size`: 1024-based units, value rounded to 2 decimals and printed as
/// Python prints a float (`"678.86 MB"`, `"1.0 KB"`, `"0B"`).
pub fn convert_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0B".into();
    }
    const NAMES: [&str; 9] = ["B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let b = bytes as f64;
    let i = ((b.ln() / 1024f64.ln()).floor() as usize).min(NAMES.len() - 1);
    let s = (b / 1024f64.powi(i as i32) * 100.0).round() / 100.0;
    if s.fract() == 0.0 {
        format!("{s:.1} {}", NAMES[i])
    } else {
        format!("{s} {}", NAMES[i])
    }
}

/// Options of the logger, named as DeepSpeed's `comms_logger` config section.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CommsLoggerOptions {
    /// Record anything at all.
    pub enabled: bool,
    /// Print one line per call to stderr.
    pub verbose: bool,
    /// Record every op (otherwise only those in `prof_ops`).
    pub prof_all: bool,
    /// Ops to record when `prof_all` is false (e.g. `["all_reduce"]`).
    pub prof_ops: Vec<String>,
}

impl Default for CommsLoggerOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            verbose: false,
            prof_all: true,
            prof_ops: Vec::new(),
        }
    }
}

/// Statistics of one op at one message size.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpStats {
    /// Op name (`all_reduce`, ...).
    pub op: String,
    /// Message size in bytes (see the module docs).
    pub msg_size: u64,
    /// Number of calls.
    pub count: usize,
    /// Sum of latencies, ms.
    pub total_latency_ms: f64,
    /// 10 % trimmed mean latency, ms.
    pub avg_latency_ms: f64,
    /// 10 % trimmed mean of per-call algbw, Gbit/s.
    pub algbw_gbps: f64,
    /// 10 % trimmed mean of per-call busbw, Gbit/s.
    pub busbw_gbps: f64,
}

#[derive(Default)]
struct Series {
    lat: Vec<f64>,
    alg: Vec<f64>,
    bus: Vec<f64>,
}

/// A [`Communicator`] that forwards to `inner` and records every call (DeepSpeed's
/// `comms_logger`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ds_comm::{Communicator, CommsLogger, LocalComm, ReduceOp};
/// let comm = CommsLogger::new(LocalComm::create(1).remove(0));
/// let x = Tensor::zeros(1024, candle_core::DType::F32, &Device::Cpu)?;
/// comm.all_reduce(&x, ReduceOp::Sum)?;
/// let s = comm.summary();
/// assert_eq!((s[0].op.as_str(), s[0].msg_size, s[0].count), ("all_reduce", 4096, 1));
/// println!("{}", comm.summary_table());
/// # Ok::<(), ds_comm::CommError>(())
/// ```
pub struct CommsLogger<C: Communicator> {
    inner: C,
    options: CommsLoggerOptions,
    records: Mutex<BTreeMap<(String, u64), Series>>,
}

impl<C: Communicator> CommsLogger<C> {
    /// Wraps `inner`, recording every op.
    pub fn new(inner: C) -> Self {
        Self::with_options(inner, CommsLoggerOptions::default())
    }

    /// Wraps `inner` with explicit options.
    pub fn with_options(inner: C, options: CommsLoggerOptions) -> Self {
        Self {
            inner,
            options,
            records: Mutex::new(BTreeMap::new()),
        }
    }

    /// The wrapped communicator.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// Unwraps the communicator.
    pub fn into_inner(self) -> C {
        self.inner
    }

    /// Forgets everything recorded (DeepSpeed's `reset_log`).
    pub fn reset(&self) {
        self.lock().clear();
    }

    /// Total number of recorded calls (DeepSpeed's `get_comm_operation_count`).
    pub fn op_count(&self) -> usize {
        self.lock().values().map(|s| s.lat.len()).sum()
    }

    /// Records one call of `op` moving `msg_size` bytes in `latency_ms` (public so callers can
    /// log work done outside the communicator with the same formulas).
    pub fn record(&self, op: &str, msg_size: u64, latency_ms: f64) {
        if !self.wants(op) {
            return;
        }
        let (alg, bus) = calc_bw(op, msg_size as f64, latency_ms, self.inner.world_size());
        if self.options.verbose {
            eprintln!(
                "comm op: {op} | time (ms): {latency_ms:.2} | msg size: {} | algbw (Gbps): {alg:.2} | busbw (Gbps): {bus:.2}",
                convert_size(msg_size)
            );
        }
        let mut rec = self.lock();
        let s = rec.entry((op.to_string(), msg_size)).or_default();
        s.lat.push(latency_ms);
        s.alg.push(alg);
        s.bus.push(bus);
    }

    /// Per op and message size (sorted by op name, then size): count, total and trimmed-mean
    /// latency and bandwidths.
    pub fn summary(&self) -> Vec<OpStats> {
        self.lock()
            .iter()
            .map(|((op, size), s)| OpStats {
                op: op.clone(),
                msg_size: *size,
                count: s.lat.len(),
                total_latency_ms: s.lat.iter().sum(),
                avg_latency_ms: trim_mean(&s.lat, 0.1),
                algbw_gbps: trim_mean(&s.alg, 0.1),
                busbw_gbps: trim_mean(&s.bus, 0.1),
            })
            .collect()
    }

    /// DeepSpeed's `log_summary` table.
    pub fn summary_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<20}{:<20}{:<20}{:<20}{:<20}{:<20}{:<20}",
            "Comm. Op",
            "Message Size",
            "Count",
            "Total Latency(ms)",
            "Avg Latency(ms)",
            "tput_avg (Gbps)",
            "busbw_avg (Gbps)"
        );
        let mut last_op = String::new();
        for s in self.summary() {
            if s.op != last_op {
                let _ = writeln!(out, "{}", s.op);
                last_op = s.op.clone();
            }
            let _ = writeln!(
                out,
                "{:<20}{:<20}{:<20}{:<20.2}{:<20.2}{:<20.2}{:<20.2}",
                " ",
                convert_size(s.msg_size),
                s.count,
                s.total_latency_ms,
                s.avg_latency_ms,
                s.algbw_gbps,
                s.busbw_gbps
            );
        }
        out
    }

    fn wants(&self, op: &str) -> bool {
        self.options.enabled
            && (self.options.prof_all || self.options.prof_ops.iter().any(|o| o == op))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u64), Series>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn timed<T>(&self, op: &str, size: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t0 = Instant::now();
        let r = f()?;
        self.record(op, size, t0.elapsed().as_secs_f64() * 1e3);
        Ok(r)
    }
}

fn bytes_of(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

impl<C: Communicator> Communicator for CommsLogger<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.timed("all_reduce", bytes_of(tensor), || {
            self.inner.all_reduce(tensor, op)
        })
    }
    fn all_reduce_inplace(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.timed("all_reduce", bytes_of(tensor), || {
            self.inner.all_reduce_inplace(tensor, op)
        })
    }
    fn reduce_scatter(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let n = self.inner.world_size().max(1);
        let part = tensor.elem_count().div_ceil(n) * tensor.dtype().size_in_bytes();
        self.timed("reduce_scatter", part as u64, || {
            self.inner.reduce_scatter(tensor, op)
        })
    }
    fn reduce(&self, tensor: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        self.timed("reduce", bytes_of(tensor), || {
            self.inner.reduce(tensor, op, root)
        })
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        self.timed("all_gather", bytes_of(tensor), || {
            self.inner.all_gather(tensor)
        })
    }
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        self.timed("broadcast", bytes_of(tensor), || {
            self.inner.broadcast(tensor, root)
        })
    }
    fn barrier(&self) -> Result<()> {
        self.timed("barrier", 0, || self.inner.barrier())
    }
    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        self.timed("send", bytes_of(tensor), || self.inner.send(tensor, dst))
    }
    fn recv(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let size = (dims.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        self.timed("recv", size, || self.inner.recv(src, dims, dtype))
    }
    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        self.inner.split(color, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn bandwidth_formulas_match_hand_computed_values() {
        // all_reduce, 1 MB in 2 ms over 4 ranks: algbw = 2*1e6/2 B/ms = 1e6 B/ms = 8 Gbps;
        // busbw = 1e6/2 * 2*3/4 = 750000 B/ms = 6 Gbps.
        let (a, b) = calc_bw("all_reduce", 1e6, 2.0, 4);
        assert!(close(a, 8.0) && close(b, 6.0), "{a} {b}");
        // all_gather, 1 MB per rank, 4 ranks, 2 ms: S=4e6; algbw = 2e6 B/ms = 16 Gbps;
        // busbw = 2e6 * 3/4 = 1.5e6 B/ms = 12 Gbps.
        let (a, b) = calc_bw("all_gather", 1e6, 2.0, 4);
        assert!(close(a, 16.0) && close(b, 12.0), "{a} {b}");
        let (a, b) = calc_bw("reduce_scatter", 1e6, 2.0, 4);
        assert!(close(a, 16.0) && close(b, 12.0), "{a} {b}");
        // broadcast / send: algbw = busbw = S/t: 1e6/4 B/ms = 2 Gbps.
        let (a, b) = calc_bw("broadcast", 1e6, 4.0, 8);
        assert!(close(a, 2.0) && close(b, 2.0), "{a} {b}");
        // all_to_all_single, 2 ranks: 1e6/1 B/ms = 8 Gbps, busbw half of it.
        let (a, b) = calc_bw("all_to_all_single", 1e6, 1.0, 2);
        assert!(close(a, 8.0) && close(b, 4.0), "{a} {b}");
        // One rank: all_reduce busbw is 0.
        assert_eq!(calc_bw("all_reduce", 1e6, 1.0, 1).1, 0.0);
    }

    #[test]
    fn trim_mean_matches_deepspeed() {
        assert_eq!(trim_mean(&[3.0, 1.0, 2.0], 0.1), 2.0); // DeepSpeed's own test
                                                           // n = 10: drop round(1.0) = 1 from each end: mean(2..=9) = 5.5.
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(trim_mean(&v, 0.1), 5.5);
        // n = 15: round(1.5) = 2 (half to even); mean of 3..=13 = 8.
        let v: Vec<f64> = (1..=15).rev().map(f64::from).collect();
        assert_eq!(trim_mean(&v, 0.1), 8.0);
        // n = 25: round(2.5) = 2; an outlier at each end is dropped: [100, 1*23, -100] -> 1.
        let mut v = vec![1.0; 23];
        v.push(100.0);
        v.push(-100.0);
        v.push(50.0); // now 26 values, round(2.6) = 3 -> drops -100 and both large ones
        assert_eq!(trim_mean(&v, 0.1), 1.0);
        assert_eq!(trim_mean(&[], 0.1), 0.0);
    }

    #[test]
    fn convert_size_matches_python() {
        assert_eq!(convert_size(0), "0B");
        assert_eq!(convert_size(1), "1.0 B");
        assert_eq!(convert_size(1024), "1.0 KB");
        assert_eq!(convert_size(1536), "1.5 KB");
        assert_eq!(convert_size(711_836_058), "678.86 MB");
        assert_eq!(convert_size(64 << 20), "64.0 MB");
    }

    #[test]
    fn logger_records_and_summarises() {
        let comm = CommsLogger::new(crate::LocalComm::create(1).remove(0));
        comm.record("all_reduce", 1_000_000, 2.0);
        comm.record("all_reduce", 1_000_000, 4.0);
        comm.record("all_reduce", 1_000_000, 6.0);
        comm.record("broadcast", 10, 1.0);
        let s = comm.summary();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].op, "all_reduce");
        assert_eq!(s[0].count, 3);
        assert_eq!(s[0].total_latency_ms, 12.0);
        assert_eq!(s[0].avg_latency_ms, 4.0);
        // world size 1: algbw = 2S/t per call: 8, 4, 8/3 Gbps -> mean (3 values, none trimmed).
        let want = (8.0 + 4.0 + 8.0 / 3.0) / 3.0;
        assert!(close(s[0].algbw_gbps, want), "{}", s[0].algbw_gbps);
        assert_eq!(s[0].busbw_gbps, 0.0);
        let table = comm.summary_table();
        assert!(table.starts_with("Comm. Op            Message Size"));
        assert!(table.contains("976.56 KB"), "{table}");
        assert!(table.contains("12.00"), "{table}");
        assert_eq!(comm.op_count(), 4);
        comm.reset();
        assert_eq!(comm.op_count(), 0);
    }

    #[test]
    fn prof_ops_filter() {
        let comm = CommsLogger::with_options(
            crate::LocalComm::create(1).remove(0),
            CommsLoggerOptions {
                prof_all: false,
                prof_ops: vec!["broadcast".into()],
                ..Default::default()
            },
        );
        comm.record("all_reduce", 8, 1.0);
        comm.record("broadcast", 8, 1.0);
        assert_eq!(comm.op_count(), 1);
    }
}
