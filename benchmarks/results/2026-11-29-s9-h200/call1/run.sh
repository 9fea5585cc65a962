#!/bin/bash
# session 9, call 1 (nvidia-h200): where a batch-1 decode step's time goes, op by op (profile + XLA's optimized HLO
# of the decode loop), and the issue-3 table with device times.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s9c1; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
XLA_FLAGS="--xla_dump_to=$R/hlo --xla_dump_hlo_module_re=.*decode.* --xla_dump_hlo_as_text" timeout 200 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4 --baselines '' --runs 1 --new-tokens 64 --profile /tmp/gprof --json $R/generate_profile.json > $R/generate.log 2>&1
date -u >> $R/gpus.txt
d=$(ls -d /tmp/gprof/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 64 --top 120 --detail 120 --json $R/profile_b1.json > $R/profile_b1.txt 2>&1
ls $R/hlo | head -50 > $R/hlo_files.txt; find $R/hlo -name "*before_optimizations*" -delete
JAX_PLATFORMS=cuda timeout 300 python3 benchmarks/kernels.py --m 1,2,4,8,16,64,512,2048,8192 --runs 10 --trace-dir /tmp/kt --json $R/kernels.json > $R/kernels.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s9c1
grep -E "^\|" $R/generate.log | tail -3; head -130 $R/profile_b1.txt | cut -c1-120; grep -E "^[0-9]+x[0-9]+ |^\|" $R/kernels.log | head -70; tail -3 $R/kernels.log
