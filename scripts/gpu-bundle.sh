#!/usr/bin/env bash
# Builds, on any x86-64 Linux machine with a Rust toolchain (no GPU, no CUDA toolkit needed:
# cudarc loads libcuda and libnccl at run time), the programs that check the GPU path, and packs
# them with scripts/gpu-check.sh into one folder to copy to a GPU machine that has no Rust
# toolchain and no network.
#
#   bash scripts/gpu-bundle.sh [--cuda] [OUT_DIR]   # default OUT_DIR: target/gpu-bundle
#   scp -r target/gpu-bundle gpu-host:              # then on the GPU machine: bash gpu-bundle/gpu-check.sh
#
# --cuda (or DS_GPU_BUNDLE_CUDA=1): also runs scripts/cuda-build.sh (CUDA 13.0 wheels from PyPI,
# about 10 min on 2 cores the first time) and adds the CUDA build of `ds` (workspace feature
# `cuda`, sm_90a: H100/H200) and of the conformance suite (`nccl_conformance_cuda`). Those link
# libcudart/libcublas/libcurand/libnccl: gpu-check.sh finds them in the GPU machine's Python
# nvidia-* wheels. The build machine's libcuda stub is never bundled.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=${DS_GPU_BUNDLE_CUDA:-0}
OUT=""
for a in "$@"; do
  case "$a" in
    --cuda) CUDA=1 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "gpu-bundle: unknown option $a (known: --cuda)" >&2; exit 2 ;;
    *) OUT=$a ;;
  esac
done
OUT=${OUT:-target/gpu-bundle}
TGT=${CARGO_TARGET_DIR:-target}
mkdir -p "$OUT"
rm -f "$OUT/ds" "$OUT/nccl_conformance_cuda"
# the plain conformance suite first: the CUDA build writes the same example path
cargo build --release -p ds-comm --features nccl --example nccl_conformance
cp "$TGT/release/examples/nccl_conformance" "$OUT/"
if [ "$CUDA" = 1 ]; then
  bash scripts/cuda-build.sh
  cp "$TGT/release/ds" "$OUT/ds"
  cp "$TGT/release/examples/nccl_conformance" "$OUT/nccl_conformance_cuda"
  # the plain build again, so target/ holds what its name says
  cargo build --release -p ds-comm --features nccl --example nccl_conformance
fi
cp scripts/gpu-check.sh "$OUT/"
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1): $(cd "$OUT" && ls | tr '\n' ' ')); on the GPU machine: bash $(basename "$OUT")/gpu-check.sh"
