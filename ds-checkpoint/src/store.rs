//! The checkpoint format, the [`CheckpointStore`] trait and the filesystem store.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, CheckpointError, Result};
use crate::format::{write_safetensors, Dtype, FileRecord, TensorFile, TensorOut};

/// Version of the on-disk format written by this library. Version 2 added per-block checksums
/// (verified as data is read) and segmented rank files (ZeRO-3); version 3 a checksum of the
/// manifest itself ([`MANIFEST_CHECKSUM_FIELD`]), required from that version on. Version 1
/// and 2 checkpoints are still read (version 1 files verified whole when opened; a manifest
/// without the checksum field is accepted for those versions, and
/// [`Checkpoint::manifest_checksum`] is then `None`). Loading any other version fails with
/// [`CheckpointError::VersionMismatch`].
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this library reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Name of the manifest inside a tag directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest's checksum of itself (format version 3): its second line is
/// `  "manifest_crc32": "<8 hex digits>",` (the first key of the top-level object), and the
/// digits are the CRC32 (IEEE) of the file's bytes with that whole line (its newline
/// included) removed. Loading refuses a manifest whose content does not match, and any
/// rewriting of the file (an edit, a reformat) is such a mismatch.
pub const MANIFEST_CHECKSUM_FIELD: &str = "manifest_crc32";
/// The bytes a sealed manifest starts with, up to the checksum's 8 hex digits.
const SEAL_PREFIX: &[u8] = b"{\n  \"manifest_crc32\": \"";
/// Name of the full-weights file inside a tag directory (written by rank 0 when given).
pub const MODEL_FILE: &str = "model.safetensors";
/// Name of the file, in the store's root, that holds the tag of the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";
/// Name of the flat buffer holding fp32 master weights; [`Checkpoint::read_weight`] falls back
/// to it when a checkpoint has no [`MODEL_FILE`].
pub const MASTER_BUFFER: &str = "master";

/// File name of rank `rank`'s flat buffers inside a tag directory.
pub fn rank_file_name(rank: usize) -> String {
    format!("rank_{rank:05}.safetensors")
}

fn receipt_name(rank: usize) -> String {
    format!("rank_{rank:05}.receipt.json")
}

/// Checks that `tag` is usable as a single directory name inside the store: not empty, at
/// most 200 bytes, no `/`, `\`, NUL or other control characters, not `.`/`..`, no leading
/// `.` (reserved for temporary directories) and not `latest`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(CheckpointError::InvalidTag {
            tag: tag.to_string(),
            reason: reason.to_string(),
        })
    };
    if tag.is_empty() {
        return bad("empty");
    }
    if tag.len() > 200 {
        return bad("longer than 200 bytes");
    }
    if tag.contains('/') || tag.contains('\\') {
        return bad("contains a path separator; a tag must be one directory name inside the checkpoint directory");
    }
    if tag.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    if tag == "." || tag == ".." || tag.contains("..") {
        return bad("contains '..'; a tag cannot escape the checkpoint directory");
    }
    if tag.starts_with('.') {
        return bad("starts with '.', reserved for temporary directories");
    }
    if Path::new(tag).is_absolute() {
        return bad("is an absolute path");
    }
    if tag == LATEST_FILE {
        return bad("'latest' is the name of the file that points at the newest checkpoint");
    }
    Ok(())
}

/// A 64-bit fingerprint of a tag (FNV-1a), for validating across ranks that every rank saves
/// the same tag (DeepSpeed's `checkpoint.tag_validation`): all-reduce it with MIN and MAX and
/// compare.
pub fn tag_fingerprint(tag: &str) -> u64 {
    tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One parameter of the model: its name, shape, and offset in the flat (unpadded) space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Parameter name (unique).
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Offset of its first element in the flat fp32 space.
    pub offset: usize,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Its range in the flat space.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Builds [`ParamSpec`]s for parameters laid out back to back, in order, from offset 0
/// (the layout of ZeRO's flat space).
pub fn contiguous_params<S: Into<String>>(
    params: impl IntoIterator<Item = (S, Vec<usize>)>,
) -> Vec<ParamSpec> {
    let mut offset = 0;
    params
        .into_iter()
        .map(|(name, shape)| {
            let p = ParamSpec {
                name: name.into(),
                shape,
                offset,
            };
            offset += p.numel();
            p
        })
        .collect()
}

/// Training progress and the state of everything around the optimizer; stored in the manifest.
///
/// The JSON values are opaque to this crate: each component serialises its own state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps taken (DeepSpeed's `global_steps`).
    pub global_step: u64,
    /// Steps skipped because of overflow.
    pub skipped_steps: u64,
    /// Samples consumed (DeepSpeed's `global_samples`).
    pub global_samples: u64,
    /// LR scheduler state.
    pub lr_scheduler: serde_json::Value,
    /// Loss scaler state.
    pub loss_scaler: serde_json::Value,
    /// RNG state(s).
    pub rng: serde_json::Value,
    /// Data sampler position.
    pub data_sampler: serde_json::Value,
    /// The user's `client_state`.
    pub client_state: serde_json::Value,
}

/// What describes a checkpoint apart from its tensors; identical on every rank of a save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Number of ranks that saved (number of rank files).
    pub world_size: usize,
    /// ZeRO stage of the run that saved (informational: the format is the same for all).
    pub zero_stage: u8,
    /// Model dtype of the run that saved, e.g. `"fp32"`, `"bf16"` (informational).
    pub dtype: String,
    /// Every parameter, in flat order.
    pub params: Vec<ParamSpec>,
    /// Progress, scheduler, scaler, RNG, sampler and client state.
    pub training: TrainingState,
}

impl CheckpointMeta {
    /// Total number of elements of the unpadded flat space (end of the last parameter).
    pub fn numel(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.offset + p.numel())
            .max()
            .unwrap_or(0)
    }

    /// Checks `world_size > 0`, that names are unique and that the parameters lie back to
    /// back in order from offset 0 (no overlap, no hole; what [`contiguous_params`] builds and
    /// what loading requires).
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(CheckpointError::InvalidInput("world_size is 0".into()));
        }
        check_params(&self.params)
            .map(|_| ())
            .map_err(CheckpointError::InvalidInput)
    }
}

