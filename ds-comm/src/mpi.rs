//! [`MpiComm`]: collectives through the system MPI (OpenMPI, MPICH) with the `mpi` crate.
//!
//! Launch with `mpirun -np N program` (as root on this machine add `--allow-run-as-root`, and
//! `--oversubscribe` when N exceeds the cores). Every collective is issued non-blocking
//! (`MPI_Iallreduce`, `MPI_Ireduce_scatter`, `MPI_Ireduce`, `MPI_Iallgather`, `MPI_Ibcast`,
//! `MPI_Ibarrier`)
//! and polled against the timeout (default [`DEFAULT_TIMEOUT`], 60 s), so a stalled peer gives
//! [`CommError::Timeout`] instead of a hang (an MPI collective cannot be cancelled: its buffers
//! are leaked and the communicator is poisoned). The poll spins for [`SPIN_FOR`], yields until
//! [`YIELD_FOR`], then sleeps in growing steps up to [`MAX_NAP`]: a rank waiting for a stalled
//! peer uses almost no CPU.
//!
//! Failures, and what Open MPI (4.1, without ULFM) lets a rank observe:
//! - A peer that stops (SIGSTOP, a hang in its own code, an endless loop): the others time out.
//!   The first to time out tells every other rank on a private duplicate communicator, and
//!   listens for a grace period (a quarter of the timeout, 1 to 3 s) for the same message from
//!   each of them; ranks still waiting notice the message within a millisecond and do the same.
//!   The error names the op, the bytes and the ranks that did not answer (the silent ones).
//!   The caller must then end the job with [`MpiComm::abort_after_failure`] (`MPI_Abort`):
//!   `MPI_Finalize` would wait for the silent rank forever.
//! - A peer that dies (exits, is killed): on one node no MPI call fails (the shared-memory
//!   transport does not watch processes); mpirun notices the exit and terminates the other
//!   processes with SIGTERM, then SIGKILL. With [`install_termination_handler`], a rank
//!   waiting in a call asks its peers who is still there and returns [`CommError::PeerFailed`]
//!   naming the dead rank; a rank in computation prints its last call and exits. Between
//!   nodes, a broken TCP connection makes the call fail: with a timeout the communicators use
//!   `MPI_ERRORS_RETURN` and every return code is checked, so that failure is reported as an
//!   error (without a timeout MPI's default handler aborts the job).
//!
//! With a timeout, all-reduce and reduce-scatter buffers of at least [`RING_MIN_BYTES`] run a
//! ring algorithm of this crate over `MPI_Isend`/`MPI_Irecv` (on a duplicated communicator),
//! polled the same way: Open MPI's non-blocking all-reduce is a binomial reduce-then-send-back on
//! fewer than 4 ranks, and its non-blocking reduce-scatter a reduce + scatter. In-place
//! all-reduce uses the library's `MPI_IN_PLACE`, and `reduce_scatter_into` receives straight into
//! the output (see `ds-comm/BENCHMARKS.md`).
//!
//! Before each collective the ranks compare a call descriptor (sequence number, op, dtype,
//! length, root) with one small `MPI_Iallreduce`; a difference gives [`CommError::Mismatch`] on
//! every rank and the communicator stays usable. `check_calls: false` skips it.
//!
//! MPI has no 16-bit float type: f16/bf16 reductions run in f32 (converted once each way), which
//! also matches [`crate::LocalComm`]'s f32 accumulation. Data movement without arithmetic
//! (all-gather, broadcast, send/recv) is done on the raw bytes.

use crate::data::{self, partition_range, with_elem, Elem};
use crate::error::{CommError, Result};
use crate::local::gathered_dims;
use crate::{Communicator, ReduceOp};
use candle_core::{DType, Tensor};
use half::{bf16, f16};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::point_to_point::{Destination, Source};
use mpi::raw::AsRaw;
use mpi::request::{Request, StaticScope};
use mpi::topology::{Color, Communicator as MpiCommunicator, SimpleCommunicator};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Options for [`MpiComm`].
#[derive(Debug, Clone, PartialEq)]
pub struct MpiCommOptions {
    /// Deadline for one collective or point-to-point call. Default [`DEFAULT_TIMEOUT`] (60 s).
    /// `None` waits forever
    /// and issues `all_reduce`, `reduce_scatter` and `all_gather` as blocking MPI calls
    /// (OpenMPI's tuned algorithms, often faster than the polled non-blocking ones; see
    /// BENCHMARKS.md).
    pub timeout: Option<Duration>,
    /// Compare call descriptors across ranks before each collective (one small allreduce).
    /// Default true.
    pub check_calls: bool,
    /// With a timeout, all-reduce and reduce-scatter buffers of at least this many bytes run
    /// this crate's ring algorithms over non-blocking point-to-point messages instead of
    /// `MPI_Iallreduce` / `MPI_Ireduce_scatter`. Default [`RING_MIN_BYTES`]; `usize::MAX`
    /// never uses the ring.
    pub ring_min_bytes: usize,
}

/// The default deadline of one call: a step of a CPU job exchanges its gradients in well under a
/// minute, and a stalled peer then ends the job in about a minute instead of five.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for MpiCommOptions {
    fn default() -> Self {
        Self {
            timeout: Some(DEFAULT_TIMEOUT),
            check_calls: true,
            ring_min_bytes: RING_MIN_BYTES,
        }
    }
}

/// One rank of an MPI communicator (the world, or a group from [`Communicator::split`]).
///
/// Not `Send`: use it from the thread that initialised MPI.
pub struct MpiComm {
    comm: SimpleCommunicator,
    /// A duplicate of `comm` for the ring algorithms' point-to-point messages (they never match
    /// the user's `send`/`recv`).
    ring: SimpleCommunicator,
    /// A second duplicate for the failure diagnosis after a timeout (see [`MpiComm::diagnose`]):
    /// each rank that gives up tells every other one, and listens for who answers.
    diag: SimpleCommunicator,
    _universe: Rc<Universe>,
    rank: usize,
    size: usize,
    seq: Cell<u64>,
    /// The collective in flight: (op code of [`OP_NAMES`], bytes this rank contributes).
    current: Cell<(i64, usize)>,
    options: MpiCommOptions,
    failure: RefCell<Option<CommError>>,
    /// Receive buffer reused by in-place all-reduce where `MPI_IN_PLACE` is unknown (8-byte
    /// aligned).
    scratch: RefCell<Vec<u64>>,
    /// The library's `MPI_IN_PLACE` sentinel (see [`in_place_sentinel`]).
    in_place: Option<usize>,
}

/// The `MPI_IN_PLACE` sentinel pointer of the MPI library this process runs with: rsmpi does not
/// export it and it differs between ABIs (`(void *)1` in Open MPI, `(void *)-1` in MPICH and its
/// derivatives). `None` for an unrecognised library (the in-place all-reduce then receives into a
/// scratch buffer and copies back).
fn in_place_sentinel() -> Option<usize> {
    let v = mpi::environment::library_version().ok()?;
    if v.contains("Open MPI") {
        Some(1)
    } else if ["MPICH", "Intel(R) MPI", "MVAPICH"]
        .iter()
        .any(|k| v.contains(k))
    {
        Some(usize::MAX)
    } else {
        None
    }
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("world_size", &self.size)
            .finish()
    }
}

fn backend_err(msg: impl Into<String>) -> CommError {
    CommError::Backend {
        backend: "mpi".into(),
        msg: msg.into(),
    }
}

/// An MPI return code as a result (the default error handler aborts before returning an error,
/// but a communicator with `MPI_ERRORS_RETURN` would return one).
fn mpi_rc(op: &str, rc: std::os::raw::c_int) -> Result<()> {
    if rc == ffi::MPI_SUCCESS as std::os::raw::c_int {
        Ok(())
    } else {
        Err(backend_err(format!("{op}: MPI error code {rc}")))
    }
}

fn dtype_code(dtype: DType) -> i64 {
    match dtype {
        DType::U8 => 1,
        DType::U32 => 2,
        DType::I64 => 3,
        DType::BF16 => 4,
        DType::F16 => 5,
        DType::F32 => 6,
        DType::F64 => 7,
        _ => 99,
    }
}

fn dtype_from_code(c: i64) -> Option<DType> {
    crate::SUPPORTED_DTYPES
        .into_iter()
        .find(|&d| dtype_code(d) == c)
}

const OP_NAMES: [&str; 13] = [
    "all_reduce(sum)",
    "all_reduce(avg)",
    "all_reduce(min)",
    "all_reduce(max)",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "barrier",
    "split",
    "reduce(sum)",
    "reduce(avg)",
    "reduce(min)",
    "reduce(max)",
];

