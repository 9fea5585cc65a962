#!/bin/bash
# session 9, call 3 (nvidia-h200): decode-attention kernel configurations against XLA (device time), compiled tests.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=/tmp/res_s9c3; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 300 python3 benchmarks/decode_attention.py --batch 1,8 --slots 192,384,2048 --trace-dir /tmp/dat --runs 5 \
  --config s2=splits:2 --config s3=splits:3 --config b32=block_s:32 --config b32s6=block_s:32,splits:6 \
  --config b16s12=block_s:16,splits:12 --config b32w2=block_s:32,num_warps:2 --config b32s6w2=block_s:32,splits:6,num_warps:2 \
  --config b32mp256=block_s:32,min_programs:256 --config b64mp256=min_programs:256 --config st3=num_stages:3 \
  --json $R/decode_attention.json > $R/decode_attention.log 2>&1
date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_attention.py > $R/tests.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s9c3
sed -n '/^  B/,$p' $R/decode_attention.log; tail -3 $R/decode_attention.log | grep -i error; tail -2 $R/tests.log
