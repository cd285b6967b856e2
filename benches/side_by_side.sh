#!/usr/bin/env bash
# Side-by-side measurements for BENCHMARKS.md: this workspace's tools and the PyTorch/DeepSpeed
# peer on the same machine, in one run. Needs the peer venv (../shared/peer/install.sh).
# Usage: bash benches/side_by_side.sh > /tmp/side_by_side.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/.."
PEER=${PEER_VENV:-$HOME/.cache/ds-peer/venv}
PY=$PEER/bin/python
SH=../shared/peer
cargo build --release -p ds-cli >/dev/null 2>&1 || { echo "build failed"; exit 1; }
DS=./target/release/ds
echo "== machine"; lscpu | grep -E "Model name|^CPU\(s\)"; date -u
bash $SH/wait_idle.sh 120

echo "== fused AdamW, 100M fp32 elements"
$DS bench adamw --json
[ -x "$PY" ] && $PY $SH/bench_adamw.py

echo "== collectives, 2 ranks"
$DS bench comm --world-size 2 --sizes 1M,16M,64M,256M
[ -x "$PY" ] && $PY $SH/bench_allreduce_gloo.py

echo "== explicit kernels, reference shape (batch 8, seq 128, hidden 256, 4 heads, vocab 8192)"
$DS bench kernels

echo "== GPT training step, reference shape (4 x 256, seq 128, batch 8, vocab 8192), 1 rank, fp32"
cat > /tmp/ds_ref_step.json <<'JSON'
{"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "steps_per_print": null,
 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}, "zero_optimization": {"stage": 0}}
JSON
sed -i 's/"steps_per_print": null,//' /tmp/ds_ref_step.json
$DS train --config /tmp/ds_ref_step.json --world-size 1 --steps 12 --layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --json | grep -E '"(median_step_ms|tokens_per_s|peak_bytes_per_rank|engine_overhead_fraction)"'
$DS train --config /tmp/ds_ref_step.json --world-size 1 --steps 12 --layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --ckpt --json | grep -E '"(median_step_ms|tokens_per_s|peak_bytes_per_rank|engine_overhead_fraction)"'
[ -x "$PY" ] && $PY $SH/bench_train_step.py --steps 12 && $PY $SH/bench_train_step.py --steps 12 --ckpt

echo "== ZeRO stages on 2 local ranks (reference shape, micro-batch 8 per rank)"
for st in 0 1 2 3; do
  sed "s/\"stage\": 0/\"stage\": $st/" /tmp/ds_ref_step.json > /tmp/ds_ref_stage.json
  echo "stage $st:"; $DS train --config /tmp/ds_ref_stage.json --world-size 2 --steps 8 --layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --json | grep -E '"(median_step_ms|model_state_bytes_per_rank|final_loss)"'
done

echo "== ZeRO 2/3 on 2 local ranks: overlap_comm (communication thread; stage-3 prefetch) and 16-bit precision"
for v in '2 false {}' '2 true {}' '3 false {"stage3_prefetch_bucket_size":0}' '3 true {}' '2 false {"fp16":{"enabled":true}}' '2 false {"bf16":{"enabled":true}}'; do
  set -- $v
  python3 - "$1" "$2" "$3" > /tmp/ds_ref_ov.json <<'PY'
import json, sys
cfg = json.load(open("/tmp/ds_ref_step.json"))
extra = json.loads(sys.argv[3])
cfg["zero_optimization"] = {"stage": int(sys.argv[1]), "overlap_comm": sys.argv[2] == "true"}
for k, val in extra.items():
    if k.startswith("stage3"):
        cfg["zero_optimization"][k] = val
    else:
        cfg[k] = val
print(json.dumps(cfg))
PY
  echo "stage $1 overlap_comm $2 $3:"; $DS train --config /tmp/ds_ref_ov.json --world-size 2 --steps 8 --layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --json 2>/dev/null | grep -E '"(median_step_ms|final_loss|engine_overhead_fraction|skipped_steps)"'
done

echo "== the generic path (the GPT on candle autograd, what a GPU runs) on the CPU device, 2 local ranks, through the same engine as the explicit kernels"
for st in 0 2 3; do
  sed "s/\"stage\": 0/\"stage\": $st/" /tmp/ds_ref_step.json > /tmp/ds_ref_stage.json
  echo "stage $st, candle autograd:"; $DS train --autograd --config /tmp/ds_ref_stage.json --world-size 2 --steps 8 --layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --json 2>/dev/null | grep -E '"(median_step_ms|final_loss)"'
done

if [ -x "$PY" ]; then
  echo "== DeepSpeed ZeRO stages on 2 ranks (torchrun, gloo, 1 thread per rank, micro-batch 8 per rank)"
  for st in 0 1 2 3; do
    PATH=$PEER/bin:$PATH DS_ACCELERATOR=cpu timeout 600 $PEER/bin/torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29600 \
      $SH/ds_train.py --stage $st --steps 8 2>/dev/null | grep -E "step_ms median|losses"
  done
fi

echo "== activation checkpointing (8 x 256, seq 256, batch 8)"
$DS bench ckpt-act --json
[ -x "$PY" ] && $PY $SH/activation_bytes.py
echo "== done"; date -u
