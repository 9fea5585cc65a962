#!/bin/bash
# session 4, call 3 on nvidia-h200-x4: same-run generation with the new defaults (GPU 0, all rows one after the
# other, baselines included); GEMV vs dequantize + dot at M = 2, 4 (GPU 1).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=/tmp/res_s4c3; rm -rf $R; mkdir -p $R/g0 $R/g1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 560 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4_lora,nf4,bf16 --baselines bnb4,hf_bf16 --runs 2 --tmp-dir /tmp/gen --json $R/g0/generate.json > $R/g0/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  JAX_PLATFORMS=cuda timeout 400 python3 benchmarks/kernel_profile.py --m 2,4 --trace-dir /tmp/kprof --repeats 5 --only-extra \
    --config gemv_prmt=decode:prmt --config gemv_prmt_f16x2=decode:prmt_f16x2 \
    --json $R/g1/kernel_profile_m2_m4.json > $R/g1/kernel_profile.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s4c3
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||Error|error" $f | tail -40; done
