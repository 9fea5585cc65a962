#!/bin/bash
# session 10, call 7 (nvidia-h200): compiled GEMV / decode tests of the final tree; 7B decoding at batch 1, 2 and 8
# with it, and at batch 2 with the session's starting tree (7f9a6ff, .scratch/old) in the same job.
export PYTHONUNBUFFERED=1
R=/tmp/res_s10c7; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 110 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
  -k "gemv_forward or bf16x2 or auto_split or gemv_llama" > $R/tests.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=. timeout 110 python3 benchmarks/generate.py --size 7b --batch 1,2,8 --variants nf4 --baselines '' --runs 2 --json $R/gen_new.json > $R/gen_new.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=.scratch/old timeout 70 python3 .scratch/old/benchmarks/generate.py --size 7b --batch 2 --variants nf4 --baselines '' --runs 2 --json $R/gen_old.json > $R/gen_old.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s10c7
tail -3 $R/tests.log; grep -E "^\| qlora" $R/gen_new.log | tail -3; grep -E "^\| qlora" $R/gen_old.log | tail -1; grep -i "error" $R/gen_*.log | head -3; cat $R/gpus.txt
