//! Model-state memory per rank for each ZeRO stage, before a run.
//!
//! The ZeRO paper's formulas (arXiv:1910.02054 §5), with Ψ parameters, N data-parallel ranks
//! and K bytes of optimizer state per parameter:
//!
//! | stage | params | grads | optimizer |
//! |---|---|---|---|
//! | 0 | 2Ψ | 2Ψ | KΨ |
//! | 1 | 2Ψ | 2Ψ | KΨ/N |
//! | 2 | 2Ψ | 2Ψ/N | KΨ/N |
//! | 3 | 2Ψ/N | 2Ψ/N | KΨ/N |
//!
//! in mixed precision (16-bit params and grads; K = 12 for Adam: fp32 master weights, momentum
//! and variance). In fp32 the params and grads take 4 bytes each; K = 8 (Adam's moments) at
//! stage 0, where the model weights are the master weights, and K = 8 + 4 from stage 1 on,
//! where each rank keeps its fp32 master shard apart from the model (as DeepSpeed's
//! `single_partition_of_fp32_groups` and this crate's `ZeroOptimizer` do).
//! Partitioned sizes are rounded up exactly as [`crate::partition`] lays them out.

use serde::Serialize;

use crate::ZeroError;

/// Training precision of the model states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 16-bit params and grads, fp32 master weights and optimizer state.
    Mixed,
    /// Everything fp32.
    Fp32,
}

/// Memory of the model states on one rank, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Parameters in the model dtype.
    pub params_bytes: u64,
    /// Gradients in the model dtype.
    pub grads_bytes: u64,
    /// Optimizer state (and fp32 master weights in mixed precision).
    pub optimizer_bytes: u64,
    /// The sum.
    pub per_rank_bytes: u64,
}

/// Estimates per-rank model-state memory. `optimizer_state_bytes` is the optimizer's own fp32
/// state per parameter (8 for Adam/Lamb, 4 for Lion or SGD with momentum).
pub fn estimate(
    params: u64,
    world_size: u64,
    stage: u8,
    precision: Precision,
    optimizer_state_bytes: u64,
) -> Result<MemoryEstimate, ZeroError> {
    if world_size == 0 {
        return Err(ZeroError::Option("world size must be >= 1".into()));
    }
    if stage > 3 {
        return Err(ZeroError::Option(format!(
            "ZeRO stage {stage} does not exist; allowed: 0, 1, 2 or 3"
        )));
    }
    let (pb, k) = match precision {
        Precision::Mixed => (2u64, optimizer_state_bytes + 4),
        Precision::Fp32 if stage == 0 => (4u64, optimizer_state_bytes),
        Precision::Fp32 => (4u64, optimizer_state_bytes + 4),
    };
    // Stage 1/2 flat partition (padded to a multiple of 2N), stage 3 per-tensor ceil: for one
    // flat group both are ceil(Ψ / N) up to the alignment.
    let align = 2 * world_size;
    let shard = params.div_ceil(align) * align / world_size;
    let (p_elems, g_elems, o_elems) = match stage {
        // Stage 0 steps the whole (padded) flat buffer on every rank.
        0 => (params, params, shard * world_size),
        1 => (params, params, shard),
        2 => (params, shard, shard),
        // Stage 3 partitions each parameter on its own: ceil(numel / N) per rank.
        _ => {
            let s3 = params.div_ceil(world_size);
            (s3, s3, s3)
        }
    };
    let params_bytes = p_elems * pb;
    let grads_bytes = g_elems * pb;
    let optimizer_bytes = o_elems * k;
    Ok(MemoryEstimate {
        params_bytes,
        grads_bytes,
        optimizer_bytes,
        per_rank_bytes: params_bytes + grads_bytes + optimizer_bytes,
    })
}

/// ZeRO-Infinity placements of one rank's model states: what stays in memory, what goes to
/// the swap files, and the disk traffic of one optimizer step (as [`crate::offload`] runs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlacedEstimate {
    /// Model-state bytes held in memory (parameters, gradients, and optimizer state where it
    /// is not swapped).
    pub memory_bytes: u64,
    /// Bytes in swap files on this rank's disk.
    pub disk_bytes: u64,
    /// Bytes read from the swap files per optimizer step.
    pub disk_read_bytes_per_step: u64,
    /// Bytes written to the swap files per optimizer step.
    pub disk_write_bytes_per_step: u64,
}

