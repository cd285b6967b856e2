//! Swap files on a local disk (ZeRO-Infinity's NVMe tier): the I/O engine under
//! [`crate::offload`].
//!
//! A [`Swapper`] owns one scratch directory per rank under `nvme_path` and a pool of
//! `thread_count` I/O threads. Every transfer is split into `block_size` requests that the
//! threads serve with `pread`/`pwrite` (`queue_depth` requests queued at most), into buffers
//! aligned to 4096 bytes so that files can be opened with `O_DIRECT` (no page cache: what is
//! swapped out does not stay in memory behind the process's back). Where the filesystem refuses
//! `O_DIRECT` (tmpfs, some overlay filesystems) the files fall back to buffered I/O and
//! [`Swapper::direct`] says so. A transfer returns a [`Ticket`] at once; waiting on it gives
//! the buffer back, so reading the next chunk, computing on this one and writing the previous
//! one back run at the same time (DeepSpeed's `pipeline_read` / `pipeline_write`).
//!
//! Swap files are scratch: created at start, removed when the [`Swapper`] is dropped (and the
//! directory with them). Committed training state lives only in checkpoints.
//!
//! ```
//! use ds_zero::swap::{AioOptions, AlignedBuf, Swapper};
//!
//! let dir = std::env::temp_dir().join(format!("ds-swap-doc-{}", std::process::id()));
//! let sw = Swapper::new(&dir, 0, AioOptions::default())?;
//! let f = sw.create_file("master", 3000, 4)?;
//! let mut buf = AlignedBuf::zeroed(3000 * 4);
//! buf.as_f32_mut()[..3000].iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
//! let buf = sw.write(&f, 0, buf, 3000)?.wait()?;
//! let back = sw.read(&f, 0, AlignedBuf::zeroed(3000 * 4), 3000)?.wait()?;
//! assert_eq!(&back.as_f32()[..3000], &buf.as_f32()[..3000]);
//! drop(f);
//! drop(sw); // removes the files and the directory
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), ds_zero::ZeroError>(())
//! ```

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam::channel::{bounded, Sender};

use crate::ZeroError;

/// Alignment of buffers, file offsets and transfer lengths (`O_DIRECT`'s requirement on the
/// usual 4096-byte logical blocks).
pub const ALIGN: usize = 4096;

/// DeepSpeed's `aio` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AioOptions {
    /// Bytes per read or write request (`aio.block_size`, default 1 MiB).
    pub block_size: usize,
    /// Requests queued for the I/O threads at most (`aio.queue_depth`, default 8).
    pub queue_depth: usize,
    /// I/O threads (`aio.thread_count`, default 1).
    pub thread_count: usize,
    /// Submit requests one at a time, each waited for before the next (`aio.single_submit`).
    pub single_submit: bool,
    /// Try `O_DIRECT` (falls back to buffered I/O where the filesystem refuses it).
    pub direct: bool,
}

impl Default for AioOptions {
    fn default() -> Self {
        AioOptions {
            block_size: 1 << 20,
            queue_depth: 8,
            thread_count: 1,
            single_submit: false,
            direct: true,
        }
    }
}

/// A zero-initialised byte buffer aligned to [`ALIGN`], its length a multiple of [`ALIGN`].
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain owned memory; access goes through &/&mut.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// A zeroed buffer of at least `bytes` bytes (rounded up to [`ALIGN`]).
    pub fn zeroed(bytes: usize) -> Self {
        let len = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        // Infallible for these sizes short of memory exhaustion, which `alloc` reports.
        let layout = Layout::from_size_align(len, ALIGN).expect("aligned layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: at least [`ALIGN`] bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The buffer as f32s.
    pub fn as_f32(&self) -> &[f32] {
        bytemuck::cast_slice(self.bytes())
    }

    /// The buffer as f32s, mutable.
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }

    /// The buffer as elements of any plain type (4096-aligned, so every such cast is valid).
    pub fn as_slice<T: bytemuck::Pod>(&self) -> &[T] {
        bytemuck::cast_slice(self.bytes())
    }

    /// The buffer as elements of any plain type, mutable.
    pub fn as_slice_mut<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len, ALIGN) {
            // SAFETY: allocated with this layout in `zeroed`.
            unsafe { dealloc(self.ptr, layout) };
        }
    }
}

