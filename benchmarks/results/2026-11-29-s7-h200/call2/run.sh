#!/bin/bash
# session 7, call 2 on nvidia-h200 (one job after the other): the 7B step with each joined weight
# dequantized into its rows of one buffer (no concat of codes): 4x512 + 1x2048, profile of 4x512; then a
# profile of 65B 1x512 in a 48 GiB pool (default settings) to see where its time goes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s7c2; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
timeout 130 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --steps 10 --warmup 2 --timeout 65 --json $R/jax_7b.json > $R/jax_7b.log 2>&1
timeout 90 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 4 --warmup 1 --timeout 85 --profile /tmp/tprof --json $R/jax_7b_prof.json > $R/prof7.log 2>&1
d=$(ls -d /tmp/tprof/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 3 --top 100 --json $R/profile_7b.json > $R/profile_7b.log 2>&1
timeout 200 python3 benchmarks/train_step.py --size 65b --batch 1x512 --weights nf4 --mem-limit-gb 48 --steps 5 --warmup 1 --timeout 190 --profile /tmp/tprof65 --json $R/jax_65b_prof.json > $R/prof65.log 2>&1
d=$(ls -d /tmp/tprof65/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 3 --top 100 --json $R/profile_65b.json > $R/profile_65b.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s7c2
for f in $R/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -4; done; head -14 $R/profile_7b.log; head -40 $R/profile_65b.log
