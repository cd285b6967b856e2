//! DeepSpeed's partition layout, as pure index arithmetic.

use std::ops::Range;

use crate::ZeroError;

/// Alignment of stage 1/2 flat groups: DeepSpeed's `nccl_start_alignment_factor`.
pub const ALIGNMENT_FACTOR: usize = 2;

/// Stage 1/2 layout of one flat parameter group over `world_size` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    /// Offsets of each parameter in the flat (unpadded) buffer.
    pub param_ranges: Vec<Range<usize>>,
    /// Elements before padding.
    pub numel: usize,
    /// Elements after padding to a multiple of `2 * world_size`.
    pub padded: usize,
    /// Ranks.
    pub world_size: usize,
}

impl FlatLayout {
    /// Lays out parameters of the given sizes, in order.
    pub fn new(sizes: &[usize], world_size: usize) -> Result<Self, ZeroError> {
        if world_size == 0 {
            return Err(ZeroError::Option("world size must be >= 1".into()));
        }
        let mut param_ranges = Vec::with_capacity(sizes.len());
        let mut off = 0usize;
        for &s in sizes {
            param_ranges.push(off..off + s);
            off += s;
        }
        let align = ALIGNMENT_FACTOR * world_size;
        let padded = off.div_ceil(align) * align;
        Ok(FlatLayout {
            param_ranges,
            numel: off,
            padded,
            world_size,
        })
    }

    /// Elements per rank (all shards are equal).
    pub fn shard_len(&self) -> usize {
        self.padded / self.world_size
    }

    /// The flat range rank `r` owns.
    pub fn shard(&self, rank: usize) -> Range<usize> {
        let n = self.shard_len();
        rank * n..(rank + 1) * n
    }

    /// The parts of each parameter inside rank `r`'s shard: (param index, range in the flat
    /// buffer). Padding belongs to no parameter.
    pub fn params_in_shard(&self, rank: usize) -> Vec<(usize, Range<usize>)> {
        let s = self.shard(rank);
        self.param_ranges
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let lo = r.start.max(s.start);
                let hi = r.end.min(s.end);
                (lo < hi).then_some((i, lo..hi))
            })
            .collect()
    }
}

/// Stage 3: elements each rank holds of a parameter of `numel` elements
/// (`ceil(numel / world_size)`, the last ranks padded).
pub fn stage3_shard_len(numel: usize, world_size: usize) -> usize {
    numel.div_ceil(world_size.max(1))
}

/// Stage 3: the range of a parameter's elements rank `r` holds (may be shorter than the
/// shard length, or empty, at the end: the rest is padding).
pub fn stage3_shard(numel: usize, world_size: usize, rank: usize) -> Range<usize> {
    let n = stage3_shard_len(numel, world_size);
    let lo = (rank * n).min(numel);
    let hi = ((rank + 1) * n).min(numel);
    lo..hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_layout_pads_to_twice_world_size_and_splits_evenly() {
        // 53 elements (DeepSpeed's odd-numel test) over 2 ranks: padded to 56, 28 each.
        let l = FlatLayout::new(&[10, 40, 3], 2).unwrap();
        assert_eq!((l.numel, l.padded, l.shard_len()), (53, 56, 28));
        assert_eq!(l.shard(1), 28..56);
        assert_eq!(l.params_in_shard(0), vec![(0, 0..10), (1, 10..28)]);
        assert_eq!(l.params_in_shard(1), vec![(1, 28..50), (2, 50..53)]);
        // 3 ranks: multiple of 6.
        let l = FlatLayout::new(&[7], 3).unwrap();
        assert_eq!((l.padded, l.shard_len()), (12, 4));
        assert_eq!(l.params_in_shard(2), Vec::<(usize, Range<usize>)>::new());
        // Every element of every parameter is owned by exactly one rank.
        for ws in 1..=4 {
            let l = FlatLayout::new(&[5, 1, 17, 2], ws).unwrap();
            let mut count = vec![0; l.numel];
            for r in 0..ws {
                for (_, rg) in l.params_in_shard(r) {
                    for i in rg {
                        count[i] += 1;
                    }
                }
            }
            assert!(count.iter().all(|&c| c == 1), "ws={ws}");
            assert_eq!(l.padded % (2 * ws), 0);
        }
        assert!(FlatLayout::new(&[1], 0).is_err());
    }

    #[test]
    fn stage3_per_parameter() {
        assert_eq!(stage3_shard_len(10, 4), 3);
        assert_eq!(stage3_shard(10, 4, 3), 9..10);
        assert_eq!(stage3_shard(2, 4, 3), 2..2);
        assert_eq!(stage3_shard(1, 2, 0), 0..1);
        assert_eq!(stage3_shard(1, 2, 1), 1..1);
    }
}
