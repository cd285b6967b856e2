//! Collective bandwidth benchmark (the library side of `ds bench comm`).
//!
//! `cargo run --release -p ds-comm --example comm_bench -- [--backend local|mpi] [--world-size N]
//! [--op all_reduce|reduce_scatter|all_gather|reduce]... [--sizes 1M,16M,64M] [--iters K] [--no-timeout]
//! [--no-check] [--no-ring] [--json]` (`--no-timeout`: MPI uses blocking collectives;
//! `--no-check`: MPI skips the per-call descriptor check; `--no-ring`: MPI uses its own
//! non-blocking collectives instead of the ring for large buffers).
//! With `--backend mpi` build with `--features mpi` and launch under `mpirun`.

use ds_comm::bench::{parse_sizes, run_comm_bench, BenchBackend, BenchOp, CommBenchOptions};

fn main() {
    if let Err(e) = run() {
        eprintln!("comm_bench: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), ds_comm::CommError> {
    let mut opts = CommBenchOptions::default();
    let mut ops = Vec::new();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    let bad = |m: String| ds_comm::CommError::invalid("comm_bench", m);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| bad(format!("{a} needs a value")));
        match a.as_str() {
            "--backend" => opts.backend = BenchBackend::parse(&val()?)?,
            "--world-size" => {
                opts.world_size = val()?
                    .parse()
                    .map_err(|e| bad(format!("--world-size: {e}")))?
            }
            "--op" => ops.push(BenchOp::parse(&val()?)?),
            "--sizes" => opts.sizes = parse_sizes(&val()?)?,
            "--iters" => {
                opts.iters = Some(val()?.parse().map_err(|e| bad(format!("--iters: {e}")))?)
            }
            "--json" => json = true,
            "--no-timeout" => opts.timeout = None,
            "--no-check" => opts.check_calls = false,
            "--no-ring" => opts.mpi_ring = false,
            other => return Err(bad(format!("unknown argument {other:?}"))),
        }
    }
    if !ops.is_empty() {
        opts.ops = ops;
    }
    let report = run_comm_bench(&opts)?;
    if report.rank == 0 {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(|e| bad(e.to_string()))?
            );
        } else {
            print!("{}", report.to_table());
        }
    }
    Ok(())
}
