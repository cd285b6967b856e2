//! Streamed gradient reduction for ZeRO stages 2 and 3: gradients are reduced as the backward
//! pass produces them, bucket by bucket, and each rank keeps only the reduced gradients of its
//! own shard (no full-size reduced gradient buffer).
//!
//! - Stage 2 (DeepSpeed's `average_tensor` with contiguous partitions): a bucket spans a
//!   contiguous range of the flat parameter space; the part of it that falls in rank `r`'s
//!   partition is reduced onto rank `r` ([`Communicator::reduce`]), so the bucket's traffic is
//!   its own size, not twice it as an all-reduce would be.
//! - Stage 3 (per-parameter partition): the bucket's parameters are laid out rank-major (rank
//!   `r`'s chunk of every parameter, then rank `r + 1`'s, ...) and reduce-scattered, each rank
//!   receiving its chunks.
//!
//! The reduction takes `&self`, so a communication thread can run it (on a second communicator
//! of the same ranks) while the model goes on with the backward pass; its results
//! ([`GradPiece`]s) are added into the shard's gradients afterwards with
//! [`ZeroOptimizer::add_grad_pieces`]. Every rank must reduce the same parameter ranges in the
//! same order. The reduced gradient is accumulated over the micro-batches of one accumulation
//! step, as DeepSpeed's stage 2 does, and consumed by [`ZeroOptimizer::step`].

use std::ops::Range;

use candle_core::DType;
use ds_comm::{Communicator, ReduceOp};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::zero::{bucketed_reduce_scatter, to_tensor, to_vec, GradStats, Wire, ZeroOptimizer};
use crate::ZeroError;
use crate::ZeroPrecision;

/// Reduced gradients that belong to this rank's shard: `values` go to shard elements
/// `offset .. offset + values.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct GradPiece {
    /// Offset into this rank's gradient shard.
    pub offset: usize,
    /// The reduced (summed over ranks, pre-scaled) gradient values.
    pub values: Vec<f32>,
}

impl ZeroOptimizer {
    /// Whether this stage partitions gradients (stages 2 and 3): their reduction can be
    /// streamed during the backward pass with [`ZeroOptimizer::reduce_grad_range`].
    pub fn partitions_gradients(&self) -> bool {
        self.opts.stage >= 2
    }

    /// The flat element range of parameters `params` (indices in the order given to
    /// [`ZeroOptimizer::new`]).
    pub fn param_span(&self, params: Range<usize>) -> Result<Range<usize>, ZeroError> {
        let np = self.layout.param_ranges.len();
        if params.start >= params.end || params.end > np {
            return Err(ZeroError::Shape(format!(
                "parameter range {params:?} is empty or outside the {np} parameters"
            )));
        }
        Ok(self.layout.param_ranges[params.start].start
            ..self.layout.param_ranges[params.end - 1].end)
    }

    /// Starts the streamed reduction of one micro-batch. `first`: the first micro-batch since
    /// the last [`ZeroOptimizer::step`] (this rank's gradient shard is zeroed, later
    /// micro-batches add to it). Errors below stage 2.
    pub fn begin_streamed(&mut self, first: bool, world_size: usize) -> Result<(), ZeroError> {
        if !self.partitions_gradients() {
            return Err(ZeroError::Option(format!(
                "streamed gradient reduction needs ZeRO stage 2 or 3 (this optimizer runs stage {})",
                self.opts.stage
            )));
        }
        let (_, after) = self.pre_scale(world_size);
        self.grad_scale = after;
        if first {
            self.grads.iter_mut().for_each(|g| *g = 0.0);
        }
        self.grad_stats = None;
        Ok(())
    }

    /// Reduces the local gradients of parameters `params` (`local`: their flat concatenation,
    /// multiplied by `scale` on the way, e.g. `1 / gradient_accumulation_steps`) over the
    /// ranks and returns the pieces of this rank's gradient shard. A collective: every rank
    /// calls it with the same `params`, in the same order. Buckets of `reduce_bucket_size`
    /// elements bound each message. `gradient_predivide_factor` / averaging are applied as in
    /// [`ZeroOptimizer::reduce_gradients`].
    pub fn reduce_grad_range(
        &self,
        params: Range<usize>,
        local: &[f32],
        scale: f32,
        comm: &dyn Communicator,
    ) -> Result<Vec<GradPiece>, ZeroError> {
        if !self.partitions_gradients() {
            return Err(ZeroError::Option(format!(
                "streamed gradient reduction needs ZeRO stage 2 or 3 (this optimizer runs stage {})",
                self.opts.stage
            )));
        }
        let span = self.param_span(params.clone())?;
        if local.len() != span.len() {
            return Err(ZeroError::Shape(format!(
                "got {} gradient elements for parameters {params:?} of {} elements",
                local.len(),
                span.len()
            )));
        }
        match self.precision.model_dtype() {
            DType::F16 => self.reduce_grad_range_wire::<f16>(params, span, local, scale, comm),
            DType::BF16 => self.reduce_grad_range_wire::<bf16>(params, span, local, scale, comm),
            _ => self.reduce_grad_range_wire::<f32>(params, span, local, scale, comm),
        }
    }

