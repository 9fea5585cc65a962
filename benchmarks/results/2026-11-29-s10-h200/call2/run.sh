#!/bin/bash
# session 10, call 2 (nvidia-h200): the GEMV with packed bf16x2 FMAs on x as it is (decode="prmt_bf16x2", the new
# bf16 default: no row max, no scale) against the fp16x2 GEMV (the previous default), device time per call at M = 1;
# 7B decoding end to end against the previous tree (7f9a6ff, .scratch/old) in this job; compiled GEMV tests.
export PYTHONUNBUFFERED=1
R=/tmp/res_s10c2; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
SH=4096x12288,4096x22016,11008x4096,4096x4096,4096x11008,8192x22016
PYTHONPATH=. JAX_PLATFORMS=cuda timeout 130 python3 benchmarks/kernel_profile.py --m 1 --shapes $SH --trace-dir /tmp/kp1 --repeats 5 --only-extra \
  --config f16x2=decode:prmt_f16x2 --config bf16x2=decode:prmt_bf16x2 --config bf16x2_s2=decode:prmt_bf16x2,split:2 \
  --config bf16x2_s1=decode:prmt_bf16x2,split:1 --json $R/gemv.json > $R/gemv.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=.scratch/old timeout 140 python3 .scratch/old/benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --baselines '' --runs 2 --json $R/gen_old.json > $R/gen_old.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=. timeout 140 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --baselines '' --runs 2 --json $R/gen_new.json > $R/gen_new.log 2>&1
date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_prmt_decode.py tests/test_kernels.py \
  -k "gemv_forward or bf16x2 or f16x2_keeps or gemv_llama" > $R/tests.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s10c2
grep -E "^\|" $R/gemv.log; grep -i "error\|Traceback" $R/gemv.log | head -3; grep -E "^\| qlora" $R/gen_old.log | tail -2; grep -E "^\| qlora" $R/gen_new.log | tail -2; tail -3 $R/gen_new.log; tail -3 $R/tests.log; cat $R/gpus.txt
