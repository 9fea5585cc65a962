#!/usr/bin/env bash
# Issue #9's GPU session in one go, under a hard time budget: ours (JAX, NF4) vs bitsandbytes + PEFT
# vs PyTorch bf16 LoRA vs our bf16 LoRA at 7B (4x512, 1x2048), the ratio table, then LLaMA-65B in a
# 48 GiB device pool (ours, then bitsandbytes) with whatever time is left. Every step writes its
# JSON and log to $OUT as it finishes; a step that fails or runs out of time leaves the others.
#
#   OUT=/path/to/results [TOTAL_S=480] bash benchmarks/run_train_step_gpu.sh
#
# SIZE/BATCHES (7b, 4x512,1x2048), BIG/BIG_BATCHES (65b, 1x512,1x2048), DEVICE (cuda) and
# CARD_MEM_GB (default: nvidia-smi) change the shapes; SIZE=tiny BIG=tiny DEVICE=cpu is a CPU dry run.
# SKIP_SMALL=1 runs only the big-model part (e.g. 65B in a second session), SKIP_BIG=1 only the small one;
# BASELINE_RUNS=1 skips the second run of each small-model baseline.
#
# Run from the repository root. bitsandbytes must be installed for the NF4 baseline
# (pip install --no-deps .wheels/bitsandbytes-0.50.2-*.whl); without it those rows say so.
set -u
OUT=${OUT:-benchmarks/results/train_step}
TOTAL_S=${TOTAL_S:-480}
PY=${PYTHON:-python3}
SIZE=${SIZE:-7b}; BATCHES=${BATCHES:-4x512,1x2048}
BIG=${BIG:-65b}; BIG_BATCHES=${BIG_BATCHES:-1x512,1x2048}
DEVICE=${DEVICE:-cuda}
CARD=${CARD_MEM_GB:+--card-mem-gb $CARD_MEM_GB}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

. "$(dirname "$0")/_budget.sh"  # left, budget, step

# baselines SUFFIX RESERVE_BNB RESERVE_TORCH: bitsandbytes + PEFT, then PyTorch bf16 LoRA, at $SIZE; each keeps
# the RESERVE seconds of the budget for what follows; files bnb_$SIZE$SUFFIX.* and torch_bf16_$SIZE$SUFFIX.*.
baselines() {
  step "bitsandbytes + PEFT${1:+ again}, $SIZE"
  $PY benchmarks/baselines/bnb_peft.py --device "$DEVICE" --size "$SIZE" --batch "$BATCHES" --weights nf4 --steps 10 --warmup 2 \
    --timeout 75 --budget-s "$(budget 90 "$2")" --json "$OUT/bnb_${SIZE}$1.json" 2>&1 | tee "$OUT/bnb_${SIZE}$1.log"
  step "PyTorch bf16 LoRA${1:+ again}, $SIZE"
  $PY benchmarks/baselines/bnb_peft.py --device "$DEVICE" --size "$SIZE" --batch "$BATCHES" --weights bf16 --steps 10 --warmup 2 \
    --timeout 60 --budget-s "$(budget 70 "$3")" --json "$OUT/torch_bf16_${SIZE}$1.json" 2>&1 | tee "$OUT/torch_bf16_${SIZE}$1.log"
}

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
$PY -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

if [ -z "${SKIP_SMALL:-}" ]; then
  step "ours, NF4, $SIZE"
  $PY benchmarks/train_step.py --size "$SIZE" --batch "$BATCHES" --weights nf4 --steps 10 --warmup 2 \
    --timeout 130 --budget-s "$(budget 200 260)" --json "$OUT/jax_nf4_${SIZE}.json" 2>&1 | tee "$OUT/jax_nf4_${SIZE}.log"

  step "ours, NF4, bf16 adapters (fp32 master in the optimizer), $SIZE"
  $PY benchmarks/train_step.py --size "$SIZE" --batch "$BATCHES" --weights nf4 --lora-dtype bfloat16 --steps 10 --warmup 2 \
    --timeout 100 --budget-s "$(budget 150 250)" --json "$OUT/jax_nf4_lora_bf16_${SIZE}.json" 2>&1 | tee "$OUT/jax_nf4_lora_bf16_${SIZE}.log"

  baselines "" 150 100

  step "ours, bf16 LoRA, $SIZE"
  $PY benchmarks/train_step.py --size "$SIZE" --batch "$BATCHES" --weights bf16 --steps 10 --warmup 2 \
    --timeout 110 --budget-s "$(budget 140 15)" --json "$OUT/jax_bf16_${SIZE}.json" 2>&1 | tee "$OUT/jax_bf16_${SIZE}.log"

  # The PyTorch baselines are bound by host-side kernel launches and moved by up to 68% between runs on
  # different H200 machines (RESULTS.md): a second run of each, after ours, shows their spread in the table.
  if [ "${BASELINE_RUNS:-2}" -ge 2 ] && [ "$(left)" -gt 200 ]; then
    baselines _2 110 15
  fi

  step "ratios, $SIZE"
  $PY benchmarks/compare_train_step.py "$OUT"/jax_nf4_${SIZE}.json "$OUT"/jax_nf4_lora_bf16_${SIZE}.json \
    "$OUT"/jax_bf16_${SIZE}.json "$OUT"/bnb_${SIZE}.json "$OUT"/torch_bf16_${SIZE}.json \
    $(ls "$OUT"/bnb_${SIZE}_2.json "$OUT"/torch_bf16_${SIZE}_2.json 2>/dev/null) \
    --json "$OUT/compare_${SIZE}.json" 2>&1 | tee "$OUT/compare_${SIZE}.txt"
fi
if [ -z "${SKIP_BIG:-}" ] && [ "$(left)" -gt 150 ]; then
  step "ours, NF4, $BIG in a 48 GiB pool"
  $PY benchmarks/train_step.py --size "$BIG" --batch "$BIG_BATCHES" --weights nf4 --mem-limit-gb 48 $CARD --steps 10 \
    --warmup 1 --timeout 200 --budget-s "$(budget 300 70)" --json "$OUT/jax_nf4_${BIG}_48gib.json" 2>&1 | tee "$OUT/jax_nf4_${BIG}_48gib.log"
fi
if [ -z "${SKIP_BIG:-}" ] && [ "$(left)" -gt 100 ]; then
  step "bitsandbytes + PEFT, $BIG"
  $PY benchmarks/baselines/bnb_peft.py --device "$DEVICE" --size "$BIG" --batch "$BIG_BATCHES" --weights nf4 --steps 10 --warmup 1 \
    --timeout 150 --budget-s "$(budget 200 10)" --json "$OUT/bnb_${BIG}_big.json" 2>&1 | tee "$OUT/bnb_${BIG}_big.log"
fi
if [ -f "$OUT/jax_nf4_${BIG}_48gib.json" ]; then
  step "ratios, all"
  $PY benchmarks/compare_train_step.py $(ls "$OUT"/jax_*.json "$OUT"/bnb_*.json "$OUT"/torch_*.json 2>/dev/null) \
    --json "$OUT/compare_all.json" 2>&1 | tee "$OUT/compare_all.txt"
fi
step "done; results in $OUT"
ls -la "$OUT"
