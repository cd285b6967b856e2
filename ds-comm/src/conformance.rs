//! The conformance suite every backend must pass, written once over `&dyn Communicator`.
//!
//! All ranks call [`run_suite`] (or the individual checks) together; every check makes the same
//! sequence of collective calls on every rank. Checks return `Err(description)` instead of
//! panicking, so the suite can run under `mpirun` and report per rank. A check that fails on some
//! ranks only leaves the ranks out of step: later checks then fail with mismatch or timeout errors
//! (use a short communicator timeout in tests), which still marks the run as failed.
//!
//! Covered: every op and reduction, every dtype of [`SUPPORTED_DTYPES`], lengths not divisible by
//! the world size (and shorter than it), multi-dimensional and non-contiguous inputs,
//! `all_reduce` of `rank + 1` = `n(n+1)/2` (DeepSpeed's `test_dist.py`), `reduce_scatter` with
//! averaging and padding (DeepSpeed's `test_coalesced_collectives.py`), `reduce` onto every root,
//! point to point, sub-groups,
//! and errors (mismatched calls, bad roots, unsupported dtypes).

use crate::{partition_range, CommError, Communicator, ReduceOp, SUPPORTED_DTYPES};
use candle_core::{DType, Device, Tensor};

/// Outcome of a check: `Err` describes what differed.
pub type CheckResult = std::result::Result<(), String>;

/// A named check.
pub type Check = (&'static str, fn(&dyn Communicator) -> CheckResult);

/// The full list of checks, in the order [`run_suite`] runs them.
pub fn checks() -> Vec<Check> {
    vec![
        ("all_reduce_rank_plus_one", all_reduce_rank_plus_one),
        (
            "all_reduce_ops_dtypes_lengths",
            all_reduce_ops_dtypes_lengths,
        ),
        ("all_reduce_shapes", all_reduce_shapes),
        ("all_reduce_inplace", all_reduce_inplace),
        ("reduce_scatter_partitions", reduce_scatter_partitions),
        ("reduce_to_root", reduce_to_root),
        (
            "reduce_scatter_coalesced_deepspeed",
            reduce_scatter_coalesced_deepspeed,
        ),
        ("all_gather", all_gather),
        ("into_variants", into_variants),
        ("broadcast", broadcast),
        ("barrier", barrier),
        ("send_recv_ring", send_recv_ring),
        ("split_and_new_group", split_and_new_group),
        ("mismatch_detected", mismatch_detected),
        ("invalid_arguments", invalid_arguments),
    ]
}

/// Result of [`run_suite`] on one rank.
#[derive(Debug, Clone, Default)]
pub struct SuiteReport {
    /// Names of the checks that passed.
    pub passed: Vec<String>,
    /// `(name, description)` of the checks that failed.
    pub failed: Vec<(String, String)>,
}

impl SuiteReport {
    /// True when nothing failed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Runs every check of [`checks`] on this rank (all ranks must call it).
pub fn run_suite(comm: &dyn Communicator) -> SuiteReport {
    let mut rep = SuiteReport::default();
    for (name, f) in checks() {
        match f(comm) {
            Ok(()) => rep.passed.push(name.to_string()),
            Err(e) => rep.failed.push((name.to_string(), e)),
        }
    }
    rep
}

fn err<E: std::fmt::Display>(ctx: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{ctx}: {e}")
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> CheckResult {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// A tensor of `dtype` holding `vals` (all exactly representable in every dtype used).
fn tensor(vals: &[f64], dims: &[usize], dtype: DType) -> std::result::Result<Tensor, String> {
    Tensor::from_slice(vals, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(err("build tensor"))
}

fn values(t: &Tensor) -> std::result::Result<Vec<f64>, String> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(err("read tensor"))
}

fn is_int(dtype: DType) -> bool {
    matches!(dtype, DType::U8 | DType::U32 | DType::I64)
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F16 | DType::BF16 => 1e-2,
        DType::F32 => 1e-6,
        _ => 1e-12,
    }
}

fn compare(ctx: &str, got: &[f64], want: &[f64], dtype: DType) -> CheckResult {
    ensure(got.len() == want.len(), || {
        format!("{ctx}: {} elements, expected {}", got.len(), want.len())
    })?;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if is_int(dtype) {
            g == w
        } else {
            (g - w).abs() <= tol(dtype) * w.abs().max(1.0)
        };
        if !ok {
            return Err(format!("{ctx}: element {i} is {g}, expected {w}"));
        }
    }
    Ok(())
}

/// Small integers, different per rank and element (exact in every dtype, sums fit in u8).
fn val(rank: usize, i: usize) -> f64 {
    ((i * 7 + rank * 3) % 11) as f64
}

fn expected_reduce(n: usize, i: usize, op: ReduceOp, dtype: DType) -> f64 {
    let vs: Vec<f64> = (0..n).map(|r| val(r, i)).collect();
    match op {
        ReduceOp::Sum => vs.iter().sum(),
        ReduceOp::Avg => {
            let s: f64 = vs.iter().sum();
            if is_int(dtype) {
                (s / n as f64).floor()
            } else {
                s / n as f64
            }
        }
        ReduceOp::Min => vs.iter().cloned().fold(f64::INFINITY, f64::min),
        ReduceOp::Max => vs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    }
}

const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max];

fn lengths(n: usize) -> Vec<usize> {
    let mut v = vec![1, 2, 3, n, n + 1, 2 * n + 1, 1000, 70_001];
    v.sort();
    v.dedup();
    v
}

/// DeepSpeed `test_dist.py`: all_reduce of `ones * (rank + 1)` is `n(n+1)/2` (128 and 3 elements,
/// fp32/bf16/fp16).
pub fn all_reduce_rank_plus_one(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let want = (n * (n + 1) / 2) as f64;
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::I64] {
        for len in [128usize, 3] {
            let x = tensor(&vec![(comm.rank() + 1) as f64; len], &[len], dtype)?;
            let y = comm
                .all_reduce(&x, ReduceOp::Sum)
                .map_err(err("all_reduce"))?;
            compare(
                &format!("{dtype:?} len {len}"),
                &values(&y)?,
                &vec![want; len],
                dtype,
            )?;
        }
    }
    Ok(())
}

