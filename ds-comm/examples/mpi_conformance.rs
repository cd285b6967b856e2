//! The conformance suite over `MpiComm`, run under mpirun:
//!
//! ```text
//! cargo build -p ds-comm --features mpi --example mpi_conformance
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/examples/mpi_conformance
//! mpirun --allow-run-as-root --oversubscribe -np 3 target/debug/examples/mpi_conformance
//! mpirun --allow-run-as-root --oversubscribe -np 3 target/debug/examples/mpi_conformance --stall
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/examples/mpi_conformance --die
//! ```
//!
//! Exit status 0 when every check passed on every rank. `--stall` instead checks that a stalled
//! peer makes the others time out (rank 1 sleeps past three 1 s timeouts and their 1 s
//! diagnoses), that every timeout names rank 1 (and only rank 1) as the silent rank, and that
//! later calls report the poisoned communicator, for a barrier and, on two more communicators,
//! for a large in-place all-reduce and reduce-scatter (the ring algorithms' point-to-point
//! steps). `--die` makes rank 1 exit without finalising while the others wait in a barrier
//! (timeout 30 s): with the termination handler, the others report `PeerFailed` naming rank 1
//! when mpirun terminates them (well before the timeout), and the job ends non-zero.

use ds_comm::{conformance, CommError, Communicator, MpiComm, MpiCommOptions};
use std::time::{Duration, Instant};

fn main() {
    let stall = std::env::args().any(|a| a == "--stall");
    let die = std::env::args().any(|a| a == "--die");
    let code = if stall {
        stall_test()
    } else if die {
        die_test()
    } else {
        suite()
    };
    std::process::exit(code);
}

fn suite() -> i32 {
    let comm = match MpiComm::init(MpiCommOptions {
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mpi_conformance: {e}");
            return 2;
        }
    };
    let t0 = Instant::now();
    let rep = conformance::run_suite(&comm);
    let (rank, n) = (comm.rank(), comm.world_size());
    for (name, why) in &rep.failed {
        eprintln!("rank {rank}/{n}: FAILED {name}: {why}");
    }
    println!(
        "rank {rank}/{n}: {} passed, {} failed ({:.1} s)",
        rep.passed.len(),
        rep.failed.len(),
        t0.elapsed().as_secs_f64()
    );
    // Every rank must pass: combine the verdicts.
    let bad = candle_core::Tensor::new(&[u8::from(!rep.ok())], &candle_core::Device::Cpu)
        .map_err(CommError::from)
        .and_then(|t| comm.all_reduce(&t, ds_comm::ReduceOp::Max))
        .and_then(|t| t.to_vec1::<u8>().map_err(CommError::from));
    drop(comm);
    match bad {
        Ok(v) if v[0] == 0 => 0,
        Ok(_) => 1,
        Err(e) => {
            eprintln!("rank {rank}: combining verdicts failed: {e}");
            1
        }
    }
}

fn stall_test() -> i32 {
    let comm = match MpiComm::init(MpiCommOptions {
        timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mpi_conformance: {e}");
            return 2;
        }
    };
    let rank = comm.rank();
    let mut ok = true;
    // Two more communicators (collective calls, before anyone stalls) for the ring checks.
    let subs = (comm.split(Some(0), rank), comm.split(Some(0), rank));
    let (Ok(Some(sub)), Ok(Some(sub2))) = subs else {
        eprintln!("rank {rank}: split failed");
        return 1;
    };
    let big =
        candle_core::Tensor::ones(1 << 20, candle_core::DType::F32, &candle_core::Device::Cpu);
    let (Ok(big), Ok(out)) = (
        big,
        candle_core::Tensor::zeros(1 << 20, candle_core::DType::F32, &candle_core::Device::Cpu),
    ) else {
        eprintln!("rank {rank}: tensor allocation failed");
        return 1;
    };
    if rank == 1 {
        // Past the others' three 1 s timeouts, each followed by a 1 s diagnosis.
        std::thread::sleep(Duration::from_millis(8000));
        // Completes what the others abandoned in their barrier (the descriptor all-reduce) and
        // meets their final barrier, with raw MPI calls: `comm.barrier()` would notice the
        // others' diagnosis messages and give up too.
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let send = [0i64; 10];
        let mut recv = [0i64; 10];
        mpi::request::scope(|sc| {
            comm.raw()
                .immediate_all_reduce_into(sc, &send[..], &mut recv[..], SystemOperation::max())
                .wait();
        });
        comm.blocking_barrier();
    } else {
        let (lo, hi) = ds_comm::partition_range(1 << 20, comm.world_size(), rank);
        for (what, res) in [
            (
                "all_reduce",
                sub.all_reduce_inplace(&big, ds_comm::ReduceOp::Sum),
            ),
            (
                "reduce_scatter",
                out.narrow(0, 0, hi - lo)
                    .map_err(CommError::from)
                    .and_then(|o| sub2.reduce_scatter_into(&big, &o, ds_comm::ReduceOp::Sum)),
            ),
        ] {
            match res {
                Err(CommError::Timeout {
                    op, waiting_for, ..
                }) if op == what && waiting_for == [1] => {
                    println!("rank {rank}: large {what} timed out as expected, naming rank 1")
                }
                other => {
                    eprintln!("rank {rank}: large {what}: expected a timeout, got {other:?}");
                    ok = false;
                }
            }
        }
        let t0 = Instant::now();
        match comm.barrier() {
            Err(e @ CommError::Timeout { .. }) if matches!(&e, CommError::Timeout { op, waiting_for, bytes: Some(0), .. } if op == "barrier" && waiting_for == &[1]) =>
            {
                println!(
                    "rank {rank}: barrier timed out after {:.2} s as expected: {e}",
                    t0.elapsed().as_secs_f64()
                );
            }
            other => {
                eprintln!("rank {rank}: expected a timeout, got {other:?}");
                ok = false;
            }
        }
        match comm.barrier() {
            Err(CommError::Poisoned { .. }) => {
                println!("rank {rank}: later call reports the earlier failure")
            }
            other => {
                eprintln!("rank {rank}: expected a poisoned communicator, got {other:?}");
                ok = false;
            }
        }
        // Meet rank 1's late barrier through the raw communicator (ours is poisoned).
        comm.blocking_barrier();
    }
    drop(comm);
    if ok {
        0
    } else {
        1
    }
}

fn die_test() -> i32 {
    let comm = match MpiComm::init(MpiCommOptions {
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mpi_conformance: {e}");
            return 2;
        }
    };
    if let Err(e) = ds_comm::install_termination_handler() {
        eprintln!("mpi_conformance: {e}");
        return 2;
    }
    if comm.rank() == 1 {
        eprintln!("rank 1: exiting without MPI_Finalize on purpose");
        std::process::exit(3);
    }
    let t0 = Instant::now();
    match comm.barrier() {
        Err(e @ CommError::PeerFailed { peer: 1, .. }) => {
            // What `ds train` prints before it aborts.
            eprintln!(
                "rank {}: after {:.2} s: error: {e}",
                comm.rank(),
                t0.elapsed().as_secs_f64()
            );
            comm.abort_after_failure(5)
        }
        r => {
            eprintln!("rank {}: barrier returned {r:?}", comm.rank());
            // Reaching this line means the dead peer went unnoticed: fail (the job would
            // fail anyway; CI also checks the message).
            drop(comm);
            4
        }
    }
}
