//! The flops profiler: a module stack fed by instrumented layers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::counts::{self, Activation, OpCost};

/// One module (named scope) in the recorded tree; own values only (children not summed).
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub name: String,
    pub type_name: String,
    pub children: Vec<usize>,
    pub depth: usize,
    pub params: u64,
    pub flops: u64,
    pub macs: u64,
    pub latency: Duration,
    pub calls: u64,
    pub start: Option<Instant>,
    pub extra_repr: String,
    pub uncounted: Vec<String>,
}

impl Node {
    fn new(name: &str, type_name: &str, depth: usize) -> Self {
        Self {
            name: name.to_string(),
            type_name: type_name.to_string(),
            children: Vec::new(),
            depth,
            params: 0,
            flops: 0,
            macs: 0,
            latency: Duration::ZERO,
            calls: 0,
            start: None,
            extra_repr: String::new(),
            uncounted: Vec::new(),
        }
    }
}

/// Recorded state. Node 0 is a hidden root; top-level scopes are its children (depth 0).
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub nodes: Vec<Node>,
    pub stack: Vec<usize>,
    /// Forward latency set explicitly with [`FlopsProfiler::set_fwd_latency`].
    pub fwd_latency: Option<Duration>,
}

impl State {
    fn new() -> Self {
        Self {
            nodes: vec![Node::new("", "", 0)],
            stack: Vec::new(),
            fwd_latency: None,
        }
    }

    fn current(&self) -> usize {
        self.stack.last().copied().unwrap_or(0)
    }
}

#[derive(Debug)]
struct Inner {
    enabled: AtomicBool,
    state: Mutex<State>,
}

/// DeepSpeed-style flops profiler for candle models.
///
/// Cheap to clone (an `Arc` inside); clones share one recording. Layers call
/// [`scope`](Self::scope) (or [`enter`](Self::enter)/[`exit`](Self::exit)) around their
/// forward, [`add_params`](Self::add_params) for their own parameters, and one of the
/// `record_*` functions per op. While the profiler is disabled every call is a relaxed
/// atomic load and an early return: no lock, no allocation.
#[derive(Debug, Clone)]
pub struct FlopsProfiler {
    inner: Arc<Inner>,
}

impl Default for FlopsProfiler {
    fn default() -> Self {
        Self::new()
    }
}

/// RAII guard returned by [`FlopsProfiler::scope`]; exits the scope when dropped.
#[must_use = "the scope ends when the guard is dropped"]
#[derive(Debug)]
pub struct ScopeGuard<'a> {
    prof: Option<&'a FlopsProfiler>,
}

impl Drop for ScopeGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.prof {
            p.exit_inner();
        }
    }
}

