#!/bin/bash
# session 7, call 1 on nvidia-h200 (one job after the other): the 7B step at 4x512 with the final session-6
# code: profile + optimized HLO; the same step without remat, with save_dots, and without dropout.
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s7c1; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*" timeout 110 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 10 --warmup 2 --timeout 100 --profile /tmp/tprof --json $R/jax_7b_prof.json > $R/prof.log 2>&1
d=$(ls -d /tmp/tprof/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 3 --top 100 --detail 40 --json $R/profile_summary.json > $R/profile_summary.log 2>&1
cp $(ls /tmp/hlo/*jit_step_fn*after_optimizations.txt | head -1) $R/step_after_opt.txt
for v in "none:--remat none" "save_dots:--remat save_dots" "nodrop:--lora-dropout 0"; do
  n=${v%%:*}; a=${v#*:}
  timeout 80 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 10 --warmup 2 --timeout 75 $a --json $R/jax_7b_$n.json > $R/jax_$n.log 2>&1
done
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s7c1
for f in $R/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -4; done; head -60 $R/profile_summary.log
