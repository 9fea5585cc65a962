#!/bin/bash
# session 7, call 7 on nvidia-h200 (one GPU, one job after the other, nothing else running): the 7B step with
# remat=save_attention (within bitsandbytes' device-wide memory) and the default full remat, then
# bitsandbytes + PEFT and PyTorch bf16 LoRA (the third same-run comparison of this session).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=/tmp/res_s7c7; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
timeout 130 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --remat save_attention --steps 10 --warmup 2 --timeout 65 --json $R/jax_nf4_7b_save_attention.json > $R/jax_sa.log 2>&1
timeout 130 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --steps 10 --warmup 2 --timeout 65 --json $R/jax_nf4_7b.json > $R/jax.log 2>&1
timeout 170 python3 benchmarks/baselines/bnb_peft.py --device cuda --size 7b --batch 4x512,1x2048 --weights nf4 --steps 10 --warmup 2 --timeout 80 --json $R/bnb_7b.json > $R/bnb.log 2>&1
timeout 120 python3 benchmarks/baselines/bnb_peft.py --device cuda --size 7b --batch 4x512,1x2048 --weights bf16 --steps 10 --warmup 2 --timeout 55 --json $R/torch_bf16_7b.json > $R/torch_bf16.log 2>&1
python3 benchmarks/compare_train_step.py $R/jax_nf4_7b_save_attention.json $R/bnb_7b.json $R/torch_bf16_7b.json > $R/compare_7b_save_attention.txt 2>&1
python3 benchmarks/compare_train_step.py $R/jax_nf4_7b.json $R/bnb_7b.json $R/torch_bf16_7b.json > $R/compare_7b.txt 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s7c7
cat $R/compare_7b_save_attention.txt $R/compare_7b.txt; for f in $R/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -4; done