/// Checks that `params` have unique names and lie back to back in order from offset 0, with
/// overflow-checked sizes; returns the end of the last one (the flat space's `numel`).
fn check_params(params: &[ParamSpec]) -> std::result::Result<usize, String> {
    let mut names = std::collections::HashSet::new();
    let mut end = 0usize;
    for (i, p) in params.iter().enumerate() {
        if !names.insert(p.name.as_str()) {
            return Err(format!(
                "params[{i}]: parameter name {:?} appears twice",
                p.name
            ));
        }
        let numel = p
            .shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| {
                format!(
                    "params[{i}] {:?}: shape {:?} overflows the element count",
                    p.name, p.shape
                )
            })?;
        if p.offset != end {
            let prev = match i {
                0 => "the flat space starts at 0".to_string(),
                _ => format!("the end of params[{}] {:?}", i - 1, params[i - 1].name),
            };
            let what = if p.offset > end {
                format!(
                    "elements [{end}, {}) would belong to no parameter (a deleted entry?)",
                    p.offset
                )
            } else {
                format!(
                    "it would overlap elements [{}, {end}) of the parameters before it",
                    p.offset
                )
            };
            return Err(format!(
                "params[{i}] {:?} has offset {}, expected {end} ({prev}): {what}",
                p.name, p.offset
            ));
        }
        end = end.checked_add(numel).ok_or_else(|| {
            format!(
                "params[{i}] {:?}: offset {} + {numel} elements overflows",
                p.name, p.offset
            )
        })?;
    }
    Ok(end)
}

/// Names the parameters that hold flat elements `range`, for messages.
fn params_in(params: &[ParamSpec], range: Range<usize>) -> String {
    let hit: Vec<String> = params
        .iter()
        .filter(|p| p.offset < range.end && range.start < p.offset.saturating_add(p.numel()))
        .map(|p| format!("{:?}", p.name))
        .collect();
    match hit.len() {
        0 => "no parameter".into(),
        1 => format!("parameter {}", hit[0]),
        n if n <= 3 => format!("parameters {}", hit.join(", ")),
        n => format!("parameters {}, ... ({n} in all)", hit[..3].join(", ")),
    }
}

/// Flat elements `[start, end)` held by a rank: `(start, end, rank)`.
type RankRun = (usize, usize, usize);

/// Checks that a manifest describes one complete, consistent checkpoint, before any other file
/// is opened: rank records in order, parameters back to back from 0 up to `numel`, every rank's
/// ranges inside the flat space and ordered, every flat buffer held for every element of the
/// flat space exactly once (or whole by every rank that holds it: ZeRO stage 0's replicas),
/// and a checksum record for exactly the files it names.
fn check_layout(m: &Manifest) -> std::result::Result<(), String> {
    let meta = &m.meta;
    if meta.world_size == 0 {
        return Err("world_size is 0".into());
    }
    if m.ranks.len() != meta.world_size {
        return Err(format!(
            "{} rank records for world_size {}",
            m.ranks.len(),
            meta.world_size
        ));
    }
    let end = check_params(&meta.params)?;
    if m.numel != end {
        return Err(format!(
            "numel is {} but the parameters end at element {end}{}",
            m.numel,
            if m.numel > end {
                " (a deleted entry after the last parameter?)"
            } else {
                ""
            }
        ));
    }
    let mut named_files: Vec<&str> = Vec::new();
    if let Some(f) = &m.model_file {
        named_files.push(f);
    }
    // Buffer name -> (flat start, flat end, rank), in order of first appearance.
    let mut runs: Vec<(&str, Vec<RankRun>)> = Vec::new();
    for (i, r) in m.ranks.iter().enumerate() {
        if r.rank != i {
            return Err(format!("ranks[{i}] says it is rank {}", r.rank));
        }
        if r.start > r.end || r.end > m.numel {
            return Err(format!(
                "ranks[{i}] holds flat elements [{}, {}), outside the flat space [0, {})",
                r.start, r.end, m.numel
            ));
        }
        let segs = r.flat_segments();
        let mut next = r.start;
        for s in &segs {
            if s.start > s.end || s.start < next || s.end > r.end {
                return Err(format!(
                    "ranks[{i}]: segment [{}, {}) is reversed, overlaps the one before it or lies outside the rank's [{}, {})",
                    s.start, s.end, r.start, r.end
                ));
            }
            next = s.end;
        }
        if let (Some(first), Some(last)) = (segs.first(), segs.last()) {
            if first.start != r.start || last.end != r.end {
                return Err(format!(
                    "ranks[{i}] holds [{}, {}) but its segments span [{}, {})",
                    r.start, r.end, first.start, last.end
                ));
            }
        }
        for (k, b) in r.buffers.iter().enumerate() {
            if r.buffers[..k].contains(b) {
                return Err(format!("ranks[{i}] lists buffer {b:?} twice"));
            }
            let at = match runs.iter().position(|(n, _)| *n == b.as_str()) {
                Some(p) => p,
                None => {
                    runs.push((b.as_str(), Vec::new()));
                    runs.len() - 1
                }
            };
            runs[at].1.extend(
                segs.iter()
                    .filter(|s| s.start < s.end)
                    .map(|s| (s.start, s.end, i)),
            );
        }
        if named_files.contains(&r.file.as_str()) {
            return Err(format!(
                "ranks[{i}] names file {:?}, which another rank or the model file also names",
                r.file
            ));
        }
        named_files.push(&r.file);
    }
    for f in &named_files {
        if validate_tag(f).is_err() {
            return Err(format!("unsafe file name {f:?}"));
        }
        if !m.files.contains_key(*f) {
            return Err(format!("no size and checksum record for file {f:?}"));
        }
    }
    if let Some(extra) = m.files.keys().find(|k| !named_files.contains(&k.as_str())) {
        return Err(format!(
            "files lists {extra:?}, which neither model_file nor any rank names"
        ));
    }
    for (b, mut list) in runs {
        if list.iter().all(|&(s, e, _)| s == 0 && e == m.numel) && !list.is_empty() {
            continue; // replicas: every rank that holds it holds all of it
        }
        list.sort_unstable();
        let mut pos = 0usize;
        let mut prev: Option<RankRun> = None;
        for &(s, e, rank) in &list {
            if let (true, Some((ps, pe, pr))) = (s < pos, prev) {
                return Err(format!(
                    "flat buffer {b:?}: ranks[{rank}] holds elements [{s}, {e}) and ranks[{pr}] [{ps}, {pe}); they overlap (only replicas, each holding the whole flat space, may)"
                ));
            }
            if s > pos {
                return Err(format!(
                    "flat buffer {b:?}: elements [{pos}, {s}) ({}) are held by no rank",
                    params_in(&meta.params, pos..s)
                ));
            }
            pos = e;
            prev = Some((s, e, rank));
        }
        if pos < m.numel {
            return Err(format!(
                "flat buffer {b:?}: elements [{pos}, {}) ({}) are held by no rank",
                m.numel,
                params_in(&meta.params, pos..m.numel)
            ));
        }
    }
    Ok(())
}

