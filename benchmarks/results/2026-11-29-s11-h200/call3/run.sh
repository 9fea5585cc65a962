#!/bin/bash
# session 11 call 3: fp32-scale layer buffers and the RMSNorm kernel, 7B decoding (same job), + GPU tests
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u
JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -o addopts="" -p no:cacheprovider -q tests/test_rms_norm.py .scratch/s11/call3/test_fp32_scales.py 2>&1 | tail -4
date -u
timeout 330 python3 benchmarks/generate.py --size 7b --batch 1,2 --variants nf4 --baselines '' --runs 2 --new-tokens 256 --rms-norm xla,auto --fp32-scales 0,1 --json $OUT/gen.json > $OUT/gen.log 2>&1
grep -E "^\| qlora" $OUT/gen.log | tail -8
date -u
