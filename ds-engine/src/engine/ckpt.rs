//! Checkpoints of an [`Engine`]: synchronous and decoupled (asynchronous) saves, ZeRO-3
//! layouts, resharding loads, and DeepSpeed's `checkpoint.tag_validation` across ranks.

use std::borrow::Cow;

use candle_core::{Device, Tensor};
use ds_checkpoint::{
    AsyncSaver, CheckpointError, CheckpointMeta, CheckpointStore, RankShard, Segment,
};
use ds_comm::{Communicator, ReduceOp};
use ds_config::ResolvedConfig;

use super::Engine;
use crate::EngineError;

fn ck(e: CheckpointError) -> EngineError {
    EngineError::Checkpoint(e.to_string())
}

/// DeepSpeed's `checkpoint.tag_validation`: what to do when ranks save under different tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagValidation {
    /// Do not compare (no collective).
    Ignore,
    /// Compare; on a mismatch print a warning and save under rank 0's tag.
    Warn,
    /// Compare; on a mismatch every rank fails with an error naming the tags.
    Fail,
}

impl TagValidation {
    /// From the config's (case-insensitive) `Ignore`/`Warn`/`Fail`.
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        match s.to_ascii_lowercase().as_str() {
            "ignore" => Ok(TagValidation::Ignore),
            "warn" => Ok(TagValidation::Warn),
            "fail" => Ok(TagValidation::Fail),
            _ => Err(EngineError::Config(format!(
                "checkpoint.tag_validation = {s:?}: allowed: Ignore, Warn, Fail"
            ))),
        }
    }
}

/// Compares `tag` across ranks (a collective unless `mode` is `Ignore`): the MIN and MAX of
/// every rank's 64-bit tag fingerprint are all-reduced; when they differ, `Fail` returns an
/// error on every rank and `Warn` prints a warning (rank 0) and returns rank 0's tag
/// (broadcast), so every rank saves into the same checkpoint. Returns the tag to save under.
pub fn validate_tag_across_ranks(
    comm: &dyn Communicator,
    tag: &str,
    mode: TagValidation,
) -> Result<String, EngineError> {
    if mode == TagValidation::Ignore || comm.world_size() == 1 {
        return Ok(tag.to_string());
    }
    let h = ds_checkpoint::tag_fingerprint(tag) as i64;
    let t = Tensor::from_vec(vec![h], 1, &Device::Cpu)?;
    let lo = comm.all_reduce(&t, ReduceOp::Min)?.to_vec1::<i64>()?[0];
    let hi = comm.all_reduce(&t, ReduceOp::Max)?.to_vec1::<i64>()?[0];
    if lo == hi {
        return Ok(tag.to_string());
    }
    // Rank 0's tag, for the message (Fail) or to save under (Warn).
    let bytes = tag.as_bytes();
    let len = comm
        .broadcast(
            &Tensor::from_vec(vec![bytes.len() as i64], 1, &Device::Cpu)?,
            0,
        )?
        .to_vec1::<i64>()?[0] as usize;
    let mine: Vec<u8> = if comm.rank() == 0 {
        bytes.to_vec()
    } else {
        vec![0; len]
    };
    let root = comm
        .broadcast(&Tensor::from_vec(mine, len, &Device::Cpu)?, 0)?
        .to_vec1::<u8>()?;
    let root = String::from_utf8_lossy(&root).into_owned();
    let msg = format!(
        "checkpoint tags differ across ranks: rank {} passed {tag:?}, rank 0 passed {root:?} (checkpoint.tag_validation)",
        comm.rank()
    );
    match mode {
        TagValidation::Fail => Err(EngineError::Checkpoint(msg)),
        _ => {
            if comm.rank() == 0 {
                eprintln!("warning: checkpoint tags differ across ranks; saving every rank under rank 0's tag {root:?} (checkpoint.tag_validation = Warn)");
            } else if root != tag {
                eprintln!("warning: {msg}; saving under {root:?}");
            }
            Ok(root)
        }
    }
}

/// A decoupled save whose rank files are being written; committed (manifest, rename,
/// `latest`) by rank 0 once every rank's writer has finished.
struct Pending {
    store: Box<dyn CheckpointStore + Send + Sync>,
    tag: String,
    meta: CheckpointMeta,
    /// Some rank's writer failed: stop polling, report at the next save or wait.
    failed: bool,
}

