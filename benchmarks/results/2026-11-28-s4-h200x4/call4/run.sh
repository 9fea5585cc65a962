#!/bin/bash
# session 4, call 4 on nvidia-h200-x4: 65B in a 48 GiB pool: Adam on the device (paged off) and bf16 adapters with
# whole-leaf pages, against the default (GPU 0, one after the other) and bitsandbytes + PEFT (GPU 1, same time);
# GPU tests of generation and kernels (GPU 2).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=/tmp/res_s4c4; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 110 python3 benchmarks/train_step.py --size 65b --batch 1x512 --weights nf4 --mem-limit-gb 48 --paged off --no-fallback-unpaged --steps 10 --warmup 1 --timeout 100 --json $R/g0/jax_nf4_65b_48gib_unpaged.json > $R/g0/unpaged.log 2>&1
  timeout 190 python3 benchmarks/train_step.py --size 65b --batch 1x512,1x2048 --weights nf4 --mem-limit-gb 48 --lora-dtype bfloat16 --steps 10 --warmup 1 --timeout 90 --budget-s 185 --json $R/g0/jax_nf4_lora_bf16_65b_48gib.json > $R/g0/lora_bf16.log 2>&1
  timeout 100 python3 benchmarks/train_step.py --size 65b --batch 1x512 --weights nf4 --mem-limit-gb 48 --steps 10 --warmup 1 --timeout 95 --json $R/g0/jax_nf4_65b_48gib.json > $R/g0/default.log 2>&1
) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 benchmarks/baselines/bnb_peft.py --device cuda --size 65b --batch 1x512 --weights nf4 --steps 10 --warmup 1 --timeout 190 --json $R/g1/bnb_65b_1x512.json > $R/g1/bnb.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2
  timeout 380 python3 -m pytest -q -x tests/test_generate.py tests/test_kernels.py tests/test_nf4_dense.py > $R/g2/pytest_gpu.log 2>&1 ) &
wait
python3 benchmarks/compare_train_step.py $R/g0/*.json $R/g1/*.json --json $R/compare.json > $R/compare.txt 2>&1
cd /tmp && tar czf $OUT/res.tgz res_s4c4
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error|error:" $f | tail -12; done
cat $R/compare.txt
