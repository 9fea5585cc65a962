#!/bin/bash
# session 9, call 5 (nvidia-h200): the fp16x2 GEMV with x packed in the kernel (x_layout="in_kernel") against the
# default (x packed by two XLA ops first), device time per call including each call's x preparation; compiled tests.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=/tmp/res_s9c5; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 110 python3 benchmarks/kernel_profile.py --m 1 --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --trace-dir /tmp/kp --repeats 5 --only-extra \
  --config split=split:4 --config in_kernel=x_layout:in_kernel --json $R/gemv_in_kernel.json > $R/gemv_in_kernel.log 2>&1
date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 70 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py -k "in_kernel or f16x2_keeps or equal_reference and gemv" > $R/tests.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s9c5
grep -E "^\|" $R/gemv_in_kernel.log; tail -3 $R/gemv_in_kernel.log | grep -i error; tail -2 $R/tests.log