    /// [`ZeroOptimizer::reduce_grad_range`] communicating in `T` (the model dtype): each
    /// gradient is rounded to `T` after the `scale` (as the 16-bit model's backward of
    /// `loss / gradient_accumulation_steps` would hold it), the pre-division factor applied in
    /// `T`, reduced in `T` and widened into the pieces.
    fn reduce_grad_range_wire<T: Wire>(
        &self,
        params: Range<usize>,
        span: Range<usize>,
        local: &[f32],
        scale: f32,
        comm: &dyn Communicator,
    ) -> Result<Vec<GradPiece>, ZeroError> {
        let ws = comm.world_size();
        let (before, _) = self.pre_scale(ws);
        let narrow = |v: f32| -> T {
            let g = T::narrow(v * scale);
            if before == 1.0 {
                g
            } else {
                T::narrow(g.widen() * before)
            }
        };
        let widen = |v: Vec<T>| -> Vec<f32> { v.into_iter().map(Wire::widen).collect() };
        let bucket = self.opts.reduce_bucket_size.max(1);
        if let Some(l3) = &self.s3 {
            let base = l3.offsets[params.start];
            let piece = l3.offsets[params.end] - base;
            // Rank-major: rank r's chunk of every parameter in the range, zero-padded.
            let mut buf = vec![T::default(); ws * piece];
            for r in 0..ws {
                for i in params.clone() {
                    let pr = &self.layout.param_ranges[i];
                    let c = l3.chunks[i];
                    let lo = (r * c).min(pr.len());
                    let hi = ((r + 1) * c).min(pr.len());
                    let src = &local[pr.start - span.start + lo..pr.start - span.start + hi];
                    let at = r * piece + l3.offsets[i] - base;
                    for (d, &v) in buf[at..at + (hi - lo)].iter_mut().zip(src) {
                        *d = narrow(v);
                    }
                }
            }
            let values = if ws == 1 {
                buf
            } else {
                bucketed_reduce_scatter(&buf, piece, bucket, comm)?
            };
            return Ok(vec![GradPiece {
                offset: base,
                values: widen(values),
            }]);
        }
        // Stage 2: contiguous partitions; each chunk's pieces reduced onto their owners.
        let shard = self.layout.shard_len();
        let mut out = Vec::new();
        let mut k = span.start;
        while k < span.end {
            let end = (k + bucket).min(span.end);
            let mut lo = k;
            while lo < end {
                let owner = lo / shard;
                let hi = end.min((owner + 1) * shard);
                let vals: Vec<T> = local[lo - span.start..hi - span.start]
                    .iter()
                    .map(|&v| narrow(v))
                    .collect();
                let offset = lo - owner * shard;
                if ws == 1 {
                    out.push(GradPiece {
                        offset,
                        values: widen(vals),
                    });
                } else if let Some(t) = comm.reduce(&to_tensor(vals)?, ReduceOp::Sum, owner)? {
                    out.push(GradPiece {
                        offset,
                        values: widen(to_vec::<T>(&t)?),
                    });
                }
                lo = hi;
            }
            k = end;
        }
        Ok(out)
    }

    /// Adds reduced pieces (from [`ZeroOptimizer::reduce_grad_range`] on this rank) into this
    /// rank's gradient shard.
    pub fn add_grad_pieces(&mut self, pieces: &[GradPiece]) -> Result<(), ZeroError> {
        self.grad_stats = None;
        Self::add_pieces_into(&mut self.grads, pieces)
    }

    /// Takes this rank's gradient shard out of the optimizer, so that a backward pass can add
    /// each bucket's reduced pieces into it as they arrive ([`ZeroOptimizer::add_pieces_into`])
    /// while the optimizer is shared for gathers and reductions; give it back with
    /// [`ZeroOptimizer::restore_grad_part`] before the step. Holding every piece of a pass until
    /// its end would double the gradient memory.
    pub fn take_grad_part(&mut self) -> Vec<f32> {
        self.grad_stats = None;
        std::mem::take(&mut self.grads)
    }

