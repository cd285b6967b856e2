//! Collectives among threads: `N` ranks of one process (`LocalComm`), each holding its own
//! candle tensor, run all-reduce (sum, average, max), reduce-scatter and all-gather, and every
//! result is checked against its closed form. This is the data-parallel gradient exchange in
//! miniature: all-reduce is what ZeRO stages 0/1 do to gradients, reduce-scatter what stage 2
//! does, all-gather how updated parameter shards come back together.
//!
//! `cargo run -p ds-comm --example thread_collectives [-- N]` (default N = 4)

use candle_core::{Device, Tensor};
use ds_comm::{partition_range, CommError, Communicator, LocalComm, LocalCommOptions, ReduceOp};

/// Rank `r`'s input: `x_r[i] = (r + 1) * (i + 1)`, exact in f32 for the sizes used here.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((rank + 1) * (i + 1)) as f32).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 4,
    };
    // An odd length, so that reduce-scatter's last partition is short (DeepSpeed's layout:
    // partitions of ceil(len / n) elements).
    let len = 1001usize;
    // Sum over ranks of (r + 1) = n (n + 1) / 2.
    let tri = (n * (n + 1) / 2) as f32;

    let results = LocalComm::run(n, LocalCommOptions::default(), |comm| {
        let (r, ws) = (comm.rank(), comm.world_size());
        let x = Tensor::new(input(r, len).as_slice(), &Device::Cpu)?;

        // all-reduce: sum_r (r + 1)(i + 1) = tri * (i + 1); avg = that / n; max = n (i + 1).
        let sum = comm.all_reduce(&x, ReduceOp::Sum)?.to_vec1::<f32>()?;
        let avg = comm.all_reduce(&x, ReduceOp::Avg)?.to_vec1::<f32>()?;
        let max = comm.all_reduce(&x, ReduceOp::Max)?.to_vec1::<f32>()?;
        for i in 0..len {
            let k = (i + 1) as f32;
            check(sum[i] == tri * k, r, "all_reduce sum", i)?;
            check(
                (avg[i] - tri * k / ws as f32).abs() <= 1e-6 * tri * k,
                r,
                "avg",
                i,
            )?;
            check(max[i] == ws as f32 * k, r, "all_reduce max", i)?;
        }

        // reduce-scatter: this rank's partition of the sum, nothing else.
        let (lo, hi) = partition_range(len, ws, r);
        let part = lo..hi;
        let shard = comm.reduce_scatter(&x, ReduceOp::Sum)?.to_vec1::<f32>()?;
        check(shard.len() == part.len(), r, "reduce_scatter length", 0)?;
        for (j, i) in part.clone().enumerate() {
            check(shard[j] == tri * (i + 1) as f32, r, "reduce_scatter", i)?;
        }

        // all-gather of the (padded) shards rebuilds the full sum on every rank, in rank order.
        let chunk = len.div_ceil(ws);
        let mut padded = shard.clone();
        padded.resize(chunk, 0.0);
        let gathered = comm
            .all_gather(&Tensor::new(padded.as_slice(), &Device::Cpu)?)?
            .to_vec1::<f32>()?;
        check(gathered.len() == chunk * ws, r, "all_gather length", 0)?;
        for i in 0..len {
            check(gathered[i] == sum[i], r, "all_gather", i)?;
        }

        // broadcast from the last rank, then a barrier.
        let b = comm.broadcast(&x, ws - 1)?.to_vec1::<f32>()?;
        check(b == input(ws - 1, len), r, "broadcast", 0)?;
        comm.barrier()?;
        Ok::<_, CommError>((r, part.len()))
    });

    for res in results {
        let (r, shard_len) = res.map_err(|_| "a rank panicked")??;
        println!("rank {r}: all-reduce sum/avg/max, reduce-scatter ({shard_len} elements), all-gather, broadcast: ok");
    }
    println!("{n} ranks x {len} elements: every collective equals its closed form");
    Ok(())
}

fn check(ok: bool, rank: usize, what: &str, i: usize) -> Result<(), CommError> {
    if ok {
        Ok(())
    } else {
        Err(CommError::invalid(
            "example",
            format!("rank {rank}: {what} is wrong at element {i}"),
        ))
    }
}
