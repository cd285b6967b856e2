//! ZeRO-Infinity: optimizer state and parameters swapped to a local disk
//! (`offload_optimizer.device = "nvme"`, `offload_param.device = "nvme"`).
//!
//! - **Optimizer state on disk** (stages 1-3): this rank's fp32 master part and the optimizer's
//!   moments live in swap files. [`crate::ZeroOptimizer::step`] streams them through the fused
//!   optimizer in chunks of [`NvmeOptions::chunk_elems`]: chunk `k + 1` is read while chunk `k`
//!   is updated and chunk `k - 1` written back (`pipeline_read`, `pipeline_write`), with
//!   `buffer_count` chunk buffers in memory at most. The reduced gradients stay in memory.
//!   The model weights handed out by the gather calls are a 16-bit (or fp32) copy kept in
//!   memory, updated chunk by chunk during the step.
//! - **Parameters on disk** (stage 3): the model-dtype copy of this rank's shard lives in a swap
//!   file too (in fp32 with the optimizer on disk, the master file itself: no second copy), but
//!   its first `max_in_cpu` elements, which stay in memory. A block's parameters are read when
//!   the block is gathered, the next block's read started while the current one computes
//!   ([`crate::ZeroOptimizer::prefetch_param_range`]).
//!
//! The arithmetic is the in-memory optimizer's, element for element, so an offloaded run is
//! bitwise equal to an in-memory one. Lamb (whole-parameter norms in a second pass) is refused.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use half::{bf16, f16};

use crate::swap::{AioOptions, AlignedBuf, SwapFile, Swapper, Ticket, ALIGN};
use crate::zero::Wire;
use crate::ZeroError;

/// Where and how a [`crate::ZeroOptimizer`] swaps to disk.
#[derive(Debug, Clone, PartialEq)]
pub struct NvmeOptions {
    /// Directory for the optimizer's swap files (`offload_optimizer.nvme_path`); `None` keeps
    /// the master weights and optimizer state in memory.
    pub optimizer_path: Option<PathBuf>,
    /// Directory for the parameters' swap file (`offload_param.nvme_path`, stage 3 only);
    /// `None` keeps the model-dtype parameters in memory.
    pub param_path: Option<PathBuf>,
    /// Chunk buffers in memory at most during the step (`offload_optimizer.buffer_count`).
    pub buffer_count: usize,
    /// Elements per swapped chunk (rounded up to a multiple of 2048).
    pub chunk_elems: usize,
    /// Read the next chunk while updating this one (`offload_optimizer.pipeline_read`).
    pub pipeline_read: bool,
    /// Write a chunk back while updating the next (`offload_optimizer.pipeline_write`).
    pub pipeline_write: bool,
    /// Parameter elements of the shard kept in memory with parameter offload
    /// (`offload_param.max_in_cpu`): the first ones in parameter order (embeddings first).
    pub max_in_cpu: usize,
    /// The `aio` section.
    pub aio: AioOptions,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        NvmeOptions {
            optimizer_path: None,
            param_path: None,
            buffer_count: 4,
            chunk_elems: 1 << 24,
            pipeline_read: true,
            pipeline_write: true,
            max_in_cpu: 1_000_000_000,
            aio: AioOptions::default(),
        }
    }
}

impl NvmeOptions {
    /// Whether anything goes to disk.
    pub fn any(&self) -> bool {
        self.optimizer_path.is_some() || self.param_path.is_some()
    }

    /// The chunk length used (a multiple of 2048 elements: aligned for f32 and 16-bit files).
    pub fn chunk(&self) -> usize {
        self.chunk_elems.max(1).div_ceil(2048) * 2048
    }

    /// Bytes on disk per rank for a part of `len` elements with `nstate` optimizer buffers and
    /// `model_bytes` bytes per model weight.
    pub fn disk_bytes(&self, len: usize, nstate: usize, model_bytes: usize) -> u64 {
        let pad = |b: usize| (b.div_ceil(ALIGN) * ALIGN) as u64;
        let mut total = 0;
        if self.optimizer_path.is_some() {
            total += (1 + nstate as u64) * pad(4 * len);
        }
        if self.param_path.is_some() && !(self.optimizer_path.is_some() && model_bytes == 4) {
            total += pad(model_bytes * len);
        }
        total
    }
}

