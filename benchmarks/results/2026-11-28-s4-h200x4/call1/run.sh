#!/bin/bash
# session 4, call 1 on nvidia-h200-x4: four independent single-GPU jobs.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s4c1; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2 $R/g3
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 520 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4,bf16 --baselines '' --layer-buffers 0,1 --runs 2 --profile /tmp/genprof --json $R/g0/generate_lb.json > $R/g0/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  for v in threefry rbg; do
    timeout 200 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --rng-impl $v --steps 10 --warmup 2 --timeout 95 --budget-s 190 --json $R/g1/ts7b_$v.json > $R/g1/ts7b_$v.log 2>&1
  done
  timeout 110 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --lora-dropout 0 --steps 10 --warmup 2 --timeout 100 --budget-s 105 --json $R/g1/ts7b_nodrop.json > $R/g1/ts7b_nodrop.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2
  JAX_PLATFORMS=cuda timeout 520 python3 benchmarks/kernel_profile.py --trace-dir /tmp/kprof --repeats 5 \
    --config w8=num_warps:8 --config st2=num_stages:2 --config bn32_g8_s2=block_n:32,split:2 \
    --config bn8_s8=block_n:8,split:8 --config g16_s4=blocks_per_step:16 --config bn64_g4_w8=block_n:64,blocks_per_step:4,num_warps:8 \
    --config s1_bn8=block_n:8,split:1 --config bn16_g4_s4_w2=blocks_per_step:4,num_warps:2 --config g2_s8=blocks_per_step:2,split:8 \
    --json $R/g2/kernel_profile.json > $R/g2/kernel_profile.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=3 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0
  timeout 400 ncu --kernel-name regex:nf4_gemv --launch-count 1 --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats python3 .scratch/ncu_gemv.py 4096x11008 > $R/g3/ncu_4096x11008.txt 2>&1
  timeout 100 ncu --kernel-name regex:nf4_gemv --launch-count 1 --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy python3 .scratch/ncu_gemv.py 11008x4096 > $R/g3/ncu_11008x4096.txt 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s4c1
for f in $R/*/*.log; do echo "== $f"; grep -E "^\|" $f | tail -20; done
for f in $R/g3/*.txt; do echo "== $f"; grep -E "nf4_gemv|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Executed Ipc|Warp Cycles|Stall|Eligible|Issued" $f | head -40; tail -3 $f; done
