#!/bin/bash
# session 5, call 5 on nvidia-h200-x4 (independent single-GPU jobs): 4-bit weights dequantized into the layer buffers
# for batched decoding.
# GPU 0: 7B NF4 generation, batch 1, 4, 8, dequantized layer buffers off / on (joined projections).
# GPU 1: the same at batch 8 with an unmerged adapter, and bf16 weights at batch 8.
# GPU 2: GPU tests of kernels and generation.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s5c5; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 215 python3 benchmarks/generate.py --size 7b --batch 1,4,8 --variants nf4 --dequantize-layers 0,1 --baselines '' --runs 1 --json $R/g0/generate_deq.json > $R/g0/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 215 python3 benchmarks/generate.py --size 7b --batch 8 --variants nf4_lora,bf16 --dequantize-layers 0,1 --baselines '' --runs 1 --json $R/g1/generate_deq_lora_bf16.json > $R/g1/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2
  timeout 215 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_generate.py > $R/g2/pytest_gpu.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s5c5
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error|error:" $f | tail -10; done
