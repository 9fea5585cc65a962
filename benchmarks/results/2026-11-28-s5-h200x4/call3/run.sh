#!/bin/bash
# session 5, call 3 on nvidia-h200-x4 (independent single-GPU jobs):
# GPU 0: 7B generation after moving the joined adapters' A to [r, in]: NF4 + adapter joined vs not, NF4 joined; batch 1, 8.
# GPU 1: profiles of one generate call (batch 1, joined): NF4 and NF4 + adapter.
# GPU 2: GEMV split-K sweep on the joined shapes (q/k/v 4096x12288, gate/up 4096x22016) and the others, M = 1 and 8.
# GPU 3: the whole test suite on the GPU.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=/tmp/res_s5c3; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2 $R/g3
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 400 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4_lora --join-projections 0,1 --baselines '' --runs 2 --json $R/g0/generate_lora_join.json > $R/g0/generate_lora.log 2>&1
  timeout 150 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --join-projections 1 --baselines '' --runs 2 --json $R/g0/generate_nf4_join.json > $R/g0/generate_nf4.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 400 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4,nf4_lora --join-projections 1 --baselines '' --runs 1 --profile /tmp/gprof --json $R/g1/generate_profile.json > $R/g1/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2
  JAX_PLATFORMS=cuda timeout 500 python3 benchmarks/kernel_profile.py --m 1,8 --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --trace-dir /tmp/kprof --repeats 5 --only-extra \
    --config s1=split:1 --config s2=split:2 --config s4=split:4 --config s8=split:8 --config bn8s1=block_n:8,split:1 --config bn8s2=block_n:8,split:2 \
    --json $R/g2/gemv_split_sweep.json > $R/g2/gemv_split_sweep.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=3
  timeout 520 python3 -m pytest -q -p no:cacheprovider > $R/g3/pytest_gpu_all.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s5c3
for f in $R/g0/*.log $R/g1/*.log $R/g3/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error|error:" $f | tail -10; done
grep -E "^\|" $R/g2/*.log | grep -v "pallas_dequant\|---" 