/// The manifest's recorded checksum and the checksum of its content, when it starts with the
/// checksum line ([`MANIFEST_CHECKSUM_FIELD`]); `Ok(None)` when it does not.
fn manifest_seal(bytes: &[u8]) -> std::result::Result<Option<(u32, u32)>, String> {
    let Some(rest) = bytes.strip_prefix(SEAL_PREFIX) else {
        return Ok(None);
    };
    let bad = || {
        format!("its {MANIFEST_CHECKSUM_FIELD} line is not 8 hex digits in quotes followed by a comma and a newline")
    };
    let (Some(hex), Some(tail)) = (rest.get(..8), rest.get(8..)) else {
        return Err(bad());
    };
    let Some(body) = tail.strip_prefix(b"\",\n") else {
        return Err(bad());
    };
    let recorded = std::str::from_utf8(hex)
        .ok()
        .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(bad)?;
    let mut h = crc32fast::Hasher::new();
    h.update(b"{\n");
    h.update(body);
    Ok(Some((recorded, h.finalize())))
}

/// The bytes of `manifest.json` for `m`: pretty JSON whose first key is
/// [`MANIFEST_CHECKSUM_FIELD`], the CRC32 of the rest.
fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    let body =
        serde_json::to_vec_pretty(m).map_err(|e| CheckpointError::InvalidInput(e.to_string()))?;
    let rest = body.strip_prefix(b"{\n").ok_or_else(|| {
        CheckpointError::InvalidInput("the manifest did not serialize as a JSON object".into())
    })?;
    let mut out = format!(
        "{{\n  \"{MANIFEST_CHECKSUM_FIELD}\": \"{:08x}\",\n",
        crc32fast::hash(&body)
    )
    .into_bytes();
    out.extend_from_slice(rest);
    Ok(out)
}

/// Best effort, for messages about an inconsistent parameter list: the tensors of the model
/// file that the manifest's params do not list (its deleted entries), as `"; ..."`.
fn model_file_hint(dir: &Path, m: &Manifest) -> String {
    let Some(name) = m.model_file.as_deref() else {
        return String::new();
    };
    if validate_tag(name).is_err() {
        return String::new();
    }
    let Ok(f) = TensorFile::open(&dir.join(name), m.files.get(name)) else {
        return String::new();
    };
    let extra: Vec<String> = f
        .tensors
        .iter()
        .filter(|(n, _)| !m.meta.params.iter().any(|p| &p.name == *n))
        .map(|(n, e)| format!("{n:?} of shape {:?}", e.shape))
        .collect();
    if extra.is_empty() {
        String::new()
    } else {
        format!(
            "; {name} holds parameter {} which the manifest's params do not list",
            extra.join(", ")
        )
    }
}

/// A run of a rank's buffers that holds a contiguous range of the flat space (ZeRO-3: this
/// rank's chunk of one parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the run inside each of the rank's buffers.
    pub buffer_offset: usize,
    /// The flat elements it holds (`flat.len()` elements from `buffer_offset`).
    pub flat: Range<usize>,
}

/// One rank's part of a save: named flat buffers over `range` of the flat space (ZeRO stages
/// 0-2), or over a list of [`Segment`]s (ZeRO-3's per-parameter chunks).
///
/// Contiguous shards: every buffer has `range.len()` elements; the part of `range` beyond the
/// meta's `numel` (ZeRO padding) is clipped away on disk. Segmented shards
/// ([`RankShard::segmented`]): every buffer has `range.len()` elements (`range` is then
/// `0..len`, positions in the buffer), and only the segments' elements are written (padding
/// between them is dropped). Buffers borrow or own their data ([`Cow`]), so the same type
/// serves synchronous saves (borrowed) and asynchronous ones (owned copies).
#[derive(Debug, Clone)]
pub struct RankShard<'a> {
    /// Rank index, `< world_size`.
    pub rank: usize,
    /// The rank's range of the flat space (may extend past `numel` into padding); for a
    /// segmented shard `0..buffer length`.
    pub range: Range<usize>,
    /// The optimizer's step count on this rank.
    pub optimizer_step: u64,
    /// Named flat buffers, e.g. `"master"`, `"exp_avg"`, `"exp_avg_sq"`.
    pub buffers: Vec<(String, Cow<'a, [f32]>)>,
    /// Empty for a contiguous shard; else where each run of the buffers lies in the flat space
    /// (increasing, non-overlapping buffer offsets).
    pub segments: Vec<Segment>,
}

impl<'a> RankShard<'a> {
    /// A shard with no buffers yet.
    pub fn new(rank: usize, range: Range<usize>, optimizer_step: u64) -> Self {
        RankShard {
            rank,
            range,
            optimizer_step,
            buffers: Vec::new(),
            segments: Vec::new(),
        }
    }
    /// A shard whose buffers (each `len` elements) hold the flat ranges of `segments`, e.g.
    /// ZeRO-3's chunk of every parameter, padding between them.
    pub fn segmented(rank: usize, len: usize, segments: Vec<Segment>, optimizer_step: u64) -> Self {
        RankShard {
            rank,
            range: 0..len,
            optimizer_step,
            buffers: Vec::new(),
            segments,
        }
    }
    /// The flat ranges this shard saves, in buffer order, each with its buffer offset
    /// (contiguous shards: `range` clipped to `numel`).
    fn saved_segments(&self, numel: usize) -> Vec<Segment> {
        if self.segments.is_empty() {
            let start = self.range.start.min(numel);
            let end = self.range.end.min(numel);
            vec![Segment {
                buffer_offset: 0,
                flat: start..end,
            }]
        } else {
            self.segments.clone()
        }
    }
    /// Adds a borrowed buffer (builder style).
    pub fn with_buffer(mut self, name: impl Into<String>, data: &'a [f32]) -> Self {
        self.buffers.push((name.into(), Cow::Borrowed(data)));
        self
    }
    /// Copies every buffer, so the shard can outlive the training state (asynchronous save).
    pub fn into_owned(self) -> RankShard<'static> {
        RankShard {
            rank: self.rank,
            range: self.range,
            optimizer_step: self.optimizer_step,
            buffers: self
                .buffers
                .into_iter()
                .map(|(n, b)| (n, Cow::Owned(b.into_owned())))
                .collect(),
            segments: self.segments,
        }
    }
}

/// A parameter read back: `(name, shape, fp32 data)`.
pub type NamedWeight = (String, Vec<usize>, Vec<f32>);

/// Full model weights by parameter name (shapes come from [`CheckpointMeta::params`]).
pub type Weights<'a> = Vec<(String, Cow<'a, [f32]>)>;

