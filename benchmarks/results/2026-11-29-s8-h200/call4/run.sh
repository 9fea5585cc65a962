#!/bin/bash
# session 8, call 4 (nvidia-h200): device time of the small-M kernels' input gradient (tile configs) against the
# bf16 dot, the Pallas dequantize + dot and the GEMV's gradient; the forward at M = 2, 4, 8 (GEMV vs small-M).
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
R=/tmp/res_s8c4; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
T="--config sm_t=kernel:small_m --config sm_t_g1_s8=kernel:small_m,blocks_per_step:1,split:8
 --config sm_t_g1_s16=kernel:small_m,blocks_per_step:1,split:16 --config sm_t_g2_s16=kernel:small_m,split:16
 --config sm_t_g4_s32=kernel:small_m,blocks_per_step:4,split:32 --config sm_t_g1_s16_bn128=kernel:small_m,blocks_per_step:1,split:16,block_n:128
 --config gemv_t=decode:gather16,block_n:16,blocks_per_step:4,split:8"
timeout 330 python3 benchmarks/kernel_profile.py --shapes 4096x11008,11008x4096,8192x22016 --m 1,16,64 --direction bwd --trace-dir /tmp/kpb --repeats 5 --only-extra $T --json $R/bwd.json > $R/bwd.log 2>&1
date -u >> $R/gpus.txt
timeout 150 python3 benchmarks/kernel_profile.py --shapes 4096x11008,11008x4096,8192x22016 --m 2,4,8 --direction fwd --trace-dir /tmp/kpf --repeats 5 --only-extra --config gemv=decode:prmt_f16x2 --config small_m=kernel:small_m --json $R/fwd_m248.json > $R/fwd.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s8c4
grep -E "^\|" $R/bwd.log | grep -v "^|---" ; grep -E "^\|" $R/fwd.log | grep -v "^|---"; tail -2 $R/bwd.log $R/fwd.log
