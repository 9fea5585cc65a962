#!/bin/bash
# session 5, call 2 on nvidia-h200-x4 (independent single-GPU jobs): joined q/k/v and gate/up projections in decoding.
# GPU 0: 7B generation, NF4 with an unmerged adapter and without, joined vs not (layer buffers on), batch 1 and 8.
# GPU 1: the same for bf16 weights, then the transformers baselines (bitsandbytes 4-bit, bf16).
# GPU 2: profiles of one generate call, NF4 + adapter, batch 1, joined vs not.
# GPU 3: GPU tests of generation, kernels, the layer and the format.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=/tmp/res_s5c2; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2 $R/g3
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 500 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4_lora,nf4 --join-projections 0,1 --baselines '' --runs 2 --json $R/g0/generate_join.json > $R/g0/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 500 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants bf16 --join-projections 0,1 --baselines bnb4,hf_bf16 --runs 2 --tmp-dir /tmp/gen --json $R/g1/generate_bf16_baselines.json > $R/g1/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2
  timeout 400 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4_lora --join-projections 0,1 --baselines '' --runs 1 --profile /tmp/gprof --json $R/g2/generate_profile.json > $R/g2/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=3
  timeout 400 python3 -m pytest -q -x tests/test_generate.py tests/test_kernels.py tests/test_nf4_dense.py tests/test_nf4.py -p no:cacheprovider > $R/g3/pytest_gpu.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s5c2
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error|error:" $f | tail -14; done
