#!/bin/bash
# session 6, call 1 on nvidia-h200-x2 (independent single-GPU jobs):
# GPU 0: 7B NF4 decoding at batch 2, 4 and 8, dequantized layer buffers off / on.
# GPU 1: GEMV reduce="end" (register decodes) against the default, M = 1 and 8, the joined 7B shapes.
#        then 7B train step 4x512 profile (where the step's time goes now).
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s6c1; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2 $R/g1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 540 python3 benchmarks/generate.py --size 7b --batch 2,4,8 --variants nf4 --dequantize-layers 0,1 --baselines '' --runs 1 --json $R/g0/generate_deq_b248.json > $R/g0/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  JAX_PLATFORMS=cuda timeout 200 python3 benchmarks/kernel_profile.py --m 1,8 --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --trace-dir /tmp/kprof --repeats 5 --only-extra \
    --config d=decode:prmt_f16x2 --config re=reduce:end --config re_bps4=reduce:end,blocks_per_step:4 --config re_bn8=reduce:end,block_n:8 \
    --json $R/g1/gemv_reduce_end.json > $R/g1/gemv.log 2>&1
  timeout 200 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 6 --warmup 2 --timeout 190 --profile /tmp/tprof --json $R/g1/train_7b_prof.json > $R/g1/train.log 2>&1
  d=$(ls -d /tmp/tprof/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 3 --top 60 --json $R/g1/profile_summary.json > $R/g1/profile_summary.log 2>&1
  timeout 150 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --lora-dropout 0 --steps 10 --warmup 2 --timeout 140 --json $R/g1/train_7b_nodrop.json > $R/g1/train_nodrop.log 2>&1
) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s6c1
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -40; done
