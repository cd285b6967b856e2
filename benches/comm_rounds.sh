#!/usr/bin/env bash
# Three interleaved rounds, 2 ranks: LocalComm (`ds bench comm`) beside gloo
# (../shared/peer/bench_allreduce_gloo.py), and MpiComm beside a plain MPI_Allreduce loop.
# Needs the peer venv (../shared/peer/install.sh) and a release build with the mpi feature:
#   cargo build --release -p ds-cli -p ds-comm --features ds-comm/mpi,ds-cli/mpi --bin ds --example mpi_allreduce_baseline
# Usage: bash benches/comm_rounds.sh > /tmp/commrounds.log 2>&1
cd "$(dirname "$0")/.."
PY=${PEER_VENV:-$HOME/.cache/ds-peer/venv}/bin/python
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
export OMPI_MCA_btl_vader_single_copy_mechanism=none
lscpu | grep -E "Model name|^CPU\(s\)"; grep -q avx512f /proc/cpuinfo && echo "AVX-512: yes" || echo "AVX-512: no"
date -u; uptime
for r in 1 2 3; do
  echo "== round $r $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  ./target/release/ds bench comm --world-size 2 --op all_reduce --sizes 1M,16M,64M,256M --json | python3 -c '
import json,sys; d=json.load(sys.stdin)
print("memcpy GB/s", {k:v for k,v in d.items() if "memcpy" in k})
for x in d["results"]: print("local %9d B  %.3f ms  busbw %.2f GB/s  (%.2f of memcpy)" % (x["bytes"], x["time_ms"], x["busbw_GBps"], x["busbw_over_memcpy"]))'
  $PY ../shared/peer/bench_allreduce_gloo.py 2>&1 | tail -4
  timeout 300 $MPIRUN -np 2 target/release/examples/mpi_allreduce_baseline 16M,64M 2>&1 | tail -3
  timeout 300 $MPIRUN -np 2 ./target/release/ds bench comm --backend mpi --op all_reduce --sizes 16M,64M 2>&1 | tail -4
done
