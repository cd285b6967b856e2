#!/usr/bin/env bash
# The issue's side-by-side subset of benches/side_by_side.sh: GPT step vs PyTorch, ZeRO 0-3 vs DeepSpeed.
# Usage: cargo build --release -p ds-cli && bash benches/side_by_side_engine.sh (needs the peer venv: ../shared/peer/install.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
PEER=${PEER_VENV:-$HOME/.cache/ds-peer/venv}; PY=$PEER/bin/python; SH=../shared/peer; DS=./target/release/ds
lscpu | grep -E "Model name|^CPU\(s\)"; date -u
bash $SH/wait_idle.sh 120
cat > /tmp/ds_ref_step.json <<'JSON'
{"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}, "zero_optimization": {"stage": 0}}
JSON
echo "== GPT step 1 rank"
$DS train --config /tmp/ds_ref_step.json --world-size 1 --steps 12 --layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --json 2>/dev/null | grep -E '"median_step_ms"'
$PY $SH/bench_train_step.py --steps 12 2>/dev/null | tail -3
echo "== ZeRO on 2 ranks: ds"
for st in 0 1 2 3; do
  sed "s/\"stage\": 0/\"stage\": $st/" /tmp/ds_ref_step.json > /tmp/ds_ref_stage.json
  echo "stage $st: $($DS train --config /tmp/ds_ref_stage.json --world-size 2 --steps 8 --layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192 --json 2>/dev/null | grep -E '"median_step_ms"')"
done
echo "== ZeRO on 2 ranks: DeepSpeed"
for st in 0 1 2 3; do
  echo "stage $st:"; PATH=$PEER/bin:$PATH DS_ACCELERATOR=cpu timeout 600 $PEER/bin/torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29600 \
    $SH/ds_train.py --stage $st --steps 8 2>/dev/null | grep -E "step_ms median|losses"
done
date -u
