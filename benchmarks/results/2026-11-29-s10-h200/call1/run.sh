#!/bin/bash
# session 10, call 1 (nvidia-h200): the decode tables held in registers (table_tiles) and fp16 chains over 2 / 4 code
# words (GemvConfig.chain) against the previous tree (7f9a6ff, .scratch/old) in the same job: compiled tests, GEMV at
# M = 1 and small-M at M = 8 / 16, device time per call.
export PYTHONUNBUFFERED=1
R=/tmp/res_s10c1; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
SH=4096x12288,4096x22016,11008x4096,4096x4096,4096x11008,8192x22016
PYTHONPATH=. JAX_PLATFORMS=cuda timeout 130 python3 benchmarks/kernel_profile.py --m 1 --shapes $SH --trace-dir /tmp/kp1 --repeats 5 --only-extra \
  --config chain1=chain:1 --config chain2=chain:2 --config chain4=chain:4 --json $R/gemv_new.json > $R/gemv_new.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=.scratch/old JAX_PLATFORMS=cuda timeout 100 python3 .scratch/old/benchmarks/kernel_profile.py --m 1 --shapes $SH --trace-dir /tmp/kp2 --repeats 5 --only-extra \
  --config old=split:4 --json $R/gemv_old.json > $R/gemv_old.log 2>&1
date -u >> $R/gpus.txt
SM=4096x11008,11008x4096,8192x22016
PYTHONPATH=. JAX_PLATFORMS=cuda timeout 90 python3 benchmarks/kernel_profile.py --m 8,16 --direction fwd,bwd --shapes $SM --trace-dir /tmp/kp3 --repeats 5 --only-extra \
  --config sm=kernel:small_m --json $R/sm_new.json > $R/sm_new.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=.scratch/old JAX_PLATFORMS=cuda timeout 90 python3 .scratch/old/benchmarks/kernel_profile.py --m 8,16 --direction fwd,bwd --shapes $SM --trace-dir /tmp/kp4 --repeats 5 --only-extra \
  --config sm_old=kernel:small_m --json $R/sm_old.json > $R/sm_old.log 2>&1
date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda timeout 110 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_prmt_decode.py tests/test_kernels.py \
  -k "gemv_forward or f16x2_keeps or small_m_forward or small_m_llama or gemv_llama" > $R/tests.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s10c1
for f in gemv_new gemv_old sm_new sm_old; do echo "== $f"; grep -E "^\|" $R/$f.log; grep -i "error\|Traceback" $R/$f.log | head -3; done; tail -3 $R/tests.log; cat $R/gpus.txt