fn op_code(name: &str, op: Option<ReduceOp>) -> i64 {
    match (name, op) {
        ("all_reduce", Some(ReduceOp::Sum)) => 0,
        ("all_reduce", Some(ReduceOp::Avg)) => 1,
        ("all_reduce", Some(ReduceOp::Min)) => 2,
        ("all_reduce", Some(ReduceOp::Max)) => 3,
        ("reduce_scatter", _) => 4,
        ("all_gather", _) => 5,
        ("broadcast", _) => 6,
        ("barrier", _) => 7,
        ("reduce", Some(ReduceOp::Sum)) => 9,
        ("reduce", Some(ReduceOp::Avg)) => 10,
        ("reduce", Some(ReduceOp::Min)) => 11,
        ("reduce", Some(ReduceOp::Max)) => 12,
        _ => 8,
    }
}

fn system_op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
        ReduceOp::Min => SystemOperation::min(),
        ReduceOp::Max => SystemOperation::max(),
    }
}

/// The reduction the ring algorithms apply step by step (`Avg` sums; the caller divides once).
fn ring_op(op: ReduceOp) -> ReduceOp {
    match op {
        ReduceOp::Avg => ReduceOp::Sum,
        other => other,
    }
}

/// Element types MPI reduces natively.
trait MpiElem: Elem + Equivalence {
    fn div_n(v: &mut [Self], n: usize);
}

macro_rules! mpi_elem {
    ($($t:ty),*) => {$(
        impl MpiElem for $t {
            fn div_n(v: &mut [Self], n: usize) {
                let n = n as $t;
                v.iter_mut().for_each(|x| *x /= n);
            }
        }
    )*};
}
mpi_elem!(f32, f64, u8, u32, i64);

/// Per-rank bytes from which the polled (timeout) all-reduce and reduce-scatter run the ring
/// algorithms below instead of `MPI_Iallreduce` / `MPI_Ireduce_scatter` (Open MPI's libnbc
/// reduces onto one rank and sends the result back for these: a binomial tree for
/// `MPI_Iallreduce` on fewer than 4 ranks or in place, reduce + scatter for
/// `MPI_Ireduce_scatter`; twice the time of a ring on 2 ranks, see BENCHMARKS.md).
pub const RING_MIN_BYTES: usize = 64 * 1024;

/// Tag of the ring messages (on the private duplicate communicator).
const RING_TAG: i32 = 0x7269;

/// Tag of the failure-diagnosis messages (on the private `diag` duplicate).
const DIAG_TAG: i32 = 0x6469;

/// A wait first tests its requests back to back for this long (the common case: the peers are
/// there and the data moves)...
pub const SPIN_FOR: Duration = Duration::from_millis(1);
/// ...then yields the CPU every 64 tests until this much time has passed (other processes of an
/// oversubscribed job run; MPI keeps progressing a transfer at every test), or longer for a
/// large call: the time its bytes (times the ranks) take at [`SLOW_NS_PER_BYTE`], at most
/// [`MAX_YIELD_FOR`] (a transfer between sleeping processes crawls: Open MPI moves shared-memory
/// fragments only inside MPI calls)...
pub const YIELD_FOR: Duration = Duration::from_millis(20);
/// A pessimistic transfer rate for [`YIELD_FOR`]: 10 ns per byte (0.1 GB/s).
pub const SLOW_NS_PER_BYTE: u64 = 10;
/// The longest yield phase of a large call.
pub const MAX_YIELD_FOR: Duration = Duration::from_secs(1);
/// ...then sleeps between tests, from [`FIRST_NAP`] doubling up to this (a stalled peer costs
/// well under 1% of a core instead of all of it).
pub const MAX_NAP: Duration = Duration::from_millis(1);
/// The first sleep of a wait past [`YIELD_FOR`].
pub const FIRST_NAP: Duration = Duration::from_micros(20);

/// The pause between two tests of a wait: spin, then yield, then sleep in growing steps.
struct Backoff {
    start: Instant,
    nap: Duration,
    yield_for: Duration,
    tests: u32,
}

impl Backoff {
    /// For a wait on a call that moves `bytes` in all (sets how long it yields before sleeping).
    fn new(bytes: usize) -> Self {
        let transfer = Duration::from_nanos((bytes as u64).saturating_mul(SLOW_NS_PER_BYTE));
        Backoff {
            start: Instant::now(),
            nap: FIRST_NAP,
            yield_for: transfer.clamp(YIELD_FOR, MAX_YIELD_FOR),
            tests: 0,
        }
    }

    /// Back to spinning (a request completed: the peers are there and the data moves).
    fn progressed(&mut self) {
        self.start = Instant::now();
        self.nap = FIRST_NAP;
    }

    fn pause(&mut self) {
        let waited = self.start.elapsed();
        self.tests = self.tests.wrapping_add(1);
        if waited < SPIN_FOR {
            // Test again at once: a transfer progresses only while this process tests.
        } else if waited < self.yield_for {
            // Yielding at every test would give the core away to any runnable process: every
            // 64th.
            if self.tests.is_multiple_of(64) {
                std::thread::yield_now();
            }
        } else {
            std::thread::sleep(self.nap);
            self.nap = (self.nap * 2).min(MAX_NAP);
        }
    }
}

/// MPI's text for an error code.
fn mpi_error_string(rc: std::os::raw::c_int) -> String {
    // Larger than MPI_MAX_ERROR_STRING of Open MPI (256) and MPICH (1024).
    let mut buf = vec![0 as std::os::raw::c_char; 4096];
    let mut len: std::os::raw::c_int = 0;
    // SAFETY: `buf` holds more than MPI_MAX_ERROR_STRING characters.
    let rc2 = unsafe { ffi::MPI_Error_string(rc, buf.as_mut_ptr(), &mut len) };
    if rc2 != ffi::MPI_SUCCESS as std::os::raw::c_int {
        return format!("error code {rc}");
    }
    let bytes: Vec<u8> = buf[..len.clamp(0, buf.len() as i32) as usize]
        .iter()
        .map(|&c| c as u8)
        .collect();
    format!("{} (code {rc})", String::from_utf8_lossy(&bytes))
}

/// This process's rank in the world (for the termination handler's message).
static WORLD_RANK: AtomicUsize = AtomicUsize::new(0);
/// The call in flight: its code in [`OP_NAMES`] (-1: send/recv or none) and its bytes.
static CURRENT_OP: AtomicI64 = AtomicI64::new(-1);
static CURRENT_BYTES: AtomicUsize = AtomicUsize::new(0);
/// True while a call polls its requests (it then handles [`TERMINATING`] itself).
static IN_WAIT: AtomicBool = AtomicBool::new(false);
/// Set by the termination handler while a call polls.
static TERMINATING: AtomicBool = AtomicBool::new(false);
/// The status this process is aborting with (0: not aborting): the termination handler then
/// exits with it silently (the failure was reported).
static ABORTING: AtomicI32 = AtomicI32::new(0);