/// Copies weights into owned buffers.
pub fn weights_into_owned(w: Weights<'_>) -> Weights<'static> {
    w.into_iter()
        .map(|(n, b)| (n, Cow::Owned(b.into_owned())))
        .collect()
}

/// Everything of one checkpoint, held by one process (all ranks' shards): the input of
/// [`CheckpointStore::save`].
#[derive(Debug, Clone)]
pub struct SaveRequest<'a> {
    /// Metadata (world size, params, training state).
    pub meta: CheckpointMeta,
    /// Full weights for [`MODEL_FILE`]; `None` to write no model file.
    pub weights: Option<Weights<'a>>,
    /// One shard per rank, `meta.world_size` of them.
    pub shards: Vec<RankShard<'a>>,
    /// Point `latest` at this tag once it is complete.
    pub save_latest: bool,
}

impl SaveRequest<'_> {
    /// Copies every buffer (for [`crate::AsyncSaver`]).
    pub fn into_owned(self) -> SaveRequest<'static> {
        SaveRequest {
            meta: self.meta,
            weights: self.weights.map(weights_into_owned),
            shards: self.shards.into_iter().map(RankShard::into_owned).collect(),
            save_latest: self.save_latest,
        }
    }
}

/// Where one rank's buffers live, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    /// Rank index.
    pub rank: usize,
    /// File name inside the tag directory.
    pub file: String,
    /// Start of the rank's range in the unpadded flat space (segmented: of its first segment).
    pub start: usize,
    /// End (exclusive), clipped to `numel` (segmented: of its last segment).
    pub end: usize,
    /// Names of the flat buffers in the file.
    pub buffers: Vec<String>,
    /// The optimizer's step count on that rank.
    pub optimizer_step: u64,
    /// Flat ranges `[start, end)` held by each buffer in the file, back to back in this order
    /// (ZeRO-3: one per parameter chunk). Empty: the buffer holds `start..end`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<[usize; 2]>,
}

impl RankRecord {
    /// The flat ranges held by each buffer, in file order.
    pub fn flat_segments(&self) -> Vec<Range<usize>> {
        if self.segments.is_empty() {
            std::iter::once(self.start..self.end).collect()
        } else {
            self.segments.iter().map(|s| s[0]..s[1]).collect()
        }
    }
    /// Elements of each buffer in the file.
    pub fn held(&self) -> usize {
        self.flat_segments().iter().map(|r| r.len()).sum()
    }
}

/// The manifest (`manifest.json`) of one tag. On disk it also holds, as its first key,
/// [`MANIFEST_CHECKSUM_FIELD`] (format version 3), which is not a field of this struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The tag.
    pub tag: String,
    /// Number of elements of the unpadded flat space.
    pub numel: usize,
    /// Metadata and training state.
    pub meta: CheckpointMeta,
    /// The model-weights file, if written.
    pub model_file: Option<String>,
    /// One record per rank.
    pub ranks: Vec<RankRecord>,
    /// Size and CRC32 of every tensor file, by file name.
    pub files: BTreeMap<String, FileRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    record: RankRecord,
    file: FileRecord,
}

