//! DeepSpeed-style text report (`print_model_profile`) and JSON profile.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::profiler::{total_duration, FlopsProfiler, State};
use crate::ProfilerError;

/// Mirrors DeepSpeed's `flops_profiler` config section (same keys and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfilerOptions {
    /// Whether profiling is on (default false).
    pub enabled: bool,
    /// Extra forward recomputations in backward (activation checkpointing), `r` (default 0).
    pub recompute_fwd_factor: f64,
    /// The global step whose forward is profiled (default 1).
    pub profile_step: u64,
    /// Depth shown in the aggregated and detailed profiles; -1 = all (default -1).
    pub module_depth: i64,
    /// How many modules per depth in the aggregated profile (default 1).
    pub top_modules: usize,
    /// Whether to print the detailed module tree (default true).
    pub detailed: bool,
    /// Where to write the report instead of returning it only (default none).
    pub output_file: Option<PathBuf>,
}

impl Default for ProfilerOptions {
    fn default() -> Self {
        Self {
            enabled: false,
            recompute_fwd_factor: 0.0,
            profile_step: 1,
            module_depth: -1,
            top_modules: 1,
            detailed: true,
            output_file: None,
        }
    }
}

impl ProfilerOptions {
    /// Whether `global_step` is the step to profile.
    pub fn should_profile(&self, global_step: u64) -> bool {
        self.enabled && global_step == self.profile_step
    }
}

/// Run facts for the summary that the profiler itself cannot know.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReportContext {
    /// Global step shown in "Profile Summary at step N".
    pub step: u64,
    /// World size (defaults to 1 when 0).
    pub world_size: usize,
    /// Data-parallel size (defaults to world size when 0).
    pub data_parallel_size: usize,
    /// Model-parallel size (defaults to 1 when 0).
    pub model_parallel_size: usize,
    /// Micro-batch size per GPU, if known.
    pub batch_size_per_gpu: Option<usize>,
    /// Forward latency of the real step from the wall-clock timers; when set it replaces the
    /// profiled pass's own latency in the summary (an instrumented forward can be slower than
    /// the training path; the module tree keeps the profiled latencies).
    pub fwd_latency: Option<Duration>,
    /// Backward latency from the wall-clock timers.
    pub bwd_latency: Option<Duration>,
    /// Optimizer step latency from the wall-clock timers.
    pub step_latency: Option<Duration>,
}

/// One module in the JSON tree: values include the module's children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleProfile {
    /// Scope name (e.g. `fc1`).
    pub name: String,
    /// Type name (e.g. `Linear`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Depth (top-level modules are 0).
    pub depth: usize,
    /// Parameters, children included.
    pub params: u64,
    /// Forward MACs, children included.
    pub macs: u64,
    /// Forward FLOPs, children included.
    pub flops: u64,
    /// Forward latency (ms) measured around the module's forward, summed over calls.
    pub fwd_latency_ms: f64,
    /// Number of forward calls recorded.
    pub calls: u64,
    /// Ops in this module (not children) the profiler could not count.
    pub uncounted: Vec<String>,
    /// Child modules in call order.
    pub modules: Vec<ModuleProfile>,
}

/// The whole profile: totals and the module tree (what `ds profile --json` prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Total forward FLOPs.
    pub flops: u64,
    /// Total forward MACs.
    pub macs: u64,
    /// Total parameters.
    pub params: u64,
    /// Total forward latency in ms.
    pub fwd_latency_ms: f64,
    /// Ops recorded outside any scope that could not be counted.
    pub uncounted: Vec<String>,
    /// Top-level modules.
    pub modules: Vec<ModuleProfile>,
}

fn build(st: &State, i: usize) -> ModuleProfile {
    let n = &st.nodes[i];
    let modules: Vec<ModuleProfile> = n.children.iter().map(|&c| build(st, c)).collect();
    ModuleProfile {
        name: n.name.clone(),
        type_name: n.type_name.clone(),
        depth: n.depth,
        params: n.params + modules.iter().map(|m| m.params).sum::<u64>(),
        macs: n.macs + modules.iter().map(|m| m.macs).sum::<u64>(),
        flops: n.flops + modules.iter().map(|m| m.flops).sum::<u64>(),
        fwd_latency_ms: n.latency.as_secs_f64() * 1e3,
        calls: n.calls,
        uncounted: n.uncounted.clone(),
        modules,
    }
}

