#!/bin/bash
# session 6, call 6 on nvidia-h200 (one job after the other):
# 7B step with dropout masks from the counter hash (commit HEAD); 65B 1x512 in a 48 GiB pool with the default
# settings and 65B 1x2048 with bf16 adapters + 8-layer pages; then the 7B step again with threefry masks
# (the hash commit reverted in this copy) for a same-call comparison.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s6c6; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
timeout 125 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --steps 10 --warmup 2 --timeout 65 --json $R/jax_nf4_7b_hash.json > $R/jax_7b_hash.log 2>&1
timeout 140 python3 benchmarks/train_step.py --size 65b --batch 1x512 --weights nf4 --mem-limit-gb 48 --steps 10 --warmup 1 --timeout 130 --json $R/jax_nf4_65b_48gib_auto.json > $R/jax_65b_1x512.log 2>&1
timeout 160 python3 benchmarks/train_step.py --size 65b --batch 1x2048 --weights nf4 --mem-limit-gb 48 --lora-dtype bfloat16 --page-size 11272192 --steps 10 --warmup 1 --timeout 150 --json $R/jax_nf4_lora_bf16_65b_48gib_page8l.json > $R/jax_65b_1x2048.log 2>&1
patch -R -p1 < .scratch/hash.patch > $R/patch.log 2>&1 && \
timeout 125 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --steps 10 --warmup 2 --timeout 65 --json $R/jax_nf4_7b_threefry.json > $R/jax_7b_threefry.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s6c6
for f in $R/*.log; do echo "== $f"; grep -E "^\||Error|error:|paged|Adam" $f | tail -5; done