/// Completion state of one transfer (all its requests).
struct Done {
    state: Mutex<(usize, Option<String>)>,
    cv: Condvar,
    finished: Mutex<Option<std::time::Instant>>,
}

impl Done {
    fn finish(&self, err: Option<String>) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if g.1.is_none() {
            g.1 = err;
        }
        if g.0 == 0 {
            *self.finished.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now());
            self.cv.notify_all();
        }
    }

    fn wait(&self) -> Option<String> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 > 0 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.1.take()
    }
}

struct Request {
    file: Arc<File>,
    offset: u64,
    /// Address and length inside a buffer that the owning [`Ticket`] keeps alive until every
    /// request of the transfer has finished.
    ptr: usize,
    len: usize,
    write: bool,
    done: Arc<Done>,
}

fn serve(r: Request) {
    let res = if r.write {
        // SAFETY: the ticket keeps the buffer alive and unaliased until `done` reaches 0.
        let src = unsafe { std::slice::from_raw_parts(r.ptr as *const u8, r.len) };
        r.file.write_all_at(src, r.offset)
    } else {
        // SAFETY: as above; requests of one transfer cover disjoint ranges.
        let dst = unsafe { std::slice::from_raw_parts_mut(r.ptr as *mut u8, r.len) };
        r.file.read_exact_at(dst, r.offset)
    };
    let what = if r.write { "write" } else { "read" };
    r.done.finish(
        res.err()
            .map(|e| format!("{what} of {} bytes at offset {}: {e}", r.len, r.offset)),
    );
}

/// One transfer in flight; [`Ticket::wait`] returns its buffer.
pub struct Ticket {
    done: Arc<Done>,
    buf: Option<AlignedBuf>,
    what: String,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", self.what)
    }
}

impl Ticket {
    /// Waits for every request of the transfer; the buffer, or the first I/O error.
    pub fn wait(mut self) -> Result<AlignedBuf, ZeroError> {
        let err = self.done.wait();
        let buf = self.buf.take();
        match (err, buf) {
            (None, Some(b)) => Ok(b),
            (Some(e), _) => Err(ZeroError::Io(format!("{}: {e}", self.what))),
            (None, None) => Err(ZeroError::Io(format!(
                "{}: buffer already taken",
                self.what
            ))),
        }
    }
}

impl Ticket {
    /// [`Ticket::wait`], with the moment the last request finished (to tell time spent
    /// waiting from time the transfer took).
    pub fn wait_timed(self) -> Result<(AlignedBuf, std::time::Instant), ZeroError> {
        let done = self.done.clone();
        let b = self.wait()?;
        let at = done
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(std::time::Instant::now);
        Ok((b, at))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The I/O threads may still write into the buffer: never free it before they finish.
        let _ = self.done.wait();
    }
}

/// A swap file: `elems` elements of `elem_bytes` bytes, padded to [`ALIGN`]. Removed on drop.
#[derive(Debug)]
pub struct SwapFile {
    file: Arc<File>,
    path: PathBuf,
    elems: usize,
    elem_bytes: usize,
}

impl SwapFile {
    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Elements the file holds.
    pub fn elems(&self) -> usize {
        self.elems
    }

    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        self.elem_bytes
    }

    /// Bytes on disk (padded to [`ALIGN`]).
    pub fn disk_bytes(&self) -> u64 {
        ((self.elems * self.elem_bytes).div_ceil(ALIGN).max(1) * ALIGN) as u64
    }

    /// Maps the file read-only (for checkpoints: the kernel pages it in as the writer reads
    /// it and can drop the pages again, so saving never needs the state in anonymous memory).
    pub fn map(&self) -> Result<memmap2::Mmap, ZeroError> {
        let f = File::open(&self.path).map_err(|e| io_err(&self.path, "open for mapping", e))?;
        // SAFETY: the file is private scratch of this process; nothing truncates it while
        // mapped (it is only removed on drop of the owner, after the mapping).
        unsafe { memmap2::MmapOptions::new().map(&f) }.map_err(|e| io_err(&self.path, "map", e))
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> ZeroError {
    ZeroError::Io(format!("{what} {}: {e}", path.display()))
}

/// The per-rank swap directory and its I/O threads.
pub struct Swapper {
    dir: PathBuf,
    root: PathBuf,
    rank: usize,
    /// Further per-rank directories (files under another `nvme_path`).
    extra: Mutex<Vec<(PathBuf, PathBuf)>>,
    opts: AioOptions,
    tx: Option<Sender<Request>>,
    threads: Vec<JoinHandle<()>>,
    direct: Mutex<Option<bool>>,
}

impl std::fmt::Debug for Swapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swapper")
            .field("dir", &self.dir)
            .field("opts", &self.opts)
            .finish()
    }
}

