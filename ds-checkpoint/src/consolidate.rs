//! Consolidation (DeepSpeed's `zero_to_fp32`): one safetensors file of full weights.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{io_err, CheckpointError, Result};
use crate::format::{write_safetensors, Dtype, FileRecord, TensorOut};
use crate::store::{Checkpoint, MASTER_BUFFER};

/// Writes every parameter of `ckpt` by name into one safetensors file at `out`, cast to
/// `dtype`; loadable by `candle_core::safetensors::load`, candle-nn's `VarBuilder` and
/// Python's `safetensors`.
///
/// Values come from the fp32 [`MASTER_BUFFER`] flat buffer when the checkpoint has one (the
/// full-precision truth, like `zero_to_fp32`), else from the model-weights file. Every file of
/// the checkpoint is verified whole first ([`Checkpoint::verify`]), the parts not copied
/// (optimizer state, the model file) included: an export is not made from a checkpoint with a
/// corrupt byte anywhere. The file is written next to `out` and renamed into place, so `out`
/// is never left half-written.
pub fn consolidate(ckpt: &Checkpoint, out: &Path, dtype: Dtype) -> Result<FileRecord> {
    // Writing into the checkpoint's own directory would replace one of its files (the
    // manifest's checksums would then no longer match) or add a stray one.
    let dir = std::fs::canonicalize(ckpt.dir()).map_err(io_err(ckpt.dir()))?;
    let out_dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::fs::canonicalize(out_dir).is_ok_and(|p| p.starts_with(&dir)) {
        return Err(CheckpointError::InvalidInput(format!(
            "{}: the output is inside the checkpoint directory {} and would overwrite or add to its files; write it elsewhere",
            out.display(),
            ckpt.dir().display()
        )));
    }
    ckpt.verify()?;
    let from_master = ckpt.buffer_names().iter().any(|b| b == MASTER_BUFFER);
    let mut data = Vec::with_capacity(ckpt.meta().params.len());
    for p in &ckpt.meta().params {
        let v = if from_master {
            ckpt.load_flat_range(MASTER_BUFFER, p.range())?
        } else {
            ckpt.read_weight(&p.name)?
        };
        data.push(v);
    }
    let tensors: Vec<TensorOut<'_>> = ckpt
        .meta()
        .params
        .iter()
        .zip(&data)
        .map(|(p, d)| TensorOut {
            name: &p.name,
            shape: p.shape.clone(),
            parts: vec![d],
        })
        .collect();
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    md.insert("source_tag".to_string(), ckpt.tag().to_string());
    md.insert(
        "global_step".to_string(),
        ckpt.training().global_step.to_string(),
    );
    let mut tmp_name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = out.with_file_name(tmp_name);
    let rec = write_safetensors(&tmp, &tensors, dtype, &md)?;
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    Ok(rec)
}
