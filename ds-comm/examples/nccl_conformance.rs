//! The conformance suite over `NcclComm` (one process per GPU), for GPU machines:
//!
//! ```text
//! cargo build --release -p ds-comm --features nccl --example nccl_conformance
//! # one GPU:
//! RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
//!     target/release/examples/nccl_conformance
//! # N GPUs: start one process per GPU with RANK=LOCAL_RANK=0..N-1 and WORLD_SIZE=N.
//! ```
//!
//! Without CUDA/NCCL it reports the missing library and exits with status 2 (no panic).
//! `split_and_new_group` is expected to fail (NCCL split is not implemented).

use ds_comm::{conformance, Communicator, NcclComm, NcclCommOptions};

fn main() {
    let comm = match NcclComm::from_env(NcclCommOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nccl_conformance: {e}");
            std::process::exit(2);
        }
    };
    let t0 = std::time::Instant::now();
    let rep = conformance::run_suite(&comm);
    for (name, why) in &rep.failed {
        eprintln!("rank {}: FAILED {name}: {why}", comm.rank());
    }
    println!(
        "rank {}/{}: {} passed, {} failed ({:.1} s)",
        comm.rank(),
        comm.world_size(),
        rep.passed.len(),
        rep.failed.len(),
        t0.elapsed().as_secs_f64()
    );
    let only_split = rep.failed.iter().all(|(n, _)| n == "split_and_new_group");
    std::process::exit(if only_split { 0 } else { 1 });
}