/// Disk traffic and time of the swap so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SwapStats {
    /// Bytes read from the swap files.
    pub bytes_read: u64,
    /// Bytes written to the swap files.
    pub bytes_written: u64,
    /// Seconds of the optimizer steps not spent updating (waiting for reads and writes, or
    /// for room in the request queue): the I/O not hidden behind the update.
    pub step_io_wait_s: f64,
    /// Seconds of the last optimizer step, all of it.
    pub last_step_s: f64,
    /// Seconds of all optimizer steps so far.
    pub step_s: f64,
    /// Seconds gathers waited for parameter reads.
    pub param_wait_s: f64,
    /// Seconds parameter reads took in all (waited for or hidden behind compute).
    pub param_read_s: f64,
}

/// Model-dtype parameter values in memory.
#[derive(Debug)]
pub(crate) enum ParamMem {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl ParamMem {
    fn new(model_bytes: usize, bf: bool, len: usize) -> Self {
        match (model_bytes, bf) {
            (4, _) => ParamMem::F32(vec![0.0; len]),
            (_, true) => ParamMem::Bf16(vec![bf16::ZERO; len]),
            _ => ParamMem::F16(vec![f16::ZERO; len]),
        }
    }

    fn slice<T: Wire>(&self, r: Range<usize>) -> Result<&[T], ZeroError> {
        let bad = || ZeroError::State("parameter copy of another dtype".into());
        match self {
            ParamMem::F32(v) => bytemuck::try_cast_slice(&v[r]).map_err(|_| bad()),
            ParamMem::F16(v) => bytemuck::try_cast_slice(&v[r]).map_err(|_| bad()),
            ParamMem::Bf16(v) => bytemuck::try_cast_slice(&v[r]).map_err(|_| bad()),
        }
    }

    /// Stores `src` (fp32 masters) rounded to the model dtype at `at`.
    fn put(&mut self, at: usize, src: &[f32]) {
        match self {
            ParamMem::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            ParamMem::F16(v) => v[at..at + src.len()]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = f16::from_f32(s)),
            ParamMem::Bf16(v) => v[at..at + src.len()]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = bf16::from_f32(s)),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            ParamMem::F32(v) => 4 * v.len(),
            ParamMem::F16(v) => 2 * v.len(),
            ParamMem::Bf16(v) => 2 * v.len(),
        }
    }
}

/// A parameter read started ahead: (shard range, ticket, index of its first element in the
/// buffer, start time).
type Prefetch = (Range<usize>, Ticket, usize, Instant);

/// The update of one chunk: (masters, gradients, optimizer state buffers).
pub(crate) type ChunkUpdate<'a> = dyn FnMut(&mut [f32], &[f32], &mut [&mut [f32]]) + 'a;

