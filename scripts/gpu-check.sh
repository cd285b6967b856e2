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
#
# With the CUDA build in the bundle (`gpu-bundle.sh --cuda`: `ds`, `nccl_conformance_cuda`), the
# CUDA 13 libraries they link (libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10) are found the same way (the nvidia-*-cu13 / nvidia-cublas wheels put them in
# site-packages/nvidia/cu13/lib), then a short bf16 ZeRO-2 training run is timed and a table of
# all-reduce bus bandwidth, tokens/s and MFU is printed. Shape of that run (defaults: the small
# GPT of `ds train`): LAYERS HIDDEN HEADS SEQ VOCAB BATCH STEPS, e.g.
#   LAYERS=12 HIDDEN=768 HEADS=12 SEQ=64 VOCAB=512 BATCH=64 bash gpu-check.sh
# A build machine's libcuda *stub* (…/lib64/stubs) is never put on the path (it would shadow the
# driver and every CUDA call would fail).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=$HERE/gpu-check.log
exec > >(tee "$LOG") 2>&1
echo "== machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi not found"
LIBS=$(mktemp -d)
# drop any stub folder a build machine's environment may have left on the path
if [ -n "${LD_LIBRARY_PATH:-}" ]; then
  LD_LIBRARY_PATH=$(printf '%s' "$LD_LIBRARY_PATH" | tr ':' '\n' | grep -v '/stubs/*$' | paste -sd: -)
  export LD_LIBRARY_PATH