/// Every reduction × dtype × length (including lengths not divisible by the world size and
/// buffers large enough for the two-phase algorithm).
pub fn all_reduce_ops_dtypes_lengths(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    for dtype in SUPPORTED_DTYPES {
        for len in lengths(n) {
            let mine: Vec<f64> = (0..len).map(|i| val(r, i)).collect();
            let x = tensor(&mine, &[len], dtype)?;
            for op in OPS {
                let y = comm.all_reduce(&x, op).map_err(err("all_reduce"))?;
                ensure(y.dtype() == dtype && y.dims() == [len], || {
                    format!("all_reduce returned {:?} {:?}", y.dtype(), y.dims())
                })?;
                let want: Vec<f64> = (0..len).map(|i| expected_reduce(n, i, op, dtype)).collect();
                compare(
                    &format!("all_reduce {} {dtype:?} len {len}", op.name()),
                    &values(&y)?,
                    &want,
                    dtype,
                )?;
            }
        }
    }
    Ok(())
}

/// Shapes are kept; non-contiguous inputs work.
pub fn all_reduce_shapes(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    let mine: Vec<f64> = (0..15).map(|i| val(r, i)).collect();
    let x = tensor(&mine, &[3, 5], DType::F32)?;
    let y = comm
        .all_reduce(&x, ReduceOp::Sum)
        .map_err(err("all_reduce"))?;
    ensure(y.dims() == [3, 5], || format!("shape {:?}", y.dims()))?;
    let want: Vec<f64> = (0..15)
        .map(|i| expected_reduce(n, i, ReduceOp::Sum, DType::F32))
        .collect();
    compare("2-D", &values(&y)?, &want, DType::F32)?;
    // Transposed (non-contiguous) input: result is the reduction of the transposed values.
    let xt = x.t().map_err(err("t"))?;
    let yt = comm
        .all_reduce(&xt, ReduceOp::Max)
        .map_err(err("all_reduce"))?;
    ensure(yt.dims() == [5, 3], || format!("shape {:?}", yt.dims()))?;
    let want_t: Vec<f64> = (0..15)
        .map(|j| {
            let (a, b) = (j / 3, j % 3); // element (a, b) of the transpose is element (b, a)
            expected_reduce(n, b * 5 + a, ReduceOp::Max, DType::F32)
        })
        .collect();
    compare("transposed", &values(&yt)?, &want_t, DType::F32)
}