/// The swapped state of one [`crate::ZeroOptimizer`].
pub(crate) struct Offload {
    pub(crate) opts: NvmeOptions,
    sw: Swapper,
    /// Length of this rank's part.
    pub(crate) len: usize,
    /// fp32 master part (optimizer offload).
    master: Option<SwapFile>,
    /// Optimizer state buffers (optimizer offload).
    state: Vec<SwapFile>,
    /// Model-dtype parameter file (parameter offload), `None` when it is the master file.
    pfile: Option<SwapFile>,
    /// Parameters on disk at all.
    params_on_disk: bool,
    /// Model-dtype parameters in memory: all of them, or the first `resident` elements.
    pmem: ParamMem,
    resident: usize,
    model_bytes: usize,
    /// A parameter read started ahead: (shard range read, ticket, index of its first element).
    prefetch: Mutex<Option<Prefetch>>,
    /// Read-only maps of the master and state files, for checkpoints (mapping costs nothing
    /// until read; [`Offload::release_views`] drops the pages again).
    maps: Vec<memmap2::Mmap>,
    pub(crate) stats: Mutex<SwapStats>,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("opts", &self.opts)
            .field("len", &self.len)
            .field("dir", &self.sw.dir())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Offload {
    /// Creates the swap files for a part of `len` elements after checking the disk's room.
    pub(crate) fn new(
        opts: NvmeOptions,
        rank: usize,
        len: usize,
        nstate: usize,
        model_bytes: usize,
        bf: bool,
        stage: u8,
    ) -> Result<Self, ZeroError> {
        if opts.param_path.is_some() && stage != 3 {
            return Err(ZeroError::Option(format!(
                "parameter offload to NVMe needs ZeRO stage 3, not {stage}"
            )));
        }
        if opts.buffer_count == 0 {
            return Err(ZeroError::Option(
                "offload_optimizer.buffer_count must be at least 1".into(),
            ));
        }
        let root = opts
            .optimizer_path
            .clone()
            .or_else(|| opts.param_path.clone())
            .ok_or_else(|| ZeroError::Option("NVMe offload without a path".into()))?;
        // Room on the disk(s), with the byte counts.
        let need_opt = NvmeOptions {
            param_path: None,
            ..opts.clone()
        }
        .disk_bytes(len, nstate, model_bytes);
        let need_par = opts.disk_bytes(len, nstate, model_bytes) - need_opt;
        for (path, need) in [
            (opts.optimizer_path.as_ref(), need_opt),
            (opts.param_path.as_ref(), need_par),
        ] {
            let Some(p) = path else { continue };
            // Both on one filesystem: the sum must fit.
            let need = if opts.optimizer_path == opts.param_path {
                need_opt + need_par
            } else {
                need
            };
            let free = crate::swap::free_disk_bytes(p)?;
            if need > free {
                return Err(ZeroError::Io(format!(
                    "NVMe offload needs {need} bytes ({:.2} GiB) of swap files on rank {rank} under {} but its filesystem has {free} bytes ({:.2} GiB) free",
                    need as f64 / (1u64 << 30) as f64,
                    p.display(),
                    free as f64 / (1u64 << 30) as f64
                )));
            }
        }
        let sw = Swapper::new(&root, rank, opts.aio)?;
        let mut master = None;
        let mut state = Vec::new();
        if opts.optimizer_path.is_some() {
            master = Some(sw.create_file("fp32_master", len, 4)?);
            for k in 0..nstate {
                state.push(sw.create_file(&format!("optimizer_state{k}"), len, 4)?);
            }
        }
        let params_on_disk = opts.param_path.is_some();
        let pfile = if params_on_disk && !(master.is_some() && model_bytes == 4) {
            let dir = opts.param_path.clone().unwrap_or_default();
            Some(sw.create_file_in(&dir, "params", len, model_bytes)?)
        } else {
            None
        };
        let mut maps = Vec::new();
        for f in master.iter().chain(state.iter()) {
            maps.push(f.map()?);
        }
        let resident = if params_on_disk {
            opts.max_in_cpu.min(len)
        } else {
            len
        };
        Ok(Offload {
            pmem: ParamMem::new(model_bytes, bf, resident),
            opts,
            sw,
            len,
            master,
            state,
            pfile,
            params_on_disk,
            resident,
            model_bytes,
            prefetch: Mutex::new(None),
            maps,
            stats: Mutex::new(SwapStats::default()),
        })
    }

    pub(crate) fn optimizer_on_disk(&self) -> bool {
        self.master.is_some()
    }

    pub(crate) fn params_on_disk(&self) -> bool {
        self.params_on_disk
    }

    /// Bytes of model-dtype parameters held in memory.
    pub(crate) fn resident_param_bytes(&self) -> usize {
        self.pmem.bytes()
    }

    /// The swap directory.
    pub(crate) fn dir(&self) -> &std::path::Path {
        self.sw.dir()
    }

    /// Whether the files use O_DIRECT.
    pub(crate) fn direct(&self) -> Option<bool> {
        self.sw.direct()
    }

    /// Writes chunk `[lo, lo + m.len())`: masters (and optimizer state when given: zeros
    /// otherwise, which a fresh file already reads as), and publishes the model-dtype copy.
    /// Synchronous: used at initialisation and on checkpoint load.
    pub(crate) fn put_chunk(
        &mut self,
        lo: usize,
        m: &[f32],
        states: Option<&[&[f32]]>,
    ) -> Result<(), ZeroError> {
        let n = m.len();
        if let Some(f) = &self.master {
            let mut b = AlignedBuf::zeroed(4 * n);
            b.as_f32_mut()[..n].copy_from_slice(m);
            self.sw.write(f, lo, b, n)?.wait()?;
            if let Some(st) = states {
                for (f, s) in self.state.iter().zip(st) {
                    let mut b = AlignedBuf::zeroed(4 * n);
                    b.as_f32_mut()[..n].copy_from_slice(&s[..n]);
                    self.sw.write(f, lo, b, n)?.wait()?;
                }
            }
            lock(&self.stats).bytes_written += (4 * n * (1 + states.map_or(0, |s| s.len()))) as u64;
        }
        let t = publish(
            &mut self.pmem,
            self.resident,
            self.pfile.as_ref(),
            &self.sw,
            self.model_bytes,
            lo,
            m,
        )?;
        if let Some(t) = t {
            lock(&self.stats).bytes_written += (self.model_bytes * n) as u64;
            t.wait()?;
        }
        Ok(())
    }

    /// Writes a whole part (masters and optimizer state) chunk by chunk, publishing the
    /// model-dtype copy: checkpoint load. Without optimizer offload only the copy is
    /// published.
    pub(crate) fn load_part(&mut self, m: &[f32], states: &[&[f32]]) -> Result<(), ZeroError> {
        *lock(&self.prefetch) = None;
        let c = self.opts.chunk();
        let mut lo = 0;
        while lo < m.len() {
            let hi = (lo + c).min(m.len());
            let st: Vec<&[f32]> = states.iter().map(|s| &s[lo..hi]).collect();
            self.put_chunk(lo, &m[lo..hi], Some(&st))?;
            lo = hi;
        }
        Ok(())
    }

    /// The model-dtype values of shard elements `a..b`: from memory, the parameter file, or
    /// a read started ahead by [`Offload::prefetch`].
    pub(crate) fn piece<T: Wire>(&self, a: usize, b: usize) -> Result<Cow<'_, [T]>, ZeroError> {
        if b <= self.resident {
            return Ok(Cow::Borrowed(self.pmem.slice::<T>(a..b)?));
        }
        let d0 = a.max(self.resident);
        let t0 = Instant::now();
        let hit = {
            let mut g = lock(&self.prefetch);
            match g.take() {
                Some((r, t, skip, started)) if r == (d0..b) => Some((t, skip, started)),
                other => {
                    *g = other;
                    None
                }
            }
        };
        let (t, skip, started) = match hit {
            Some(x) => x,
            None => {
                let (t, skip) = self.read_params(d0, b)?;
                (t, skip, t0)
            }
        };
        let (buf, done_at) = t.wait_timed()?;
        {
            let mut s = lock(&self.stats);
            s.param_wait_s += t0.elapsed().as_secs_f64();
            s.param_read_s += done_at.saturating_duration_since(started).as_secs_f64();
            s.bytes_read += ((b - d0) * std::mem::size_of::<T>()) as u64;
        }
        let disk = &buf.as_slice::<T>()[skip..skip + (b - d0)];
        if a < self.resident {
            let mut v = self.pmem.slice::<T>(a..self.resident)?.to_vec();
            v.extend_from_slice(disk);
            Ok(Cow::Owned(v))
        } else {
            Ok(Cow::Owned(disk.to_vec()))
        }
    }

