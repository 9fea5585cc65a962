#!/bin/bash
# session 8, call 5 (nvidia-h200): the final defaults: GPU tests of the kernels and generation (compiled), the small-M
# kernel's forward on every 7B/65B shape at M = 1, 16, 64 (default config), 7B generation at batch 4, 8, 16.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s8c5; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt; git log -1 --format=%H >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "small_m or auto or grad_through or entry_point" > $R/tests.log 2>&1
tail -2 $R/tests.log; date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 150 python3 benchmarks/kernel_profile.py --shapes 8192x22016,4096x12288,4096x22016,4096x4096 --m 1,16,64 --trace-dir /tmp/kp5 --repeats 5 --only-extra --config small_m=kernel:small_m --json $R/fwd_default.json > $R/fwd.log 2>&1
date -u >> $R/gpus.txt
timeout 200 python3 benchmarks/generate.py --size 7b --batch 4,8,16 --variants nf4 --baselines '' --runs 1 --json $R/generate_b4816.json > $R/generate.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s8c5
grep -E "^\|" $R/fwd.log | grep -v "^|---"; tail -2 $R/fwd.log; grep -E "^\|" $R/generate.log | tail -4; tail -2 $R/generate.log