/// In-place all-reduce overwrites the tensor (and views of its storage) for every op, dtype and
/// length; a non-contiguous tensor is rejected on every rank.
pub fn all_reduce_inplace(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    for dtype in SUPPORTED_DTYPES {
        for len in lengths(n) {
            for op in OPS {
                let mine: Vec<f64> = (0..len).map(|i| val(r, i)).collect();
                let x = tensor(&mine, &[len], dtype)?;
                let view = x.clone();
                comm.all_reduce_inplace(&x, op)
                    .map_err(err("all_reduce_inplace"))?;
                let want: Vec<f64> = (0..len).map(|i| expected_reduce(n, i, op, dtype)).collect();
                let ctx = format!("all_reduce_inplace {} {dtype:?} len {len}", op.name());
                compare(&ctx, &values(&x)?, &want, dtype)?;
                compare(&ctx, &values(&view)?, &want, dtype)?;
            }
        }
    }
    let x = tensor(&[1.0; 6], &[2, 3], DType::F32)?
        .t()
        .map_err(err("t"))?;
    match comm.all_reduce_inplace(&x, ReduceOp::Sum) {
        Err(CommError::InvalidArgument { .. }) => {}
        other => {
            return Err(format!(
                "in-place all_reduce of a transposed tensor: {other:?}"
            ))
        }
    }
    Ok(())
}

/// Partition sizes follow `ceil(L / n)` padding and values are the reduction of that range.
pub fn reduce_scatter_partitions(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    for dtype in SUPPORTED_DTYPES {
        for len in lengths(n) {
            let mine: Vec<f64> = (0..len).map(|i| val(r, i)).collect();
            let x = tensor(&mine, &[len], dtype)?;
            for op in OPS {
                let y = comm.reduce_scatter(&x, op).map_err(err("reduce_scatter"))?;
                let (lo, hi) = partition_range(len, n, r);
                let want: Vec<f64> = (lo..hi).map(|i| expected_reduce(n, i, op, dtype)).collect();
                ensure(y.dims() == [hi - lo], || {
                    format!(
                        "reduce_scatter len {len}: shape {:?}, expected [{}]",
                        y.dims(),
                        hi - lo
                    )
                })?;
                compare(
                    &format!("reduce_scatter {} {dtype:?} len {len}", op.name()),
                    &values(&y)?,
                    &want,
                    dtype,
                )?;
            }
        }
    }
    Ok(())
}