/// A store of checkpoints addressed by tag.
pub trait CheckpointStore {
    /// Saves a whole checkpoint (every rank's shard) atomically under `tag`.
    fn save(&self, tag: &str, request: &SaveRequest<'_>) -> Result<()>;
    /// Opens and verifies checkpoint `tag`, or the one `latest` names when `tag` is `None`.
    fn load(&self, tag: Option<&str>) -> Result<Checkpoint>;
    /// The tag `latest` names, `None` when nothing was saved yet.
    fn latest(&self) -> Result<Option<String>>;
    /// Tags of the complete checkpoints in the store, sorted.
    fn list(&self) -> Result<Vec<String>>;

    /// Step 1 of the multi-rank save, on rank 0 only, before any rank writes: makes room for
    /// `tag` (nothing of it may be visible to [`CheckpointStore::load`] until step 3).
    fn prepare(&self, tag: &str) -> Result<()>;
    /// Step 2, on every rank (possibly at once, from many processes): writes this rank's shard
    /// of `tag` durably.
    fn save_rank(&self, tag: &str, meta: &CheckpointMeta, shard: &RankShard<'_>) -> Result<()>;
    /// Step 3, on rank 0 only, after every rank's [`CheckpointStore::save_rank`] returned:
    /// checks that all shards are there, writes the manifest (and `weights` when given),
    /// makes `tag` visible atomically and, with `save_latest`, points `latest` at it.
    fn finalize(
        &self,
        tag: &str,
        meta: &CheckpointMeta,
        weights: Option<&Weights<'_>>,
        save_latest: bool,
    ) -> Result<()>;
    /// Where checkpoint `tag` lives, for messages (a path, a URL, ...).
    fn location(&self, tag: &str) -> String;

    /// The whole multi-rank protocol for one rank, given the caller's `barrier` (e.g. a
    /// closure over a `Communicator`'s barrier): rank 0 prepares, barrier, every rank writes
    /// its shard, barrier, rank 0 finalizes, barrier. `weights` is used on rank 0 only.
    ///
    /// If a step fails on one rank, the others may wait in the barrier; callers that cannot
    /// tolerate that should all-reduce a success flag instead of a plain barrier.
    fn save_collective(
        &self,
        tag: &str,
        meta: &CheckpointMeta,
        shard: &RankShard<'_>,
        weights: Option<&Weights<'_>>,
        save_latest: bool,
        barrier: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        validate_tag(tag)?;
        if shard.rank == 0 {
            self.prepare(tag)?;
        }
        barrier()?;
        self.save_rank(tag, meta, shard)?;
        barrier()?;
        if shard.rank == 0 {
            self.finalize(tag, meta, weights, save_latest)?;
        }
        barrier()
    }
}

/// A [`CheckpointStore`] in a directory: `<root>/<tag>/{manifest.json, model.safetensors,
/// rank_00000.safetensors, ...}` and `<root>/latest`.
///
/// Saves are atomic: files are written into `<root>/.tmp-<tag>`, fsynced, the directory is
/// renamed to `<root>/<tag>`, and `latest` is replaced by write-temporary-then-rename, last.
#[derive(Debug, Clone)]
pub struct FsCheckpointStore {
    root: PathBuf,
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn check_shard(meta: &CheckpointMeta, shard: &RankShard<'_>) -> Result<()> {
    if shard.rank >= meta.world_size {
        return Err(CheckpointError::InvalidInput(format!(
            "rank {} >= world_size {}",
            shard.rank, meta.world_size
        )));
    }
    if shard.range.start > shard.range.end {
        return Err(CheckpointError::InvalidInput(format!(
            "rank {}: empty-reversed range {:?}",
            shard.rank, shard.range
        )));
    }
    let mut next = 0usize;
    for s in &shard.segments {
        if s.flat.start > s.flat.end
            || s.buffer_offset < next
            || s.buffer_offset + s.flat.len() > shard.range.len()
            || s.flat.end > meta.numel()
        {
            return Err(CheckpointError::InvalidInput(format!(
                "rank {}: segment {s:?} is reversed, overlaps the previous one, runs past the buffers' {} elements or past the {} parameters' elements",
                shard.rank,
                shard.range.len(),
                meta.numel()
            )));
        }
        next = s.buffer_offset + s.flat.len();
    }
    let mut names = std::collections::HashSet::new();
    for (name, buf) in &shard.buffers {
        if !names.insert(name.as_str()) {
            return Err(CheckpointError::InvalidInput(format!(
                "rank {}: buffer {name:?} given twice",
                shard.rank
            )));
        }
        if buf.len() != shard.range.len() {
            return Err(CheckpointError::InvalidInput(format!(
                "rank {}: buffer {name:?} has {} elements, its range {:?} has {}",
                shard.rank,
                buf.len(),
                shard.range,
                shard.range.len()
            )));
        }
    }
    Ok(())
}

impl FsCheckpointStore {
    /// A store rooted at `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(FsCheckpointStore { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Deletes checkpoint `tag` (retention). Refused for the checkpoint `latest` names.
    pub fn remove(&self, tag: &str) -> Result<()> {
        let dir = self.tag_dir(tag)?;
        if CheckpointStore::latest(self)?.as_deref() == Some(tag) {
            return Err(CheckpointError::InvalidInput(format!(
                "{tag} is the checkpoint `latest` names; it is not removed"
            )));
        }
        fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// Keeps the newest `keep` complete checkpoints (by the step number at the end of their
    /// tag, then name) and the one `latest` names; deletes the others. Returns the tags
    /// deleted.
    pub fn retain_newest(&self, keep: usize) -> Result<Vec<String>> {
        let latest = CheckpointStore::latest(self)?;
        let step = |t: &str| -> u64 {
            let digits: String = t
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            digits.parse().unwrap_or(0)
        };
        let mut tags = CheckpointStore::list(self)?;
        tags.sort_by(|a, b| step(b).cmp(&step(a)).then(b.cmp(a)));
        let mut removed = Vec::new();
        for t in tags.into_iter().skip(keep) {
            if latest.as_deref() != Some(t.as_str()) {
                self.remove(&t)?;
                removed.push(t);
            }
        }
        Ok(removed)
    }

    /// Directory of a complete checkpoint.
    pub fn tag_dir(&self, tag: &str) -> Result<PathBuf> {
        validate_tag(tag)?;
        Ok(self.root.join(tag))
    }

    fn tmp_dir(&self, tag: &str) -> PathBuf {
        self.root.join(format!(".tmp-{tag}"))
    }

    fn old_dir(&self, tag: &str) -> PathBuf {
        self.root.join(format!(".old-{tag}"))
    }

    /// Step 1 of a multi-rank save, on rank 0 only: (re)creates the empty temporary directory
    /// of `tag`. Every rank must wait (barrier) until it returns before [`Self::save_rank`].
    pub fn prepare(&self, tag: &str) -> Result<()> {
        validate_tag(tag)?;
        let tmp = self.tmp_dir(tag);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        fsync_dir(&self.root)
    }

    /// Step 2, on every rank: writes this rank's flat buffers (clipped to `meta.numel()`) into
    /// the temporary directory and fsyncs them. Safe to call from many threads or processes at
    /// once (each rank writes only its own files). Every rank must then wait (barrier) before
    /// rank 0 calls [`Self::finalize`].
    pub fn save_rank(&self, tag: &str, meta: &CheckpointMeta, shard: &RankShard<'_>) -> Result<()> {
        validate_tag(tag)?;
        check_shard(meta, shard)?;
        let tmp = self.tmp_dir(tag);
        if !tmp.is_dir() {
            return Err(CheckpointError::IncompleteSave {
                tag: tag.into(),
                reason: format!(
                    "temporary directory {} does not exist: rank 0 must call prepare() first",
                    tmp.display()
                ),
            });
        }
        let numel = meta.numel();
        let segs = shard.saved_segments(numel);
        let keep: usize = segs.iter().map(|s| s.flat.len()).sum();
        let tensors: Vec<TensorOut<'_>> = shard
            .buffers
            .iter()
            .map(|(n, b)| TensorOut {
                name: n,
                shape: vec![keep],
                parts: segs
                    .iter()
                    .map(|s| &b[s.buffer_offset..s.buffer_offset + s.flat.len()])
                    .collect(),
            })
            .collect();
        let start = segs.first().map_or(0, |s| s.flat.start);
        let end = segs.last().map_or(0, |s| s.flat.end).max(start);
        let file = rank_file_name(shard.rank);
        let mut md = BTreeMap::new();
        md.insert("rank".to_string(), shard.rank.to_string());
        md.insert("flat_range".to_string(), format!("{start}..{end}"));
        let rec = write_safetensors(&tmp.join(&file), &tensors, Dtype::F32, &md)?;
        let receipt = Receipt {
            record: RankRecord {
                rank: shard.rank,
                file,
                start,
                end,
                buffers: shard.buffers.iter().map(|(n, _)| n.clone()).collect(),
                optimizer_step: shard.optimizer_step,
                segments: if shard.segments.is_empty() {
                    Vec::new()
                } else {
                    segs.iter().map(|s| [s.flat.start, s.flat.end]).collect()
                },
            },
            file: rec,
        };
        let bytes = serde_json::to_vec_pretty(&receipt)
            .map_err(|e| CheckpointError::InvalidInput(e.to_string()))?;
        write_file_synced(&tmp.join(receipt_name(shard.rank)), &bytes)
    }

    /// Step 3, on rank 0 only, after every rank's [`Self::save_rank`] returned: checks that all
    /// `world_size` rank files are there, writes the model-weights file (if `weights` is given)
    /// and the manifest, fsyncs, renames the temporary directory to `<root>/<tag>`, and (if
    /// `save_latest`) points `latest` at it.
    pub fn finalize(
        &self,
        tag: &str,
        meta: &CheckpointMeta,
        weights: Option<&Weights<'_>>,
        save_latest: bool,
    ) -> Result<()> {
        validate_tag(tag)?;
        meta.validate()?;
        let tmp = self.tmp_dir(tag);
        let numel = meta.numel();
        let mut ranks = Vec::with_capacity(meta.world_size);
        let mut files = BTreeMap::new();
        for r in 0..meta.world_size {
            let rp = tmp.join(receipt_name(r));
            let bytes = match fs::read(&rp) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CheckpointError::IncompleteSave {
                        tag: tag.into(),
                        reason: format!("rank {r} of {} has not written {} (did every rank call save_rank before finalize?)", meta.world_size, rp.display()),
                    })
                }
                Err(e) => return Err(io_err(&rp)(e)),
            };
            let receipt: Receipt =
                serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Malformed {
                    path: rp.clone(),
                    reason: e.to_string(),
                })?;
            files.insert(receipt.record.file.clone(), receipt.file);
            ranks.push(receipt.record);
            fs::remove_file(&rp).map_err(io_err(&rp))?;
        }
        let model_file = match weights {
            Some(w) => {
                let mut tensors = Vec::with_capacity(meta.params.len());
                for p in &meta.params {
                    let data = w
                        .iter()
                        .find(|(n, _)| n == &p.name)
                        .map(|(_, d)| d)
                        .ok_or_else(|| {
                            CheckpointError::InvalidInput(format!(
                                "weights lack parameter {:?}",
                                p.name
                            ))
                        })?;
                    tensors.push(TensorOut {
                        name: &p.name,
                        shape: p.shape.clone(),
                        parts: vec![data],
                    });
                }
                if w.len() != meta.params.len() {
                    return Err(CheckpointError::InvalidInput(format!(
                        "{} weights given for {} parameters",
                        w.len(),
                        meta.params.len()
                    )));
                }
                let rec = write_safetensors(
                    &tmp.join(MODEL_FILE),
                    &tensors,
                    Dtype::F32,
                    &BTreeMap::new(),
                )?;
                files.insert(MODEL_FILE.to_string(), rec);
                Some(MODEL_FILE.to_string())
            }
            None => None,
        };
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            tag: tag.into(),
            numel,
            meta: meta.clone(),
            model_file,
            ranks,
            files,
        };
        // Never write a manifest that loading would refuse (e.g. ranks that leave part of the
        // flat space unsaved).
        check_layout(&manifest).map_err(|reason| CheckpointError::IncompleteSave {
            tag: tag.into(),
            reason,
        })?;
        let bytes = encode_manifest(&manifest)?;
        write_file_synced(&tmp.join(MANIFEST_FILE), &bytes)?;
        fsync_dir(&tmp)?;
        // Move into place. Overwriting an existing tag: move the old one aside first; a crash
        // in between is recovered by `resolve_dir` (it falls back to `.old-<tag>`).
        let dst = self.root.join(tag);
        let old = self.old_dir(tag);
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        if dst.exists() {
            fs::rename(&dst, &old).map_err(io_err(&dst))?;
        }
        fs::rename(&tmp, &dst).map_err(io_err(&tmp))?;
        fsync_dir(&self.root)?;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        if save_latest {
            self.set_latest(tag)?;
        }
        Ok(())
    }

    /// Atomically points `latest` at `tag` (write `.latest.tmp`, fsync, rename, fsync dir).
    pub fn set_latest(&self, tag: &str) -> Result<()> {
        validate_tag(tag)?;
        let tmp = self.root.join(".latest.tmp");
        write_file_synced(&tmp, tag.as_bytes())?;
        let dst = self.root.join(LATEST_FILE);
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        fsync_dir(&self.root)
    }

    fn resolve_dir(&self, tag: &str) -> Result<PathBuf> {
        let dir = self.tag_dir(tag)?;
        if dir.join(MANIFEST_FILE).is_file() {
            return Ok(dir);
        }
        if dir.join(MANIFEST_FILE).exists() {
            // There, but not a regular file (a FIFO would block the reader): say so.
            crate::format::check_regular_file(&dir.join(MANIFEST_FILE))?;
        }
        let old = self.old_dir(tag);
        if !dir.exists() && old.join(MANIFEST_FILE).is_file() {
            return Ok(old);
        }
        Err(CheckpointError::TagNotFound {
            tag: tag.into(),
            path: dir.join(MANIFEST_FILE),
        })
    }

    /// Opens `tag` (or `latest`), checks the manifest's version and every file's size and
    /// checksum. Convenience for [`CheckpointStore::load`].
    pub fn open(&self, tag: Option<&str>) -> Result<Checkpoint> {
        let tag = match tag {
            Some(t) => t.to_string(),
            None => self.latest()?.ok_or_else(|| CheckpointError::NoLatest {
                dir: self.root.clone(),
            })?,
        };
        let dir = self.resolve_dir(&tag)?;
        Checkpoint::open_dir(&dir)
    }
}

