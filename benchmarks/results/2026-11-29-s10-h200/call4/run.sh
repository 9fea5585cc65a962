#!/bin/bash
# session 10, call 4 (nvidia-h200): the bf16x2 GEMV's three x layouts (XLA planes, in place strided, in place split on
# chip) per call at M = 1 and in 7B batch-1 decoding (trees differing only in GemvConfig.x_layout's default), one job.
export PYTHONUNBUFFERED=1
R=/tmp/res_s10c4; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
SH=4096x12288,4096x22016,11008x4096,4096x4096,4096x11008,8192x22016
PYTHONPATH=. JAX_PLATFORMS=cuda timeout 130 python3 benchmarks/kernel_profile.py --m 1 --shapes $SH --trace-dir /tmp/kp1 --repeats 5 --only-extra \
  --config f16x2=decode:prmt_f16x2 --config bf16x2_split=decode:prmt_bf16x2 --config bf16x2_strided=decode:prmt_bf16x2,x_layout:strided \
  --config bf16x2_pairs=decode:prmt_bf16x2,x_layout:pairs --json $R/gemv.json > $R/gemv.log 2>&1
date -u >> $R/gpus.txt
for n in split strided pairs; do
  t=.scratch/t_$n; [ $n = split ] && t=.; PYTHONPATH=$t timeout 100 python3 $t/benchmarks/generate.py --size 7b --batch 1 --variants nf4 --baselines '' --runs 2 --json $R/gen_$n.json > $R/gen_$n.log 2>&1
  date -u >> $R/gpus.txt
done
JAX_PLATFORMS=cuda timeout 80 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py -k "gemv_forward and config1 or bf16x2" > $R/tests.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s10c4
grep -E "^\|" $R/gemv.log | grep -v pallas_dequant; grep -i "error\|Traceback" $R/gemv.log | head -3
for n in split strided pairs; do echo "== $n"; grep -E "^\| qlora" $R/gen_$n.log | tail -1; grep -iE "error" $R/gen_$n.log | head -2; done; tail -2 $R/tests.log; cat $R/gpus.txt
