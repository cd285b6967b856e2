//! `ds-checkpoint`: sharded, atomic, verifiable, reshardable checkpoints for the `ds`
//! training runtime; usable alone from any Rust program that keeps its state as flat `f32`
//! buffers.
//!
//! # Model
//! Parameters are an ordered list of named fp32 tensors laid out back to back in one flat
//! space ([`ParamSpec`]). Each rank owns a contiguous range of that space (ZeRO stage 0: all
//! of it; stages 1-3: its shard, possibly with padding past `numel`) and holds named flat
//! buffers over it: fp32 master weights ([`MASTER_BUFFER`]), optimizer moments, ... A
//! checkpoint is one directory per tag:
//!
//! ```text
//! <root>/latest                       text: the tag of the newest complete checkpoint
//! <root>/<tag>/manifest.json          format version, world size, stage, params, training
//!                                     state, rank ranges, size + CRC32 of every file, and
//!                                     (line 2) the CRC32 of the manifest itself
//! <root>/<tag>/model.safetensors      full weights by parameter name (optional, rank 0)
//! <root>/<tag>/rank_00000.safetensors rank 0's flat buffers over its (unpadded) range
//! ```
//!
//! # Protocol with several ranks (threads or processes)
//! 1. rank 0: [`FsCheckpointStore::prepare`]`(tag)`; barrier;
//! 2. every rank: [`FsCheckpointStore::save_rank`]`(tag, meta, shard)`; barrier;
//! 3. rank 0: [`FsCheckpointStore::finalize`]`(tag, meta, weights, save_latest)`; barrier.
//!
//! [`CheckpointStore::save_collective`] runs those steps given a barrier closure;
//! [`CheckpointStore::save`] runs them in one process holding every shard. Loading:
//! [`CheckpointStore::load`] then [`Checkpoint::load_flat_range`] for the new rank's own range
//! (any world size, any stage) and [`Checkpoint::read_weight`]. [`consolidate`] writes one
//! safetensors file of full weights; [`AsyncSaver`] saves in the background.
//!
//! # Example
//! ```
//! use ds_checkpoint::*;
//! # fn main() -> Result<(), CheckpointError> {
//! let dir = std::env::temp_dir().join(format!("ds-ckpt-doc-{}", std::process::id()));
//! let store = FsCheckpointStore::new(&dir)?;
//! // Two parameters, 6 elements in the flat space, saved by 2 ranks owning [0,3) and [3,6).
//! let params = contiguous_params([("w", vec![2, 2]), ("b", vec![2])]);
//! let master: Vec<f32> = (0..6).map(|i| i as f32).collect();
//! let exp_avg: Vec<f32> = (0..6).map(|i| 0.1 * i as f32).collect();
//! let meta = CheckpointMeta {
//!     world_size: 2,
//!     zero_stage: 1,
//!     dtype: "fp32".into(),
//!     params,
//!     training: TrainingState { global_step: 10, ..Default::default() },
//! };
//! let shards = (0..2)
//!     .map(|r| {
//!         let range = 3 * r..3 * r + 3;
//!         RankShard::new(r, range.clone(), 10)
//!             .with_buffer(MASTER_BUFFER, &master[range.clone()])
//!             .with_buffer("exp_avg", &exp_avg[range])
//!     })
//!     .collect();
//! store.save("global_step10", &SaveRequest { meta, weights: None, shards, save_latest: true })?;
//!
//! // Load into 3 ranks: rank 1 of 3 owns [2, 4).
//! let ckpt = store.load(None)?;
//! assert_eq!(ckpt.tag(), "global_step10");
//! assert_eq!(ckpt.load_flat_range("exp_avg", 2..4)?, vec![0.2f32, 0.3]);
//! assert_eq!(ckpt.read_weight("b")?, vec![4.0, 5.0]);
//! // Padding past numel reads as zeros.
//! assert_eq!(ckpt.load_flat_range(MASTER_BUFFER, 5..8)?, vec![5.0, 0.0, 0.0]);
//! consolidate(&ckpt, &dir.join("model.safetensors"), Dtype::BF16)?;
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod async_save;
mod consolidate;
mod error;
mod format;
mod store;

pub use async_save::AsyncSaver;
pub use consolidate::consolidate;
pub use error::{CheckpointError, Result};
pub use format::{Dtype, FileRecord, BLOCK_BYTES};
pub use store::{
    contiguous_params, rank_file_name, tag_fingerprint, validate_tag, weights_into_owned,
    Checkpoint, CheckpointMeta, CheckpointStore, FsCheckpointStore, Manifest, NamedWeight,
    ParamSpec, RankRecord, RankShard, SaveRequest, Segment, TrainingState, Weights, FORMAT_VERSION,
    LATEST_FILE, MANIFEST_CHECKSUM_FIELD, MANIFEST_FILE, MASTER_BUFFER, MIN_FORMAT_VERSION,
    MODEL_FILE,
};

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
