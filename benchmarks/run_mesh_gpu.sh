#!/usr/bin/env bash
# Issue #8's multi-GPU session in one go (one host, 2 or 4 GPUs), under a hard time budget: the train
# step at 7B on meshes of 2 and 4 GPUs (data parallel and FSDP) against a 1-GPU row of the same run,
# then 65B with FSDP. Tokens/s are global, peak memory per GPU (max over the mesh's GPUs); every
# step writes its JSON and log to $OUT as it finishes.
#
#   OUT=/path/to/results [TOTAL_S=1500] [GPUS=4] bash benchmarks/run_mesh_gpu.sh
#
# GPUS=2 runs the 2-GPU meshes only. SIZE/BATCH (7b, 4x512: per GPU), BIG/BIG_BATCH (65b, 1x512)
# change the shapes; SIZE=tiny BIG=tiny with XLA_FLAGS=--xla_force_host_platform_device_count=4
# JAX_PLATFORMS=cpu is a CPU dry run.
set -u
OUT=${OUT:-benchmarks/results/train_step_mesh}
TOTAL_S=${TOTAL_S:-1500}
PY=${PYTHON:-python3}
GPUS=${GPUS:-4}
SIZE=${SIZE:-7b}; BATCH=${BATCH:-4x512}
BIG=${BIG:-65b}; BIG_BATCH=${BIG_BATCH:-1x512}
if [ "$GPUS" -ge 4 ]; then MESHES=2x1,1x2,4x1,1x4,2x2; BIG_MESHES=1x2,1x4; else MESHES=2x1,1x2; BIG_MESHES=1x2; fi
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

. "$(dirname "$0")/_budget.sh"  # left, budget, step

step "devices"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
nvidia-smi topo -m 2>&1 | tee -a "$OUT/gpu.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"

step "ours, NF4, $SIZE, meshes 1x1,$MESHES (per-GPU batch $BATCH)"
$PY benchmarks/train_step.py --size "$SIZE" --batch "$BATCH" --weights nf4 --mesh "$MESHES" --steps 10 --warmup 2 \
  --timeout 240 --budget-s "$(budget 900 400)" --json "$OUT/jax_nf4_${SIZE}_mesh.json" 2>&1 | tee "$OUT/jax_nf4_${SIZE}_mesh.log"

if [ "$(left)" -gt 200 ]; then
  step "ours, NF4, $BIG, FSDP meshes 1x1,$BIG_MESHES (per-GPU batch $BIG_BATCH)"
  $PY benchmarks/train_step.py --size "$BIG" --batch "$BIG_BATCH" --weights nf4 --mesh "$BIG_MESHES" --steps 5 --warmup 1 \
    --timeout 400 --budget-s "$(budget 1200 10)" --json "$OUT/jax_nf4_${BIG}_fsdp.json" 2>&1 | tee "$OUT/jax_nf4_${BIG}_fsdp.log"
fi
step "done; results in $OUT"
ls -la "$OUT"
