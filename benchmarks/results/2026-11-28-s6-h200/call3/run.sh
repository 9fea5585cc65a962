#!/bin/bash
# session 6, call 3 on nvidia-h200: what the 7B step's elementwise time is (profile with op details,
# optimized HLO), and the step with XLA's Triton GEMMs off (cuBLAS for every dot).
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s6c3; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*" \
  timeout 150 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 4 --warmup 1 --timeout 140 --profile /tmp/tprof --json $R/train_7b_prof.json > $R/train_prof.log 2>&1
d=$(ls -d /tmp/tprof/*/ | head -1); python3 benchmarks/profile_summary.py $d --steps 3 --top 80 --detail 45 --json $R/profile_summary.json > $R/profile_summary.log 2>&1
ls -la /tmp/hlo | head -30 > $R/hlo_files.txt
mkdir -p $R/hlo; cp $(ls -S /tmp/hlo/*after_optimizations.txt | head -2) $R/hlo/ 2>/dev/null; gzip $R/hlo/* 2>/dev/null
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" timeout 120 python3 benchmarks/train_step.py --size 7b --batch 4x512 --weights nf4 --steps 10 --warmup 2 --timeout 110 --json $R/train_7b_notriton.json > $R/train_notriton.log 2>&1
cd /tmp && tar czf $OUT/res.tgz res_s6c3
for f in $R/*.log; do echo "== $f"; grep -E "^\||Error|error:" $f | tail -6; done
head -30 $R/profile_summary.log; cat $R/hlo_files.txt | head; du -sh $R/hlo