impl Swapper {
    /// Creates `nvme_path/ds-swap-<pid>-rank<rank>` (refused when it exists) and starts the
    /// I/O threads.
    pub fn new(nvme_path: &Path, rank: usize, opts: AioOptions) -> Result<Self, ZeroError> {
        if opts.block_size == 0 || opts.queue_depth == 0 || opts.thread_count == 0 {
            return Err(ZeroError::Option(format!(
                "aio.block_size ({}), aio.queue_depth ({}) and aio.thread_count ({}) must be at least 1",
                opts.block_size, opts.queue_depth, opts.thread_count
            )));
        }
        std::fs::create_dir_all(nvme_path).map_err(|e| io_err(nvme_path, "create nvme_path", e))?;
        remove_stale(nvme_path);
        let dir = nvme_path.join(format!("ds-swap-{}-rank{rank}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| io_err(&dir, "create swap directory", e))?;
        let (tx, rx) = bounded::<Request>(opts.queue_depth);
        let threads = (0..opts.thread_count)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    for r in rx {
                        serve(r);
                    }
                })
            })
            .collect();
        Ok(Swapper {
            dir,
            root: nvme_path.to_path_buf(),
            rank,
            extra: Mutex::new(Vec::new()),
            opts,
            tx: Some(tx),
            threads,
            direct: Mutex::new(None),
        })
    }

    /// The swap directory of this rank.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The I/O options.
    pub fn options(&self) -> &AioOptions {
        &self.opts
    }

    /// Whether the files use `O_DIRECT` (`None` before the first file is created).
    pub fn direct(&self) -> Option<bool> {
        *self.direct.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a swap file of `elems` elements of `elem_bytes` bytes (sized and reserved on
    /// disk, reading as zeros, not written).
    pub fn create_file(
        &self,
        name: &str,
        elems: usize,
        elem_bytes: usize,
    ) -> Result<SwapFile, ZeroError> {
        self.create_file_in(&self.root.clone(), name, elems, elem_bytes)
    }

    /// [`Swapper::create_file`] under another `nvme_path` (its own per-rank directory, removed
    /// with this swapper).
    pub fn create_file_in(
        &self,
        nvme_path: &Path,
        name: &str,
        elems: usize,
        elem_bytes: usize,
    ) -> Result<SwapFile, ZeroError> {
        let dir = if nvme_path == self.root {
            self.dir.clone()
        } else {
            let mut ex = self.extra.lock().unwrap_or_else(|p| p.into_inner());
            match ex.iter().find(|(r, _)| r == nvme_path) {
                Some((_, d)) => d.clone(),
                None => {
                    std::fs::create_dir_all(nvme_path)
                        .map_err(|e| io_err(nvme_path, "create nvme_path", e))?;
                    let d =
                        nvme_path.join(format!("ds-swap-{}-rank{}", std::process::id(), self.rank));
                    std::fs::create_dir(&d).map_err(|e| io_err(&d, "create swap directory", e))?;
                    ex.push((nvme_path.to_path_buf(), d.clone()));
                    d
                }
            }
        };
        let path = dir.join(format!("{name}.swp"));
        let bytes = ((elems * elem_bytes).div_ceil(ALIGN).max(1) * ALIGN) as u64;
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create_new(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let mut use_direct = self.opts.direct;
        let file = if use_direct {
            match open(true) {
                Ok(f) => {
                    // Some filesystems accept the flag and fail the first transfer: probe.
                    let probe = AlignedBuf::zeroed(ALIGN);
                    let ok = f.write_all_at(probe.bytes(), 0).is_ok()
                        && f.read_exact_at(&mut AlignedBuf::zeroed(ALIGN).bytes_mut()[..], 0)
                            .is_ok();
                    if ok {
                        f
                    } else {
                        drop(f);
                        let _ = std::fs::remove_file(&path);
                        use_direct = false;
                        open(false).map_err(|e| io_err(&path, "create swap file", e))?
                    }
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                    use_direct = false;
                    open(false).map_err(|e| io_err(&path, "create swap file", e))?
                }
            }
        } else {
            open(false).map_err(|e| io_err(&path, "create swap file", e))?
        };
        // Reserve the blocks (a later ENOSPC mid-step would lose a step); sparse where the
        // filesystem cannot.
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; fallocate only changes the file's allocation.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(io_err(
                    &path,
                    &format!("reserve {bytes} bytes for swap file"),
                    e,
                ));
            }
            file.set_len(bytes)
                .map_err(|e| io_err(&path, "size swap file", e))?;
        }
        *self.direct.lock().unwrap_or_else(|p| p.into_inner()) = Some(use_direct);
        Ok(SwapFile {
            file: Arc::new(file),
            path,
            elems,
            elem_bytes,
        })
    }

    fn submit(
        &self,
        f: &SwapFile,
        elem_offset: usize,
        buf: AlignedBuf,
        elems: usize,
        write: bool,
    ) -> Result<Ticket, ZeroError> {
        let eb = f.elem_bytes;
        let what = format!(
            "{} {} elements at {elem_offset} of {}",
            if write { "swap-out of" } else { "swap-in of" },
            elems,
            f.path.display()
        );
        let off = elem_offset * eb;
        if !off.is_multiple_of(ALIGN) {
            return Err(ZeroError::Io(format!(
                "{what}: offset {off} bytes is not a multiple of {ALIGN}"
            )));
        }
        // Whole aligned blocks (the file is padded, the buffer rounded up).
        let len = (elems * eb).div_ceil(ALIGN) * ALIGN;
        if len > buf.len() || off as u64 + len as u64 > f.disk_bytes() {
            return Err(ZeroError::Io(format!(
                "{what}: {len} bytes do not fit the buffer of {} or the file of {}",
                buf.len(),
                f.disk_bytes()
            )));
        }
        let block = (self.opts.block_size.div_ceil(ALIGN) * ALIGN).max(ALIGN);
        let n = len.div_ceil(block);
        let done = Arc::new(Done {
            state: Mutex::new((n, None)),
            cv: Condvar::new(),
            finished: Mutex::new(None),
        });
        let ticket = Ticket {
            done: done.clone(),
            buf: Some(buf),
            what,
        };
        let base = ticket.buf.as_ref().map_or(0, |b| b.ptr as usize);
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| ZeroError::Io("the swap threads stopped".into()))?;
        for k in 0..n {
            let lo = k * block;
            let l = block.min(len - lo);
            let r = Request {
                file: f.file.clone(),
                offset: (off + lo) as u64,
                ptr: base + lo,
                len: l,
                write,
                done: done.clone(),
            };
            if tx.send(r).is_err() {
                // Account for the requests never sent so the ticket's wait ends.
                for _ in k..n {
                    done.finish(Some("the swap threads stopped".into()));
                }
                break;
            }
            if self.opts.single_submit {
                // One request in flight at a time.
                let g = done.state.lock().unwrap_or_else(|p| p.into_inner());
                let want = n - k - 1;
                let _g = done
                    .cv
                    .wait_while(g, |s| s.0 > want)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        Ok(ticket)
    }

    /// Starts reading `elems` elements at element `elem_offset` (aligned to [`ALIGN`] bytes)
    /// into `buf`.
    pub fn read(
        &self,
        f: &SwapFile,
        elem_offset: usize,
        buf: AlignedBuf,
        elems: usize,
    ) -> Result<Ticket, ZeroError> {
        self.submit(f, elem_offset, buf, elems, false)
    }

    /// Starts writing the first `elems` elements of `buf` at element `elem_offset` (aligned
    /// to [`ALIGN`] bytes; the padding up to the next [`ALIGN`] is written too).
    pub fn write(
        &self,
        f: &SwapFile,
        elem_offset: usize,
        buf: AlignedBuf,
        elems: usize,
    ) -> Result<Ticket, ZeroError> {
        self.submit(f, elem_offset, buf, elems, true)
    }

    /// Reads elements `lo..hi` (any alignment) of a file: the covering aligned range is read
    /// and `(buffer, index of element lo in it)` returned.
    pub fn read_range(
        &self,
        f: &SwapFile,
        lo: usize,
        hi: usize,
    ) -> Result<(Ticket, usize), ZeroError> {
        let per = ALIGN / f.elem_bytes;
        let a = lo / per * per;
        let n = hi.max(lo) - a;
        let t = self.read(f, a, AlignedBuf::zeroed(n * f.elem_bytes), n)?;
        Ok((t, lo - a))
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        for (_, d) in self
            .extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Removes swap directories left by processes of this machine that no longer run (a job
/// killed with SIGKILL cannot remove its own): `ds-swap-<pid>-rank<r>` whose pid has no
/// `/proc/<pid>`. Swap files are scratch, never the only copy of committed state.
fn remove_stale(nvme_path: &Path) {
    let Ok(rd) = std::fs::read_dir(nvme_path) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ds-swap-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Free bytes for an unprivileged user on the filesystem holding `path` (the nearest existing
/// ancestor).
pub fn free_disk_bytes(path: &Path) -> Result<u64, ZeroError> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    if p.as_os_str().is_empty() {
        p = PathBuf::from(".");
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| ZeroError::Io(format!("path {} holds a NUL byte", p.display())))?;
    // SAFETY: statvfs writes into a zeroed struct; c is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io_err(&p, "statvfs", std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ds-swap-test-{name}-{}", std::process::id()))
    }

    /// Round trips through requests of several block sizes, thread counts and submit modes,
    /// with offsets past the first block, and unaligned range reads.
    #[test]
    fn round_trip_every_mode() {
        for (block, threads, qd, single) in [
            (4096usize, 1usize, 1usize, false),
            (8192, 3, 2, false),
            (1 << 20, 2, 8, true),
        ] {
            let dir = tmp(&format!("rt{block}"));
            let opts = AioOptions {
                block_size: block,
                queue_depth: qd,
                thread_count: threads,
                single_submit: single,
                direct: true,
            };
            let sw = Swapper::new(&dir, 1, opts).unwrap();
            let n = 50_000usize;
            let f = sw.create_file("x", n, 4).unwrap();
            let mut b = AlignedBuf::zeroed(n * 4);
            for (i, x) in b.as_f32_mut()[..n].iter_mut().enumerate() {
                *x = (i as f32).sqrt();
            }
            let b = sw.write(&f, 0, b, n).unwrap().wait().unwrap();
            // A second write at an aligned offset overwrites only its range.
            let mut c = AlignedBuf::zeroed(2048 * 4);
            c.as_f32_mut().iter_mut().for_each(|x| *x = -1.0);
            sw.write(&f, 2048, c, 2048).unwrap().wait().unwrap();
            let (t, skip) = sw.read_range(&f, 1000, 4100).unwrap();
            let r = t.wait().unwrap();
            let got = &r.as_f32()[skip..skip + 3100];
            for (k, &g) in got.iter().enumerate() {
                let i = 1000 + k;
                let want = if (2048..4096).contains(&i) {
                    -1.0
                } else {
                    b.as_f32()[i]
                };
                assert_eq!(g, want, "element {i} with block {block}");
            }
            assert!(sw.direct().is_some());
            let path = f.path().to_path_buf();
            drop(f);
            assert!(!path.exists(), "the swap file is removed with its handle");
            drop(sw);
            assert!(!dir
                .join(format!("ds-swap-{}-rank1", std::process::id()))
                .exists());
            std::fs::remove_dir_all(&dir).ok();
        }
    }

    /// Misaligned offsets and transfers past the end of a file are refused, not corrupting.
    #[test]
    fn refuses_misaligned_and_oversized() {
        let dir = tmp("bad");
        let sw = Swapper::new(&dir, 0, AioOptions::default()).unwrap();
        let f = sw.create_file("x", 1000, 4).unwrap();
        let e = sw.read(&f, 3, AlignedBuf::zeroed(4096), 10).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 4096"), "{e}");
        let e = sw.read(&f, 0, AlignedBuf::zeroed(8192), 2000).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        drop(f);
        drop(sw);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn free_disk_space_is_reported() {
        let b = free_disk_bytes(&std::env::temp_dir().join("no/such/dir")).unwrap();
        assert!(b > 0);
    }
}
