#!/bin/bash
# session 10, call 6 (nvidia-h200): the GEMV's automatic K slices (split=0, ~2,560 programs) against 4 slices (the
# previous commit 66d5c82, .scratch/old2) per call at M = 1 and in 7B batch-1 decoding, one job.
export PYTHONUNBUFFERED=1
R=/tmp/res_s10c6; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
PYTHONPATH=. JAX_PLATFORMS=cuda timeout 100 python3 benchmarks/kernel_profile.py --m 1 --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --trace-dir /tmp/kp1 --repeats 5 --only-extra \
  --config auto=split:0 --config s4=split:4 --json $R/gemv.json > $R/gemv.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=.scratch/old2 timeout 100 python3 .scratch/old2/benchmarks/generate.py --size 7b --batch 1 --variants nf4 --baselines '' --runs 2 --json $R/gen_old.json > $R/gen_old.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=. timeout 100 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4 --baselines '' --runs 2 --json $R/gen_new.json > $R/gen_new.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s10c6
grep -E "^\|" $R/gemv.log | grep -v pallas_dequant; grep -i "error\|Traceback" $R/gemv.log | head -3
grep -E "^\| qlora" $R/gen_old.log | tail -1; grep -E "^\| qlora" $R/gen_new.log | tail -1; grep -i error $R/gen_*.log | head; cat $R/gpus.txt