/// `reduce` onto every root, for every dtype, reduction and length: the root gets the reduction
/// (same shape), the others `None`; shapes are kept; a mismatched root is detected.
pub fn reduce_to_root(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    for dtype in SUPPORTED_DTYPES {
        for len in lengths(n) {
            let mine: Vec<f64> = (0..len).map(|i| val(r, i)).collect();
            let x = tensor(&mine, &[len], dtype)?;
            for op in OPS {
                for root in 0..n {
                    let ctx = format!("reduce {} {dtype:?} len {len} root {root}", op.name());
                    let y = comm.reduce(&x, op, root).map_err(err(&ctx))?;
                    match (y, r == root) {
                        (Some(y), true) => {
                            ensure(y.dtype() == dtype && y.dims() == [len], || {
                                format!("{ctx}: returned {:?} {:?}", y.dtype(), y.dims())
                            })?;
                            let want: Vec<f64> =
                                (0..len).map(|i| expected_reduce(n, i, op, dtype)).collect();
                            compare(&ctx, &values(&y)?, &want, dtype)?;
                        }
                        (None, false) => {}
                        (Some(_), false) => {
                            return Err(format!("{ctx}: rank {r} (not the root) got a result"))
                        }
                        (None, true) => return Err(format!("{ctx}: the root got no result")),
                    }
                }
            }
            // The input is not modified.
            compare(
                &format!("reduce input {dtype:?} len {len}"),
                &values(&x)?,
                &mine,
                dtype,
            )?;
        }
    }
    // Multi-dimensional input keeps its shape on the root.
    let root = n - 1;
    let mine: Vec<f64> = (0..6).map(|i| val(r, i)).collect();
    let x = tensor(&mine, &[2, 3], DType::F32)?;
    if let Some(y) = comm
        .reduce(&x, ReduceOp::Max, root)
        .map_err(err("reduce 2-D"))?
    {
        ensure(y.dims() == [2, 3], || {
            format!("reduce 2-D: shape {:?}", y.dims())
        })?;
        let want: Vec<f64> = (0..6)
            .map(|i| expected_reduce(n, i, ReduceOp::Max, DType::F32))
            .collect();
        compare("reduce 2-D", &values(&y)?, &want, DType::F32)?;
    }
    if n < 2 {
        return Ok(());
    }
    // Ranks naming different roots: a mismatch on every rank, and the communicator still works.
    let x = tensor(&[1.0; 4], &[4], DType::F32)?;
    match comm.reduce(&x, ReduceOp::Sum, if r == 0 { 1 } else { 0 }) {
        Err(CommError::Mismatch { .. }) => {}
        Err(e) => {
            return Err(format!(
                "reduce with different roots: expected a mismatch, got {e}"
            ))
        }
        Ok(_) => return Err("reduce with different roots succeeded".into()),
    }
    let y = comm
        .reduce(
            &tensor(&[(r + 1) as f64], &[1], DType::F32)?,
            ReduceOp::Sum,
            0,
        )
        .map_err(err("reduce after a mismatch"))?;
    if r == 0 {
        let y = y.ok_or("reduce after a mismatch: the root got no result")?;
        compare(
            "reduce after a mismatch",
            &values(&y)?,
            &[(n * (n + 1) / 2) as f64],
            DType::F32,
        )?;
    }
    Ok(())
}

/// DeepSpeed `test_coalesced_collectives.py`, generalised from 2 ranks to `n`: inputs
/// `rank * arange` averaged give `arange * (n-1)/2`, split in padded partitions (fp16).
pub fn reduce_scatter_coalesced_deepspeed(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank() as f64;
    let dt = DType::F16;
    let half_sum = (n as f64 - 1.0) / 2.0;
    // Single input: full(6, rank) -> each partition all (n-1)/2 (0.5 for 2 ranks, shape (3,)).
    let x = tensor(&[r; 6], &[6], dt)?;
    let out = comm
        .reduce_scatter_coalesced(&[x], ReduceOp::Avg)
        .map_err(err("reduce_scatter_coalesced"))?;
    let (lo, hi) = partition_range(6, n, comm.rank());
    compare(
        "single input",
        &values(&out[0])?,
        &vec![half_sum; hi - lo],
        dt,
    )?;
    // Two inputs: rank*arange(0,6) and rank*arange(6,9).
    let a: Vec<f64> = (0..6).map(|i| r * i as f64).collect();
    let b: Vec<f64> = (6..9).map(|i| r * i as f64).collect();
    let outs = comm
        .reduce_scatter_coalesced(
            &[tensor(&a, &[6], dt)?, tensor(&b, &[3], dt)?],
            ReduceOp::Avg,
        )
        .map_err(err("reduce_scatter_coalesced"))?;
    let (lo, hi) = partition_range(6, n, comm.rank());
    let want: Vec<f64> = (lo..hi).map(|i| i as f64 * half_sum).collect();
    compare("two inputs, first", &values(&outs[0])?, &want, dt)?;
    let (lo, hi) = partition_range(3, n, comm.rank());
    let want: Vec<f64> = (lo..hi).map(|i| (6 + i) as f64 * half_sum).collect();
    compare("two inputs, second", &values(&outs[1])?, &want, dt)?;
    if n == 2 {
        // The literal DeepSpeed expectations.
        let want_a: &[f64] = if r == 0.0 {
            &[0.0, 0.5, 1.0]
        } else {
            &[1.5, 2.0, 2.5]
        };
        let want_b: &[f64] = if r == 0.0 { &[3.0, 3.5] } else { &[4.0] };
        compare("deepspeed two inputs a", &values(&outs[0])?, want_a, dt)?;
        compare("deepspeed two inputs b", &values(&outs[1])?, want_b, dt)?;
    }
    // One element: rank 0 gets (1,), all others (0,).
    let one = comm
        .reduce_scatter(&tensor(&[1.0], &[1], dt)?, ReduceOp::Avg)
        .map_err(err("reduce_scatter"))?;
    let want_len = if comm.rank() == 0 { 1 } else { 0 };
    ensure(one.dims() == [want_len], || {
        format!(
            "1-element input: shape {:?}, expected [{want_len}]",
            one.dims()
        )
    })
}