fn profile_of(st: &State) -> Profile {
    let root = build(st, 0);
    Profile {
        flops: root.flops,
        macs: root.macs,
        params: root.params,
        fwd_latency_ms: total_duration(st).as_secs_f64() * 1e3,
        uncounted: root.uncounted,
        modules: root.modules,
    }
}

/// DeepSpeed's `number_to_string`: units T/G/M/K/''/m/u, rounded to `precision` decimals,
/// trailing zeros trimmed (Python's `:g`), then a space and the unit (so `"156 "` for no unit;
/// [`params_to_string`] and [`flops_to_string`] trim that space).
pub fn number_to_string(num: f64, precision: usize) -> String {
    let (mag, unit) = if num >= 1e12 {
        (1e12, "T")
    } else if num >= 1e9 {
        (1e9, "G")
    } else if num >= 1e6 {
        (1e6, "M")
    } else if num >= 1e3 {
        (1e3, "K")
    } else if num >= 1.0 || num == 0.0 {
        (1.0, "")
    } else if num >= 1e-3 {
        (1e-3, "m")
    } else {
        (1e-6, "u")
    };
    format!("{} {}", trim_g(num / mag, precision), unit)
}

fn trim_g(v: f64, precision: usize) -> String {
    let s = format!("{v:.precision$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Parameters: like [`number_to_string`] with "B" instead of "G" (e.g. `61.71 K`, `1.5 B`).
pub fn params_to_string(n: u64) -> String {
    number_to_string(n as f64, 2)
        .replace('G', "B")
        .trim_end()
        .to_string()
}

/// MACs, e.g. `426.52 MMACs`.
pub fn macs_to_string(n: u64) -> String {
    format!("{}MACs", number_to_string(n as f64, 2))
}

/// FLOPs count, e.g. `866.08 M`.
pub fn flops_to_string(n: f64) -> String {
    number_to_string(n, 2).trim_end().to_string()
}

/// FLOP rate, e.g. `70.1 GFLOPS`.
pub fn flops_rate_to_string(per_sec: f64) -> String {
    format!("{}FLOPS", number_to_string(per_sec, 2))
}

/// Duration, e.g. `12.3 ms`.
pub fn duration_to_string(d: Duration) -> String {
    format!("{}s", number_to_string(d.as_secs_f64(), 2))
}

fn rate(flops: f64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        flops / s
    } else {
        0.0
    }
}

fn pct(part: f64, total: f64) -> f64 {
    if total > 0.0 {
        100.0 * part / total
    } else {
        0.0
    }
}

const LINE: usize = 60;

fn kv(out: &mut String, k: &str, v: &str) {
    let pad = LINE.saturating_sub(k.len() + 1).max(1);
    let _ = writeln!(out, "{k}:{}{v}", " ".repeat(pad));
}

fn max_depth(m: &[ModuleProfile]) -> usize {
    m.iter()
        .map(|c| {
            if c.modules.is_empty() {
                c.depth + 1
            } else {
                max_depth(&c.modules)
            }
        })
        .max()
        .unwrap_or(0)
}

fn collect_depth<'a>(m: &'a [ModuleProfile], d: usize, out: &mut Vec<&'a ModuleProfile>) {
    for c in m {
        if c.depth == d {
            out.push(c);
        } else if c.depth < d {
            collect_depth(&c.modules, d, out);
        }
    }
}

