#!/bin/bash
# session 5, call 1 on nvidia-h200-x4 (independent single-GPU jobs):
# GPU 0: 65B 1x512 in a 48 GiB pool with the default optim.paged=auto (XLA memory check), then bf16 adapters + 8-layer pages at 1x2048.
# GPU 1: bitsandbytes + PEFT 65B 1x512 and 1x2048 (same call).
# GPU 2: generation profiles, 7B batch 1, NF4 with an unmerged adapter and without.
# GPU 3: ncu of the prmt_f16x2 GEMV; GEMV config sweep at M = 1 incl. 4096x4096.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=/tmp/res_s5c1; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2 $R/g3
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  timeout 130 python3 benchmarks/train_step.py --size 65b --batch 1x512 --weights nf4 --mem-limit-gb 48 --steps 10 --warmup 1 --timeout 120 --json $R/g0/jax_nf4_65b_48gib_auto.json > $R/g0/auto.log 2>&1
  timeout 150 python3 benchmarks/train_step.py --size 65b --batch 1x2048 --weights nf4 --mem-limit-gb 48 --lora-dtype bfloat16 --page-size 11272192 --steps 10 --warmup 1 --timeout 140 --json $R/g0/jax_nf4_lora_bf16_65b_48gib_page8l.json > $R/g0/lora_bf16_page8l.log 2>&1
) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 420 python3 benchmarks/baselines/bnb_peft.py --device cuda --size 65b --batch 1x512,1x2048 --weights nf4 --steps 10 --warmup 1 --timeout 410 --json $R/g1/bnb_65b.json > $R/g1/bnb.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2
  timeout 400 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4_lora,nf4 --baselines '' --runs 2 --profile /tmp/gprof --json $R/g2/generate_profile.json > $R/g2/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=3 XLA_PYTHON_CLIENT_PREALLOCATE=false
  timeout 150 ncu --kernel-name regex:nf4_gemv --launch-count 1 --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats --section SourceCounters python3 .scratch/ncu_gemv.py 4096x11008 > $R/g3/ncu_f16x2_4096x11008.txt 2>&1
  unset XLA_PYTHON_CLIENT_PREALLOCATE
  JAX_PLATFORMS=cuda timeout 300 python3 benchmarks/kernel_profile.py --m 1 --shapes 4096x4096,4096x11008,11008x4096 --trace-dir /tmp/kprof --repeats 5 --only-extra \
    --config d=decode:prmt_f16x2 --config s2=split:2 --config s8=split:8 --config bn8=block_n:8 --config bn32=block_n:32 \
    --config bps4=blocks_per_step:4 --config bps16=blocks_per_step:16 --config w2=num_warps:2 --config w8=num_warps:8 \
    --config st2=num_stages:2 --config st4=num_stages:4 --config bn32s8=block_n:32,split:8 --config bn8s2=block_n:8,split:2 \
    --json $R/g3/gemv_sweep_m1.json > $R/g3/gemv_sweep.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s5c1
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -30; done
grep -E "Duration|Throughput|Registers|Achieved Occ|Issued Ipc|No Eligible" $R/g3/ncu*.txt | head -30
