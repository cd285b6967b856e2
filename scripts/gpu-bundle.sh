#!/usr/bin/env bash
# Builds, on any x86-64 Linux machine with a Rust toolchain (no GPU, no CUDA toolkit needed:
# cudarc loads libcuda and libnccl at run time), the programs that check the GPU path, and packs
# them with scripts/gpu-check.sh into one folder to copy to a GPU machine that has no Rust
# toolchain and no network.
#
#   bash scripts/gpu-bundle.sh [OUT_DIR]        # default: target/gpu-bundle
#   scp -r target/gpu-bundle gpu-host:          # then on the GPU machine: bash gpu-bundle/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/gpu-bundle}
cargo build --release -p ds-comm --features nccl --example nccl_conformance
mkdir -p "$OUT"
cp target/release/examples/nccl_conformance "$OUT/"
cp scripts/gpu-check.sh "$OUT/"
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1)); on the GPU machine: bash $(basename "$OUT")/gpu-check.sh"