/// Concatenation in rank order along dim 0, for every dtype and several shapes.
pub fn all_gather(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    let g = |rank: usize, i: usize| ((rank * 37 + i) % 200) as f64;
    for dtype in SUPPORTED_DTYPES {
        for dims in [vec![1usize], vec![5], vec![2, 3], vec![70_001], vec![]] {
            let len: usize = dims.iter().product();
            let mine: Vec<f64> = (0..len).map(|i| g(r, i)).collect();
            let x = tensor(&mine, &dims, dtype)?;
            let y = comm.all_gather(&x).map_err(err("all_gather"))?;
            let want_dims = if dims.is_empty() {
                vec![n]
            } else {
                let mut d = dims.clone();
                d[0] *= n;
                d
            };
            ensure(y.dims() == want_dims.as_slice(), || {
                format!(
                    "all_gather {dims:?}: shape {:?}, expected {want_dims:?}",
                    y.dims()
                )
            })?;
            let want: Vec<f64> = (0..n)
                .flat_map(|k| (0..len).map(move |i| g(k, i)))
                .collect();
            compare(
                &format!("all_gather {dtype:?} {dims:?}"),
                &values(&y)?,
                &want,
                dtype,
            )?;
        }
    }
    Ok(())
}

/// `reduce_scatter_into` / `all_gather_into` fill preallocated outputs; a wrong output is an
/// error on that rank only, after a collective that still completes everywhere.
pub fn into_variants(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    for dtype in [DType::F32, DType::BF16, DType::I64] {
        for len in lengths(n) {
            let mine: Vec<f64> = (0..len).map(|i| val(r, i)).collect();
            let x = tensor(&mine, &[len], dtype)?;
            let (lo, hi) = partition_range(len, n, r);
            let out = Tensor::zeros(hi - lo, dtype, &Device::Cpu).map_err(err("zeros"))?;
            comm.reduce_scatter_into(&x, &out, ReduceOp::Sum)
                .map_err(err("reduce_scatter_into"))?;
            let want: Vec<f64> = (lo..hi)
                .map(|i| expected_reduce(n, i, ReduceOp::Sum, dtype))
                .collect();
            compare(
                &format!("reduce_scatter_into {dtype:?} len {len}"),
                &values(&out)?,
                &want,
                dtype,
            )?;
            let g = Tensor::zeros(n * len, dtype, &Device::Cpu).map_err(err("zeros"))?;
            comm.all_gather_into(&x, &g)
                .map_err(err("all_gather_into"))?;
            let want: Vec<f64> = (0..n)
                .flat_map(|k| (0..len).map(move |i| val(k, i)))
                .collect();
            compare(
                &format!("all_gather_into {dtype:?} len {len}"),
                &values(&g)?,
                &want,
                dtype,
            )?;
        }
    }
    // An output sharing the input's storage (a view of one buffer) still works.
    let buf = tensor(&vec![(r + 1) as f64; 2 * n], &[2 * n], DType::F32)?;
    let (inp, outp) = (
        buf.narrow(0, 0, 2).map_err(err("narrow"))?,
        buf.narrow(0, 0, 2 * n).map_err(err("narrow"))?,
    );
    comm.all_gather_into(&inp, &outp)
        .map_err(err("all_gather_into on a shared storage"))?;
    let want: Vec<f64> = (0..n).flat_map(|k| [(k + 1) as f64; 2]).collect();
    compare(
        "all_gather_into on a shared storage",
        &values(&buf)?,
        &want,
        DType::F32,
    )?;
    // Rank 0 passes an output of the wrong size: it gets an error, the others succeed, and the
    // communicator still works.
    let x = tensor(&[1.0; 8], &[8], DType::F32)?;
    let size = if r == 0 { 3 * n } else { 8 * n };
    let g = Tensor::zeros(size, DType::F32, &Device::Cpu).map_err(err("zeros"))?;
    let res = comm.all_gather_into(&x, &g);
    match (r, res) {
        (0, Err(CommError::InvalidArgument { .. })) => {}
        (0, other) => return Err(format!("all_gather_into with a wrong output: {other:?}")),
        (_, res) => res.map_err(err("all_gather_into"))?,
    }
    comm.barrier().map_err(err("barrier after a bad output"))
}

