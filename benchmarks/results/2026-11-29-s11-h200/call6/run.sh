#!/bin/bash
# session 11 call 6: GEMV tile configurations on fp32-scale weights (what decoding's layer buffers now hold), M = 1,
# the 7B joined decode shapes
export PYTHONUNBUFFERED=1 PYTHONPATH=.
date -u
timeout 330 python3 benchmarks/kernel_profile.py --shapes 4096x12288,4096x22016,11008x4096,4096x4096 --fp32-scales \
  --only-extra --repeats 10 --trace-dir /tmp/kp --json $OUT/sweep.json \
  --config default=decode:auto --config bn8=block_n:8 --config g4=blocks_per_step:4 --config g16=blocks_per_step:16 \
  --config w2=num_warps:2 --config st1=num_stages:1 --config st2=num_stages:2 --config s2=split:2 --config s8=split:8 \
  > $OUT/sweep.log 2>&1
grep -E "^\|" $OUT/sweep.log | tail -48
date -u
