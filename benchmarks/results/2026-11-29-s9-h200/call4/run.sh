#!/bin/bash
# session 9, call 4 (nvidia-h200): the decode-attention kernel's new default (more slices) against one and three
# slices and XLA; 7B decoding end to end: the previous commit's tree (333de7e, .scratch/old) and this tree with
# XLA's attention and with the kernel, one after the other in this job.
export PYTHONUNBUFFERED=1
R=/tmp/res_s9c4; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
PYTHONPATH=. JAX_PLATFORMS=cuda timeout 100 python3 benchmarks/decode_attention.py --batch 1,8 --slots 384,2048 --trace-dir /tmp/dat --runs 3 \
  --config s1=splits:1 --config s3=splits:3 --json $R/decode_attention.json > $R/decode_attention.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=.scratch/old timeout 130 python3 .scratch/old/benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --baselines '' --runs 2 --json $R/gen_old.json > $R/gen_old.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=. timeout 220 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --baselines '' --runs 2 --attention xla,auto --json $R/gen_new.json > $R/gen_new.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s9c4
sed -n '/^  B/,$p' $R/decode_attention.log; grep -E "^\| qlora" $R/gen_old.log | tail -2; grep -E "^\| qlora" $R/gen_new.log | tail -4; cat $R/gpus.txt
