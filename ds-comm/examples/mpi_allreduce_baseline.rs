//! Plain MPI loops (rsmpi, f32 sum) over the same sizes and iteration counts as
//! `comm_bench --backend mpi`, for the overhead comparison: `MPI_Allreduce` (the default), or with
//! a second argument `reduce_scatter`, `MPI_Reduce_scatter_block` (blocking and non-blocking, the
//! latter waited on with `MPI_Wait`).
//!
//! ```text
//! cargo build --release -p ds-comm --features mpi --example mpi_allreduce_baseline --example comm_bench
//! mpirun --allow-run-as-root -np 2 target/release/examples/mpi_allreduce_baseline 1M,16M,64M
//! mpirun --allow-run-as-root -np 2 target/release/examples/mpi_allreduce_baseline 1M,16M,64M reduce_scatter
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
    let n = world.size() as usize;
    let mut args = std::env::args().skip(1);
    let sizes = args.next().unwrap_or_else(|| "1M,16M,64M".into());
    let what = args.next().unwrap_or_else(|| "all_reduce".into());
    let sizes = match ds_comm::bench::parse_sizes(&sizes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let variants: &[&str] = match what.as_str() {
        "all_reduce" => &["MPI_Allreduce"],
        "reduce_scatter" => &["MPI_Reduce_scatter_block", "MPI_Ireduce_scatter_block+Wait"],
        other => {
            eprintln!("unknown op {other:?}: all_reduce or reduce_scatter");
            std::process::exit(2);
        }
    };
    if world.rank() == 0 {
        println!("# plain MPI loops (f32 sum), {n} ranks");
        println!(
            "#{:>14} {:>32} {:>6} {:>11} {:>12}",
            "size(B)", "call", "iters", "time(ms)", "busbw(GB/s)"
        );
    }
    for &variant in variants {
        for &size in &sizes {
            let elems = (size / 4).div_ceil(n) * n;
            let send = vec![1f32; elems];
            let mut recv = vec![
                0f32;
                if what == "all_reduce" {
                    elems
                } else {
                    elems / n
                }
            ];
            let iters = ((1usize << 30) / size.max(1)).clamp(5, 200);
            let mut call = || match variant {
                "MPI_Allreduce" => {
                    world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum())
                }
                "MPI_Reduce_scatter_block" => world.reduce_scatter_block_into(
                    &send[..],
                    &mut recv[..],
                    SystemOperation::sum(),
                ),
                _ => {
                    mpi::request::scope(|sc| {
                        world
                            .immediate_reduce_scatter_block_into(
                                sc,
                                &send[..],
                                &mut recv[..],
                                SystemOperation::sum(),
                            )
                            .wait();
                    });
                }
            };
            for _ in 0..2 {
                call();
            }
            world.barrier();
            let t0 = Instant::now();
            for _ in 0..iters {
                call();
            }
            world.barrier();
            let mine = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let mut t = 0f64;
            world.all_reduce_into(&mine, &mut t, SystemOperation::max());
            let factor = if what == "all_reduce" { 2.0 } else { 1.0 };
            let busbw = size as f64 / t / 1e6 * factor * (n as f64 - 1.0) / n as f64;
            if world.rank() == 0 {
                println!("{size:>15} {variant:>32} {iters:>6} {t:>11.3} {busbw:>12.2}");
            }
        }
    }
}