    /// Gives back the shard taken by [`ZeroOptimizer::take_grad_part`].
    pub fn restore_grad_part(&mut self, part: Vec<f32>) -> Result<(), ZeroError> {
        if part.len() != self.part_len() {
            return Err(ZeroError::Shape(format!(
                "gradient shard of {} elements given back, this rank's part has {}",
                part.len(),
                self.part_len()
            )));
        }
        self.grads = part;
        self.grad_stats = None;
        Ok(())
    }

    /// [`ZeroOptimizer::restore_grad_part`] with the statistics that
    /// [`ZeroOptimizer::add_pieces_into_stats`] took while adding the last micro-batch's
    /// pieces, `covered` being the elements those pieces covered: when they cover every
    /// element a full pass reduces into this rank's part ([`ZeroOptimizer::streamed_cover`]),
    /// the next step uses the statistics instead of a norm pass of its own.
    pub fn restore_grad_part_with_stats(
        &mut self,
        part: Vec<f32>,
        stats: GradStats,
        covered: usize,
    ) -> Result<(), ZeroError> {
        self.restore_grad_part(part)?;
        if covered == self.streamed_cover() {
            self.grad_stats = Some(stats);
        }
        Ok(())
    }

    /// Whether, on `world_size` ranks, a rank's streamed gradients may be added straight into
    /// its taken gradient part ([`ZeroOptimizer::take_grad_part`]) at their flat offsets,
    /// times the caller's scale, instead of going through
    /// [`ZeroOptimizer::reduce_grad_range`]: one rank, fp32, no pre-division. The part then
    /// holds parameter `i` at its flat offset (stage 2's one shard, stage 3's one chunk per
    /// parameter) and the result is the same, bit for bit, without the reduction's buffers.
    pub fn direct_accumulation(&self, world_size: usize) -> bool {
        world_size == 1
            && self.partitions_gradients()
            && self.precision == ZeroPrecision::F32
            && self.pre_scale(1).0 == 1.0
    }

    /// Elements of this rank's part that the pieces of one full streamed pass cover (all of
    /// them at stage 3; at stage 2 the shard less its padding past the last parameter).
    pub fn streamed_cover(&self) -> usize {
        match &self.s3 {
            Some(l3) => l3.shard,
            None => {
                let sh = self.layout.shard(self.rank);
                self.layout.numel.min(sh.end).saturating_sub(sh.start)
            }
        }
    }

    /// [`ZeroOptimizer::add_pieces_into`] that returns the statistics of the sums it wrote
    /// (taken on each piece while it is in cache) and the elements covered: adding the last
    /// micro-batch of an accumulation step this way gives the step's gradient norm with no
    /// pass of its own (pieces must not overlap).
    pub fn add_pieces_into_stats(
        part: &mut [f32],
        pieces: &[GradPiece],
    ) -> Result<(GradStats, usize), ZeroError> {
        add_pieces(part, pieces, true)
    }

    /// Adds reduced pieces into a gradient shard (taken with
    /// [`ZeroOptimizer::take_grad_part`]).
    pub fn add_pieces_into(part: &mut [f32], pieces: &[GradPiece]) -> Result<(), ZeroError> {
        add_pieces(part, pieces, false).map(|_| ())
    }
}