impl CheckpointStore for FsCheckpointStore {
    fn save(&self, tag: &str, request: &SaveRequest<'_>) -> Result<()> {
        validate_tag(tag)?;
        request.meta.validate()?;
        if request.shards.len() != request.meta.world_size {
            return Err(CheckpointError::InvalidInput(format!(
                "{} shards given for world_size {}",
                request.shards.len(),
                request.meta.world_size
            )));
        }
        for s in &request.shards {
            check_shard(&request.meta, s)?;
        }
        self.prepare(tag)?;
        for s in &request.shards {
            self.save_rank(tag, &request.meta, s)?;
        }
        self.finalize(
            tag,
            &request.meta,
            request.weights.as_ref(),
            request.save_latest,
        )
    }

    fn load(&self, tag: Option<&str>) -> Result<Checkpoint> {
        self.open(tag)
    }

    fn prepare(&self, tag: &str) -> Result<()> {
        FsCheckpointStore::prepare(self, tag)
    }

    fn save_rank(&self, tag: &str, meta: &CheckpointMeta, shard: &RankShard<'_>) -> Result<()> {
        FsCheckpointStore::save_rank(self, tag, meta, shard)
    }

    fn finalize(
        &self,
        tag: &str,
        meta: &CheckpointMeta,
        weights: Option<&Weights<'_>>,
        save_latest: bool,
    ) -> Result<()> {
        FsCheckpointStore::finalize(self, tag, meta, weights, save_latest)
    }

    fn location(&self, tag: &str) -> String {
        self.root.join(tag).display().to_string()
    }

