#!/usr/bin/env bash
# GPT-2-small and the reference GPT, ds against PyTorch, in one run on one machine (issue #21):
# fp32 eager (manual attention and SDPA) and bf16 autocast on the PyTorch side, fp32 and bf16 on
# ds's side; each side's GFLOP/s by model FLOPs against the processor's fp32 and bf16 matrix-
# product peaks measured in the same run; the processor and its 16-bit units named.
# Needs the peer venv (../shared/peer/install.sh); without it only ds's side runs.
# Usage: bash benches/gpt2_small.sh [--quick] > /tmp/gpt2_small.log 2>&1
#   --quick: 3 timed steps instead of 6 (the GPT-2-small step takes seconds on 2 cores).
set -uo pipefail
cd "$(dirname "$0")/.."
PEER=${PEER_VENV:-$HOME/.cache/ds-peer/venv}
PY=$PEER/bin/python
SH=../shared/peer
STEPS=6
[ "${1:-}" = "--quick" ] && STEPS=3
THREADS=${THREADS:-$(nproc)}
cargo build --release -p ds-cli >/dev/null 2>&1 || { echo "build failed"; exit 1; }
DS=./target/release/ds
OUT=$(mktemp -d)

echo "== machine"
lscpu | grep -E "Model name|^CPU\(s\)"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
units="f32:"
for f in avx2 fma avx512f; do [[ " $flags " == *" $f "* ]] && units="$units $f"; done
units="$units; 16-bit:"
n16=0
for f in avx512_bf16 amx_bf16 amx_tile avx512_fp16; do
  [[ " $flags " == *" $f "* ]] && { units="$units $f"; n16=1; }
done
[ $n16 = 0 ] && units="$units none (bf16 computes in f32 on both sides)"
echo "units: $units"
date -u
[ -f $SH/wait_idle.sh ] && bash $SH/wait_idle.sh 120