/// Adds the pieces into `part` (in parallel chunks), with the statistics of the sums when
/// `stats` (each chunk checked while in cache) and the elements covered.
fn add_pieces(
    part: &mut [f32],
    pieces: &[GradPiece],
    stats: bool,
) -> Result<(GradStats, usize), ZeroError> {
    const CHUNK: usize = 1 << 15;
    let n = part.len();
    let mut st = GradStats::ZERO;
    let mut covered = 0;
    for p in pieces {
        let Some(dst) = part.get_mut(p.offset..p.offset + p.values.len()) else {
            return Err(ZeroError::Shape(format!(
                "gradient piece at {} of {} elements outside the shard of {n}",
                p.offset,
                p.values.len(),
            )));
        };
        let add = |d: &mut [f32], v: &[f32]| {
            for (a, &b) in d.iter_mut().zip(v) {
                *a += b;
            }
            if stats {
                GradStats::of_serial(d)
            } else {
                GradStats::ZERO
            }
        };
        let s = if dst.len() < 2 * CHUNK {
            add(dst, &p.values)
        } else {
            dst.par_chunks_mut(CHUNK)
                .zip(p.values.par_chunks(CHUNK))
                .map(|(d, v)| add(d, v))
                .reduce(|| GradStats::ZERO, GradStats::combine)
        };
        st = st.combine(s);
        covered += p.values.len();
    }
    Ok((st, covered))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{OptimizerSpec, SgdParams};
    use crate::{ZeroOptions, ZeroPrecision};
    use ds_comm::LocalComm;

    /// Streaming the gradients in reverse-order buckets of several sizes gives the same step
    /// as reducing the whole flat gradient at once, at stages 2 and 3 and world sizes 1-3.
    #[test]
    fn streamed_reduction_equals_whole_reduction() {
        let sizes = [7usize, 13, 1, 30, 5, 64, 3];
        let n: usize = sizes.iter().sum();
        let init: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        for (stage, precision, tol) in [
            (2u8, ZeroPrecision::F32, 1e-5f32),
            (3, ZeroPrecision::F32, 1e-5),
            // 16-bit communication: each micro-batch's gradient is rounded on its own.
            (2, ZeroPrecision::bf16(), 2e-2),
            (3, ZeroPrecision::bf16(), 2e-2),
        ] {
            for ws in 1..=3 {
                for bucket in [4usize, 9, 1000] {
                    let comms = LocalComm::create(ws);
                    std::thread::scope(|sc| {
                        let hs: Vec<_> = comms
                            .into_iter()
                            .map(|c| {
                                let init = &init;
                                let sizes = &sizes;
                                let precision = &precision;
                                sc.spawn(move || {
                                    let opts = ZeroOptions {
                                        stage,
                                        reduce_bucket_size: bucket,
                                        gradient_clipping: 0.0,
                                        ..ZeroOptions::default()
                                    };
                                    let spec = OptimizerSpec::Sgd(SgdParams {
                                        lr: 1.0,
                                        momentum: 0.0,
                                        dampening: 0.0,
                                        weight_decay: 0.0,
                                        nesterov: false,
                                    });
                                    let r = c.rank();
                                    // Two micro-batches of different local gradients.
                                    let g = |m: usize| -> Vec<f32> {
                                        (0..n)
                                            .map(|i| ((i * 7 + r * 3 + m * 11) % 17) as f32 - 8.0)
                                            .collect()
                                    };
                                    let mut a = ZeroOptimizer::with_precision(
                                        sizes,
                                        init,
                                        spec,
                                        opts.clone(),
                                        precision.clone(),
                                        &c,
                                    )
                                    .unwrap();
                                    let mut b = ZeroOptimizer::with_precision(
                                        sizes,
                                        init,
                                        spec,
                                        opts,
                                        precision.clone(),
                                        &c,
                                    )
                                    .unwrap();
                                    let sum: Vec<f32> =
                                        g(0).iter().zip(g(1)).map(|(x, y)| (x + y) * 0.5).collect();
                                    a.reduce_gradients(&sum, &c).unwrap();
                                    a.step(1.0, &c).unwrap();
                                    for m in 0..2 {
                                        b.begin_streamed(m == 0, ws).unwrap();
                                        let local = g(m);
                                        // Groups of parameters, last first (as a backward pass).
                                        for grp in [5..7, 3..5, 2..3, 0..2] {
                                            let sp = b.param_span(grp.clone()).unwrap();
                                            let p = b
                                                .reduce_grad_range(grp, &local[sp], 0.5, &c)
                                                .unwrap();
                                            b.add_grad_pieces(&p).unwrap();
                                        }
                                    }
                                    b.step(1.0, &c).unwrap();
                                    let (pa, pb) = (
                                        a.gather_params(&c).unwrap(),
                                        b.gather_params(&c).unwrap(),
                                    );
                                    for (x, y) in pa.iter().zip(&pb) {
                                        assert!(
                                            (x - y).abs() <= tol * x.abs().max(1.0),
                                            "stage {stage} ws {ws} bucket {bucket}: {x} vs {y}"
                                        );
                                    }
                                })
                            })
                            .collect();
                        for h in hs {
                            h.join().unwrap();
                        }
                    });
                }
            }
        }
    }

    #[test]
    fn streaming_is_refused_below_stage_2() {
        let c = LocalComm::create(1).remove(0);
        let spec = OptimizerSpec::Sgd(SgdParams {
            lr: 1.0,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        });
        let mut z = ZeroOptimizer::new(&[4], &[0.0; 4], spec, ZeroOptions::default(), &c).unwrap();
        assert!(!z.partitions_gradients());
        let e = z.begin_streamed(true, 1).unwrap_err().to_string();
        assert!(e.contains("stage 2 or 3"), "{e}");
        assert!(z.reduce_grad_range(0..1, &[0.0; 4], 1.0, &c).is_err());
    }
}