/// The engine's checkpoint settings and decoupled-save state.
pub(super) struct CkptState {
    tag_validation: TagValidation,
    saver: Option<AsyncSaver>,
    pending: Option<Pending>,
    /// An error of a commit that ran inside `step()`, returned by the next save or wait.
    error: Option<String>,
}

impl CkptState {
    /// From `checkpoint.tag_validation` and `checkpoint.writer`.
    pub(super) fn from_config(cfg: &ResolvedConfig) -> Result<Self, EngineError> {
        let c = &cfg.checkpoint;
        let decoupled = match &c.writer {
            Some(w) if w.kind.eq_ignore_ascii_case("mock") => {
                return Err(EngineError::Config(
                    "checkpoint.writer.type = mock writes nothing, which this engine does not do; allowed: python, fast (both use ds-checkpoint's writer)".into(),
                ))
            }
            Some(w) => w.decoupled,
            None => false,
        };
        Ok(CkptState {
            tag_validation: TagValidation::parse(&c.tag_validation)?,
            saver: decoupled.then(AsyncSaver::new),
            pending: None,
            error: None,
        })
    }

    /// Notes for accepted writer settings that change nothing here.
    pub(super) fn notes(cfg: &ResolvedConfig) -> Vec<String> {
        match &cfg.checkpoint.writer {
            Some(w) => vec![format!(
                "checkpoint.writer: type {} and the io_buffer/data_parallel settings select DeepSpeed's torch writers; ds-checkpoint's streaming writer is used (decoupled = {}{})",
                w.kind,
                w.decoupled,
                if w.decoupled { ": rank files are written in the background, committed at a later step, `wait_checkpoint` or the next save" } else { "" }
            )],
            None => Vec::new(),
        }
    }
}

/// Stage 3: the flat ranges of this rank's chunk of every parameter, with their offsets in
/// its shard (DeepSpeed's per-parameter partition; see `ds_zero::partition::stage3_shard`).
fn stage3_segments(sizes: &[usize], ws: usize, rank: usize) -> (usize, Vec<Segment>) {
    let mut segs = Vec::with_capacity(sizes.len());
    let (mut flat, mut at) = (0usize, 0usize);
    for &n in sizes {
        let r = ds_zero::partition::stage3_shard(n, ws, rank);
        if !r.is_empty() {
            segs.push(Segment {
                buffer_offset: at,
                flat: flat + r.start..flat + r.end,
            });
        }
        at += ds_zero::partition::stage3_shard_len(n, ws);
        flat += n;
    }
    (at, segs)
}