    fn read_params(&self, a: usize, b: usize) -> Result<(Ticket, usize), ZeroError> {
        let f = match (&self.pfile, &self.master) {
            (Some(f), _) => f,
            (None, Some(m)) if self.model_bytes == 4 => m,
            _ => {
                return Err(ZeroError::State(
                    "parameters are not on disk on this rank".into(),
                ))
            }
        };
        self.sw.read_range(f, a, b)
    }

    /// Starts reading shard elements `a..b` (the part not resident) for a later
    /// [`Offload::piece`] of the same range.
    pub(crate) fn prefetch(&self, a: usize, b: usize) -> Result<(), ZeroError> {
        if !self.params_on_disk || b <= self.resident {
            return Ok(());
        }
        let d0 = a.max(self.resident);
        let started = Instant::now();
        let (t, skip) = self.read_params(d0, b)?;
        *lock(&self.prefetch) = Some((d0..b, t, skip, started));
        Ok(())
    }

    /// The masters (index 0) and optimizer state buffers as read-only maps of the swap files.
    pub(crate) fn view(&self, k: usize) -> &[f32] {
        self.maps
            .get(k)
            .and_then(|m| m.get(..4 * self.len))
            .and_then(|b| bytemuck::try_cast_slice(b).ok())
            .unwrap_or(&[])
    }