impl FlopsProfiler {
    /// A new, disabled profiler with an empty recording.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                enabled: AtomicBool::new(false),
                state: Mutex::new(State::new()),
            }),
        }
    }

    /// A new profiler that is already enabled.
    pub fn enabled_new() -> Self {
        let p = Self::new();
        p.set_enabled(true);
        p
    }

    /// Whether recording is on (relaxed load).
    #[inline(always)]
    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Turns recording on or off without clearing what was recorded.
    pub fn set_enabled(&self, on: bool) {
        self.inner.enabled.store(on, Ordering::Relaxed);
    }

    /// DeepSpeed's `start_profile`: clears the recording and enables.
    pub fn start_profile(&self) {
        self.reset_profile();
        self.set_enabled(true);
    }

    /// DeepSpeed's `stop_profile`: disables, keeping the recording for the report.
    pub fn stop_profile(&self) {
        self.set_enabled(false);
    }

    /// DeepSpeed's `reset_profile`: clears all recorded modules and counts.
    pub fn reset_profile(&self) {
        *self.lock() = State::new();
    }

    /// DeepSpeed's `end_profile`: disables and clears.
    pub fn end_profile(&self) {
        self.set_enabled(false);
        self.reset_profile();
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        match self.inner.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A copy of the recorded state (for reports).
    pub(crate) fn snapshot(&self) -> State {
        self.lock().clone()
    }

    /// Enters a named module scope (e.g. `("fc1", "Linear")`). A scope entered again under
    /// the same parent with the same name accumulates into the same module (MACs, FLOPs and
    /// latency add up over calls, as DeepSpeed's hooks do). Pair with [`exit`](Self::exit).
    #[inline]
    pub fn enter(&self, name: &str, type_name: &str) {
        if !self.is_enabled() {
            return;
        }
        self.enter_inner(name, type_name);
    }

    fn enter_inner(&self, name: &str, type_name: &str) {
        let mut st = self.lock();
        let parent = st.current();
        let existing = st.nodes[parent]
            .children
            .iter()
            .copied()
            .find(|&c| st.nodes[c].name == name && st.nodes[c].type_name == type_name);
        let idx = match existing {
            Some(i) => i,
            None => {
                let depth = if parent == 0 {
                    0
                } else {
                    st.nodes[parent].depth + 1
                };
                let i = st.nodes.len();
                st.nodes.push(Node::new(name, type_name, depth));
                st.nodes[parent].children.push(i);
                i
            }
        };
        st.nodes[idx].calls += 1;
        st.stack.push(idx);
        st.nodes[idx].start = Some(Instant::now());
    }

    /// Leaves the innermost scope, adding its forward latency. A call with no open scope is
    /// ignored.
    #[inline]
    pub fn exit(&self) {
        if !self.is_enabled() {
            return;
        }
        self.exit_inner();
    }

    fn exit_inner(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(idx) = st.stack.pop() {
            if let Some(t0) = st.nodes[idx].start.take() {
                st.nodes[idx].latency += now.duration_since(t0);
            }
        }
    }

    /// Enters a scope and returns a guard that exits it when dropped. Free when disabled.
    #[inline]
    pub fn scope(&self, name: &str, type_name: &str) -> ScopeGuard<'_> {
        if !self.is_enabled() {
            return ScopeGuard { prof: None };
        }
        self.enter_inner(name, type_name);
        ScopeGuard { prof: Some(self) }
    }

    /// Sets the current module's own parameter count (not its children's). Setting it again
    /// on a later call overwrites, so repeated forwards do not double count.
    #[inline]
    pub fn set_params(&self, n: u64) {
        if !self.is_enabled() {
            return;
        }
        let mut st = self.lock();
        let i = st.current();
        st.nodes[i].params = n;
    }

    /// Alias of [`set_params`](Self::set_params) kept for readability in layer code.
    #[inline]
    pub fn add_params(&self, n: u64) {
        self.set_params(n)
    }

    /// Sets the current module's `extra_repr` (shown in the detailed tree, like PyTorch's).
    pub fn set_extra_repr(&self, s: &str) {
        if !self.is_enabled() {
            return;
        }
        let mut st = self.lock();
        let i = st.current();
        if st.nodes[i].extra_repr != s {
            st.nodes[i].extra_repr = s.to_string();
        }
    }

    /// Overrides the total forward latency (e.g. measured around the whole forward by the
    /// engine, as DeepSpeed uses its `fwd` timer). Without it, the total is the sum of the
    /// top-level scopes' latencies.
    pub fn set_fwd_latency(&self, d: Duration) {
        self.lock().fwd_latency = Some(d);
    }

    /// Records an op of a precomputed cost in the current module.
    #[inline]
    pub fn record(&self, cost: OpCost) {
        if !self.is_enabled() {
            return;
        }
        let mut st = self.lock();
        let i = st.current();
        st.nodes[i].flops += cost.flops;
        st.nodes[i].macs += cost.macs;
    }

    /// Records an op the caller cannot count: it is listed as "uncounted" in the report and
    /// JSON (its cost is unknown, not zero).
    #[inline]
    pub fn record_uncounted(&self, op: &str) {
        if !self.is_enabled() {
            return;
        }
        let mut st = self.lock();
        let i = st.current();
        if !st.nodes[i].uncounted.iter().any(|o| o == op) {
            st.nodes[i].uncounted.push(op.to_string());
        }
    }

    /// `F.linear` ([`counts::linear`]): bias not counted.
    #[inline]
    pub fn record_linear(&self, input_shape: &[usize], out_features: usize) {
        if self.is_enabled() {
            self.record(counts::linear(input_shape, out_features));
        }
    }

    /// `matmul`/`bmm` ([`counts::matmul`]).
    #[inline]
    pub fn record_matmul(&self, a_shape: &[usize], b_shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::matmul(a_shape, b_shape));
        }
    }

    /// `addmm`/`baddbmm` ([`counts::addmm`]).
    #[inline]
    pub fn record_addmm(&self, input_shape: &[usize], a_shape: &[usize], b_shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::addmm(input_shape, a_shape, b_shape));
        }
    }

    /// Convolution ([`counts::conv`]).
    #[inline]
    pub fn record_conv(
        &self,
        input_shape: &[usize],
        kernel_spatial: &[usize],
        output_shape: &[usize],
        groups: usize,
        bias: bool,
    ) {
        if self.is_enabled() {
            self.record(counts::conv(
                input_shape,
                kernel_spatial,
                output_shape,
                groups,
                bias,
            ));
        }
    }

    /// Transposed convolution ([`counts::conv_transpose`]).
    #[inline]
    pub fn record_conv_transpose(
        &self,
        input_shape: &[usize],
        kernel_spatial: &[usize],
        output_shape: &[usize],
        groups: usize,
        bias: bool,
    ) {
        if self.is_enabled() {
            self.record(counts::conv_transpose(
                input_shape,
                kernel_spatial,
                output_shape,
                groups,
                bias,
            ));
        }
    }

    /// Scaled-dot-product attention ([`counts::scaled_dot_product_attention`]).
    #[inline]
    pub fn record_sdpa(&self, q_shape: &[usize], k_shape: &[usize], v_shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::scaled_dot_product_attention(
                q_shape, k_shape, v_shape,
            ));
        }
    }

    /// An activation ([`counts::activation`]; tanh/sigmoid count 0 as in DeepSpeed).
    #[inline]
    pub fn record_activation(&self, kind: Activation, shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::activation(kind, shape));
        }
    }

    /// Softmax ([`counts::softmax`]).
    #[inline]
    pub fn record_softmax(&self, shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::softmax(shape));
        }
    }

    /// Layer/group/instance norm ([`counts::norm`]): 5 per element with affine, 4 without.
    #[inline]
    pub fn record_layer_norm(&self, shape: &[usize], affine: bool) {
        if self.is_enabled() {
            self.record(counts::norm(shape, affine));
        }
    }

    /// Batch norm ([`counts::batch_norm`]).
    #[inline]
    pub fn record_batch_norm(&self, shape: &[usize], affine: bool, training: bool) {
        if self.is_enabled() {
            self.record(counts::batch_norm(shape, affine, training));
        }
    }

    /// Pooling ([`counts::pool`]): input numel.
    #[inline]
    pub fn record_pool(&self, input_shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::pool(input_shape));
        }
    }

    /// Upsample/interpolate ([`counts::upsample`]): output numel.
    #[inline]
    pub fn record_upsample(&self, output_shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::upsample(output_shape));
        }
    }

    /// Elementwise add/mul ([`counts::elementwise`]): broadcast numel.
    #[inline]
    pub fn record_elementwise(&self, a_shape: &[usize], b_shape: &[usize]) {
        if self.is_enabled() {
            self.record(counts::elementwise(a_shape, b_shape));
        }
    }

    /// Embedding lookup: 0 FLOPs (recorded for completeness; no-op on counts).
    #[inline]
    pub fn record_embedding(&self, _ids_shape: &[usize]) {}

    /// Dropout: 0 FLOPs (no-op on counts).
    #[inline]
    pub fn record_dropout(&self, _shape: &[usize]) {}

    /// Total forward FLOPs recorded (all modules).
    pub fn total_flops(&self) -> u64 {
        self.lock().nodes.iter().map(|n| n.flops).sum()
    }

    /// Total forward MACs recorded.
    pub fn total_macs(&self) -> u64 {
        self.lock().nodes.iter().map(|n| n.macs).sum()
    }

    /// Total parameters recorded (sum of every module's own count).
    pub fn total_params(&self) -> u64 {
        self.lock().nodes.iter().map(|n| n.params).sum()
    }

    /// Total forward latency: [`set_fwd_latency`](Self::set_fwd_latency) if given, else the
    /// sum of the top-level scopes' latencies.
    pub fn total_duration(&self) -> Duration {
        let st = self.lock();
        total_duration(&st)
    }
}

pub(crate) fn total_duration(st: &State) -> Duration {
    st.fwd_latency.unwrap_or_else(|| {
        st.nodes[0]
            .children
            .iter()
            .map(|&c| st.nodes[c].latency)
            .sum()
    })
}
