//! [`LocalComm`]: ranks as threads of one process, collectives through shared memory.
//!
//! Each collective publishes, per rank, a pointer to its input and (where it has one) to its
//! output buffer, then works directly on those buffers:
//!
//! * `all_reduce`: rank `r` reduces partition `r` of every rank's input into its own output
//!   (all ranks in parallel), then copies the other partitions from their owners' outputs.
//!   Small messages (at most [`SMALL_MESSAGE_BYTES`] per rank) skip the second phase: every rank
//!   reduces the whole buffer.
//! * `reduce_scatter`: rank `r` reduces partition `r` of every input into a new tensor.
//! * `reduce`: only the root allocates an output; rank `r` reduces partition `r` of every input
//!   straight into the root's output (small messages: the root reduces the whole buffer alone).
//! * `all_gather` / `broadcast`: every rank copies straight from the peers' inputs.
//!
//! Synchronisation is a generation-counting barrier (a short crossbeam `Backoff` spin, then a
//! condition variable with a deadline). Every barrier checks the published call descriptors
//! (sequence number, op, dtype, shape), so mismatched calls are reported instead of mixing
//! buffers. A rank that panics or drops its communicator poisons the group at once; a rank that
//! stops answering makes the others time out. Buffers shared with peers are reference counted, so a
//! rank that gives up early never frees memory a slow peer still reads.

use crate::data::{self, partition_range, with_elem, Elem};
use crate::error::{CommError, Result};
use crate::{Communicator, ReduceOp};
use candle_core::{DType, Tensor};
use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use crossbeam::utils::Backoff;
use std::any::Any;
use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Per-rank message size (bytes) up to which `all_reduce` has every rank reduce the whole buffer
/// (one phase, lower latency) instead of reduce-scatter + all-gather.
pub const SMALL_MESSAGE_BYTES: usize = 64 * 1024;

/// Elements per step of the blocked reduction (the temporary stays in L1/L2).
const BLOCK_ELEMS: usize = 4096;

/// Options for [`LocalComm::create_with`].
#[derive(Debug, Clone, PartialEq)]
pub struct LocalCommOptions {
    /// How long a rank waits for its peers in one step of a collective (or for a message in
    /// `recv`) before it returns [`CommError::Timeout`]. Default: 300 s.
    pub timeout: Duration,
}

impl Default for LocalCommOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
        }
    }
}

/// What a rank asked for in one collective slot; all ranks must agree.
#[derive(Debug, Clone, PartialEq)]
struct Desc {
    seq: u64,
    op: OpKind,
    dtype: Option<DType>,
    dims: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OpKind {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    Reduce(ReduceOp, usize),
    AllGather,
    Broadcast(usize),
    Barrier,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpKind::AllReduce(op) => write!(f, "all_reduce({})", op.name()),
            OpKind::ReduceScatter(op) => write!(f, "reduce_scatter({})", op.name()),
            OpKind::Reduce(op, root) => write!(f, "reduce({}, root={root})", op.name()),
            OpKind::AllGather => write!(f, "all_gather"),
            OpKind::Broadcast(root) => write!(f, "broadcast(root={root})"),
            OpKind::Barrier => write!(f, "barrier"),
        }
    }
}

impl fmt::Display for Desc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dtype {
            Some(dt) => write!(f, "{} of {:?} {:?}", self.op, dt, self.dims),
            None => write!(f, "{}", self.op),
        }
    }
}

/// An output buffer that peers read through raw pointers (each rank writes only its own, and only
/// partitions no peer reads at that time).
struct OutBuf<T> {
    cell: UnsafeCell<Vec<T>>,
}

// SAFETY: access is coordinated by the barriers (disjoint writers, readers after a barrier).
unsafe impl<T: Send> Sync for OutBuf<T> {}

impl<T: Elem> OutBuf<T> {
    fn zeroed(n: usize) -> Self {
        Self {
            cell: UnsafeCell::new(data::zeroed(n)),
        }
    }
    fn ptr(&self) -> *mut T {
        // SAFETY: only the pointer is taken; no reference to the Vec escapes.
        unsafe { (*self.cell.get()).as_mut_ptr() }
    }
}