/// Every rank as root, every dtype.
pub fn broadcast(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    for dtype in SUPPORTED_DTYPES {
        for root in 0..n {
            let len = 1000 + root;
            let mine: Vec<f64> = if r == root {
                (0..len).map(|i| val(root, i) + 1.0).collect()
            } else {
                vec![0.0; len]
            };
            let y = comm
                .broadcast(&tensor(&mine, &[len], dtype)?, root)
                .map_err(err("broadcast"))?;
            let want: Vec<f64> = (0..len).map(|i| val(root, i) + 1.0).collect();
            compare(
                &format!("broadcast {dtype:?} root {root}"),
                &values(&y)?,
                &want,
                dtype,
            )?;
        }
    }
    Ok(())
}

/// Barriers complete.
pub fn barrier(comm: &dyn Communicator) -> CheckResult {
    for _ in 0..3 {
        comm.barrier().map_err(err("barrier"))?;
    }
    Ok(())
}

/// Each rank sends to `rank + 1` and receives from `rank - 1` (rank 0 sends first, the others
/// receive first, so blocking sends cannot deadlock).
pub fn send_recv_ring(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    if n < 2 {
        return Ok(());
    }
    let r = comm.rank();
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    for (dtype, len) in [
        (DType::F32, 100_003usize),
        (DType::BF16, 7),
        (DType::I64, 1),
    ] {
        let mine: Vec<f64> = (0..len).map(|i| val(r, i)).collect();
        let x = tensor(&mine, &[len], dtype)?;
        let got = if r == 0 {
            comm.send(&x, next).map_err(err("send"))?;
            comm.recv(prev, &[len], dtype).map_err(err("recv"))?
        } else {
            let got = comm.recv(prev, &[len], dtype).map_err(err("recv"))?;
            comm.send(&x, next).map_err(err("send"))?;
            got
        };
        let want: Vec<f64> = (0..len).map(|i| val(prev, i)).collect();
        compare(
            &format!("recv {dtype:?} from {prev}"),
            &values(&got)?,
            &want,
            dtype,
        )?;
    }
    Ok(())
}

/// `split` by parity and `new_group` in reverse order; collectives inside the sub-groups.
pub fn split_and_new_group(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let r = comm.rank();
    let sub = comm
        .split(Some((r % 2) as u32), r)
        .map_err(err("split"))?
        .ok_or("split returned no group for a member")?;
    let members: Vec<usize> = (0..n).filter(|k| k % 2 == r % 2).collect();
    ensure(sub.world_size() == members.len(), || {
        format!(
            "sub-group size {}, expected {}",
            sub.world_size(),
            members.len()
        )
    })?;
    ensure(sub.rank() == r / 2, || {
        format!("sub-group rank {}, expected {}", sub.rank(), r / 2)
    })?;
    let x = tensor(&[(r + 1) as f64; 3], &[3], DType::F32)?;
    let y = sub
        .all_reduce(&x, ReduceOp::Sum)
        .map_err(err("sub all_reduce"))?;
    let want: f64 = members.iter().map(|k| (k + 1) as f64).sum();
    compare(
        "parity sub-group all_reduce",
        &values(&y)?,
        &[want; 3],
        DType::F32,
    )?;
    drop(sub);
    // new_group with all ranks in reverse order.
    let rev: Vec<usize> = (0..n).rev().collect();
    let g = comm
        .new_group(&rev)
        .map_err(err("new_group"))?
        .ok_or("new_group returned no group for a member")?;
    ensure(g.rank() == n - 1 - r, || {
        format!("reversed rank {}, expected {}", g.rank(), n - 1 - r)
    })?;
    let y = g
        .all_gather(&tensor(&[r as f64], &[1], DType::I64)?)
        .map_err(err("reversed all_gather"))?;
    compare(
        "reversed group order",
        &values(&y)?,
        &rev.iter().map(|&k| k as f64).collect::<Vec<_>>(),
        DType::I64,
    )?;
    drop(g);
    // new_group of rank 0 only.
    let only0 = comm.new_group(&[0]).map_err(err("new_group([0])"))?;
    ensure(only0.is_some() == (r == 0), || {
        format!("new_group([0]) membership wrong on rank {r}")
    })?;
    if let Some(g) = only0 {
        ensure(g.world_size() == 1, || {
            "group of one has another size".into()
        })?;
        g.barrier().map_err(err("barrier in group of one"))?;
    }
    Ok(())
}

