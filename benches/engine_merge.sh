#!/usr/bin/env bash
# The one engine against the two engines it replaced, side by side in one run: the host fast
# path (GPT on its explicit kernels) and the generic path (GPT on candle autograd, what a GPU
# runs) at the reference shape, before (OLD: a `ds` built from the commit before the merge,
# whose generic path is `--device-engine`) and after (NEW: this tree, `--autograd`).
# Three interleaved rounds; prints median step milliseconds.
# Usage: OLD=/path/to/old/ds bash benches/engine_merge.sh > /tmp/merge.log 2>&1
#   (e.g. git worktree add /tmp/ds-old 191eadb && (cd /tmp/ds-old && cargo build --release -p ds-engine --bin ds))
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ds-cli --bin ds >/dev/null 2>&1 || { echo "build failed"; exit 1; }
NEW=./target/release/ds
OLD=${OLD:?set OLD to a ds binary built before the merge}
echo "== machine"; lscpu | grep -E "Model name|^CPU\(s\)|^Flags" | cut -c1-60; date -u
[ -f ../shared/peer/wait_idle.sh ] && bash ../shared/peer/wait_idle.sh 120
SHAPE="--layers 4 --hidden 256 --heads 4 --seq 128 --vocab 8192"
cfg() {
  cat > /tmp/merge_$1.json <<JSON
{"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}, "zero_optimization": {"stage": $1}}
JSON
}
for st in 0 1 2 3; do cfg $st; done
med() { python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("%.1f ms (final loss %.5f)" % (d["median_step_ms"], d["final_loss"]))'; }
for round in 1 2 3; do
  echo "== round $round"
  for bin in OLD NEW; do
    B=${!bin}
    echo "$bin 1 rank fast path: $($B train --config /tmp/merge_0.json --world-size 1 --steps 12 $SHAPE --json 2>/dev/null | med)"
    for st in 0 1 2 3; do
      echo "$bin ZeRO-$st 2 ranks fast path: $($B train --config /tmp/merge_$st.json --world-size 2 --steps 8 $SHAPE --json 2>/dev/null | med)"
    done
    G=--autograd; [ $bin = OLD ] && G=--device-engine
    for st in 0 2 3; do
      echo "$bin ZeRO-$st 2 ranks generic path ($G): $($B train $G --config /tmp/merge_$st.json --world-size 2 --steps 8 $SHAPE --json 2>/dev/null | med)"
    done
  done
done