echo "== matrix-product peaks, $THREADS threads"
$DS bench kernels --threads "$THREADS" --json > $OUT/kernels.json
# The f32 matrix peak: the best rate of the GPT-2-small step's own products (repeated calls,
# kept output buffers), which the single 1024^3 probe of `bench kernels` under-reads.
$DS bench gemm --threads "$THREADS" --min-secs 0.1 --json > $OUT/gemm.json
if [ -x "$PY" ]; then
  $PY - "$THREADS" > $OUT/torch_peak.json <<'PYEOF'
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
out = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a = torch.randn(1024, 1024, dtype=dt); b = torch.randn(1024, 1024, dtype=dt)
    for _ in range(3): a @ b
    ts = []
    for _ in range(10):
        t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
    ts.sort()
    out[name] = 2 * 1024**3 / ts[len(ts) // 2] / 1e9
print(json.dumps(out))
PYEOF
fi

# One ds training run: median step ms (JSON) for a shape and precision.
ds_step() { # name layers hidden heads seq batch vocab precision
  local name=$1 L=$2 C=$3 H=$4 T=$5 B=$6 V=$7 prec=$8
  local p16=""
  [ "$prec" = bf16 ] && p16='"bf16": {"enabled": true},'
  cat > $OUT/cfg.json <<JSON
{"train_micro_batch_size_per_gpu": $B, "gradient_accumulation_steps": 1, $p16
 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
 "zero_optimization": {"stage": 0}}
JSON
  $DS train --config $OUT/cfg.json --world-size 1 --steps $((STEPS + 2)) --layers $L --hidden $C \
    --heads $H --seq $T --vocab $V --batch $B --eval-samples 0 --json > $OUT/$name.json 2>$OUT/$name.err \
    || { echo "ds $name failed:"; tail -3 $OUT/$name.err; }
}
torch_step() { # name layers hidden heads seq batch vocab extra-args...
  local name=$1 L=$2 C=$3 H=$4 T=$5 B=$6 V=$7; shift 7
  [ -x "$PY" ] || return 0
  timeout ${TORCH_TIMEOUT:-900} $PY $SH/bench_train_step.py --threads "$THREADS" --steps $STEPS --warmup 2 --layers $L --hidden $C \
    --heads $H --seq $T --batch $B --vocab $V "$@" > $OUT/$name.txt 2>&1 || { echo "torch $name failed"; tail -3 $OUT/$name.txt; }
}

for shape in "gpt2 12 768 12 256 4 50304" "ref 4 256 4 128 8 8192"; do
  set -- $shape
  echo "== $1: layers $2, hidden $3, heads $4, seq $5, micro-batch $6, vocab $7"
  ds_step ds_$1_fp32 $2 $3 $4 $5 $6 $7 fp32
  ds_step ds_$1_bf16 $2 $3 $4 $5 $6 $7 bf16
  torch_step pt_$1_manual $2 $3 $4 $5 $6 $7 --attn manual
  torch_step pt_$1_sdpa $2 $3 $4 $5 $6 $7 --attn sdpa
  if [ "$n16" = 1 ] || [ "${FORCE_TORCH_BF16:-0}" = 1 ]; then
    torch_step pt_$1_bf16 $2 $3 $4 $5 $6 $7 --attn sdpa --autocast bf16
  else
    # Without a 16-bit unit PyTorch's bf16 matmul runs at ~1 GFLOP/s here (measured above):
    # one GPT-2-small step would take minutes. FORCE_TORCH_BF16=1 runs it anyway.
    echo "PyTorch bf16 autocast skipped: no bf16 unit (FORCE_TORCH_BF16=1 to run it)"
  fi
done

python3 - "$OUT" <<'PYEOF'
import json, os, re, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    try:
        if name.endswith(".json"):
            return json.load(open(p))
        m = re.search(r"step_ms median=([0-9.]+)", open(p).read())
        return {"median_step_ms": float(m.group(1))} if m else None
    except Exception:
        return None
k = load("kernels.json") or {}
g = load("gemm.json") or {}
tp = load("torch_peak.json") or {}
peak32 = max(k.get("matmul_peak_gflops") or 0, g.get("peak_gflops") or 0, tp.get("fp32") or 0) or None
print(f"\nmatmul peaks: ds fp32 {k.get('matmul_peak_gflops') and round(k['matmul_peak_gflops'], 1)} GFLOP/s (1024^3), "
      f"{g.get('peak_gflops') and round(g['peak_gflops'], 1)} GFLOP/s (best GPT-2-small product: {g.get('peak_at')}); "
      f"PyTorch fp32 {tp.get('fp32') and round(tp['fp32'], 1)}, bf16 {tp.get('bf16') and round(tp['bf16'], 1)} GFLOP/s (1024^3); "
      f"fp32 peak used: {peak32 and round(peak32, 1)} (the highest)")
peak16 = max(tp.get("bf16") or 0, peak32 or 0) or None
shapes = {"gpt2": (12, 768, 12, 256, 4, 50304), "ref": (4, 256, 4, 128, 8, 8192)}
for s, (L, C, H, T, B, V) in shapes.items():
    # Model FLOPs of a training step (3x the forward): the matrix products of the blocks and
    # the tied LM head, and attention's two T x T products over the full (not causal) square.
    tok = B * T
    fwd = 2 * tok * (12 * L * C * C + V * C) + 4 * L * B * T * T * C
    step = 3 * fwd
    print(f"\n{s}: {step / 1e9:.1f} GFLOP per step")
    rows = [("ds fp32", "ds_%s_fp32.json", peak32), ("ds bf16", "ds_%s_bf16.json", peak16),
            ("PyTorch fp32 manual", "pt_%s_manual.txt", peak32), ("PyTorch fp32 SDPA", "pt_%s_sdpa.txt", peak32),
            ("PyTorch bf16 autocast", "pt_%s_bf16.txt", peak16)]
    got = {}
    for label, f, peak in rows:
        r = load(f % s)
        if not r:
            continue
        ms = r["median_step_ms"]
        got[label] = ms
        g = step / ms / 1e6
        frac = f"{g / peak:.2f} of peak" if peak else ""
        print(f"  {label:<24} {ms:>10.1f} ms/step  {g:>7.1f} GFLOP/s  {frac}")
    def ratio(a, b):
        if a in got and b in got:
            print(f"  {a} / {b}: {got[a] / got[b]:.2f}x")
    ratio("ds fp32", "PyTorch fp32 manual")
    ratio("ds fp32", "PyTorch fp32 SDPA")
    ratio("ds bf16", "PyTorch bf16 autocast")
    ratio("ds bf16", "ds fp32")
PYEOF
rm -rf "$OUT"