fn expect_mismatch(ctx: &str, r: crate::Result<Tensor>) -> CheckResult {
    match r {
        Err(CommError::Mismatch { .. }) => Ok(()),
        Err(e) => Err(format!("{ctx}: expected a mismatch error, got {e}")),
        Ok(_) => Err(format!("{ctx}: mismatched call succeeded")),
    }
}

/// Different lengths, ops or dtypes in the same slot fail on every rank, and the communicator
/// still works afterwards.
pub fn mismatch_detected(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    if n < 2 {
        return Ok(());
    }
    let r = comm.rank();
    let len = if r == 0 { 4 } else { 5 };
    let x = tensor(&vec![1.0; len], &[len], DType::F32)?;
    expect_mismatch("length", comm.all_reduce(&x, ReduceOp::Sum))?;
    let x = tensor(&[1.0; 4], &[4], DType::F32)?;
    let res = if r == 0 {
        comm.all_reduce(&x, ReduceOp::Sum)
    } else {
        comm.all_gather(&x)
    };
    expect_mismatch("op", res)?;
    let res = if r == 0 {
        comm.all_reduce(&x, ReduceOp::Sum)
    } else {
        comm.all_reduce(&x, ReduceOp::Max)
    };
    expect_mismatch("reduce op", res)?;
    let dt = if r == 0 { DType::F32 } else { DType::BF16 };
    expect_mismatch(
        "dtype",
        comm.all_reduce(&tensor(&[1.0; 4], &[4], dt)?, ReduceOp::Sum),
    )?;
    // Still usable.
    let y = comm
        .all_reduce(&tensor(&[(r + 1) as f64], &[1], DType::F32)?, ReduceOp::Sum)
        .map_err(err("all_reduce after mismatches"))?;
    compare(
        "after mismatches",
        &values(&y)?,
        &[(n * (n + 1) / 2) as f64],
        DType::F32,
    )
}

/// Bad roots and unsupported dtypes are rejected on every rank before any communication.
pub fn invalid_arguments(comm: &dyn Communicator) -> CheckResult {
    let n = comm.world_size();
    let x = tensor(&[1.0; 4], &[4], DType::F32)?;
    match comm.broadcast(&x, n) {
        Err(CommError::InvalidArgument { .. }) => {}
        other => return Err(format!("broadcast to root {n}: {other:?}")),
    }
    match comm.reduce(&x, ReduceOp::Sum, n) {
        Err(CommError::InvalidArgument { .. }) => {}
        other => return Err(format!("reduce to root {n}: {other:?}")),
    }
    let bad = Tensor::zeros(4, DType::I32, &Device::Cpu).map_err(err("zeros"))?;
    match comm.all_reduce(&bad, ReduceOp::Sum) {
        Err(CommError::UnsupportedDType { .. }) => {}
        other => return Err(format!("all_reduce of i32: {other:?}")),
    }
    // Still usable.
    comm.barrier()
        .map_err(err("barrier after invalid arguments"))
}
