#!/bin/bash
# session 6, call 8 on nvidia-h200: the final code's generation path on a GPU (prefill now runs the joined
# q/k/v and gate/up products), and tests/test_nf4_dense.py on the GPU.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s6c8; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
timeout 150 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4_lora --baselines '' --runs 1 --json $R/generate_final.json > $R/generate.log 2>&1
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_nf4_dense.py > $R/pytest_gpu.log 2>&1
cd /tmp && tar czf $OUT/res.tgz res_s6c8
for f in $R/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error|error:" $f | tail -6; done
