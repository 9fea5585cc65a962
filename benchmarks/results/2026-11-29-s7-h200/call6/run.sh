#!/bin/bash
# session 7, call 6 on nvidia-h200 (one job after the other): remat experiments at 7B 4x512 (uncommitted
# policies in the working tree): names kept on the device ({attn_out, resid_mid}) and/or offloaded to pinned
# host memory (all projections; qkv; gate_up); the default full remat first as the same-call reference.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s7c6; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
for v in full save_attention save_attention_offload_qkv offload_projections save_attention_offload_gate_up; do
  timeout 75 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --remat $v --steps 8 --warmup 2 --timeout 70 --json $R/jax_7b_$v.json > $R/jax_$v.log 2>&1
done
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s7c6
for f in $R/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -3; done
