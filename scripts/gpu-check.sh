#!/usr/bin/env bash
# Runs the GPU checks of this workspace on a GPU machine, in one command, from the folder that
# scripts/gpu-bundle.sh made (release binaries built elsewhere; no Rust, no network needed).
#
#   bash gpu-check.sh            # writes gpu-check.log beside itself
#
# Libraries: libcuda.so.1 comes from the NVIDIA driver; libnccl from the machine's NCCL install
# or from Python's NCCL wheel (nvidia-nccl-cu12/cu13), found through `python3 -c "import nvidia"`.
# cudarc looks for `libnccl.so` (unversioned): when only libnccl.so.2 exists, a link to it is
# made in a scratch folder put first on LD_LIBRARY_PATH.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=$HERE/gpu-check.log
exec > >(tee "$LOG") 2>&1
echo "== machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi not found"
LIBS=$(mktemp -d)
NCCL=""
for d in $(python3 - <<'PY' 2>/dev/null
import os, glob
try:
    import nvidia
    for p in nvidia.__path__:
        for lib in glob.glob(os.path.join(p, "*", "lib")):
            print(lib)
except Exception:
    pass
PY
) /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
  if [ -z "$NCCL" ] && ls "$d"/libnccl.so* >/dev/null 2>&1; then NCCL=$d; fi
done
if [ -n "$NCCL" ]; then
  echo "libnccl from $NCCL"
  [ -e "$NCCL/libnccl.so" ] || ln -s "$(ls "$NCCL"/libnccl.so.* | head -1)" "$LIBS/libnccl.so"
  export LD_LIBRARY_PATH=$LIBS:$NCCL:${LD_LIBRARY_PATH:-}
else
  echo "no libnccl found (install NCCL or pip install nvidia-nccl-cu12); the checks will say so"
fi
status=0
echo "== NCCL conformance suite, world size 1 (every op and dtype on device buffers)"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 "$HERE/nccl_conformance" || status=$?
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "${NGPU:-0}" -ge 2 ]; then
  echo "== NCCL conformance suite, world size $NGPU (one process per GPU)"
  pids=()
  for r in $(seq 0 $((NGPU - 1))); do
    RANK=$r WORLD_SIZE=$NGPU LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 "$HERE/nccl_conformance" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=$?; done
else
  echo "(${NGPU:-0} GPU(s): NCCL does not put two ranks on one device, so world size > 1 is not run)"
fi
echo "== done: status $status; log in $LOG"
exit $status