    fn latest(&self) -> Result<Option<String>> {
        let p = self.root.join(LATEST_FILE);
        let malformed = |reason: String| CheckpointError::Malformed {
            path: p.clone(),
            reason,
        };
        match fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&p)(e)),
            Ok(m) if !m.file_type().is_file() => {
                return Err(malformed(
                    "not a regular file (a symbolic link, FIFO or directory); `latest` is a small file this store writes".into(),
                ))
            }
            Ok(m) if m.len() > 512 => {
                return Err(malformed(format!(
                    "{} bytes; `latest` holds one tag of at most 200 bytes",
                    m.len()
                )))
            }
            Ok(_) => {}
        }
        match fs::read(&p) {
            Ok(bytes) => {
                let Ok(s) = String::from_utf8(bytes) else {
                    return Err(malformed("not UTF-8 text".into()));
                };
                let t = s.trim();
                // The reason names the rule broken; the content is shown shortened and escaped.
                validate_tag(t).map_err(|e| {
                    let why = match e {
                        CheckpointError::InvalidTag { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    let preview: String = t.chars().take(40).collect();
                    malformed(format!(
                        "the tag {preview:?}{} {why}",
                        if t.chars().count() > 40 { "..." } else { "" }
                    ))
                })?;
                Ok(Some(t.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut tags = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let e = e.map_err(io_err(&self.root))?;
            if let Some(name) = e.file_name().to_str() {
                if validate_tag(name).is_ok() && e.path().join(MANIFEST_FILE).is_file() {
                    tags.push(name.to_string());
                }
            }
        }
        tags.sort();
        Ok(tags)
    }
}

/// One run of a flat buffer held by a saved rank: flat `start..end` at element `at` of the
/// rank file's tensor.
#[derive(Debug, Clone, Copy)]
struct HeldRun {
    start: usize,
    end: usize,
    rank: usize,
    at: usize,
}

/// Where every element of one flat buffer lives: runs sorted by start, and for each prefix
/// the index of the run reaching furthest (so the run covering a position that extends
/// furthest is found by one binary search).
#[derive(Debug, Default)]
struct BufferIndex {
    runs: Vec<HeldRun>,
    furthest: Vec<usize>,
}

impl BufferIndex {
    fn new(mut runs: Vec<HeldRun>) -> Self {
        runs.retain(|r| r.start < r.end);
        runs.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
        let mut furthest = Vec::with_capacity(runs.len());
        let mut best = 0usize;
        for (i, r) in runs.iter().enumerate() {
            if i == 0 || r.end > runs[best].end {
                best = i;
            }
            furthest.push(best);
        }
        BufferIndex { runs, furthest }
    }

    /// The run covering `pos` that extends furthest, or the start of the next run.
    fn find(&self, pos: usize) -> Result<HeldRun, Option<usize>> {
        let p = self.runs.partition_point(|r| r.start <= pos);
        if p > 0 {
            let r = self.runs[self.furthest[p - 1]];
            if r.end > pos {
                return Ok(r);
            }
        }
        Err(self.runs.get(p).map(|r| r.start))
    }
}

/// An opened checkpoint: the manifest is checked against its own checksum
/// ([`MANIFEST_CHECKSUM_FIELD`]) and for consistency (parameters back to back, every element of
/// every flat buffer held by the ranks exactly once, a record for exactly the files it names),
/// every file's size, header blocks, whole-file CRC32 (against its block CRC32s) and
/// safetensors header (offsets ordered, without overlap or hole) checked, and the headers'
/// tensors, shapes and rank metadata cross-checked with the manifest. Tensor data is verified against the per-block checksums as it is read:
/// no byte that fails its checksum is ever returned ([`Checkpoint::verify`] checks everything
/// at once). Reads any range of any flat buffer (resharding) and any weight by name.
pub struct Checkpoint {
    dir: PathBuf,
    manifest: Manifest,
    manifest_crc32: Option<u32>,
    model: Option<TensorFile>,
    ranks: Vec<TensorFile>,
    index: BTreeMap<String, BufferIndex>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tag", &self.manifest.tag)
            .finish()
    }
}

impl Checkpoint {
    /// Opens a tag directory directly, with every check described on [`Checkpoint`]; the
    /// first failure is returned, naming the file and what was expected.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST_FILE);
        crate::format::check_regular_file(&mpath)?;
        let bytes = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingFile { path: mpath })
            }
            Err(e) => return Err(io_err(&mpath)(e)),
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Malformed {
                path: mpath.clone(),
                reason: format!("not valid JSON: {e}"),
            })?;
        let found = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| CheckpointError::Malformed {
                path: mpath.clone(),
                reason: "no integer \"format_version\"".into(),
            })?;
        if !(MIN_FORMAT_VERSION as u64..=FORMAT_VERSION as u64).contains(&found) {
            return Err(CheckpointError::VersionMismatch {
                path: mpath,
                found: found as u32,
                expected: FORMAT_VERSION,
            });
        }
        let bad = |reason: String| CheckpointError::Malformed {
            path: mpath.clone(),
            reason,
        };
        // The manifest's checksum of itself (format version 3; optional before).
        let seal = manifest_seal(&bytes).map_err(bad)?;
        let mut value = value;
        let had_field = value
            .as_object_mut()
            .and_then(|o| o.remove(MANIFEST_CHECKSUM_FIELD))
            .is_some();
        if seal.is_none() && had_field {
            return Err(bad(format!(
                "its {MANIFEST_CHECKSUM_FIELD} field is not the first line of the object as written (`  \"{MANIFEST_CHECKSUM_FIELD}\": \"<8 hex digits>\",` on line 2): the file was rewritten after it was saved"
            )));
        }
        if seal.is_none() && found >= 3 {
            return Err(bad(format!(
                "no {MANIFEST_CHECKSUM_FIELD} line (required from format version 3, this manifest says {found}): its content cannot be verified"
            )));
        }
        let parsed: std::result::Result<Manifest, _> = serde_json::from_value(value);
        if let Some((recorded, actual)) = seal {
            if recorded != actual {
                let detail = match &parsed {
                    Ok(m) => check_layout(m)
                        .err()
                        .map(|e| format!("{e}{}", model_file_hint(dir, m))),
                    Err(e) => Some(format!("it no longer parses as a manifest: {e}")),
                };
                return Err(CheckpointError::ManifestChecksum {
                    path: mpath.clone(),
                    expected: recorded,
                    actual,
                    detail,
                });
            }
        }
        let manifest = parsed.map_err(|e| bad(e.to_string()))?;
        check_layout(&manifest)
            .map_err(|e| bad(format!("{e}{}", model_file_hint(dir, &manifest))))?;
        let open = |name: &str| -> Result<TensorFile> {
            let rec = manifest
                .files
                .get(name)
                .ok_or_else(|| bad(format!("no checksum for file {name:?}")))?;
            TensorFile::open(&dir.join(name), Some(rec))
        };
        let model = manifest.model_file.as_deref().map(open).transpose()?;
        let mut ranks = Vec::with_capacity(manifest.ranks.len());
        let mut runs: BTreeMap<String, Vec<HeldRun>> = BTreeMap::new();
        for (i, r) in manifest.ranks.iter().enumerate() {
            let segs = r.flat_segments();
            let f = open(&r.file)?;
            let held = r.held();
            let file_bad = |reason: String| CheckpointError::Malformed {
                path: f.path.clone(),
                reason,
            };
            // The file's own record of whose it is and what it holds (written by save_rank)
            // must agree with the manifest.
            if let Some(fr) = f.metadata.get("rank") {
                if fr != &i.to_string() {
                    return Err(file_bad(format!(
                        "its header says rank {fr}, the manifest lists it as ranks[{i}]"
                    )));
                }
            }
            if let Some(fr) = f.metadata.get("flat_range") {
                if fr != &format!("{}..{}", r.start, r.end) {
                    return Err(file_bad(format!(
                        "its header says it holds flat range {fr}, ranks[{i}] of the manifest says {}..{}",
                        r.start, r.end
                    )));
                }
            }
            if let Some(extra) = f.tensors.keys().find(|t| !r.buffers.contains(t)) {
                return Err(file_bad(format!(
                    "holds tensor {extra:?}, which ranks[{i}] of the manifest does not list among its buffers {:?}",
                    r.buffers
                )));
            }
            for b in &r.buffers {
                match f.entry(b) {
                    Some(e) if e.shape == [held] => {}
                    Some(e) => {
                        return Err(file_bad(format!(
                            "buffer {b:?} has shape {:?}, ranks[{i}] of the manifest holds {held} elements",
                            e.shape
                        )))
                    }
                    None => {
                        return Err(file_bad(format!(
                            "buffer {b:?}, listed by ranks[{i}] of the manifest, is not in the file"
                        )))
                    }
                }
                let list = runs.entry(b.clone()).or_default();
                let mut at = 0;
                for s in &segs {
                    list.push(HeldRun {
                        start: s.start,
                        end: s.end,
                        rank: i,
                        at,
                    });
                    at += s.len();
                }
            }
            ranks.push(f);
        }
        let index = runs
            .into_iter()
            .map(|(b, r)| (b, BufferIndex::new(r)))
            .collect();
        if let Some(m) = &model {
            if let Some(extra) = m
                .tensors
                .keys()
                .find(|t| !manifest.meta.params.iter().any(|p| &p.name == *t))
            {
                return Err(CheckpointError::Malformed {
                    path: m.path.clone(),
                    reason: format!(
                        "holds parameter {extra:?}, which the manifest's params do not list (a deleted entry?)"
                    ),
                });
            }
            for p in &manifest.meta.params {
                match m.entry(&p.name) {
                    Some(e) if e.shape == p.shape => {}
                    _ => {
                        return Err(CheckpointError::Malformed {
                            path: m.path.clone(),
                            reason: format!(
                                "parameter {:?} missing or not of shape {:?}",
                                p.name, p.shape
                            ),
                        })
                    }
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            manifest,
            manifest_crc32: seal.map(|(recorded, _)| recorded),
            model,
            ranks,
            index,
        })
    }

    /// Reads every file completely, checking every checksum (a load checks only what it
    /// reads, as it reads it).
    pub fn verify(&self) -> Result<()> {
        for f in self.model.iter().chain(&self.ranks) {
            f.verify_all()?;
        }
        Ok(())
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.manifest.tag
    }
    /// The tag directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The manifest (ranks, files, checksums).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The manifest's checksum of itself, verified when it was opened; `None` for a manifest
    /// written before format version 3, which has none (its content is then only checked for
    /// consistency, not against a checksum).
    pub fn manifest_checksum(&self) -> Option<u32> {
        self.manifest_crc32
    }
    /// Metadata: world size, stage, parameters.
    pub fn meta(&self) -> &CheckpointMeta {
        &self.manifest.meta
    }
    /// Training state: steps, samples, scheduler, scaler, RNG, sampler, client state.
    pub fn training(&self) -> &TrainingState {
        &self.manifest.meta.training
    }
    /// Number of elements of the unpadded flat space.
    pub fn numel(&self) -> usize {
        self.manifest.numel
    }
    /// The optimizer step count saved by rank 0.
    pub fn optimizer_step(&self) -> u64 {
        self.manifest.ranks.first().map_or(0, |r| r.optimizer_step)
    }
    /// Names of the flat buffers saved (union over ranks, sorted).
    pub fn buffer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .manifest
            .ranks
            .iter()
            .flat_map(|r| r.buffers.iter().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Elements `range` of flat buffer `buffer`, assembled from whichever saved ranks hold
    /// them: the way a run loads its own shard after changing world size or ZeRO stage.
    /// Elements at or past `numel` (padding) are zero. Fails if part of the range is held by
    /// no rank.
    pub fn load_flat_range(&self, buffer: &str, range: Range<usize>) -> Result<Vec<f32>> {
        if range.start > range.end {
            return Err(CheckpointError::InvalidInput(format!(
                "reversed range {range:?}"
            )));
        }
        // Zeroed by the allocator (fresh pages), so padding costs nothing and the reads go
        // straight into the result.
        let mut out = vec![0f32; range.len()];
        self.load_flat_range_into(buffer, range.start, &mut out)?;
        Ok(out)
    }

    /// [`Checkpoint::load_flat_range`] into a caller's buffer: elements `start..start +
    /// out.len()` of flat buffer `buffer` (padding past `numel` is set to zero).
    pub fn load_flat_range_into(&self, buffer: &str, start: usize, out: &mut [f32]) -> Result<()> {
        let Some(index) = self.index.get(buffer) else {
            return Err(CheckpointError::NotFound {
                tag: self.tag().into(),
                what: format!("flat buffer {buffer:?}"),
            });
        };
        let end = start + out.len();
        let stop = end.min(self.manifest.numel).max(start);
        let mut pos = start;
        while pos < stop {
            match index.find(pos) {
                Ok(run) => {
                    let hi = stop.min(run.end);
                    self.ranks[run.rank].read_f32_into(
                        buffer,
                        run.at + (pos - run.start),
                        &mut out[pos - start..hi - start],
                    )?;
                    pos = hi;
                }
                Err(next) => {
                    return Err(CheckpointError::RangeNotCovered {
                        tag: self.tag().into(),
                        buffer: buffer.into(),
                        start: pos,
                        end: next.unwrap_or(stop).min(stop),
                    });
                }
            }
        }
        out[stop - start..].fill(0.0);
        Ok(())
    }

    /// Parameter `name` as fp32: from the model file when there is one, else from the
    /// [`MASTER_BUFFER`] flat buffer.
    pub fn read_weight(&self, name: &str) -> Result<Vec<f32>> {
        let p = self
            .manifest
            .meta
            .params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| CheckpointError::NotFound {
                tag: self.tag().into(),
                what: format!("parameter {name:?}"),
            })?;
        match &self.model {
            Some(m) => {
                let mut out = vec![0f32; p.numel()];
                m.read_f32_into(name, 0, &mut out)?;
                Ok(out)
            }
            None => self.load_flat_range(MASTER_BUFFER, p.range()),
        }
    }

    /// Every parameter as `(name, shape, fp32 data)`, in flat order.
    pub fn read_all_weights(&self) -> Result<Vec<NamedWeight>> {
        self.manifest
            .meta
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), p.shape.clone(), self.read_weight(&p.name)?)))
            .collect()
    }
}