fn top_k<F: Fn(&ModuleProfile) -> f64, S: Fn(f64) -> String>(
    mods: &[&ModuleProfile],
    k: usize,
    key: F,
    fmt: S,
) -> String {
    let mut agg: Vec<(String, f64)> = Vec::new();
    let mut idx: HashMap<&str, usize> = HashMap::new();
    for m in mods {
        match idx.get(m.type_name.as_str()) {
            Some(&i) => agg[i].1 += key(m),
            None => {
                idx.insert(m.type_name.as_str(), agg.len());
                agg.push((m.type_name.clone(), key(m)));
            }
        }
    }
    agg.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    let items: Vec<String> = agg
        .iter()
        .take(k)
        .map(|(n, v)| format!("'{n}': '{}'", fmt(*v)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

struct Totals {
    params: f64,
    macs: f64,
    latency_ms: f64,
}

fn tree(out: &mut String, m: &ModuleProfile, t: &Totals, indent: usize, max_d: Option<usize>) {
    let pad = "  ".repeat(indent);
    let lat = Duration::from_secs_f64(m.fwd_latency_ms.max(0.0) / 1e3);
    let mut prof = format!(
        "{} = {:.2}% Params, {} = {:.2}% MACs, {} = {:.2}% latency, {}",
        params_to_string(m.params),
        pct(m.params as f64, t.params),
        macs_to_string(m.macs),
        pct(m.macs as f64, t.macs),
        duration_to_string(lat),
        pct(m.fwd_latency_ms, t.latency_ms),
        flops_rate_to_string(rate(m.flops as f64, lat)),
    );
    if !m.uncounted.is_empty() {
        let _ = write!(prof, ", uncounted: [{}]", m.uncounted.join(", "));
    }
    let head = if indent == 0 {
        m.type_name.clone()
    } else {
        format!("({}): {}", m.name, m.type_name)
    };
    let show_children = max_d.is_none_or(|d| m.depth + 1 < d) && !m.modules.is_empty();
    if show_children {
        let _ = writeln!(out, "{pad}{head}(");
        let _ = writeln!(out, "{pad}  {prof}");
        for c in &m.modules {
            tree(out, c, t, indent + 1, max_d);
        }
        let _ = writeln!(out, "{pad})");
    } else {
        let _ = writeln!(out, "{pad}{head}({prof})");
    }
}

impl FlopsProfiler {
    /// The recorded profile as a serializable tree.
    pub fn profile(&self) -> Profile {
        profile_of(&self.snapshot())
    }

    /// The profile as pretty JSON (`flops`, `macs`, `params`, `fwd_latency_ms`, `modules`).
    pub fn to_json(&self) -> Result<String, ProfilerError> {
        Ok(serde_json::to_string_pretty(&self.profile())?)
    }

    /// DeepSpeed's `print_model_profile`: returns the report text and, when
    /// `opts.output_file` is set, also writes it there (an I/O failure is an error).
    pub fn model_profile_report(
        &self,
        opts: &ProfilerOptions,
        ctx: &ReportContext,
    ) -> Result<String, ProfilerError> {
        let text = render(&self.profile(), opts, ctx);
        if let Some(path) = &opts.output_file {
            std::fs::write(path, &text).map_err(|source| ProfilerError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(text)
    }
}

/// Renders a [`Profile`] as DeepSpeed's text report.
pub fn render(p: &Profile, opts: &ProfilerOptions, ctx: &ReportContext) -> String {
    let mut o = String::new();
    let world = ctx.world_size.max(1);
    let dp = if ctx.data_parallel_size == 0 {
        world
    } else {
        ctx.data_parallel_size
    };
    let mp = ctx.model_parallel_size.max(1);
    let r = opts.recompute_fwd_factor;
    let fwd = ctx
        .fwd_latency
        .unwrap_or_else(|| Duration::from_secs_f64(p.fwd_latency_ms.max(0.0) / 1e3));
    let flops = p.flops as f64;
    let _ = writeln!(
        o,
        "\n-------------------------- DeepSpeed Flops Profiler --------------------------"
    );
    let _ = writeln!(o, "Profile Summary at step {}:", ctx.step);
    o.push_str(
        "Notations:\n\
data parallel size (dp_size), model parallel size(mp_size),\n\
number of parameters (params), number of multiply-accumulate operations(MACs),\n\
number of floating-point operations (flops), floating-point operations per second (FLOPS),\n\
fwd latency (forward propagation latency), bwd latency (backward propagation latency),\n\
step (weights update latency), iter latency (sum of fwd, bwd and step latency)\n\n",
    );
    kv(&mut o, "world size", &world.to_string());
    kv(&mut o, "data parallel size", &dp.to_string());
    kv(&mut o, "model parallel size", &mp.to_string());
    if let Some(b) = ctx.batch_size_per_gpu {
        kv(&mut o, "batch size per GPU", &b.to_string());
    }
    kv(&mut o, "params per GPU", &params_to_string(p.params));
    kv(
        &mut o,
        "params of model = params per GPU * mp_size",
        &params_to_string(p.params * mp as u64),
    );
    kv(&mut o, "fwd MACs per GPU", &macs_to_string(p.macs));
    kv(&mut o, "fwd flops per GPU", &flops_to_string(flops));
    kv(
        &mut o,
        "fwd flops of model = fwd flops per GPU * mp_size",
        &flops_to_string(flops * mp as f64),
    );
    kv(&mut o, "fwd latency", &duration_to_string(fwd));
    kv(
        &mut o,
        "fwd FLOPS per GPU = fwd flops per GPU / fwd latency",
        &flops_rate_to_string(rate(flops, fwd)),
    );
    if let Some(bwd) = ctx.bwd_latency {
        let step = ctx.step_latency.unwrap_or(Duration::ZERO);
        let iter = fwd + bwd + step;
        kv(&mut o, "bwd latency", &duration_to_string(bwd));
        kv(
            &mut o,
            &format!(
                "bwd FLOPS per GPU = {} * fwd flops per GPU / bwd latency",
                trim_g(2.0 + r, 2)
            ),
            &flops_rate_to_string(rate((2.0 + r) * flops, bwd)),
        );
        kv(
            &mut o,
            &format!(
                "fwd+bwd FLOPS per GPU = {} * fwd flops per GPU / (fwd+bwd latency)",
                trim_g(3.0 + r, 2)
            ),
            &flops_rate_to_string(rate((3.0 + r) * flops, fwd + bwd)),
        );
        kv(&mut o, "step latency", &duration_to_string(step));
        kv(&mut o, "iter latency", &duration_to_string(iter));
        kv(
            &mut o,
            &format!(
                "FLOPS per GPU = {} * fwd flops per GPU / iter latency",
                trim_g(3.0 + r, 2)
            ),
            &flops_rate_to_string(rate((3.0 + r) * flops, iter)),
        );
        if let Some(b) = ctx.batch_size_per_gpu {
            let s = iter.as_secs_f64();
            let sps = if s > 0.0 { (b * world) as f64 / s } else { 0.0 };
            kv(&mut o, "samples/second", &format!("{sps:.2}"));
        }
    }
    if !p.uncounted.is_empty() {
        kv(
            &mut o,
            "uncounted ops (outside modules)",
            &p.uncounted.join(", "),
        );
    }

    let md = max_depth(&p.modules);
    let depth_limit = if opts.module_depth < 0 {
        md
    } else {
        (opts.module_depth as usize).min(md)
    };
    let _ = writeln!(
        o,
        "\n----------------------------- Aggregated Profile per GPU -----------------------------"
    );
    let _ = writeln!(
        o,
        "Top {} modules in terms of params, MACs or fwd latency at different model depths:",
        opts.top_modules
    );
    for d in 0..depth_limit {
        let mut mods = Vec::new();
        collect_depth(&p.modules, d, &mut mods);
        if mods.is_empty() {
            continue;
        }
        let k = opts.top_modules;
        let _ = writeln!(o, "depth {d}:");
        let _ = writeln!(
            o,
            "    params      - {}",
            top_k(
                &mods,
                k,
                |m| m.params as f64,
                |v| params_to_string(v as u64)
            )
        );
        let _ = writeln!(
            o,
            "    MACs        - {}",
            top_k(&mods, k, |m| m.macs as f64, |v| macs_to_string(v as u64))
        );
        let _ = writeln!(
            o,
            "    fwd latency - {}",
            top_k(
                &mods,
                k,
                |m| m.fwd_latency_ms,
                |v| { duration_to_string(Duration::from_secs_f64(v.max(0.0) / 1e3)) }
            )
        );
    }

    if opts.detailed {
        let _ = writeln!(o, "\n------------------------------ Detailed Profile per GPU ------------------------------");
        o.push_str(
            "Each module profile is listed after its name in the following order:\n\
params, percentage of total params, MACs, percentage of total MACs, fwd latency, percentage of total fwd latency, fwd FLOPS\n\n\
Note: 1. A module can have ops outside its instrumented submodules. They are not counted as submodules, thus not to be printed out. However they make up the difference between a parent's MACs (or latency) and the sum of its submodules'.\n\
2. Number of floating-point operations is a theoretical estimation, thus FLOPS computed using that could be larger than the maximum system throughput.\n\
3. Ops listed as \"uncounted\" were reported by the layers as not countable; their cost is unknown, not zero.\n\n",
        );
        let t = Totals {
            params: p.params as f64,
            macs: p.macs as f64,
            latency_ms: p.fwd_latency_ms,
        };
        let max_d = if opts.module_depth < 0 {
            None
        } else {
            Some(opts.module_depth as usize)
        };
        for m in &p.modules {
            tree(&mut o, m, &t, 0, max_d);
        }
    }
    let _ = writeln!(
        o,
        "------------------------------------------------------------------------------"
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_format() {
        assert_eq!(number_to_string(866_076_672.0, 2), "866.08 M");
        assert_eq!(params_to_string(61_706), "61.71 K");
        assert_eq!(params_to_string(1_500_000_000), "1.5 B");
        assert_eq!(macs_to_string(100), "100 MACs");
        assert_eq!(number_to_string(0.0123, 2), "12.3 m");
        assert_eq!(flops_rate_to_string(81.9e12), "81.9 TFLOPS");
    }
}
