#!/bin/bash
# session 11 call 5: (a) spike: prmt NF4 decode inside a Mosaic GPU kernel (plgpu.inline_mgpu + llvm.inline_asm);
# (b) final tree, 7B decoding at batch 1/2/8: defaults vs the tenth session's behaviour (XLA norm, 8-bit scale codes)
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u
timeout 120 python3 .scratch/s11/mgpu/decode_spike.py run 2>&1 | grep -v Deprecat | tail -5
date -u
timeout 220 python3 benchmarks/generate.py --size 7b --batch 1,2,8 --variants nf4 --baselines '' --runs 3 --new-tokens 256 --json $OUT/gen_new.json > $OUT/gen_new.log 2>&1
grep -E "^\| qlora" $OUT/gen_new.log | tail -3
date -u
timeout 220 python3 benchmarks/generate.py --size 7b --batch 1,2,8 --variants nf4 --baselines '' --runs 3 --new-tokens 256 --rms-norm xla --fp32-scales 0 --json $OUT/gen_old.json > $OUT/gen_old.log 2>&1
grep -E "^\| qlora" $OUT/gen_old.log | tail -3
date -u
