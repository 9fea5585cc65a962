#!/bin/bash
# session 7, call 3 on nvidia-h200 (one job after the other): the joined weights dequantized by ONE kernel
# into one buffer (no concat of codes, no aliasing): kernel tests compiled; 7B 4x512 + 1x2048; a profile
# and the optimized HLO of 4x512; 65B 1x512 in a 48 GiB pool (default settings).
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s7c3; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "rows or joined or dequantize" > $R/test_kernels.log 2>&1
timeout 130 python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 --weights nf4 --steps 10 --warmup 2 --timeout 65 --json $R/jax_7b.json > $R/jax_7b.log 2>&1
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*" timeout 90 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 4 --warmup 1 --timeout 85 --profile /tmp/tprof --json $R/jax_7b_prof.json > $R/prof7.log 2>&1
d=$(ls -d /tmp/tprof/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 3 --top 100 --json $R/profile_7b.json > $R/profile_7b.log 2>&1
cp $(ls /tmp/hlo/*jit_step_fn*after_optimizations.txt | head -1) $R/step_after_opt.txt
timeout 150 python3 benchmarks/train_step.py --size 65b --batch 1x512 --weights nf4 --mem-limit-gb 48 --steps 8 --warmup 1 --timeout 140 --json $R/jax_65b.json > $R/jax_65b.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s7c3
tail -3 $R/test_kernels.log; for f in $R/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -4; done; head -30 $R/profile_7b.log
