#!/bin/bash
# session 8, call 1 (nvidia-h200): the tensor-core small-M kernel (nf4_matmul_small_m.py rewrite): compiled
# tests, then device time per call against the bf16 dot, the dequantize + dot and the GEMV, several tile configs.
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
R=/tmp/res_s8c1; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
git log -1 --format=%H >> $R/gpus.txt
timeout 150 python3 -m pytest -q -x tests/test_kernels.py -k "small_m or grad_through" -p no:cacheprovider > $R/tests.log 2>&1
tail -3 $R/tests.log
C="--config sm_bn32=kernel:small_m,block_n:32 --config sm_bn128=kernel:small_m,block_n:128
 --config sm_g4=kernel:small_m,blocks_per_step:4 --config sm_g16=kernel:small_m,blocks_per_step:16
 --config sm_s2=kernel:small_m,split:2 --config sm_s8=kernel:small_m,split:8
 --config sm_w8=kernel:small_m,num_warps:8 --config sm_st2=kernel:small_m,num_stages:2 --config sm_st4=kernel:small_m,num_stages:4
 --config sm_bn128_w8=kernel:small_m,block_n:128,num_warps:8"
timeout 260 python3 benchmarks/kernel_profile.py --shapes 4096x11008 --m 1,16,64 --trace-dir /tmp/kp1 --repeats 5 --only-extra \
  --config gemv=decode:prmt_f16x2 --config small_m=kernel:small_m $C --json $R/sweep_4096x11008.json > $R/sweep.log 2>&1
timeout 200 python3 benchmarks/kernel_profile.py --shapes 11008x4096,8192x22016,4096x12288,4096x22016 --m 1,8,16,32,64 --trace-dir /tmp/kp2 --repeats 5 --only-extra \
  --config gemv=decode:prmt_f16x2 --config small_m=kernel:small_m --json $R/shapes.json > $R/shapes.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s8c1
grep -E "^\|" $R/sweep.log | head -60; grep -E "^\|" $R/shapes.log | head -80; tail -5 $R/sweep.log $R/shapes.log
