#!/bin/bash
# session 10, call 5 (nvidia-h200): the bf16x2 GEMV (x pairs) around its tile configuration at M = 1, and against
# the small-M kernel at M = 2-4 (where "auto" switches from one to the other), device time per call.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=/tmp/res_s10c5; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 170 python3 benchmarks/kernel_profile.py --m 1 --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --trace-dir /tmp/kp1 --repeats 5 --only-extra \
  --config default=split:4 --config bn8=block_n:8 --config bn32=block_n:32 --config g4=blocks_per_step:4 --config g16s2=blocks_per_step:16,split:2 \
  --config s8=split:8 --config s2=split:2 --config w8bn32=block_n:32,num_warps:8 --config st2=num_stages:2 --config st4=num_stages:4 \
  --json $R/gemv_sweep.json > $R/gemv_sweep.log 2>&1
date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 150 python3 benchmarks/kernel_profile.py --m 2,3,4 --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --trace-dir /tmp/kp2 --repeats 5 --only-extra \
  --config gemv=split:4 --config small_m=kernel:small_m --json $R/gemv_vs_sm.json > $R/gemv_vs_sm.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s10c5
grep -E "^\|" $R/gemv_sweep.log | grep -v "pallas_dequant\|bf16_dot"; grep -E "bf16_dot" $R/gemv_sweep.log; grep -i "error\|Traceback" $R/gemv_sweep.log | head -3
grep -E "^\|" $R/gemv_vs_sm.log | grep -v pallas_dequant; grep -i "error\|Traceback" $R/gemv_vs_sm.log | head -3; cat $R/gpus.txt