/// One rank's contribution to a collective. The `keep_*` fields own what the pointers point to, so
/// the memory outlives every peer that may still read it.
struct Entry {
    desc: Desc,
    src: usize,
    dst: usize,
    _keep_in: Option<Tensor>,
    _keep_out: Option<Arc<dyn Any + Send + Sync>>,
}

impl Entry {
    fn plain(desc: Desc) -> Self {
        Entry {
            desc,
            src: 0,
            dst: 0,
            _keep_in: None,
            _keep_out: None,
        }
    }
}

type Snapshot = Arc<Vec<Option<Entry>>>;

struct State {
    generation: u64,
    arrived: usize,
    pending: Vec<Option<Entry>>,
    completed: Snapshot,
    entered: Vec<u64>,
    failure: Option<CommError>,
    groups: HashMap<(u64, u32), Vec<Option<LocalComm>>>,
}

struct Shared {
    n: usize,
    options: LocalCommOptions,
    gen: AtomicU64,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; recover the data if it ever happens.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A message for `send`/`recv`.
struct Msg {
    dtype: DType,
    dims: Vec<usize>,
    data: Box<dyn Any + Send>,
}

/// One rank of a group of ranks that run as threads of this process.
///
/// Create all ranks at once with [`LocalComm::create`] (or [`LocalComm::run`], which also spawns
/// the threads) and move each into its thread. Dropping a `LocalComm` (including during a panic)
/// tells the peers that this rank is gone: their pending and later collectives fail with
/// [`CommError::PeerFailed`].
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    seq: AtomicU64,
    to: Vec<Sender<Msg>>,
    from: Vec<Receiver<Msg>>,
}

impl fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalComm")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.n)
            .finish()
    }
}

impl LocalComm {
    /// Creates the `world_size` ranks of a new group with default options (timeout 300 s).
    /// Element `r` is rank `r`. `world_size` 0 gives an empty vector.
    pub fn create(world_size: usize) -> Vec<LocalComm> {
        Self::create_with(world_size, LocalCommOptions::default())
    }

