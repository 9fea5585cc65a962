#!/bin/bash
# session 8, call 3 (nvidia-h200): the dispatcher with the small-M kernel: GPU tests (compiled kernels), the
# issue-3 table (benchmarks/kernels.py, auto vs XLA dequant+dot vs bf16 dot, fwd and bwd), 7B generation at
# batch 4 and 8 with and without dequantized layer buffers.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s8c3; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_nf4_dense.py tests/test_prmt_decode.py > $R/tests.log 2>&1
tail -3 $R/tests.log; date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 260 python3 benchmarks/kernels.py --m 1,2,4,8,16,64 --runs 10 --json $R/kernels.json > $R/kernels.log 2>&1
date -u >> $R/gpus.txt
timeout 240 python3 benchmarks/generate.py --size 7b --batch 4,8 --variants nf4 --dequantize-layers 0,1 --baselines '' --runs 1 --json $R/generate_b48.json > $R/generate.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s8c3
grep -E "passed|failed" $R/tests.log | tail -3; grep -E "^[0-9]+x[0-9]+ " $R/kernels.log; tail -3 $R/kernels.log; grep -E "^\|" $R/generate.log | tail -6; tail -3 $R/generate.log
