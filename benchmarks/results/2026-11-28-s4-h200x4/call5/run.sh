#!/bin/bash
# session 4, call 5 on nvidia-h200-x2: 65B in a 48 GiB pool with pages of 8 layers of the largest LoRA leaf
# (optim.page_size 11272192): bf16 adapters at 1x2048 and 1x512 (GPU 0); fp32 adapters at 1x512 (GPU 1).
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s4c5; rm -rf $R; mkdir -p $R/g0 $R/g1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 benchmarks/train_step.py --size 65b --batch 1x2048,1x512 --weights nf4 --mem-limit-gb 48 --lora-dtype bfloat16 --page-size 11272192 --steps 10 --warmup 1 --timeout 100 --budget-s 195 --json $R/g0/jax_nf4_lora_bf16_65b_48gib_page8l.json > $R/g0/lora_bf16_page8l.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 benchmarks/train_step.py --size 65b --batch 1x512 --weights nf4 --mem-limit-gb 48 --page-size 11272192 --steps 10 --warmup 1 --timeout 140 --json $R/g1/jax_nf4_65b_48gib_page8l.json > $R/g1/page8l.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s4c5
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -8; done