/// Places an [`estimate`] on memory and disk. `optimizer_nvme`: master weights and optimizer
/// state swapped (stages 1-3); `param_nvme`: stage-3 parameters swapped except the first
/// `max_in_cpu` elements of the part; `grad_accum`: micro-batches per step (each reads every
/// swapped block twice: forward, and the recompute of the backward pass);
/// `model_bytes`: bytes per model weight (4 fp32, 2 fp16/bf16). In fp32 with both swapped the
/// parameters are read from the master file (no second copy).
#[allow(clippy::too_many_arguments)]
pub fn place(
    e: &MemoryEstimate,
    stage: u8,
    optimizer_nvme: bool,
    param_nvme: bool,
    max_in_cpu: u64,
    grad_accum: u64,
    model_bytes: u64,
) -> Result<PlacedEstimate, ZeroError> {
    if optimizer_nvme && stage == 0 {
        return Err(ZeroError::Option(
            "optimizer offload needs ZeRO stage 1, 2 or 3".into(),
        ));
    }
    if param_nvme && stage != 3 {
        return Err(ZeroError::Option(format!(
            "parameter offload needs ZeRO stage 3, not {stage}"
        )));
    }
    let mut mem = e.per_rank_bytes;
    let (mut disk, mut rd, mut wr) = (0u64, 0u64, 0u64);
    if optimizer_nvme {
        mem -= e.optimizer_bytes;
        disk += e.optimizer_bytes;
        rd += e.optimizer_bytes;
        wr += e.optimizer_bytes;
    }
    if param_nvme {
        let part = e.params_bytes;
        let resident = (max_in_cpu.saturating_mul(model_bytes)).min(part);
        let swapped = part - resident;
        mem -= swapped;
        let shared = optimizer_nvme && model_bytes == 4;
        if !shared {
            disk += part;
            wr += part;
        }
        rd += swapped.saturating_mul(2).saturating_mul(grad_accum.max(1));
    }
    Ok(PlacedEstimate {
        memory_bytes: mem,
        disk_bytes: disk,
        disk_read_bytes_per_step: rd,
        disk_write_bytes_per_step: wr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1e9 fp32 parameters, one rank, stage 3, Adam: 20 GB of model states (weights,
    /// gradients, master copy, moments). Optimizer on disk:
    /// 12 GB (master + moments) there, read and written once a step; parameters too: the
    /// master file serves them, read twice per micro-batch, nothing more written.
    #[test]
    fn placements() {
        let e = estimate(1_000_000_000, 1, 3, Precision::Fp32, 8).unwrap();
        assert_eq!(e.per_rank_bytes, 20_000_000_000);
        let p = place(&e, 3, true, false, 0, 1, 4).unwrap();
        assert_eq!(
            (p.memory_bytes, p.disk_bytes),
            (8_000_000_000, 12_000_000_000)
        );
        assert_eq!(
            (p.disk_read_bytes_per_step, p.disk_write_bytes_per_step),
            (12_000_000_000, 12_000_000_000)
        );
        let p = place(&e, 3, true, true, 100_000_000, 2, 4).unwrap();
        assert_eq!(p.memory_bytes, 4_000_000_000 + 400_000_000);
        assert_eq!(p.disk_bytes, 12_000_000_000);
        assert_eq!(
            p.disk_read_bytes_per_step,
            12_000_000_000 + 4 * 3_600_000_000
        );
        assert_eq!(p.disk_write_bytes_per_step, 12_000_000_000);
        // Mixed precision, parameters alone: a 2-byte copy on disk, written each step.
        let m = estimate(1_000_000_000, 1, 3, Precision::Mixed, 8).unwrap();
        let p = place(&m, 3, false, true, 0, 1, 2).unwrap();
        assert_eq!(p.disk_bytes, 2_000_000_000);
        assert_eq!(p.memory_bytes, m.per_rank_bytes - 2_000_000_000);
        assert!(place(&e, 2, false, true, 0, 1, 4).is_err());
        assert!(place(
            &estimate(10, 1, 0, Precision::Fp32, 8).unwrap(),
            0,
            true,
            false,
            0,
            1,
            4
        )
        .is_err());
    }

    /// The ZeRO paper's example: Ψ = 7.5B, N = 64, K = 12, mixed precision:
    /// 120 GB -> 31.4 GB -> 16.6 GB -> 1.9 GB.
    #[test]
    fn paper_example() {
        let psi = 7_500_000_000u64;
        let gb = |s| {
            estimate(psi, 64, s, Precision::Mixed, 8)
                .unwrap()
                .per_rank_bytes as f64
                / 1e9
        };
        assert!((gb(0) - 120.0).abs() < 0.05, "{}", gb(0));
        assert!((gb(1) - 31.4).abs() < 0.05, "{}", gb(1));
        assert!((gb(2) - 16.6).abs() < 0.05, "{}", gb(2));
        assert!((gb(3) - 1.9).abs() < 0.05, "{}", gb(3));
    }

    #[test]
    fn fp32_and_errors() {
        let e = estimate(1000, 4, 2, Precision::Fp32, 8).unwrap();
        assert_eq!(e.params_bytes, 4000);
        assert_eq!(e.grads_bytes, 1000);
        // 250 elements per rank x (8 bytes of Adam state + 4 of master copy).
        assert_eq!(e.optimizer_bytes, 3000);
        assert_eq!(
            estimate(1000, 4, 0, Precision::Fp32, 8)
                .unwrap()
                .optimizer_bytes,
            8000
        );
        assert!(estimate(1, 0, 0, Precision::Fp32, 8).is_err());
        assert!(estimate(1, 1, 4, Precision::Fp32, 8).is_err());
    }
}