    /// Creates the `world_size` ranks of a new group.
    pub fn create_with(world_size: usize, options: LocalCommOptions) -> Vec<LocalComm> {
        let n = world_size;
        let shared = Arc::new(Shared {
            n,
            options,
            gen: AtomicU64::new(0),
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                pending: (0..n).map(|_| None).collect(),
                completed: Arc::new(Vec::new()),
                entered: vec![0; n],
                failure: None,
                groups: HashMap::new(),
            }),
            cv: Condvar::new(),
        });
        // channels[src][dst]
        let mut senders: Vec<Vec<Sender<Msg>>> = (0..n).map(|_| Vec::with_capacity(n)).collect();
        let mut receivers: Vec<Vec<Receiver<Msg>>> =
            (0..n).map(|_| Vec::with_capacity(n)).collect();
        for to_src in senders.iter_mut() {
            for from_dst in receivers.iter_mut() {
                let (s, r) = channel::unbounded();
                to_src.push(s);
                from_dst.push(r);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| LocalComm {
                rank,
                shared: shared.clone(),
                seq: AtomicU64::new(0),
                to,
                from,
            })
            .collect()
    }

    /// Runs `f` on `world_size` threads, one per rank, each with its own `LocalComm`, and returns
    /// each thread's result in rank order (`Err` holds the panic payload of a rank that panicked).
    pub fn run<T, F>(
        world_size: usize,
        options: LocalCommOptions,
        f: F,
    ) -> Vec<std::thread::Result<T>>
    where
        T: Send,
        F: Fn(LocalComm) -> T + Sync,
    {
        let comms = Self::create_with(world_size, options);
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    std::thread::Builder::new()
                        .name(format!("rank{}", c.rank))
                        .spawn_scoped(s, move || f(c))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join(),
                    Err(e) => Err(Box::new(e) as Box<dyn Any + Send>),
                })
                .collect()
        })
    }

    /// The options this group was created with.
    pub fn options(&self) -> &LocalCommOptions {
        &self.shared.options
    }

    fn next_desc(&self, op: OpKind, dtype: Option<DType>, dims: &[usize]) -> Desc {
        Desc {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            op,
            dtype,
            dims: dims.to_vec(),
        }
    }

    /// The failure reported to a rank that finds the group already broken.
    fn failure_for(&self, op: &str, f: &CommError) -> CommError {
        match f {
            CommError::PeerFailed { peer, reason, .. } => CommError::PeerFailed {
                op: op.to_string(),
                rank: self.rank,
                peer: *peer,
                reason: reason.clone(),
            },
            other => CommError::Poisoned {
                op: op.to_string(),
                rank: self.rank,
                cause: Box::new(other.clone()),
            },
        }
    }

    /// One barrier step: publishes `entry` and waits for all ranks; returns all entries.
    fn sync(&self, op: &str, entry: Option<Entry>) -> Result<Snapshot> {
        let sh = &*self.shared;
        let start = Instant::now();
        let mut st = sh.lock();
        if let Some(f) = &st.failure {
            return Err(self.failure_for(op, f));
        }
        st.pending[self.rank] = entry;
        st.entered[self.rank] += 1;
        st.arrived += 1;
        if st.arrived == sh.n {
            st.arrived = 0;
            let done: Vec<Option<Entry>> = st.pending.iter_mut().map(Option::take).collect();
            st.completed = Arc::new(done);
            st.generation += 1;
            sh.gen.store(st.generation, Ordering::Release);
            sh.cv.notify_all();
            return Ok(st.completed.clone());
        }
        let g = st.generation;
        drop(st);
        // Short spin: peers usually arrive within microseconds.
        let backoff = Backoff::new();
        while !backoff.is_completed() {
            if sh.gen.load(Ordering::Acquire) != g {
                // The next generation cannot complete without this rank, so `completed` is ours.
                return Ok(sh.lock().completed.clone());
            }
            backoff.snooze();
        }
        let deadline = start + sh.options.timeout;
        let mut st = sh.lock();
        loop {
            if st.generation != g {
                return Ok(st.completed.clone());
            }
            if let Some(f) = &st.failure {
                return Err(self.failure_for(op, f));
            }
            let now = Instant::now();
            if now >= deadline {
                let mine = st.entered[self.rank];
                let waiting_for: Vec<usize> = (0..sh.n).filter(|&k| st.entered[k] < mine).collect();
                let err = CommError::Timeout {
                    bytes: None,
                    op: op.to_string(),
                    rank: self.rank,
                    waiting_for,
                    timeout: sh.options.timeout,
                };
                st.failure = Some(err.clone());
                sh.cv.notify_all();
                return Err(err);
            }
            st = match sh.cv.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// First barrier of a collective: publishes this rank's entry and checks that every rank
    /// called the same thing.
    fn sync_checked(&self, entry: Entry) -> Result<Snapshot> {
        let desc = entry.desc.clone();
        let name = op_name(desc.op);
        let snap = self.sync(name, Some(entry))?;
        let mut bad = false;
        for e in snap.iter() {
            match e {
                Some(e) if e.desc == desc => {}
                _ => bad = true,
            }
        }
        if bad {
            let detail = snap
                .iter()
                .enumerate()
                .map(|(k, e)| match e {
                    Some(e) => format!("rank {k} called {} (call #{})", e.desc, e.desc.seq),
                    None => format!("rank {k} published nothing"),
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(CommError::Mismatch {
                seq: desc.seq,
                detail,
            });
        }
        Ok(snap)
    }

    /// All-reduce of `len` elements from `src` into `dst`; `src == dst` is allowed (in place).
    /// `keep_in` owns `src` (and `dst` when in place), `keep_out` owns `dst` otherwise.
    #[allow(clippy::too_many_arguments)]
    fn all_reduce_raw<T: Elem>(
        &self,
        src: *const T,
        dst: *mut T,
        len: usize,
        desc: Desc,
        keep_in: Tensor,
        keep_out: Option<Arc<dyn Any + Send + Sync>>,
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.shared.n;
        let r = self.rank;
        let in_place = std::ptr::eq(src, dst);
        let snap = self.sync_checked(Entry {
            desc,
            src: src as usize,
            dst: dst as usize,
            _keep_in: Some(keep_in),
            _keep_out: keep_out,
        })?;
        let ptrs: Vec<(usize, usize)> = snap.iter().flatten().map(|e| (e.src, e.dst)).collect();
        // Reduces elements [lo, hi) of every rank's input into each output of `dsts`, block by
        // block through a small buffer, so an output may alias an input.
        let reduce_range = |lo: usize, hi: usize, tmp: &mut [T], dsts: &[*mut T]| {
            let mut a = lo;
            while a < hi {
                let b = (a + tmp.len()).min(hi);
                {
                    // SAFETY: every published input has `len` elements (checked by the
                    // descriptor), is kept alive by the snapshot, and elements [a, b) are not
                    // written by anyone while these short-lived slices exist.
                    let srcs: Vec<&[T]> = ptrs
                        .iter()
                        .map(|&(s, _)| unsafe {
                            std::slice::from_raw_parts((s as *const T).add(a), b - a)
                        })
                        .collect();
                    T::reduce(&mut tmp[..b - a], &srcs, op);
                }
                for &d in dsts {
                    // SAFETY: elements [a, b) of the outputs in `dsts` belong to this rank here;
                    // outputs have `len` elements and are kept alive by the snapshot.
                    unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), d.add(a), b - a) };
                }
                a = b;
            }
        };
        if len * std::mem::size_of::<T>() <= SMALL_MESSAGE_BYTES {
            if in_place {
                // Reduce everything into a temporary, wait until every peer has read this rank's
                // input, then overwrite it.
                let mut tmp = data::zeroed::<T>(len);
                {
                    // SAFETY: as above; nobody writes any input before the next barrier.
                    let srcs: Vec<&[T]> = ptrs
                        .iter()
                        .map(|&(s, _)| unsafe { std::slice::from_raw_parts(s as *const T, len) })
                        .collect();
                    T::reduce(&mut tmp, &srcs, op);
                }
                drop(snap);
                self.sync("all_reduce", None)?;
                // SAFETY: all peers are done reading this rank's buffer.
                unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, len) };
            } else {
                let mut tmp = data::zeroed::<T>(len.min(BLOCK_ELEMS));
                reduce_range(0, len, &mut tmp, &[dst]);
                drop(snap);
                self.sync("all_reduce", None)?;
            }
        } else {
            // One pass: this rank reduces its partition of every input, block by block through
            // a small buffer, and writes the block into every rank's output. Each rank reads
            // its partition of all inputs once and writes it once to all outputs: 2 bytes moved
            // per buffer byte per rank, the least an all-reduce in shared memory can move (a
            // reduce-then-gather moves 3 - 1/n).
            let (lo, hi) = partition_range(len, n, r);
            let mut tmp = data::zeroed::<T>((hi - lo).clamp(1, BLOCK_ELEMS));
            let dsts: Vec<*mut T> = ptrs.iter().map(|&(_, d)| d as *mut T).collect();
            reduce_range(lo, hi, &mut tmp, &dsts);
            drop(snap);
            // Peers may still be writing into this rank's output.
            self.sync("all_reduce", None)?;
        }
        Ok(())
    }

    fn all_reduce_t<T: Elem>(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let len = t.elem_count();
        let src = data::data_ptr::<T>(t)?;
        let out = Arc::new(OutBuf::<T>::zeroed(len));
        let dst = out.ptr();
        let desc = self.next_desc(OpKind::AllReduce(op), Some(t.dtype()), t.dims());
        let keep: Arc<dyn Any + Send + Sync> = out.clone();
        self.all_reduce_raw(src, dst, len, desc, t.clone(), Some(keep), op)?;
        let v = take_out(out, len);
        data::from_vec(v, t.dims())
    }

    fn all_reduce_inplace_t<T: Elem>(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        let desc = self.next_desc(OpKind::AllReduce(op), Some(t.dtype()), t.dims());
        data::with_slice_mut::<T, ()>("all_reduce", t, |s| {
            let p = s.as_mut_ptr();
            self.all_reduce_raw(p, p, s.len(), desc, t.clone(), None, op)
        })
    }

    /// Reduces this rank's partition of every rank's `t` into `out` (`hi - lo` elements).
    fn reduce_scatter_fill<T: Elem>(&self, t: &Tensor, out: &mut [T], op: ReduceOp) -> Result<()> {
        let n = self.shared.n;
        let len = t.elem_count();
        let src = data::data_ptr::<T>(t)? as usize;
        let desc = self.next_desc(OpKind::ReduceScatter(op), Some(t.dtype()), t.dims());
        let snap = self.sync_checked(Entry {
            desc,
            src,
            dst: 0,
            _keep_in: Some(t.clone()),
            _keep_out: None,
        })?;
        let (lo, hi) = partition_range(len, n, self.rank);
        {
            // SAFETY: as in `all_reduce_raw`.
            let srcs: Vec<&[T]> = snap
                .iter()
                .flatten()
                .map(|e| unsafe {
                    std::slice::from_raw_parts((e.src as *const T).add(lo), hi - lo)
                })
                .collect();
            if hi > lo {
                T::reduce(out, &srcs, op);
            }
        }
        drop(snap);
        self.sync("reduce_scatter", None).map(drop)
    }

    fn reduce_scatter_t<T: Elem>(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let (lo, hi) = partition_range(t.elem_count(), self.shared.n, self.rank);
        let mut out = data::zeroed::<T>(hi - lo);
        self.reduce_scatter_fill(t, &mut out, op)?;
        data::from_vec(out, &[hi - lo])
    }

    /// Reduce onto `root`: only the root allocates the result; every rank reduces its partition
    /// of all inputs straight into the root's output (small messages: the root alone reduces the
    /// whole buffer, saving the peers' cache traffic).
    fn reduce_t<T: Elem>(&self, t: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        let n = self.shared.n;
        let len = t.elem_count();
        let src = data::data_ptr::<T>(t)? as usize;
        let out = (self.rank == root).then(|| Arc::new(OutBuf::<T>::zeroed(len)));
        let (dst, keep_out) = match &out {
            Some(o) => (
                o.ptr() as usize,
                Some(o.clone() as Arc<dyn Any + Send + Sync>),
            ),
            None => (0, None),
        };
        let desc = self.next_desc(OpKind::Reduce(op, root), Some(t.dtype()), t.dims());
        let snap = self.sync_checked(Entry {
            desc,
            src,
            dst,
            _keep_in: Some(t.clone()),
            _keep_out: keep_out,
        })?;
        let root_dst = snap[root]
            .as_ref()
            .map(|e| e.dst as *mut T)
            .filter(|p| !p.is_null())
            .ok_or_else(|| CommError::invalid("reduce", "root published no output buffer"))?;
        let (lo, hi) = if len * std::mem::size_of::<T>() <= SMALL_MESSAGE_BYTES {
            if self.rank == root {
                (0, len)
            } else {
                (0, 0)
            }
        } else {
            partition_range(len, n, self.rank)
        };
        if hi > lo {
            // SAFETY: every published input has `len` elements (checked by the descriptor) and is
            // kept alive by the snapshot; nobody writes the inputs during the collective. The
            // root's output (kept alive by the snapshot too) is a fresh buffer that aliases no
            // input, and elements [lo, hi) of it are written by this rank only.
            let srcs: Vec<&[T]> = snap
                .iter()
                .flatten()
                .map(|e| unsafe {
                    std::slice::from_raw_parts((e.src as *const T).add(lo), hi - lo)
                })
                .collect();
            let d = unsafe { std::slice::from_raw_parts_mut(root_dst.add(lo), hi - lo) };
            T::reduce(d, &srcs, op);
        }
        drop(snap);
        // After this barrier every partition of the root's output is written and no peer reads
        // this rank's input any more.
        self.sync("reduce", None)?;
        match out {
            Some(o) => Ok(Some(data::from_vec(take_out(o, len), t.dims())?)),
            None => Ok(None),
        }
    }

    /// Copies every rank's `t` into `out` (`n * len` elements), in rank order.
    fn all_gather_fill<T: Elem>(&self, t: &Tensor, out: &mut [T]) -> Result<()> {
        let len = t.elem_count();
        let src = data::data_ptr::<T>(t)? as usize;
        let desc = self.next_desc(OpKind::AllGather, Some(t.dtype()), t.dims());
        let snap = self.sync_checked(Entry {
            desc,
            src,
            dst: 0,
            _keep_in: Some(t.clone()),
            _keep_out: None,
        })?;
        for (k, e) in snap.iter().flatten().enumerate() {
            // SAFETY: as in `all_reduce_raw`.
            let s = unsafe { std::slice::from_raw_parts(e.src as *const T, len) };
            out[k * len..(k + 1) * len].copy_from_slice(s);
        }
        drop(snap);
        self.sync("all_gather", None).map(drop)
    }

    fn all_gather_t<T: Elem>(&self, t: &Tensor) -> Result<Tensor> {
        let n = self.shared.n;
        let mut out = data::zeroed::<T>(n * t.elem_count());
        self.all_gather_fill(t, &mut out)?;
        data::from_vec(out, &gathered_dims(t.dims(), n))
    }

    /// True when `out` can receive (outputs sharing the input's storage take the copying path:
    /// the in-place writer would otherwise wait on its own read lock) `len` elements of `dtype` in place.
    fn writable(out: &Tensor, dtype: DType, len: usize) -> bool {
        out.dtype() == dtype
            && out.elem_count() == len
            && out.is_contiguous()
            && out.device().is_cpu()
    }

    fn broadcast_t<T: Elem>(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let len = t.elem_count();
        let src = data::data_ptr::<T>(t)? as usize;
        let desc = self.next_desc(OpKind::Broadcast(root), Some(t.dtype()), t.dims());
        let snap = self.sync_checked(Entry {
            desc,
            src,
            dst: 0,
            _keep_in: Some(t.clone()),
            _keep_out: None,
        })?;
        let result = if self.rank == root {
            t.clone()
        } else {
            let e = snap[root]
                .as_ref()
                .ok_or_else(|| CommError::invalid("broadcast", "root published nothing"))?;
            // SAFETY: as in `all_reduce_t`.
            let s = unsafe { std::slice::from_raw_parts(e.src as *const T, len) };
            data::from_vec(s.to_vec(), t.dims())?
        };
        drop(snap);
        self.sync("broadcast", None)?;
        Ok(result)
    }

    fn check_failed(&self, op: &str) -> Result<()> {
        match &self.shared.lock().failure {
            Some(f) => Err(self.failure_for(op, f)),
            None => Ok(()),
        }
    }

    fn poison(&self, err: &CommError) {
        let mut st = self.shared.lock();
        if st.failure.is_none() {
            st.failure = Some(err.clone());
        }
        self.shared.cv.notify_all();
    }

    fn split_local(&self, color: Option<u32>, key: usize) -> Result<Option<LocalComm>> {
        let mine = [color.map(i64::from).unwrap_or(-1), key as i64];
        let seq = self.seq.load(Ordering::Relaxed);
        let t = Tensor::from_slice(&mine, 2, &candle_core::Device::Cpu)?;
        let all = self.all_gather(&t)?.to_vec1::<i64>()?;
        let Some(color) = color else {
            return Ok(None);
        };
        let mut members: Vec<(i64, usize)> = (0..self.shared.n)
            .filter(|&k| all[2 * k] == i64::from(color))
            .map(|k| (all[2 * k + 1], k))
            .collect();
        members.sort();
        let new_rank = members
            .iter()
            .position(|&(_, k)| k == self.rank)
            .ok_or_else(|| CommError::invalid("split", "rank missing from its own group"))?;
        let size = members.len();
        let mut st = self.shared.lock();
        let slot = st.groups.entry((seq, color)).or_insert_with(|| {
            LocalComm::create_with(size, self.shared.options.clone())
                .into_iter()
                .map(Some)
                .collect()
        });
        let comm = slot.get_mut(new_rank).and_then(Option::take);
        if slot.iter().all(Option::is_none) {
            st.groups.remove(&(seq, color));
        }
        drop(st);
        comm.map(Some)
            .ok_or_else(|| CommError::invalid("split", "sub-group rank already taken"))
    }
}

