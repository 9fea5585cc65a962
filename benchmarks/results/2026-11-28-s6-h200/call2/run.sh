#!/bin/bash
# session 6, call 2 on nvidia-h200 (one GPU, one job after the other):
# 7B train step (bf16 backward products for LoRA and lm_head), 4x512 and 1x2048, then a 4x512 profile;
# 7B decoding at batch 1 (GEMV reduce "end" at M = 1 by default).
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s6c2; rm -rf $R; mkdir -p $R/g0
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
timeout 200 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --steps 10 --warmup 2 --timeout 95 --json $R/g0/train_7b.json > $R/g0/train.log 2>&1
timeout 150 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 6 --warmup 2 --timeout 140 --profile /tmp/tprof --json $R/g0/train_7b_prof.json > $R/g0/train_prof.log 2>&1
d=$(ls -d /tmp/tprof/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 3 --top 70 --json $R/g0/profile_summary.json > $R/g0/profile_summary.log 2>&1
timeout 200 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4,nf4_lora --baselines '' --runs 1 --json $R/g0/generate_b1.json > $R/g0/generate.log 2>&1
cd /tmp && tar czf $OUT/res.tgz res_s6c2
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error|error:" $f | grep -v "^| [a-z_]*fusion\|^| gemm" | tail -25; done
head -45 $R/g0/profile_summary.log