/// Makes SIGTERM a reported failure: Open MPI's mpirun ends a job whose process exited (or was
/// killed) by sending SIGTERM to the others, then SIGKILL after a grace period. With this
/// handler, a rank waiting in a call stops waiting, asks its peers who is still there
/// ([`MpiComm::diagnose`], half a second) and returns [`CommError::PeerFailed`] naming the
/// silent rank; a rank outside a call prints one line naming its last call and exits with
/// status 143. Install it once, after [`MpiComm::init`].
pub fn install_termination_handler() -> Result<()> {
    extern "C" fn on_term(_: libc::c_int) {
        let aborting = ABORTING.load(Ordering::SeqCst);
        if aborting != 0 {
            // SAFETY: _exit(2) is async-signal-safe.
            unsafe { libc::_exit(aborting) };
        }
        if IN_WAIT.load(Ordering::SeqCst) {
            TERMINATING.store(true, Ordering::SeqCst);
            return;
        }
        // Async-signal-safe: format into a stack buffer, write(2), _exit(2).
        let mut buf = [0u8; 256];
        let mut n = 0;
        let mut put = |b: &[u8]| {
            for &c in b {
                if n < buf.len() {
                    buf[n] = c;
                    n += 1;
                }
            }
        };
        put(b"error: rank ");
        put(itoa(
            WORLD_RANK.load(Ordering::Relaxed) as u64,
            &mut [0u8; 20],
        ));
        put(b": the MPI launcher is terminating the job (SIGTERM; another rank exited or was killed) while this rank computed; its last call: ");
        let op = CURRENT_OP.load(Ordering::Relaxed);
        put(
            match usize::try_from(op).ok().and_then(|i| OP_NAMES.get(i)) {
                Some(name) => name.as_bytes(),
                None => b"send/recv",
            },
        );
        put(b" of ");
        put(itoa(
            CURRENT_BYTES.load(Ordering::Relaxed) as u64,
            &mut [0u8; 20],
        ));
        put(b" bytes\n");
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, buf.as_ptr().cast(), n);
            libc::_exit(143);
        }
    }
    fn itoa(mut v: u64, out: &mut [u8; 20]) -> &[u8] {
        let mut i = out.len();
        loop {
            i -= 1;
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        &out[i..]
    }
    // SAFETY: installs a handler that only touches atomics and async-signal-safe calls.
    let prev = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut())
    };
    if prev != 0 {
        return Err(backend_err(format!(
            "cannot install the SIGTERM handler: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Extends a borrow to `'static` for a `StaticScope` request. The caller keeps the owner alive
/// until the request completes, and leaks it if the request is abandoned.
unsafe fn forever<T>(s: &[T]) -> &'static [T] {
    // SAFETY: see the function docs.
    unsafe { std::slice::from_raw_parts(s.as_ptr(), s.len()) }
}

/// As [`forever`], mutable.
unsafe fn forever_mut<T>(s: &mut [T]) -> &'static mut [T] {
    // SAFETY: see `forever`.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr(), s.len()) }
}

impl MpiComm {
    /// Initialises MPI (`MPI_Init_thread`, single-threaded use) and returns the world
    /// communicator. Fails if MPI was already initialised in this process.
    pub fn init(options: MpiCommOptions) -> Result<MpiComm> {
        let universe = mpi::initialize()
            .ok_or_else(|| backend_err("MPI is already initialised in this process"))?;
        let world = universe.world();
        let c = Self::wrap(world, Rc::new(universe), options);
        WORLD_RANK.store(c.rank, Ordering::Relaxed);
        Ok(c)
    }

    fn wrap(comm: SimpleCommunicator, universe: Rc<Universe>, options: MpiCommOptions) -> Self {
        let rank = comm.rank().max(0) as usize;
        let size = comm.size().max(0) as usize;
        let (ring, diag) = (comm.duplicate(), comm.duplicate());
        if options.timeout.is_some() {
            // Every call is polled through `poll`, which checks MPI's return codes: a failure
            // MPI detects (a broken TCP connection to a dead peer) becomes an error this rank
            // reports, instead of MPI's default abort without a word from us.
            for c in [&comm, &ring, &diag] {
                // SAFETY: a live communicator and a predefined error handler.
                unsafe { ffi::MPI_Comm_set_errhandler(c.as_raw(), ffi::RSMPI_ERRORS_RETURN) };
            }
        }
        MpiComm {
            ring,
            diag,
            comm,
            _universe: universe,
            rank,
            size,
            seq: Cell::new(0),
            current: Cell::new((-1, 0)),
            options,
            failure: RefCell::new(None),
            scratch: RefCell::new(Vec::new()),
            in_place: in_place_sentinel(),
        }
    }

    /// The underlying rsmpi communicator (for calls this crate does not wrap).
    pub fn raw(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// A barrier that ignores the poisoned state and the timeout (to meet peers that are late
    /// after a timeout, e.g. before finalising). Non-blocking underneath, so it matches
    /// [`Communicator::barrier`] on the peers (MPI never matches blocking with non-blocking
    /// collectives).
    pub fn blocking_barrier(&self) {
        self.comm.immediate_barrier().wait();
    }

    /// Ends the whole MPI job (all processes) with `code` (`MPI_Abort`).
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }

    /// Ends the job after a failure that this rank has reported (`MPI_Abort` with `code`),
    /// never through `MPI_Finalize`, which would wait for the peers that failed. When the
    /// failure was a timeout or a terminated job, waits one second first, so that the other
    /// live ranks (which learn of it through [`MpiComm::diagnose`]'s messages) print their own
    /// report before the launcher kills them.
    pub fn abort_after_failure(&self, code: i32) -> ! {
        use std::io::Write;
        let _ = std::io::stderr().flush();
        let _ = std::io::stdout().flush();
        // The launcher's SIGTERM (another rank aborted first) now just ends this process.
        ABORTING.store(code, Ordering::SeqCst);
        if self.failure.borrow().is_some() && self.size > 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
        self.comm.abort(code)
    }

    /// The first failure of this communicator (a timeout, a failed peer), if any.
    pub fn failure(&self) -> Option<CommError> {
        self.failure.borrow().clone()
    }

    /// The timeout this communicator polls its calls against.
    pub fn timeout(&self) -> Option<Duration> {
        self.options.timeout
    }

    /// Changes the timeout of later calls (every rank must set the same: `None` makes
    /// all-reduce, reduce-scatter and all-gather blocking MPI calls, which the peers' polled
    /// calls would not match). Communicators split off earlier keep theirs.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        if timeout.is_some() != self.options.timeout.is_some() {
            let handler = if timeout.is_some() {
                // SAFETY: a predefined error handler.
                unsafe { ffi::RSMPI_ERRORS_RETURN }
            } else {
                // SAFETY: as above.
                unsafe { ffi::RSMPI_ERRORS_ARE_FATAL }
            };
            for c in [&self.comm, &self.ring, &self.diag] {
                // SAFETY: a live communicator.
                unsafe { ffi::MPI_Comm_set_errhandler(c.as_raw(), handler) };
            }
        }
        self.options.timeout = timeout;
    }

    /// Records the call in flight (for the messages of a failure and the termination handler).
    fn begin(&self, code: i64, bytes: usize) {
        self.current.set((code, bytes));
        CURRENT_OP.store(code, Ordering::Relaxed);
        CURRENT_BYTES.store(bytes, Ordering::Relaxed);
    }

    fn check_failed(&self, op: &str) -> Result<()> {
        match &*self.failure.borrow() {
            Some(f) => Err(CommError::Poisoned {
                op: op.into(),
                rank: self.rank,
                cause: Box::new(f.clone()),
            }),
            None => Ok(()),
        }
    }

    /// Polls `req` until it completes or the timeout passes (see [`MpiComm::poll`]).
    fn wait<R: ?Sized>(&self, op: &str, req: Request<'static, R, StaticScope>) -> Result<()> {
        let deadline = self.options.timeout.map(|t| Instant::now() + t);
        self.wait_all(op, vec![req], deadline)
    }

    /// Polls `reqs` until all complete or `deadline` passes (see [`MpiComm::poll`]).
    fn wait_all<T: ?Sized>(
        &self,
        op: &str,
        reqs: Vec<Request<'static, T, StaticScope>>,
        deadline: Option<Instant>,
    ) -> Result<()> {
        // SAFETY: the buffers are `'static` for the requests (the callers keep them alive until
        // completion and leak them when this returns an error).
        let raw = reqs
            .into_iter()
            .map(|r| unsafe { r.into_raw().0 })
            .collect();
        self.poll(op, raw, deadline)
    }

    /// Tests `reqs` until all complete, `deadline` passes, a peer reports that it gave up on
    /// this communicator, or the process is being terminated. Spins for the first
    /// [`SPIN_FOR`], then yields the CPU until [`YIELD_FOR`] (longer for a large call), then
    /// sleeps between tests in growing steps up to [`MAX_NAP`] (a stalled peer costs almost no
    /// CPU); back to spinning whenever one of several requests completes.
    ///
    /// On any error the requests are abandoned and the communicator is poisoned: the caller must
    /// leak every buffer they use. A timeout first runs [`MpiComm::diagnose`] to name the silent
    /// ranks.
    fn poll(
        &self,
        op: &str,
        mut reqs: Vec<ffi::MPI_Request>,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let mut backoff = Backoff::new(self.current.get().1.saturating_mul(self.size));
        let mut next_probe = Instant::now() + SPIN_FOR;
        IN_WAIT.store(true, Ordering::SeqCst);
        let res = loop {
            let mut i = 0;
            let mut failed = None;
            let before = reqs.len();
            while i < reqs.len() {
                let mut flag: std::os::raw::c_int = 0;
                let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
                // SAFETY: a live request handle; MPI writes `flag` and `status`.
                let rc = unsafe { ffi::MPI_Test(&mut reqs[i], &mut flag, status.as_mut_ptr()) };
                if rc != ffi::MPI_SUCCESS as std::os::raw::c_int {
                    failed = Some(rc);
                    break;
                }
                if flag != 0 {
                    reqs.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            if let Some(rc) = failed {
                break Err(self.fail(backend_err(format!(
                    "{} on rank {}: MPI reported {} (a peer process failed or its connection broke)",
                    self.describe(op),
                    self.rank,
                    mpi_error_string(rc)
                ))));
            }
            if reqs.is_empty() {
                break Ok(());
            }
            if reqs.len() < before {
                backoff.progressed();
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break Err(self.timed_out(op));
            }
            if TERMINATING.load(Ordering::SeqCst) {
                break Err(self.terminated(op));
            }
            if now >= next_probe {
                // A peer that timed out announces it on `diag`: join the diagnosis now, so that
                // every live rank reports before the job is aborted.
                next_probe = now + Duration::from_millis(1);
                if self
                    .diag
                    .any_process()
                    .immediate_probe_with_tag(DIAG_TAG)
                    .is_some()
                {
                    break Err(self.timed_out(op));
                }
            }
            backoff.pause();
        };
        IN_WAIT.store(false, Ordering::SeqCst);
        res
    }

    /// Records `err` as this communicator's first failure and returns it.
    fn fail(&self, err: CommError) -> CommError {
        self.failure.borrow_mut().get_or_insert_with(|| err.clone());
        err
    }

    /// `op` with its byte count, for messages.
    fn describe(&self, op: &str) -> String {
        let (_, bytes) = self.current.get();
        format!("{op} of {bytes} bytes")
    }

    /// The timeout error for `op`, naming the ranks that did not answer [`MpiComm::diagnose`].
    /// Also the error of a rank that noticed a peer's announcement before its own deadline (the
    /// op cannot complete: that peer abandoned it, its timeout having passed).
    fn timed_out(&self, op: &str) -> CommError {
        let silent = self.diagnose(self.grace());
        let err = CommError::Timeout {
            op: op.into(),
            bytes: Some(self.current.get().1),
            rank: self.rank,
            waiting_for: silent,
            timeout: self.options.timeout.unwrap_or_default(),
        };
        self.fail(err)
    }

    /// The error when the MPI launcher terminates this process (SIGTERM with
    /// [`install_termination_handler`]): mpirun does so when another process of the job exited.
    /// The ranks that do not answer [`MpiComm::diagnose`] within half a second are named.
    fn terminated(&self, op: &str) -> CommError {
        let silent = self.diagnose(Duration::from_millis(500));
        let err = match silent.first() {
            Some(&peer) => CommError::PeerFailed {
                op: self.describe(op),
                rank: self.rank,
                peer,
                reason: format!(
                    "exited or was killed: the MPI launcher is terminating the job (SIGTERM), and rank(s) {silent:?} did not answer"
                ),
            },
            None => backend_err(format!(
                "{} on rank {}: the MPI launcher is terminating the job (SIGTERM); every peer answered, so the rank that failed is outside this communicator",
                self.describe(op),
                self.rank
            )),
        };
        self.fail(err)
    }

    /// How long [`MpiComm::diagnose`] listens after a timeout: a quarter of the timeout, at
    /// least 1 s and at most 3 s (a job then ends within the timeout plus about 5 s, with
    /// [`MpiComm::abort_after_failure`]'s second).
    fn grace(&self) -> Duration {
        (self.options.timeout.unwrap_or_default() / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(3))
    }

    /// After a failure: tells every other rank on the `diag` duplicate that this rank gave up
    /// (its rank, call sequence number and op), then listens up to `grace` for the same message
    /// from each of them. Live ranks that gave up too (or that notice the message while they
    /// wait, see [`MpiComm::poll`]) answer; the ranks returned did not: stopped, stuck in
    /// computation, or dead. The messages' buffers and requests are leaked (the communicator is
    /// poisoned and the job is about to be aborted).
    fn diagnose(&self, grace: Duration) -> Vec<usize> {
        if self.size <= 1 {
            return Vec::new();
        }
        let me = [
            self.rank as i64,
            self.seq.get() as i64,
            self.current.get().0,
        ];
        let mine: &'static [i64] = Box::leak(Box::new(me));
        let inbox: &'static mut [i64] = Box::leak(vec![0i64; 3 * self.size].into_boxed_slice());
        let mut recvs = Vec::new();
        for (peer, slot) in inbox.chunks_mut(3).enumerate() {
            if peer == self.rank {
                continue;
            }
            let p = self.diag.process_at_rank(peer as i32);
            let s = p.immediate_send_with_tag(StaticScope, mine, DIAG_TAG);
            // SAFETY: `mine` is leaked; the send request is abandoned (never freed: a dead peer
            // would never take it).
            let _ = unsafe { s.into_raw() };
            let r = p.immediate_receive_into_with_tag(StaticScope, slot, DIAG_TAG);
            // SAFETY: `inbox` is leaked.
            recvs.push((peer, unsafe { r.into_raw().0 }));
        }
        let deadline = Instant::now() + grace;
        let mut backoff = Backoff::new(0);
        while !recvs.is_empty() && Instant::now() < deadline {
            recvs.retain_mut(|(_, r)| {
                let mut flag: std::os::raw::c_int = 0;
                // SAFETY: a live request handle.
                let rc = unsafe { ffi::MPI_Test(r, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
                // An error counts as no answer.
                !(rc == ffi::MPI_SUCCESS as std::os::raw::c_int && flag != 0)
            });
            backoff.pause();
        }
        recvs.into_iter().map(|(p, _)| p).collect()
    }

    /// One ring step: sends `send` to the next rank and receives `recv` from the previous one.
    fn ring_step<T: MpiElem>(
        &self,
        op: &str,
        send: &[T],
        recv: &mut [T],
        deadline: Option<Instant>,
    ) -> Result<()> {
        let n = self.size as i32;
        let me = self.rank as i32;
        let next = self.ring.process_at_rank((me + 1) % n);
        let prev = self.ring.process_at_rank((me + n - 1) % n);
        // SAFETY: the caller keeps both buffers alive until this returns, and leaks their owners
        // when it returns an error (the requests are then abandoned).
        let (s, r) = unsafe { (forever(send), forever_mut(recv)) };
        let rr = prev.immediate_receive_into_with_tag(StaticScope, r, RING_TAG);
        let sr = next.immediate_send_with_tag(StaticScope, s, RING_TAG);
        self.wait_all(op, vec![rr, sr], deadline)
    }

    /// In-place ring all-reduce of `buf` (partitions of [`partition_range`]): `n - 1` steps of
    /// reduce-scatter (each rank accumulates the chunk it receives into `buf`), then `n - 1` of
    /// all-gather (each rank receives the finished chunks straight into `buf`). `op` must not be
    /// `Avg` (reduce with `Sum` and divide). `tmp` needs `ceil(len / n)` elements. On error the
    /// caller leaks `buf`'s and `tmp`'s owners.
    fn ring_all_reduce<T: MpiElem>(
        &self,
        buf: &mut [T],
        tmp: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.size;
        let r = self.rank;
        let len = buf.len();
        let deadline = self.options.timeout.map(|t| Instant::now() + t);
        let part = |k: usize| partition_range(len, n, k % n);
        for s in 1..n {
            let (slo, shi) = part(r + n - s);
            let (rlo, rhi) = part(r + 2 * n - s - 1);
            let t = &mut tmp[..rhi - rlo];
            {
                // SAFETY: the chunks are disjoint ([slo, shi) is only read, by MPI, while
                // [rlo, rhi) of `buf` is not touched until the step completed).
                let send = unsafe { std::slice::from_raw_parts(buf.as_ptr().add(slo), shi - slo) };
                self.ring_step("all_reduce", send, t, deadline)?;
            }
            data::accumulate(&mut buf[rlo..rhi], t, op);
        }
        for s in 0..n - 1 {
            let (slo, shi) = part(r + n - s);
            let (rlo, rhi) = part(r + 2 * n - s - 1);
            // SAFETY: as above, disjoint chunks of `buf`.
            let send = unsafe { std::slice::from_raw_parts(buf.as_ptr().add(slo), shi - slo) };
            self.ring_step("all_reduce", send, &mut buf[rlo..rhi], deadline)?;
        }
        Ok(())
    }

    /// Ring reduce-scatter of `input` into `out` (this rank's partition): at step `s` each rank
    /// sends its running sum of chunk `r - s` and adds its own contribution to the chunk it
    /// receives; the last step lands in `out`. `input` is not modified. `scratch` needs
    /// `3 * ceil(len / n)` elements. `op` must not be `Avg`. On error the caller leaks the owners
    /// of all three buffers.
    fn ring_reduce_scatter<T: MpiElem>(
        &self,
        input: &[T],
        out: &mut [T],
        scratch: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.size;
        let r = self.rank;
        let len = input.len();
        let c = len.div_ceil(n);
        let deadline = self.options.timeout.map(|t| Instant::now() + t);
        let part = |k: usize| partition_range(len, n, k % n);
        let (tmp, accs) = scratch.split_at_mut(c);
        let (acc_a, acc_b) = accs.split_at_mut(c);
        let (mut cur, mut nxt) = (acc_a, acc_b);
        for s in 1..n {
            let (slo, shi) = part(r + n - s);
            let (rlo, rhi) = part(r + 2 * n - s - 1);
            let t = &mut tmp[..rhi - rlo];
            let send: &[T] = if s == 1 {
                &input[slo..shi]
            } else {
                &cur[..shi - slo]
            };
            self.ring_step("reduce_scatter", send, t, deadline)?;
            let dst: &mut [T] = if s == n - 1 {
                &mut *out
            } else {
                &mut nxt[..rhi - rlo]
            };
            T::reduce(dst, &[&input[rlo..rhi], t], op);
            std::mem::swap(&mut cur, &mut nxt);
        }
        Ok(())
    }

    /// True when a polled collective over `bytes` per rank runs the ring algorithms.
    fn use_ring(&self, bytes: usize) -> bool {
        self.options.timeout.is_some() && self.size > 1 && bytes >= self.options.ring_min_bytes
    }

    /// Leaks the scratch buffer (an abandoned request may still write into it).
    fn leak_scratch(&self) {
        std::mem::forget(std::mem::take(&mut *self.scratch.borrow_mut()));
    }

    /// A reused scratch buffer of `elems` elements of `T` (8-byte aligned storage).
    fn scratch_for<T: MpiElem>(&self, elems: usize) -> std::cell::RefMut<'_, [T]> {
        let bytes = elems * std::mem::size_of::<T>();
        let words = bytes.div_ceil(8);
        let mut sc = self.scratch.borrow_mut();
        if sc.len() < words {
            *sc = vec![0u64; words];
        }
        std::cell::RefMut::map(sc, |v| {
            &mut bytemuck::cast_slice_mut::<u64, T>(&mut v[..words])[..elems]
        })
    }

    /// Compares this call's descriptor with every rank's (one small allreduce of max and -min).
    fn check(
        &self,
        name: &str,
        op: Option<ReduceOp>,
        dtype: Option<DType>,
        len: usize,
        root: usize,
    ) -> Result<()> {
        self.check_failed(name)?;
        let bytes = match name {
            // `len` is a shape code for all_gather: the caller set `current`.
            "all_gather" => self.current.get().1,
            _ => len.saturating_mul(dtype.map_or(0, |d| d.size_in_bytes())),
        };
        self.begin(op_code(name, op), bytes);
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        if !self.options.check_calls || self.size <= 1 {
            return Ok(());
        }
        let d = [
            seq as i64,
            op_code(name, op),
            dtype.map(dtype_code).unwrap_or(0),
            len as i64,
            root as i64,
        ];
        let mut send = [0i64; 10];
        for i in 0..5 {
            send[i] = d[i];
            send[5 + i] = -d[i];
        }
        let mut recv = Box::new([0i64; 10]);
        let send = Box::new(send);
        // SAFETY: both boxes outlive the request or are leaked on timeout.
        let (s, r) = unsafe { (forever(&send[..]), forever_mut(&mut recv[..])) };
        let req = self
            .comm
            .immediate_all_reduce_into(StaticScope, s, r, SystemOperation::max());
        if let Err(e) = self.wait(name, req) {
            std::mem::forget(send);
            std::mem::forget(recv);
            return Err(e);
        }
        let same = (0..5).all(|i| recv[i] == -recv[5 + i]);
        if same {
            return Ok(());
        }
        // Everyone saw the mismatch: gather the descriptors to say who called what.
        let mut all = vec![0i64; 5 * self.size];
        let dd = Box::new(d);
        // SAFETY: as above.
        let (s, r) = unsafe { (forever(&dd[..]), forever_mut(&mut all[..])) };
        let req = self.comm.immediate_all_gather_into(StaticScope, s, r);
        if let Err(e) = self.wait(name, req) {
            std::mem::forget(dd);
            std::mem::forget(all);
            return Err(e);
        }
        let detail = (0..self.size)
            .map(|k| {
                let x = &all[5 * k..5 * k + 5];
                let op = OP_NAMES.get(x[1] as usize).copied().unwrap_or("?");
                let dt = dtype_from_code(x[2])
                    .map(|d| format!("{d:?}"))
                    .unwrap_or_else(|| "-".into());
                format!(
                    "rank {k} called {op} of {dt} len {} root {} (call #{})",
                    x[3], x[4], x[0]
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        Err(CommError::Mismatch { seq, detail })
    }

    fn all_reduce_native<T: MpiElem>(&self, t: &Tensor, op: ReduceOp) -> Result<Vec<T>> {
        let len = t.elem_count();
        if self.use_ring(len * std::mem::size_of::<T>()) {
            // Copy the input into the result, then reduce the result in place.
            let mut out = data::to_vec::<T>(t)?;
            let res = {
                let mut tmp = self.scratch_for::<T>(len.div_ceil(self.size));
                self.ring_all_reduce(&mut out, &mut tmp, ring_op(op))
            };
            if let Err(e) = res {
                self.leak_scratch();
                std::mem::forget(out);
                return Err(e);
            }
            if op == ReduceOp::Avg {
                T::div_n(&mut out, self.size);
            }
            return Ok(out);
        }
        let keep = t.clone();
        let ptr = data::data_ptr::<T>(&keep)?;
        let mut out = data::zeroed::<T>(len);
        // SAFETY: `keep` owns the input and `out` the output until the request completes; both
        // are leaked on timeout.
        let (s, r) = unsafe {
            (
                std::slice::from_raw_parts(ptr, len),
                forever_mut(&mut out[..]),
            )
        };
        if let Err(e) = self.all_reduce_slices(s, r, op) {
            std::mem::forget(keep);
            std::mem::forget(out);
            return Err(e);
        }
        if op == ReduceOp::Avg {
            T::div_n(&mut out, self.size);
        }
        Ok(out)
    }

    /// `MPI_Allreduce` of `s` into `r`: blocking when there is no timeout (OpenMPI's tuned
    /// algorithms), otherwise non-blocking and polled. On error the caller leaks both buffers.
    fn all_reduce_slices<T: MpiElem>(
        &self,
        s: &'static [T],
        r: &'static mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        if self.options.timeout.is_none() {
            self.comm.all_reduce_into(s, r, system_op(op));
            return Ok(());
        }
        let req = self
            .comm
            .immediate_all_reduce_into(StaticScope, s, r, system_op(op));
        self.wait("all_reduce", req)
    }

    /// `MPI_Allreduce(MPI_IN_PLACE, buf)` (blocking without a timeout, else `MPI_Iallreduce`
    /// polled against it): no receive buffer and no copy back. On error the caller leaks the
    /// tensor that owns `buf`.
    fn all_reduce_in_place_raw<T: MpiElem>(
        &self,
        buf: &mut [T],
        count: std::os::raw::c_int,
        in_place: usize,
        op: ReduceOp,
    ) -> Result<()> {
        if buf.is_empty() {
            // Every rank has nothing (an empty buffer's dangling pointer could even equal
            // MPI_IN_PLACE).
            return Ok(());
        }
        let dt = T::equivalent_datatype().as_raw();
        let mop = system_op(op).as_raw();
        let comm = self.comm.as_raw();
        let send = in_place as *const std::ffi::c_void;
        let recv = buf.as_mut_ptr().cast::<std::ffi::c_void>();
        if self.options.timeout.is_none() {
            // SAFETY: `buf` holds `count` elements of `dt`; `send` is the library's MPI_IN_PLACE.
            let rc = unsafe { ffi::MPI_Allreduce(send, recv, count, dt, mop, comm) };
            return mpi_rc("all_reduce", rc);
        }
        // SAFETY: as above; `request` is written by MPI before it is read.
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        let rc = unsafe { ffi::MPI_Iallreduce(send, recv, count, dt, mop, comm, &mut request) };
        mpi_rc("all_reduce", rc)?;
        // SAFETY: `request` is a live, non-persistent request on `buf`, which the caller keeps
        // alive until it completes (or leaks on timeout).
        let req = unsafe { Request::from_raw(request, forever(buf), StaticScope) };
        self.wait("all_reduce", req)
    }

    /// In-place all-reduce: sends from the tensor's storage, receives into a reused scratch
    /// buffer, copies back (no allocation after the first call of a given size).
    fn all_reduce_inplace_native<T: MpiElem>(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        let keep = t.clone();
        data::with_slice_mut::<T, ()>("all_reduce", t, |dst| {
            let len = dst.len();
            if self.use_ring(std::mem::size_of_val(dst)) {
                let res = {
                    let mut tmp = self.scratch_for::<T>(len.div_ceil(self.size));
                    self.ring_all_reduce(dst, &mut tmp, ring_op(op))
                };
                if let Err(e) = res {
                    self.leak_scratch();
                    std::mem::forget(keep.clone());
                    return Err(e);
                }
                if op == ReduceOp::Avg {
                    T::div_n(dst, self.size);
                }
                return Ok(());
            }
            if let (Some(ip), Ok(count)) = (self.in_place, std::os::raw::c_int::try_from(len)) {
                if let Err(e) = self.all_reduce_in_place_raw(dst, count, ip, op) {
                    std::mem::forget(keep.clone());
                    return Err(e);
                }
                if op == ReduceOp::Avg {
                    T::div_n(dst, self.size);
                }
                return Ok(());
            }
            let words = std::mem::size_of_val(dst).div_ceil(8);
            let mut scratch = self.scratch.borrow_mut();
            if scratch.len() < words {
                *scratch = vec![0u64; words];
            }
            let r: &mut [T] = &mut bytemuck::cast_slice_mut::<u64, T>(&mut scratch[..words])[..len];
            // SAFETY: the tensor (kept by `keep`) and the scratch buffer outlive the request or
            // are leaked on timeout.
            let (s, rr) = unsafe { (forever(dst), forever_mut(r)) };
            if let Err(e) = self.all_reduce_slices(s, rr, op) {
                std::mem::forget(std::mem::take(&mut *scratch));
                std::mem::forget(keep.clone());
                return Err(e);
            }
            dst.copy_from_slice(r);
            if op == ReduceOp::Avg {
                T::div_n(dst, self.size);
            }
            Ok(())
        })
    }

    /// `keep` owns `input` when it is a tensor's storage (leaked on timeout).
    fn reduce_scatter_native<T: MpiElem>(
        &self,
        input: &[T],
        keep: Option<Tensor>,
        op: ReduceOp,
    ) -> Result<Vec<T>> {
        let (lo, hi) = partition_range(input.len(), self.size, self.rank);
        let mut out = data::zeroed::<T>(hi - lo);
        if let Err(e) = self.reduce_scatter_raw(input, &mut out, op) {
            std::mem::forget(out);
            std::mem::forget(keep);
            return Err(e);
        }
        Ok(out)
    }

    /// Reduce-scatter of `input` straight into `out` (this rank's partition, see
    /// [`partition_range`]): `MPI_Reduce_scatter` with the partition lengths as receive counts,
    /// so nothing is padded or copied (blocking without a timeout, else `MPI_Ireduce_scatter`
    /// polled against it). Divides by the world size for `Avg`. On error the caller leaks the
    /// owners of `input` and `out`.
    fn reduce_scatter_raw<T: MpiElem>(
        &self,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.size;
        let len = input.len();
        let counts = (0..n)
            .map(|k| {
                let (lo, hi) = partition_range(len, n, k);
                std::os::raw::c_int::try_from(hi - lo)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| {
                CommError::invalid(
                    "reduce_scatter",
                    "partitions over 2^31 elements (MPI counts)",
                )
            })?;
        if counts.get(self.rank).map(|&c| c as usize) != Some(out.len()) {
            return Err(CommError::invalid(
                "reduce_scatter",
                "output length is not this rank's partition",
            ));
        }
        if self.use_ring(std::mem::size_of_val(input)) {
            let res = {
                let mut scratch = self.scratch_for::<T>(3 * len.div_ceil(n));
                self.ring_reduce_scatter(input, out, &mut scratch, ring_op(op))
            };
            if let Err(e) = res {
                self.leak_scratch();
                return Err(e);
            }
            if op == ReduceOp::Avg {
                T::div_n(out, n);
            }
            return Ok(());
        }
        if len == 0 {
            // Every rank has nothing (the descriptor check compared the lengths).
            return Ok(());
        }
        let dt = T::equivalent_datatype().as_raw();
        let mop = system_op(op).as_raw();
        let comm = self.comm.as_raw();
        let send = input.as_ptr().cast::<std::ffi::c_void>();
        // An empty vector's dangling pointer can equal MPI_IN_PLACE (`(void *)1` in Open MPI for
        // a `u8` buffer): point an empty partition at a real (unused) word instead.
        let mut empty = [0u64; 1];
        let recv = if out.is_empty() {
            empty.as_mut_ptr().cast::<std::ffi::c_void>()
        } else {
            out.as_mut_ptr().cast::<std::ffi::c_void>()
        };
        if self.options.timeout.is_none() {
            // SAFETY: `input` holds `len` = sum(counts) elements, `out` counts[rank].
            let rc = unsafe { ffi::MPI_Reduce_scatter(send, recv, counts.as_ptr(), dt, mop, comm) };
            mpi_rc("reduce_scatter", rc)?;
        } else {
            // SAFETY: as above; `request` is written by MPI before it is read.
            let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
            let rc = unsafe {
                ffi::MPI_Ireduce_scatter(send, recv, counts.as_ptr(), dt, mop, comm, &mut request)
            };
            mpi_rc("reduce_scatter", rc)?;
            // SAFETY: a live request on `out` and `input` (owned by the caller until it
            // completes, leaked on timeout) and `counts` (leaked below on timeout).
            let req = unsafe { Request::from_raw(request, forever(out), StaticScope) };
            if let Err(e) = self.wait("reduce_scatter", req) {
                std::mem::forget(counts);
                return Err(e);
            }
        }
        if op == ReduceOp::Avg {
            T::div_n(out, n);
        }
        Ok(())
    }

    /// [`Communicator::reduce_scatter_into`] for the natively reduced types: straight into the
    /// output tensor's storage.
    fn reduce_scatter_into_native<T: MpiElem>(
        &self,
        t: &Tensor,
        output: &Tensor,
        op: ReduceOp,
    ) -> Result<()> {
        let keep_in = t.clone();
        let keep_out = output.clone();
        data::with_slice_mut::<T, ()>("reduce_scatter", output, |o| {
            data::with_slice::<T, _>(t, |s| {
                let r = self.reduce_scatter_raw(s, o, op);
                if r.is_err() {
                    std::mem::forget(keep_in.clone());
                    std::mem::forget(keep_out.clone());
                }
                r
            })?
        })
    }

    /// `MPI_Reduce` of `input` onto `root` (blocking without a timeout, otherwise `MPI_Ireduce`
    /// polled against it). Only the root allocates a receive buffer. `keep` owns `input` when it
    /// is a tensor's storage (leaked on timeout).
    fn reduce_native<T: MpiElem>(
        &self,
        input: &[T],
        keep: Option<Tensor>,
        op: ReduceOp,
        root: usize,
    ) -> Result<Option<Vec<T>>> {
        if input.is_empty() {
            // Every rank has nothing (and an empty `u8` buffer's dangling pointer would read as
            // MPI_IN_PLACE in Open MPI).
            return Ok((self.rank == root).then(Vec::new));
        }
        let proc_ = self.comm.process_at_rank(root as i32);
        // SAFETY: `keep` (or the caller's vector) owns `input` until the request completes; it is
        // leaked on timeout.
        let s = unsafe { forever(input) };
        if self.rank != root {
            let res = if self.options.timeout.is_none() {
                proc_.reduce_into(s, system_op(op));
                Ok(())
            } else {
                let req = proc_.immediate_reduce_into(StaticScope, s, system_op(op));
                self.wait("reduce", req)
            };
            return match res {
                Ok(()) => Ok(None),
                Err(e) => {
                    std::mem::forget(keep);
                    Err(e)
                }
            };
        }
        let mut out = data::zeroed::<T>(input.len());
        // SAFETY: as above; `out` outlives the request or is leaked on timeout.
        let r = unsafe { forever_mut(&mut out[..]) };
        let res = if self.options.timeout.is_none() {
            proc_.reduce_into_root(s, r, system_op(op));
            Ok(())
        } else {
            let req = proc_.immediate_reduce_into_root(StaticScope, s, r, system_op(op));
            self.wait("reduce", req)
        };
        if let Err(e) = res {
            std::mem::forget(out);
            std::mem::forget(keep);
            return Err(e);
        }
        if op == ReduceOp::Avg {
            T::div_n(&mut out, self.size);
        }
        Ok(Some(out))
    }

    /// All-gather of raw bytes: `mine.len()` bytes from every rank, concatenated.
    fn all_gather_bytes(&self, mine: &[u8], out: &mut [u8], keep: Tensor) -> Result<()> {
        // SAFETY: `keep` owns `mine`; `out` is owned by the caller, who leaks it on error.
        let (s, r) = unsafe { (forever(mine), forever_mut(out)) };
        if self.options.timeout.is_none() {
            self.comm.all_gather_into(s, r);
            return Ok(());
        }
        let req = self.comm.immediate_all_gather_into(StaticScope, s, r);
        self.wait("all_gather", req)
            .inspect_err(|_| std::mem::forget(keep))
    }

    fn split_mpi(&self, color: Option<u32>, key: usize) -> Result<Option<MpiComm>> {
        self.check("split", None, None, 0, 0)?;
        let c = match color {
            Some(c) => Color::with_value(c.min(i32::MAX as u32) as i32),
            None => Color::undefined(),
        };
        let key = key.min(i32::MAX as usize) as i32;
        Ok(self
            .comm
            .split_by_color_with_key(c, key)
            .map(|sub| MpiComm::wrap(sub, self._universe.clone(), self.options.clone())))
    }
}

/// f16/bf16 <-> f32 for reductions.
trait HalfElem: Elem {
    fn to_f32s(s: &[Self]) -> Vec<f32>;
    fn from_f32s(v: &[f32]) -> Vec<Self>;
}
impl HalfElem for f16 {
    fn to_f32s(s: &[Self]) -> Vec<f32> {
        s.iter().map(|x| x.to_f32()).collect()
    }
    fn from_f32s(v: &[f32]) -> Vec<Self> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }
}
impl HalfElem for bf16 {
    fn to_f32s(s: &[Self]) -> Vec<f32> {
        s.iter().map(|x| x.to_f32()).collect()
    }
    fn from_f32s(v: &[f32]) -> Vec<Self> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }
}

impl MpiComm {
    fn all_reduce_typed(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let dims = t.dims().to_vec();
        match t.dtype() {
            DType::F16 => self.all_reduce_half::<f16>(t, op, &dims),
            DType::BF16 => self.all_reduce_half::<bf16>(t, op, &dims),
            DType::F32 => data::from_vec(self.all_reduce_native::<f32>(t, op)?, &dims),
            DType::F64 => data::from_vec(self.all_reduce_native::<f64>(t, op)?, &dims),
            DType::U8 => data::from_vec(self.all_reduce_native::<u8>(t, op)?, &dims),
            DType::U32 => data::from_vec(self.all_reduce_native::<u32>(t, op)?, &dims),
            DType::I64 => data::from_vec(self.all_reduce_native::<i64>(t, op)?, &dims),
            other => Err(CommError::UnsupportedDType {
                op: "all_reduce".into(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    fn all_reduce_half<H: HalfElem>(
        &self,
        t: &Tensor,
        op: ReduceOp,
        dims: &[usize],
    ) -> Result<Tensor> {
        let wide = data::with_slice::<H, _>(t, H::to_f32s)?;
        let wide = data::from_vec(wide, dims)?;
        let r = self.all_reduce_native::<f32>(&wide, op)?;
        data::from_vec(H::from_f32s(&r), dims)
    }

    fn reduce_scatter_typed(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let out: Tensor = match t.dtype() {
            DType::F16 => {
                let w = data::with_slice::<f16, _>(t, f16::to_f32s)?;
                let r = self.reduce_scatter_native::<f32>(&w, None, op)?;
                let n = r.len();
                data::from_vec(f16::from_f32s(&r), &[n])?
            }
            DType::BF16 => {
                let w = data::with_slice::<bf16, _>(t, bf16::to_f32s)?;
                let r = self.reduce_scatter_native::<f32>(&w, None, op)?;
                let n = r.len();
                data::from_vec(bf16::from_f32s(&r), &[n])?
            }
            DType::F32 => self.rs_native::<f32>(t, op)?,
            DType::F64 => self.rs_native::<f64>(t, op)?,
            DType::U8 => self.rs_native::<u8>(t, op)?,
            DType::U32 => self.rs_native::<u32>(t, op)?,
            DType::I64 => self.rs_native::<i64>(t, op)?,
            other => {
                return Err(CommError::UnsupportedDType {
                    op: "reduce_scatter".into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(out)
    }

    fn reduce_typed(&self, t: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        let dims = t.dims().to_vec();
        match t.dtype() {
            DType::F16 => {
                let w = data::with_slice::<f16, _>(t, f16::to_f32s)?;
                self.reduce_native::<f32>(&w, None, op, root)?
                    .map(|r| data::from_vec(f16::from_f32s(&r), &dims))
                    .transpose()
            }
            DType::BF16 => {
                let w = data::with_slice::<bf16, _>(t, bf16::to_f32s)?;
                self.reduce_native::<f32>(&w, None, op, root)?
                    .map(|r| data::from_vec(bf16::from_f32s(&r), &dims))
                    .transpose()
            }
            DType::F32 => self.reduce_tensor::<f32>(t, op, root),
            DType::F64 => self.reduce_tensor::<f64>(t, op, root),
            DType::U8 => self.reduce_tensor::<u8>(t, op, root),
            DType::U32 => self.reduce_tensor::<u32>(t, op, root),
            DType::I64 => self.reduce_tensor::<i64>(t, op, root),
            other => Err(CommError::UnsupportedDType {
                op: "reduce".into(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    fn reduce_tensor<T: MpiElem>(
        &self,
        t: &Tensor,
        op: ReduceOp,
        root: usize,
    ) -> Result<Option<Tensor>> {
        let r = data::with_slice::<T, _>(t, |s| {
            self.reduce_native::<T>(s, Some(t.clone()), op, root)
        })??;
        r.map(|v| data::from_vec(v, t.dims())).transpose()
    }

    fn rs_native<T: MpiElem>(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let r = data::with_slice::<T, _>(t, |s| {
            self.reduce_scatter_native::<T>(s, Some(t.clone()), op)
        })??;
        let n = r.len();
        data::from_vec(r, &[n])
    }

    fn all_gather_t<T: Elem>(&self, t: &Tensor) -> Result<Tensor> {
        let len = t.elem_count();
        let mut out = data::zeroed::<T>(len * self.size);
        let keep = t.clone();
        let res = data::with_slice::<T, _>(&keep, |s| {
            let mine: &[u8] = bytemuck::cast_slice(s);
            let o: &mut [u8] = bytemuck::cast_slice_mut(&mut out[..]);
            self.all_gather_bytes(mine, o, keep.clone())
        })?;
        if let Err(e) = res {
            std::mem::forget(out);
            return Err(e);
        }
        data::from_vec(out, &gathered_dims(t.dims(), self.size))
    }

    fn all_gather_into_t<T: Elem>(&self, t: &Tensor, output: &Tensor) -> Result<()> {
        let keep_out = output.clone();
        data::with_slice_mut::<T, ()>("all_gather", output, |o| {
            data::with_slice::<T, _>(t, |s| {
                let mine: &[u8] = bytemuck::cast_slice(s);
                let ob: &mut [u8] = bytemuck::cast_slice_mut(o);
                let r = self.all_gather_bytes(mine, ob, t.clone());
                if r.is_err() {
                    std::mem::forget(keep_out.clone());
                }
                r
            })?
        })
    }

    fn broadcast_t<T: Elem>(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let len = t.elem_count();
        let mut buf: Vec<T> = if self.rank == root {
            data::to_vec::<T>(t)?
        } else {
            data::zeroed::<T>(len)
        };
        {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf[..]);
            // SAFETY: `buf` outlives the request or is leaked on timeout.
            let b = unsafe { forever_mut(bytes) };
            let req = self
                .comm
                .process_at_rank(root as i32)
                .immediate_broadcast_into(StaticScope, b);
            if let Err(e) = self.wait("broadcast", req) {
                std::mem::forget(buf);
                return Err(e);
            }
        }
        data::from_vec(buf, t.dims())
    }

    fn send_t<T: Elem>(&self, t: &Tensor, dst: usize) -> Result<()> {
        let keep = t.clone();
        let tag = dtype_code(t.dtype()) as i32;
        let r = data::with_slice::<T, _>(&keep, |s| {
            let bytes: &[u8] = bytemuck::cast_slice(s);
            // SAFETY: `keep` owns the data; leaked on timeout.
            let b = unsafe { forever(bytes) };
            let req = self
                .comm
                .process_at_rank(dst as i32)
                .immediate_send_with_tag(StaticScope, b, tag);
            self.wait("send", req)
        })?;
        if r.is_err() {
            std::mem::forget(keep);
        }
        r
    }

    fn recv_t<T: Elem>(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let len: usize = dims.iter().product();
        let deadline = self.options.timeout.map(|t| Instant::now() + t);
        let proc_ = self.comm.process_at_rank(src as i32);
        let mut backoff = Backoff::new(self.current.get().1);
        IN_WAIT.store(true, Ordering::SeqCst);
        let probed = loop {
            if let Some(m) = proc_.immediate_matched_probe() {
                break Ok(m);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let mut err = self.timed_out("recv");
                // The peer this receive waits for, whatever the diagnosis found.
                if let CommError::Timeout { waiting_for, .. } = &mut err {
                    if !waiting_for.contains(&src) {
                        waiting_for.push(src);
                        waiting_for.sort_unstable();
                    }
                }
                *self.failure.borrow_mut() = Some(err.clone());
                break Err(err);
            }
            if TERMINATING.load(Ordering::SeqCst) {
                break Err(self.terminated("recv"));
            }
            backoff.pause();
        };
        IN_WAIT.store(false, Ordering::SeqCst);
        let (msg, status) = probed?;
        let got_bytes = status.count(u8::equivalent_datatype()).max(0) as usize;
        let want_bytes = len * dtype.size_in_bytes();
        if status.tag() as i64 != dtype_code(dtype) || got_bytes != want_bytes {
            // Consume the message so the channel stays in order, then report.
            let mut sink = vec![0u8; got_bytes];
            msg.matched_receive_into(&mut sink[..]);
            let sent = dtype_from_code(status.tag() as i64)
                .map(|d| format!("{d:?}"))
                .unwrap_or_else(|| "?".into());
            return Err(CommError::Mismatch {
                seq: 0,
                detail: format!(
                    "rank {} expected {dtype:?} {dims:?} ({want_bytes} bytes) from rank {src}, which sent {sent} ({got_bytes} bytes)",
                    self.rank
                ),
            });
        }
        let mut out = data::zeroed::<T>(len);
        {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out[..]);
            msg.matched_receive_into(bytes);
        }
        data::from_vec(out, dims)
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let t = data::cpu_contiguous("all_reduce", tensor)?;
        self.check("all_reduce", Some(op), Some(t.dtype()), t.elem_count(), 0)?;
        self.all_reduce_typed(&t, op)
    }

    fn all_reduce_inplace(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        data::check_dtype("all_reduce", tensor.dtype())?;
        if !tensor.device().is_cpu() || !tensor.is_contiguous() {
            return Err(CommError::invalid(
                "all_reduce",
                "in-place collectives need a contiguous CPU tensor",
            ));
        }
        self.check(
            "all_reduce",
            Some(op),
            Some(tensor.dtype()),
            tensor.elem_count(),
            0,
        )?;
        match tensor.dtype() {
            DType::F32 => self.all_reduce_inplace_native::<f32>(tensor, op),
            DType::F64 => self.all_reduce_inplace_native::<f64>(tensor, op),
            DType::U8 => self.all_reduce_inplace_native::<u8>(tensor, op),
            DType::U32 => self.all_reduce_inplace_native::<u32>(tensor, op),
            DType::I64 => self.all_reduce_inplace_native::<i64>(tensor, op),
            // f16/bf16 reduce in f32 anyway: reduce out of place, copy back.
            _ => {
                let r = self.all_reduce_typed(tensor, op)?;
                data::copy_into("all_reduce", tensor, &r)
            }
        }
    }

    fn reduce_scatter(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let t = data::cpu_contiguous("reduce_scatter", tensor)?;
        self.check(
            "reduce_scatter",
            Some(op),
            Some(t.dtype()),
            t.elem_count(),
            0,
        )?;
        if t.elem_count() == 0 {
            return Ok(t.flatten_all()?);
        }
        self.reduce_scatter_typed(&t, op)
    }

    fn reduce(&self, tensor: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        if root >= self.size {
            return Err(CommError::invalid(
                "reduce",
                format!("root {root} out of range for world size {}", self.size),
            ));
        }
        let t = data::cpu_contiguous("reduce", tensor)?;
        self.check("reduce", Some(op), Some(t.dtype()), t.elem_count(), root)?;
        self.reduce_typed(&t, op, root)
    }

    fn reduce_scatter_into(&self, tensor: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        let t = data::cpu_contiguous("reduce_scatter", tensor)?;
        let (lo, hi) = partition_range(t.elem_count(), self.size, self.rank);
        let native = matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::U8 | DType::U32 | DType::I64
        );
        let ok = native
            && output.dtype() == t.dtype()
            && output.elem_count() == hi - lo
            && output.is_contiguous()
            && output.device().is_cpu()
            && !data::same_storage(&t, output);
        if !ok {
            // Take part in the collective, then report a bad output on this rank.
            let r = self.reduce_scatter(&t, op)?;
            return data::copy_into("reduce_scatter", output, &r);
        }
        self.check(
            "reduce_scatter",
            Some(op),
            Some(t.dtype()),
            t.elem_count(),
            0,
        )?;
        match t.dtype() {
            DType::F32 => self.reduce_scatter_into_native::<f32>(&t, output, op),
            DType::F64 => self.reduce_scatter_into_native::<f64>(&t, output, op),
            DType::U8 => self.reduce_scatter_into_native::<u8>(&t, output, op),
            DType::U32 => self.reduce_scatter_into_native::<u32>(&t, output, op),
            _ => self.reduce_scatter_into_native::<i64>(&t, output, op),
        }
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let t = data::cpu_contiguous("all_gather", tensor)?;
        // Shapes must agree: fold the leading dims into the length check.
        let shape_code = t
            .dims()
            .iter()
            .fold(t.elem_count(), |a, &d| a.wrapping_mul(31).wrapping_add(d));
        self.begin(
            op_code("all_gather", None),
            t.elem_count() * t.dtype().size_in_bytes(),
        );
        self.check("all_gather", None, Some(t.dtype()), shape_code, 0)?;
        with_elem!(t.dtype(), "all_gather", T => self.all_gather_t::<T>(&t))
    }

    fn all_gather_into(&self, tensor: &Tensor, output: &Tensor) -> Result<()> {
        let t = data::cpu_contiguous("all_gather", tensor)?;
        let ok = output.dtype() == t.dtype()
            && output.elem_count() == self.size * t.elem_count()
            && output.is_contiguous()
            && output.device().is_cpu()
            && !data::same_storage(&t, output);
        if !ok {
            // Take part in the collective, then report the bad output on this rank.
            let r = self.all_gather(&t)?;
            return data::copy_into("all_gather", output, &r);
        }
        let shape_code = t
            .dims()
            .iter()
            .fold(t.elem_count(), |a, &d| a.wrapping_mul(31).wrapping_add(d));
        self.begin(
            op_code("all_gather", None),
            t.elem_count() * t.dtype().size_in_bytes(),
        );
        self.check("all_gather", None, Some(t.dtype()), shape_code, 0)?;
        with_elem!(t.dtype(), "all_gather", T => self.all_gather_into_t::<T>(&t, output))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.size {
            return Err(CommError::invalid(
                "broadcast",
                format!("root {root} out of range for world size {}", self.size),
            ));
        }
        let t = data::cpu_contiguous("broadcast", tensor)?;
        self.check("broadcast", None, Some(t.dtype()), t.elem_count(), root)?;
        with_elem!(t.dtype(), "broadcast", T => self.broadcast_t::<T>(&t, root))
    }

    fn barrier(&self) -> Result<()> {
        self.check("barrier", None, None, 0, 0)?;
        let req = self.comm.immediate_barrier();
        self.wait("barrier", req)
    }

    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        if dst >= self.size {
            return Err(CommError::invalid(
                "send",
                format!(
                    "destination {dst} out of range for world size {}",
                    self.size
                ),
            ));
        }
        self.check_failed("send")?;
        let t = data::cpu_contiguous("send", tensor)?;
        self.begin(-1, t.elem_count() * t.dtype().size_in_bytes());
        with_elem!(t.dtype(), "send", T => self.send_t::<T>(&t, dst))
    }

    fn recv(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
        if src >= self.size {
            return Err(CommError::invalid(
                "recv",
                format!("source {src} out of range for world size {}", self.size),
            ));
        }
        self.check_failed("recv")?;
        data::check_dtype("recv", dtype)?;
        self.begin(
            -1,
            dims.iter()
                .product::<usize>()
                .saturating_mul(dtype.size_in_bytes()),
        );
        with_elem!(dtype, "recv", T => self.recv_t::<T>(src, dims, dtype))
    }

    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        Ok(self
            .split_mpi(color, key)?
            .map(|c| Box::new(c) as Box<dyn Communicator>))
    }
}
