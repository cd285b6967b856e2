//! A plain `MPI_Allreduce` loop (rsmpi, blocking, f32 sum, in place semantics aside) over the same
//! sizes and iteration counts as `comm_bench --backend mpi`, for the overhead comparison:
//!
//! ```text
//! cargo build --release -p ds-comm --features mpi --example mpi_allreduce_baseline --example comm_bench
//! mpirun --allow-run-as-root -np 2 target/release/examples/mpi_allreduce_baseline 1M,16M,64M
//! mpirun --allow-run-as-root -np 2 target/release/examples/comm_bench --backend mpi --op all_reduce --sizes 1M,16M,64M
//! ```

use mpi::collective::SystemOperation;
use mpi::traits::*;
use std::time::Instant;

fn main() {
    let Some(universe) = mpi::initialize() else {
        eprintln!("MPI already initialised");
        std::process::exit(2);
    };
    let world = universe.world();
    let n = world.size() as f64;
    let sizes = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "1M,16M,64M".into());
    let sizes = match ds_comm::bench::parse_sizes(&sizes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if world.rank() == 0 {
        println!("# plain MPI_Allreduce (f32 sum), {} ranks", world.size());
        println!(
            "#{:>14} {:>6} {:>11} {:>12}",
            "size(B)", "iters", "time(ms)", "busbw(GB/s)"
        );
    }
    for size in sizes {
        let elems = size / 4;
        let send = vec![1f32; elems];
        let mut recv = vec![0f32; elems];
        let iters = ((1usize << 30) / size.max(1)).clamp(5, 200);
        for _ in 0..2 {
            world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        }
        world.barrier();
        let t0 = Instant::now();
        for _ in 0..iters {
            world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        }
        world.barrier();
        let mine = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let mut t = 0f64;
        world.all_reduce_into(&mine, &mut t, SystemOperation::max());
        let busbw = size as f64 / t / 1e6 * 2.0 * (n - 1.0) / n;
        if world.rank() == 0 {
            println!("{:>15} {:>6} {:>11.3} {:>12.2}", size, iters, t, busbw);
        }
    }
}