/// Takes the output vector back from its shared wrapper (no copy once every peer let go).
fn take_out<T: Elem>(out: Arc<OutBuf<T>>, len: usize) -> Vec<T> {
    match Arc::try_unwrap(out) {
        Ok(o) => o.cell.into_inner(),
        // Unreachable in practice (peers drop their references before the last barrier); copy
        // rather than fail.
        Err(shared) => {
            // SAFETY: all writers are done (we passed the last barrier).
            unsafe { std::slice::from_raw_parts(shared.ptr(), len) }.to_vec()
        }
    }
}

/// Shape of an all-gather result: ranks stacked along dimension 0.
pub(crate) fn gathered_dims(dims: &[usize], n: usize) -> Vec<usize> {
    if dims.is_empty() {
        vec![n]
    } else {
        let mut d = dims.to_vec();
        d[0] *= n;
        d
    }
}

fn op_name(op: OpKind) -> &'static str {
    match op {
        OpKind::AllReduce(_) => "all_reduce",
        OpKind::ReduceScatter(_) => "reduce_scatter",
        OpKind::Reduce(..) => "reduce",
        OpKind::AllGather => "all_gather",
        OpKind::Broadcast(_) => "broadcast",
        OpKind::Barrier => "barrier",
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            "panicked"
        } else {
            "exited (dropped its communicator)"
        };
        let mut st = self.shared.lock();
        if st.failure.is_none() {
            st.failure = Some(CommError::PeerFailed {
                op: "(any)".into(),
                rank: self.rank,
                peer: self.rank,
                reason: reason.into(),
            });
        }
        self.shared.cv.notify_all();
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.n
    }

    fn backend(&self) -> &'static str {
        "local"
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let t = data::cpu_contiguous("all_reduce", tensor)?;
        if self.shared.n == 1 {
            self.check_failed("all_reduce")?;
            return Ok(t);
        }
        with_elem!(t.dtype(), "all_reduce", T => self.all_reduce_t::<T>(&t, op))
    }

    fn all_reduce_inplace(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        data::check_dtype("all_reduce", tensor.dtype())?;
        if self.shared.n == 1 {
            self.check_failed("all_reduce")?;
            return if tensor.is_contiguous() && tensor.device().is_cpu() {
                Ok(())
            } else {
                Err(CommError::invalid(
                    "all_reduce",
                    "in-place collectives need a contiguous CPU tensor",
                ))
            };
        }
        with_elem!(tensor.dtype(), "all_reduce", T => self.all_reduce_inplace_t::<T>(tensor, op))
    }

    fn reduce_scatter(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let t = data::cpu_contiguous("reduce_scatter", tensor)?;
        if self.shared.n == 1 {
            self.check_failed("reduce_scatter")?;
            return Ok(t.flatten_all()?);
        }
        with_elem!(t.dtype(), "reduce_scatter", T => self.reduce_scatter_t::<T>(&t, op))
    }

    fn reduce(&self, tensor: &Tensor, op: ReduceOp, root: usize) -> Result<Option<Tensor>> {
        if root >= self.shared.n {
            return Err(CommError::invalid(
                "reduce",
                format!("root {root} out of range for world size {}", self.shared.n),
            ));
        }
        let t = data::cpu_contiguous("reduce", tensor)?;
        if self.shared.n == 1 {
            self.check_failed("reduce")?;
            return Ok(Some(t));
        }
        with_elem!(t.dtype(), "reduce", T => self.reduce_t::<T>(&t, op, root))
    }

    fn reduce_scatter_into(&self, tensor: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        let t = data::cpu_contiguous("reduce_scatter", tensor)?;
        let (lo, hi) = partition_range(t.elem_count(), self.shared.n, self.rank);
        if self.shared.n == 1
            || !Self::writable(output, t.dtype(), hi - lo)
            || data::same_storage(&t, output)
        {
            // Run the collective anyway (peers are in it), then report a bad output here.
            let r = self.reduce_scatter(&t, op)?;
            return data::copy_into("reduce_scatter", output, &r);
        }
        with_elem!(t.dtype(), "reduce_scatter", T => data::with_slice_mut::<T, ()>(
            "reduce_scatter",
            output,
            |o| self.reduce_scatter_fill::<T>(&t, o, op),
        ))
    }

    fn all_gather_into(&self, tensor: &Tensor, output: &Tensor) -> Result<()> {
        let t = data::cpu_contiguous("all_gather", tensor)?;
        let n = self.shared.n;
        if n == 1
            || !Self::writable(output, t.dtype(), n * t.elem_count())
            || data::same_storage(&t, output)
        {
            let r = self.all_gather(&t)?;
            return data::copy_into("all_gather", output, &r);
        }
        with_elem!(t.dtype(), "all_gather", T => data::with_slice_mut::<T, ()>(
            "all_gather",
            output,
            |o| self.all_gather_fill::<T>(&t, o),
        ))
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let t = data::cpu_contiguous("all_gather", tensor)?;
        if self.shared.n == 1 {
            self.check_failed("all_gather")?;
            return Ok(t.reshape(gathered_dims(t.dims(), 1))?);
        }
        with_elem!(t.dtype(), "all_gather", T => self.all_gather_t::<T>(&t))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.n {
            return Err(CommError::invalid(
                "broadcast",
                format!("root {root} out of range for world size {}", self.shared.n),
            ));
        }
        let t = data::cpu_contiguous("broadcast", tensor)?;
        if self.shared.n == 1 {
            self.check_failed("broadcast")?;
            return Ok(t);
        }
        with_elem!(t.dtype(), "broadcast", T => self.broadcast_t::<T>(&t, root))
    }

    fn barrier(&self) -> Result<()> {
        let desc = self.next_desc(OpKind::Barrier, None, &[]);
        let snap = self.sync_checked(Entry::plain(desc))?;
        drop(snap);
        Ok(())
    }

    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        if dst >= self.shared.n {
            return Err(CommError::invalid(
                "send",
                format!(
                    "destination {dst} out of range for world size {}",
                    self.shared.n
                ),
            ));
        }
        self.check_failed("send")?;
        let t = data::cpu_contiguous("send", tensor)?;
        let data: Box<dyn Any + Send> = with_elem!(t.dtype(), "send", T => data::to_vec::<T>(&t).map(|v| Box::new(v) as Box<dyn Any + Send>))?;
        let msg = Msg {
            dtype: t.dtype(),
            dims: t.dims().to_vec(),
            data,
        };
        self.to[dst].send(msg).map_err(|_| CommError::PeerFailed {
            op: "send".into(),
            rank: self.rank,
            peer: dst,
            reason: "exited (dropped its communicator)".into(),
        })
    }

    fn recv(&self, src: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
        if src >= self.shared.n {
            return Err(CommError::invalid(
                "recv",
                format!("source {src} out of range for world size {}", self.shared.n),
            ));
        }
        data::check_dtype("recv", dtype)?;
        let rx = &self.from[src];
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(_) => {
                self.check_failed("recv")?;
                match rx.recv_timeout(self.shared.options.timeout) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        let err = CommError::Timeout {
                            bytes: None,
                            op: "recv".into(),
                            rank: self.rank,
                            waiting_for: vec![src],
                            timeout: self.shared.options.timeout,
                        };
                        self.poison(&err);
                        return Err(err);
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(CommError::PeerFailed {
                            op: "recv".into(),
                            rank: self.rank,
                            peer: src,
                            reason: "exited (dropped its communicator)".into(),
                        })
                    }
                }
            }
        };
        let want: usize = dims.iter().product();
        let got: usize = msg.dims.iter().product();
        if msg.dtype != dtype || want != got {
            return Err(CommError::Mismatch {
                seq: 0,
                detail: format!(
                    "rank {} expected {:?} {:?} from rank {src}, which sent {:?} {:?}",
                    self.rank, dtype, dims, msg.dtype, msg.dims
                ),
            });
        }
        with_elem!(dtype, "recv", T => {
            match msg.data.downcast::<Vec<T>>() {
                Ok(v) => data::from_vec(*v, dims),
                Err(_) => Err(CommError::invalid("recv", "message payload has the wrong type")),
            }
        })
    }

    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        Ok(self
            .split_local(color, key)?
            .map(|c| Box::new(c) as Box<dyn Communicator>))
    }
}