fi
CANDIDATES=$(python3 - <<'PY' 2>/dev/null
import os, glob
try:
    import nvidia
    for p in nvidia.__path__:
        for lib in glob.glob(os.path.join(p, "*", "lib")):
            print(lib)
except Exception:
    pass
PY
)
CANDIDATES="$CANDIDATES /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64"
# first candidate folder holding $1 (a file name or glob), never a stubs folder
find_lib() {
  local d
  for d in $CANDIDATES; do
    case "$d" in */stubs | */stubs/*) continue ;; esac
    if ls "$d"/$1 >/dev/null 2>&1; then echo "$d"; return 0; fi
  done
  return 1
}
add_path() {
  case ":${LD_LIBRARY_PATH:-}:" in *":$1:"*) ;; *) export LD_LIBRARY_PATH=$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;; esac
}
NCCL=$(find_lib 'libnccl.so*' || true)
if [ -n "$NCCL" ]; then
  echo "libnccl from $NCCL"
  [ -e "$NCCL/libnccl.so" ] || ln -s "$(ls "$NCCL"/libnccl.so.* | head -1)" "$LIBS/libnccl.so"
  add_path "$NCCL"
  add_path "$LIBS"
else
  echo "no libnccl found (install NCCL or pip install nvidia-nccl-cu12); the checks will say so"
fi
HAVE_CUDA_BUILD=0
if [ -x "$HERE/ds" ] || [ -x "$HERE/nccl_conformance_cuda" ]; then
  HAVE_CUDA_BUILD=1
  echo "== CUDA build in the bundle: libraries it links (libcuda.so.1 comes from the driver)"
  for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnccl.so.2; do
    d=$(find_lib "$l" || true)
    if [ -n "$d" ]; then
      echo "$l from $d"
      add_path "$d"
    else
      echo "$l: NOT FOUND (pip install nvidia-cuda-runtime nvidia-cublas nvidia-curand nvidia-nccl-cu13, CUDA 13.0 line); the CUDA checks will fail to load"
    fi
  done
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
status=0
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
# conformance suite of one binary ($1): world size 1, then one process per GPU
conformance() {
  local bin=$1 port=$2
  shift 2
  echo "== NCCL conformance suite ($(basename "$bin")), world size 1 (every op and dtype on device buffers)"
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$bin" "$@" || status=$?
  if [ "${NGPU:-0}" -ge 2 ]; then
    echo "== NCCL conformance suite ($(basename "$bin")), world size $NGPU (one process per GPU)"
    local pids=() r
    for r in $(seq 0 $((NGPU - 1))); do
      RANK=$r WORLD_SIZE=$NGPU LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$((port + 1)) "$bin" "$@" & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || status=$?; done
  else
    echo "(${NGPU:-0} GPU(s): NCCL does not put two ranks on one device, so world size > 1 is not run)"
  fi
}
conformance "$HERE/nccl_conformance" 29511
# the CUDA build: the same suite on CUDA candle tensors, reduced in place in device memory
[ -x "$HERE/nccl_conformance_cuda" ] && conformance "$HERE/nccl_conformance_cuda" 29521 --device

if [ -x "$HERE/ds" ]; then
  WS=$((NGPU >= 1 ? NGPU : 1))
  # runs "$@" as ranks 0..WS-1 (one process per GPU; rank 0's stdout to file $2); status: the last failure
  launch() {
    local port=$1 out=$2 pids=() r st=0
    shift 2
    for r in $(seq 0 $((WS - 1))); do
      if [ "$r" = 0 ]; then
        RANK=0 WORLD_SIZE=$WS LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$@" >"$out" & pids+=($!)
      else
        RANK=$r WORLD_SIZE=$WS LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$@" >/dev/null & pids+=($!)
      fi
    done
    for r in "${pids[@]}"; do wait "$r" || st=$?; done
    return $st
  }
  L=${LAYERS:-2} C=${HIDDEN:-128} NH=${HEADS:-4} T=${SEQ:-64} V=${VOCAB:-512} B=${BATCH:-8} STEPS=${STEPS:-200}
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  # dense bf16 tensor-core peak per GPU, TFLOP/s (NVIDIA data sheets, without sparsity)
  case "$GPU" in
    *H200*) PEAK=989 ;;
    *H100*PCIe*) PEAK=756 ;;
    *H100*NVL*) PEAK=835 ;;
    *H100*) PEAK=989 ;; # SXM
    *) PEAK=${GPU_PEAK_TFLOPS:-} ;;
  esac
  echo "== ds --version: $("$HERE/ds" --version 2>&1)"
  echo "== all-reduce bus bandwidth (ds bench comm --backend nccl)"
  # device buffers, one process per GPU; the JSON also has the GPU's device-copy bandwidth
  BUSBW=n/a
  if launch 29531 "$HERE/bench-comm.json" "$HERE/ds" bench comm --backend nccl --world-size "$WS" \
    --op all_reduce --sizes 256M --json 2>"$HERE/bench-comm.err"; then
    BUSBW=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
best = max(float(r["busbw_GBps"]) for r in d["results"] if r.get("op", "all_reduce") == "all_reduce")
print(f"{best:.1f} GB/s")' "$HERE/bench-comm.json" 2>/dev/null || echo n/a)
  else
    echo "(not available: $(head -c 300 "$HERE/bench-comm.err"))"
  fi
  # bf16 + ZeRO stage 2, written as a DeepSpeed config (every 50 steps rank 0 prints the mean
  # fwd/bwd/step milliseconds, the device synchronised at each timer's end): `ds train` has no --precision or
  # --zero-stage flags (both come from the config).
  # With --backend nccl the ranks are processes (RANK/WORLD_SIZE/LOCAL_RANK, as the launcher
  # sets them); the world size comes from the environment.
  CFG=$HERE/gpu-bf16-zero2.json
  cat >"$CFG" <<EOF
{
  "train_micro_batch_size_per_gpu": $B,
  "gradient_accumulation_steps": 1,
  "gradient_clipping": 1.0,
  "optimizer": { "type": "AdamW", "params": { "lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1 } },
  "scheduler": { "type": "WarmupDecayLR", "params": { "warmup_min_lr": 0, "warmup_max_lr": 2e-3, "warmup_num_steps": 20, "total_num_steps": $STEPS } },
  "zero_optimization": { "stage": 2, "reduce_bucket_size": 5e8 },
  "bf16": { "enabled": true },
  "steps_per_print": 50,
  "wall_clock_breakdown": true
}
EOF
  echo "== ds train --backend nccl, $WS rank(s), $STEPS steps, bf16, ZeRO-2 (layers $L, hidden $C, heads $NH, seq $T, vocab $V, micro-batch $B)"
  TRAIN=("$HERE/ds" train --backend nccl --world-size "$WS" --steps "$STEPS" --config "$CFG"
    --layers "$L" --hidden "$C" --heads "$NH" --seq "$T" --vocab "$V" --batch "$B" --json)
  echo "${TRAIN[*]}"
  launch 29541 "$HERE/train.json" "${TRAIN[@]}" || { tstatus=$?; echo "ds train failed: status $tstatus"; status=$tstatus; }
  # tokens/s is the global batch's; model FLOPs per token as `ds train` counts them (DeepSpeed's
  # matmul count: 3 x forward, forward = 2(12 L C^2 + V C) + 4 L T C)
  python3 - "$HERE/train.json" "$L" "$C" "$T" "$V" "$WS" "${PEAK:-}" "$GPU" "$BUSBW" <<'PY' || true
import json, sys
path, L, C, T, V, ws, peak, gpu, busbw = sys.argv[1:]
L, C, T, V, ws = (float(x) for x in (L, C, T, V, ws))
try:
    r = json.load(open(path))
    tps = float(r["tokens_per_s"])
    loss = f'{r["final_loss"]:.4f}'
    ms = f'{r["median_step_ms"]:.1f}'
except Exception as e:
    tps, loss, ms = None, "n/a", "n/a"
fwd = 2 * (12 * L * C * C + V * C) + 4 * L * T * C
rows = [("GPU", f"{gpu or '?'} x {int(ws)}"), ("all-reduce busbw", busbw)]
if tps is None:
    rows += [("training", "no result (see above)")]
else:
    per_gpu = 3 * fwd * tps / ws
    rows += [("final loss", loss), ("median step", f"{ms} ms"), ("tokens/s (global)", f"{tps:,.0f}"),
             ("model TFLOP/s per GPU", f"{per_gpu / 1e12:.2f}")]
    if peak:
        rows.append(("MFU (bf16 dense peak)", f"{100 * per_gpu / (float(peak) * 1e12):.2f} % of {peak} TFLOP/s"))
    else:
        rows.append(("MFU", "n/a (unknown GPU; set GPU_PEAK_TFLOPS)"))
w = max(len(k) for k, _ in rows)
print("== summary")
for k, v in rows:
    print(f"{k:<{w}}  {v}")
PY
elif [ "$HAVE_CUDA_BUILD" = 0 ]; then
  echo "(no CUDA \`ds\` in the bundle: make it with scripts/gpu-bundle.sh --cuda)"
fi
echo "== done: status $status; log in $LOG"
exit $status
