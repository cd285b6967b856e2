#!/usr/bin/env bash
# GEMM backends side by side on a GPT step's matrix products (issue #21 item 2): the gemm crate
# (what the explicit kernels call) against MKL (PyPI wheel `mkl`, its libmkl_rt), BLIS and
# OpenBLAS (Debian's libblis-dev, libopenblas-dev), all loaded at run time by `ds bench gemm`
# (nothing is linked into the build), at 1 thread and at every core, in one run.
# Installs what is missing (apt and pip download; needs root for apt) under target/blas.
# Usage: bash benches/gemm_backends.sh [--quick] > /tmp/gemm_backends.log 2>&1
#   --quick: the reference GPT shape (256 hidden, 4 layers, vocab 8192, 8 x 128 tokens)
#   instead of GPT-2-small (768 hidden, 12 layers, vocab 50304, 4 x 256 tokens).
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPE=(--hidden 768 --layers 12 --vocab 50304 --rows 1024)
[ "${1:-}" = "--quick" ] && SHAPE=(--hidden 256 --layers 4 --vocab 8192 --rows 1024)
cargo build --release -p ds-cli >/dev/null 2>&1 || { echo "build failed"; exit 1; }
DS=./target/release/ds
LIBDIR=/usr/lib/x86_64-linux-gnu
BLAS=target/blas
mkdir -p $BLAS

if [ ! -e $LIBDIR/libblis.so.4 ] || [ ! -e $LIBDIR/libopenblas.so.0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libblis-dev libopenblas-dev >/dev/null 2>&1 \
    || echo "note: could not install libblis-dev/libopenblas-dev (not root?); they are skipped"
fi
MKL=$(ls -d $BLAS/mkl/*.data/data/lib 2>/dev/null | head -1)
if [ -z "$MKL" ]; then
  python3 -m pip download -q --no-deps -d $BLAS/wheels mkl >/dev/null 2>&1 \
    && python3 - "$BLAS" <<'PYEOF'
import glob, sys, zipfile
w = sorted(glob.glob(sys.argv[1] + "/wheels/mkl-*.whl"))[-1]
zipfile.ZipFile(w).extractall(sys.argv[1] + "/mkl")
PYEOF
  MKL=$(ls -d $BLAS/mkl/*.data/data/lib 2>/dev/null | head -1)
  [ -z "$MKL" ] && echo "note: could not fetch the mkl wheel from PyPI; MKL is skipped"
fi
LIBS=()
[ -n "$MKL" ] && LIBS+=(--blas "mkl=$(realpath $MKL)/libmkl_rt.so.3")
[ -e $LIBDIR/libblis.so.4 ] && LIBS+=(--blas "blis=$LIBDIR/libblis.so.4")
[ -e $LIBDIR/libopenblas.so.0 ] && LIBS+=(--blas "openblas=$LIBDIR/libopenblas.so.0")

echo "== machine"
lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
units=""
for f in avx2 fma avx512f avx512_bf16 amx_bf16; do [[ " $flags " == *" $f "* ]] && units="$units $f"; done
echo "units:$units"
[ -n "$MKL" ] && echo "mkl: $(basename $(ls $BLAS/wheels/mkl-*.whl 2>/dev/null | tail -1) 2>/dev/null)"
dpkg-query -W -f='${Package} ${Version}\n' libblis4-openmp libblis4-pthread libblis4-serial libopenblas0-pthread 2>/dev/null
date -u
[ -f ../shared/peer/wait_idle.sh ] && bash ../shared/peer/wait_idle.sh 120
uptime

for T in 1 $(nproc); do
  echo "== $T thread(s)"
  # The libraries run single-threaded in T bands (as the kernels run them under DS_BLAS).
  $DS bench gemm "${SHAPE[@]}" --threads $T "${LIBS[@]}"
  [ "$T" = "$(nproc)" ] && break
done
uptime