impl<M: crate::traits::Model> Engine<'_, M> {
    fn ckpt_meta(&self, samples_per_step: u64) -> CheckpointMeta {
        let params = self.model.params();
        let shapes = self.model.param_shapes();
        CheckpointMeta {
            world_size: self.comm.world_size(),
            zero_stage: self.zero.options().stage,
            dtype: "fp32".into(),
            params: ds_checkpoint::contiguous_params(
                params.iter().map(|p| p.name.clone()).zip(shapes),
            ),
            training: ds_checkpoint::TrainingState {
                global_step: self.global_steps,
                skipped_steps: self.skipped_steps,
                global_samples: self.global_steps * samples_per_step,
                lr_scheduler: serde_json::json!({"last_batch_iteration": self.sched.last_batch_iteration()}),
                data_sampler: serde_json::json!({"next_step": self.global_steps}),
                loss_scaler: serde_json::to_value(self.zero.scaler_state())
                    .unwrap_or(serde_json::Value::Null),
                client_state: match self.model.config() {
                    serde_json::Value::Null => serde_json::Value::Null,
                    c => serde_json::json!({ "model": c }),
                },
                ..Default::default()
            },
        }
    }

    /// This rank's shard: master weights and optimizer state over its flat range (stages
    /// 0-2) or its chunk of every parameter (stage 3).
    ///
    /// Nothing is copied: with NVMe offload the buffers are maps of the swap files, read as
    /// the writer goes (their pages are dropped after the save).
    fn ckpt_shard(&self) -> RankShard<'_> {
        let (step, views) = self.zero.optimizer_state_views();
        let mut shard = match self.zero.flat_range() {
            Some(range) => RankShard::new(self.comm.rank(), range, step),
            None => {
                let (len, segs) =
                    stage3_segments(&self.sizes, self.comm.world_size(), self.comm.rank());
                RankShard::segmented(self.comm.rank(), len, segs, step)
            }
        };
        shard = shard.with_buffer(ds_checkpoint::MASTER_BUFFER, self.zero.master());
        for (name, buf) in views {
            shard.buffers.push((name.to_string(), Cow::Borrowed(buf)));
        }
        shard
    }

    /// Saves a checkpoint into any [`CheckpointStore`] (a collective: every rank calls it with the same tag): each rank its
    /// fp32 master part and optimizer state (over its flat range, or at ZeRO-3 its chunk of
    /// every parameter), rank 0 the full weights (stages 0-2), the manifest and `latest`
    /// (atomic, `ds-checkpoint`'s protocol). Tags are first compared across ranks per
    /// `checkpoint.tag_validation`.
    ///
    /// With `checkpoint.writer.decoupled` the state is copied to host buffers and written by
    /// a background thread while training continues; rank 0 commits it (manifest, `latest`)
    /// at the first `step()` after every rank's writer finished, or at [`Engine::wait_checkpoint`]
    /// or the next save. A failed write is returned by the next save or wait. Decoupled saves
    /// write no separate model-weights file: weights are read from the fp32 master buffers.
    pub fn save_checkpoint<S: CheckpointStore + Clone + Send + Sync + 'static>(
        &mut self,
        store: &S,
        tag: &str,
        samples_per_step: u64,
    ) -> Result<(), EngineError> {
        ds_checkpoint::validate_tag(tag).map_err(ck)?;
        self.wait_checkpoint()?;
        let tag = validate_tag_across_ranks(self.comm, tag, self.ckpt.tag_validation)?;
        let meta = self.ckpt_meta(samples_per_step);
        let comm = self.comm;
        let mut barrier = || {
            comm.barrier()
                .map_err(|e| CheckpointError::InvalidInput(format!("barrier: {e}")))
        };
        if self.ckpt.saver.is_some() {
            // Decoupled: prepare (rank 0), barrier, then this rank's file in the background.
            if comm.rank() == 0 {
                store.prepare(&tag).map_err(ck)?;
            }
            barrier().map_err(ck)?;
            let shard = self.ckpt_shard().into_owned();
            self.zero.release_swap_views();
            let (st, t, m) = (store.clone(), tag.clone(), meta.clone());
            if let Some(saver) = self.ckpt.saver.as_mut() {
                saver
                    .submit(Box::new(move || st.save_rank(&t, &m, &shard)))
                    .map_err(ck)?;
            }
            self.ckpt.pending = Some(Pending {
                store: Box::new(store.clone()),
                tag,
                meta,
                failed: false,
            });
            return Ok(());
        }
        let shard = self.ckpt_shard();
        // Rank 0 holds the full model at stages 0-2 (at stage 3 weights come from the master
        // buffers).
        let weights: Option<ds_checkpoint::Weights<'static>> =
            if self.comm.rank() == 0 && !self.stage3 {
                let params = self.model.params();
                let mut w = Vec::with_capacity(params.len());
                for p in &params {
                    let v = p.var.flatten_all()?.to_vec1::<f32>()?;
                    w.push((p.name.clone(), Cow::Owned(v)));
                }
                Some(w)
            } else {
                None
            };
        let r = store
            .save_collective(&tag, &meta, &shard, weights.as_ref(), true, &mut barrier)
            .map_err(ck);
        drop(shard);
        self.zero.release_swap_views();
        r
    }

    /// Waits for a decoupled save to be written on every rank and commits it (a collective
    /// when a save is pending; a no-op otherwise). Returns any error of the background write
    /// or of a commit attempted during `step()`.
    pub fn wait_checkpoint(&mut self) -> Result<(), EngineError> {
        if self.ckpt.pending.is_some() {
            let mine = match self.ckpt.saver.as_mut().map(|s| s.wait()) {
                Some(Err(e)) => Err(e.to_string()),
                _ => Ok(()),
            };
            self.commit(mine)?;
        }
        match self.ckpt.error.take() {
            Some(e) => Err(EngineError::Checkpoint(e)),
            None => Ok(()),
        }
    }

    /// Called at the end of every `step()` while a decoupled save is pending: one tiny
    /// all-reduce tells whether every rank's writer finished; if so rank 0 commits. Never
    /// blocks on the disk and never fails the step: errors wait for the next save or wait.
    pub(super) fn poll_checkpoint(&mut self) -> Result<(), EngineError> {
        let Some(p) = &self.ckpt.pending else {
            return Ok(());
        };
        if p.failed {
            return Ok(());
        }
        let done = self.ckpt.saver.as_mut().is_none_or(|s| s.poll());
        let t = Tensor::from_vec(vec![f32::from(u8::from(done))], 1, &Device::Cpu)?;
        let all = self.comm.all_reduce(&t, ReduceOp::Min)?.to_vec1::<f32>()?[0];
        if all < 1.0 {
            return Ok(());
        }
        let mine = match self.ckpt.saver.as_mut().map(|s| s.wait()) {
            Some(Err(e)) => Err(e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = self.commit(mine) {
            self.ckpt.error = Some(e.to_string());
        }
        Ok(())
    }

    /// Every rank's writer has finished (`mine` is this rank's result): agree on success,
    /// rank 0 finalizes, every rank learns the outcome.
    fn commit(&mut self, mine: Result<(), String>) -> Result<(), EngineError> {
        let Some(p) = self.ckpt.pending.take() else {
            return Ok(());
        };
        let ok = f32::from(u8::from(mine.is_ok()));
        let t = Tensor::from_vec(vec![ok], 1, &Device::Cpu)?;
        let all_ok = self.comm.all_reduce(&t, ReduceOp::Min)?.to_vec1::<f32>()?[0] >= 1.0;
        let fin = if all_ok && self.comm.rank() == 0 {
            p.store
                .finalize(&p.tag, &p.meta, None, true)
                .map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let t = Tensor::from_vec(vec![f32::from(u8::from(fin.is_ok()))], 1, &Device::Cpu)?;
        let fin_ok = self.comm.all_reduce(&t, ReduceOp::Min)?.to_vec1::<f32>()?[0] >= 1.0;
        match (mine, fin) {
            (Err(e), _) => Err(EngineError::Checkpoint(format!(
                "decoupled save of {:?} failed on rank {}: {e}",
                p.tag,
                self.comm.rank()
            ))),
            (_, Err(e)) => Err(EngineError::Checkpoint(format!(
                "decoupled save of {:?}: commit failed: {e}",
                p.tag
            ))),
            _ if !all_ok => Err(EngineError::Checkpoint(format!(
                "decoupled save of {:?} failed on another rank; `latest` still names the previous checkpoint",
                p.tag
            ))),
            _ if !fin_ok => Err(EngineError::Checkpoint(format!(
                "decoupled save of {:?}: rank 0 could not commit it",
                p.tag
            ))),
            _ => Ok(()),
        }
    }

    /// Whether a decoupled save is still pending (written or not yet committed).
    pub fn checkpoint_pending(&self) -> bool {
        self.ckpt.pending.is_some()
    }

    /// Loads a checkpoint saved at any world size and ZeRO stage 0-3 into this rank (any
    /// stage): its master part and optimizer state are resliced from the saved ranks' files,
    /// the model weights rebuilt from them, and the step counters and LR schedule restored.
    /// Returns the saved training state.
    pub fn load_checkpoint(
        &mut self,
        ckpt: &ds_checkpoint::Checkpoint,
    ) -> Result<ds_checkpoint::TrainingState, EngineError> {
        let params = self.model.params();
        let shapes = self.model.param_shapes();
        let saved = &ckpt.meta().params;
        if saved.len() != params.len()
            || saved
                .iter()
                .zip(params.iter().zip(&shapes))
                .any(|(s, (p, sh))| s.name != p.name || &s.shape != sh)
        {
            return Err(EngineError::Checkpoint(format!(
                "checkpoint {} holds a different model (parameter names or shapes differ)",
                ckpt.dir().display()
            )));
        }
        drop(params);
        // Hyperparameters the shapes do not show (a GPT's head count): compared when both the
        // checkpoint and the model state them.
        let saved_cfg = &ckpt.training().client_state["model"];
        let cfg = self.model.config();
        if !saved_cfg.is_null() && !cfg.is_null() && saved_cfg != &cfg {
            return Err(EngineError::Checkpoint(format!(
                "checkpoint {} was saved by a model configured {saved_cfg}, this one is {cfg}: the weights would be read as a different model",
                ckpt.dir().display()
            )));
        }
        // This rank's part, piece by piece (a part swapped to disk never has to fit in
        // memory): elements `lo..` of buffer `name` over its flat range (stages 0-2) or its
        // chunk of every parameter (stage 3, padding left zero).
        let flat = self.zero.flat_range();
        let (_, segs) = stage3_segments(&self.sizes, self.comm.world_size(), self.comm.rank());
        let read_range = |name: &str, lo: usize, out: &mut [f32]| -> Result<(), EngineError> {
            match &flat {
                Some(range) => ckpt
                    .load_flat_range_into(name, range.start + lo, out)
                    .map_err(ck),
                None => {
                    let hi = lo + out.len();
                    for s in &segs {
                        let (bo, len) = (s.buffer_offset, s.flat.len());
                        let (a, b) = (lo.max(bo), hi.min(bo + len));
                        if a < b {
                            ckpt.load_flat_range_into(
                                name,
                                s.flat.start + (a - bo),
                                &mut out[a - lo..b - lo],
                            )
                            .map_err(ck)?;
                        }
                    }
                    Ok(())
                }
            }
        };
        let mut names: Vec<String> = vec![ds_checkpoint::MASTER_BUFFER.to_string()];
        names.extend(
            self.zero
                .optimizer()
                .spec()
                .state_names()
                .iter()
                .map(|s| s.to_string()),
        );
        let t = ckpt.training().clone();
        let mut failed: Option<EngineError> = None;
        let mut read = |k: usize, lo: usize, out: &mut [f32]| -> Result<(), ds_zero::ZeroError> {
            let r = names
                .get(k)
                .ok_or_else(|| EngineError::Data(format!("no state buffer {k}")))
                .and_then(|n| read_range(n, lo, out));
            r.map_err(|e| {
                let msg = e.to_string();
                failed.get_or_insert(e);
                ds_zero::ZeroError::State(msg)
            })
        };
        let loaded = self
            .zero
            .load_state_with(t.global_step.saturating_sub(t.skipped_steps), &mut read);
        if let Some(e) = failed {
            return Err(e);
        }
        loaded?;
        if !t.loss_scaler.is_null() {
            match serde_json::from_value::<ds_precision::LossScalerState>(t.loss_scaler.clone()) {
                Ok(st) => self.zero.load_scaler_state(&st)?,
                Err(e) => {
                    return Err(EngineError::Data(format!(
                        "the checkpoint's loss_scaler state is malformed: {e}"
                    )))
                }
            }
        }
        self.refresh_model_params()?;
        self.global_steps = t.global_step;
        self.skipped_steps = t.skipped_steps;
        // Dropout masks are keyed by the micro-step: continue the sequence.
        self.micro_steps = t.global_step * self.gas as u64;
        let last = t.lr_scheduler["last_batch_iteration"]
            .as_i64()
            .unwrap_or(t.global_step as i64 - 1);
        self.sched.set_last_batch_iteration(last);
        self.acc_fresh = true;
        self.acc_stats = None;
        Ok(t)
    }

    /// Copies the optimizer's current parameters into the model: all of them at stages 0-2;
    /// at stage 3 the persistent ones (embeddings, final LayerNorm), blocks being gathered
    /// when they run.
    pub(super) fn refresh_model_params(&mut self) -> Result<(), EngineError> {
        if self.stage3 {
            let np = self.sizes.len();
            for range in super::persistent_ranges(np, &self.model.block_param_ranges()) {
                let data = self.zero.gather_param_range(range.clone(), self.comm)?;
                let mut off = 0;
                for i in range {
                    let n = self.sizes[i];
                    self.model.set_param(i, &data[off..off + n])?;
                    off += n;
                }
            }
        } else {
            let full = self.zero.gather_params(self.comm)?;
            let mut off = 0;
            for (p, &n) in self.model.params().iter().zip(&self.sizes) {
                crate::traits::set_var(&p.var, &full[off..off + n])?;
                off += n;
            }
        }
        Ok(())
    }
}