    /// Drops the pages a checkpoint save read through the maps from this process.
    pub(crate) fn release_views(&self) {
        for m in &self.maps {
            // SAFETY: read-only private file maps: dropped pages are read again from the file.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// One optimizer step over the swapped part: `update(master, grads, states)` per chunk;
    /// the updated chunk's model-dtype copy is published (memory and parameter file) before it
    /// is written back.
    pub(crate) fn step(
        &mut self,
        grads: &[f32],
        update: &mut ChunkUpdate<'_>,
    ) -> Result<(), ZeroError> {
        let t0 = Instant::now();
        let Offload {
            opts,
            sw,
            len,
            master,
            state,
            pfile,
            pmem,
            resident,
            model_bytes,
            stats,
            ..
        } = self;
        let Some(mf) = master.as_ref() else {
            return Err(ZeroError::State("step on a part not swapped".into()));
        };
        let c = opts.chunk();
        let n = *len;
        let nchunks = n.div_ceil(c);
        let slots = opts.buffer_count.min(nchunks).max(1);
        let files: Vec<&SwapFile> = std::iter::once(mf).chain(state.iter()).collect();
        let mut free: Vec<Vec<AlignedBuf>> = (0..slots)
            .map(|_| files.iter().map(|_| AlignedBuf::zeroed(4 * c)).collect())
            .collect();
        let mut reads: VecDeque<Vec<Ticket>> = VecDeque::new();
        let mut writes: VecDeque<(Vec<Ticket>, Option<Ticket>)> = VecDeque::new();
        let mut compute_s = 0.0;
        let mut next = 0usize;
        let mut bytes_w = 0u64;
        let span = |k: usize| (k * c, ((k + 1) * c).min(n));
        // Waits for the oldest write and returns its buffers.
        let reclaim = |writes: &mut VecDeque<(Vec<Ticket>, Option<Ticket>)>|
         -> Result<Option<Vec<AlignedBuf>>, ZeroError> {
            let Some((ts, pt)) = writes.pop_front() else {
                return Ok(None);
            };
            let bufs = ts
                .into_iter()
                .map(|t| t.wait())
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(pt) = pt {
                pt.wait()?;
            }
            Ok(Some(bufs))
        };
        // Starts reading chunk `k` of every file into `bufs`.
        let start_read = |k: usize, bufs: Vec<AlignedBuf>| -> Result<Vec<Ticket>, ZeroError> {
            let (lo, hi) = span(k);
            files
                .iter()
                .zip(bufs)
                .map(|(f, b)| sw.read(f, lo, b, hi - lo))
                .collect()
        };
        for k in 0..nchunks {
            // Chunk k's read (issued ahead with pipeline_read, else now).
            if next <= k {
                let bufs = match free.pop() {
                    Some(b) => b,
                    None => reclaim(&mut writes)?
                        .ok_or_else(|| ZeroError::Io("swap pipeline: no buffer".into()))?,
                };
                reads.push_back(start_read(k, bufs)?);
                next = k + 1;
            }
            let Some(ts) = reads.pop_front() else {
                return Err(ZeroError::Io("swap pipeline: no read in flight".into()));
            };
            let mut bufs = ts
                .into_iter()
                .map(|t| t.wait())
                .collect::<Result<Vec<_>, _>>()?;
            if opts.pipeline_read {
                // Keep reads ahead in the free buffers, and at least one in flight.
                while next < nchunks && (!free.is_empty() || reads.is_empty()) {
                    let b = match free.pop() {
                        Some(b) => b,
                        None => match reclaim(&mut writes)? {
                            Some(b) => b,
                            None => break,
                        },
                    };
                    reads.push_back(start_read(next, b)?);
                    next += 1;
                }
            }
            let (lo, hi) = span(k);
            let m = hi - lo;
            let tc = Instant::now();
            {
                let (mb, rest) = bufs.split_at_mut(1);
                let mut st: Vec<&mut [f32]> =
                    rest.iter_mut().map(|b| &mut b.as_f32_mut()[..m]).collect();
                update(&mut mb[0].as_f32_mut()[..m], &grads[lo..hi], &mut st);
            }
            let pt = publish(
                pmem,
                *resident,
                pfile.as_ref(),
                sw,
                *model_bytes,
                lo,
                &bufs[0].as_f32()[..m],
            )?;
            compute_s += tc.elapsed().as_secs_f64();
            if pt.is_some() {
                bytes_w += (*model_bytes * m) as u64;
            }
            let ts = files
                .iter()
                .zip(bufs)
                .map(|(f, b)| sw.write(f, lo, b, m))
                .collect::<Result<Vec<_>, _>>()?;
            writes.push_back((ts, pt));
            if !opts.pipeline_write {
                while let Some(b) = reclaim(&mut writes)? {
                    free.push(b);
                }
            }
        }
        while reclaim(&mut writes)?.is_some() {}
        // Every chunk of every file read once and written once.
        let bytes_r = (4 * n * files.len()) as u64;
        bytes_w += bytes_r;
        let mut s = lock(stats);
        s.bytes_read += bytes_r;
        s.bytes_written += bytes_w;
        let total = t0.elapsed().as_secs_f64();
        // Everything that was not the update itself: waits for reads and writes, and
        // submissions blocked on a full queue.
        s.step_io_wait_s += (total - compute_s).max(0.0);
        s.last_step_s = total;
        s.step_s += total;
        Ok(())
    }
}

/// Publishes the model-dtype values of masters `m` at shard offset `lo`: into memory (the
/// resident part) and, with parameter offload, into the parameter file (the returned write).
fn publish(
    pmem: &mut ParamMem,
    resident: usize,
    pfile: Option<&SwapFile>,
    sw: &Swapper,
    model_bytes: usize,
    lo: usize,
    m: &[f32],
) -> Result<Option<Ticket>, ZeroError> {
    let hi = lo + m.len();
    if lo < resident {
        let e = hi.min(resident);
        pmem.put(lo, &m[..e - lo]);
    }
    let Some(f) = pfile else {
        return Ok(None);
    };
    let n = m.len();
    let mut b = AlignedBuf::zeroed(model_bytes * n);
    match (model_bytes, &*pmem) {
        (4, _) => b.as_f32_mut()[..n].copy_from_slice(m),
        (_, ParamMem::Bf16(_)) => b.as_slice_mut::<bf16>()[..n]
            .iter_mut()
            .zip(m)
            .for_each(|(d, &s)| *d = bf16::from_f32(s)),
        _ => b.as_slice_mut::<f16>()[..n]
            .iter_mut()
            .zip(m)
            .for_each(|(d, &s)| *d = f16::from_f32(s)),
    }
    Ok(Some(sw.write(f, lo, b, n)?))
}
