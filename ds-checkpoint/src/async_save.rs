//! Asynchronous saving (DeepSpeed's decoupled checkpoint engine).

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::{CheckpointError, Result};
use crate::store::{CheckpointStore, FsCheckpointStore, SaveRequest};

type Job = Box<dyn FnOnce() -> Result<()> + Send + 'static>;

/// Lowers the calling thread's scheduling priority (Linux: nice +10 for this thread only),
/// so a background write takes CPU time the training threads leave idle rather than theirs.
/// Best effort: failure changes nothing.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id; no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// A background writer: [`AsyncSaver::save`] copies the state into owned host buffers and
/// returns; a worker thread writes it while training continues.
///
/// At most one save is in flight: the next `save` (or [`AsyncSaver::wait`]) first waits for
/// the previous one and returns its error, so a failed write is never lost silently.
pub struct AsyncSaver {
    tx: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Result<()>>,
    in_flight: bool,
    /// The result of the last job, taken by [`AsyncSaver::poll`] and not yet returned by
    /// [`AsyncSaver::wait`].
    finished: Option<Result<()>>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AsyncSaver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncSaver")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Default for AsyncSaver {
    fn default() -> Self {
        Self::new()
    }
}

impl AsyncSaver {
    /// Starts the writer thread.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("ds-checkpoint-writer".into())
            .spawn(move || {
                lower_priority();
                for job in rx {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                        .unwrap_or_else(|_| {
                            Err(CheckpointError::Async("the writer panicked".into()))
                        });
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
            })
            .ok();
        AsyncSaver {
            tx: Some(tx),
            done,
            in_flight: false,
            finished: None,
            worker,
        }
    }

    /// Copies `request` and saves it to `store` under `tag` in the background. Returns the
    /// error of the previous save, if it failed (this save is then not started).
    pub fn save(
        &mut self,
        store: &FsCheckpointStore,
        tag: &str,
        request: SaveRequest<'_>,
    ) -> Result<()> {
        crate::store::validate_tag(tag)?;
        self.wait()?;
        let owned = request.into_owned();
        let store = store.clone();
        let tag = tag.to_string();
        self.submit(Box::new(move || store.save(&tag, &owned)))
    }

    /// Runs any job on the writer thread (e.g. one rank's `save_collective` with owned
    /// buffers and a `Send` barrier). Waits for the previous job first and returns its error.
    pub fn submit(&mut self, job: Box<dyn FnOnce() -> Result<()> + Send + 'static>) -> Result<()> {
        self.wait()?;
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| CheckpointError::Async("writer stopped".into()))?;
        if self.worker.is_none() || tx.send(job).is_err() {
            return Err(CheckpointError::Async(
                "the writer thread is not running".into(),
            ));
        }
        self.in_flight = true;
        Ok(())
    }

    /// Whether a save is still being written (as of the last [`AsyncSaver::poll`] or
    /// [`AsyncSaver::wait`]).
    pub fn in_flight(&self) -> bool {
        self.in_flight && self.finished.is_none()
    }

    /// Without blocking: `true` when no job is running (the last one's result is kept for the
    /// next [`AsyncSaver::wait`], so an error is never lost), `false` while one is.
    pub fn poll(&mut self) -> bool {
        if !self.in_flight || self.finished.is_some() {
            return true;
        }
        match self.done.try_recv() {
            Ok(r) => {
                self.finished = Some(r);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.finished = Some(Err(CheckpointError::Async("the writer thread died".into())));
                true
            }
        }
    }

    /// Blocks until the in-flight save (if any) is on disk; returns its error.
    pub fn wait(&mut self) -> Result<()> {
        if !self.in_flight {
            return Ok(());
        }
        self.in_flight = false;
        if let Some(r) = self.finished.take() {
            return r;
        }
        match self.done.recv() {
            Ok(r) => r,
            Err(_) => Err(CheckpointError::Async("the writer thread died".into())),
        }
    }
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        let _ = self.wait();
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
