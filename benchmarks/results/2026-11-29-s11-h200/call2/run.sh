#!/bin/bash
# session 11 call 2: the kernel sequence of one 7B batch-1 decode layer, and the decode step's optimized HLO
export PYTHONUNBUFFERED=1 PYTHONPATH=.
date -u
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*" timeout 200 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4 --baselines '' --runs 1 --new-tokens 32 --profile /tmp/gp --json $OUT/gen.json > $OUT/gen.log 2>&1
tail -5 $OUT/gen.log
ls /tmp/hlo | head -30
cd /tmp/hlo && tar czf $OUT/hlo.tgz $(ls | grep -E "after_optimizations.txt|buffer-assignment" | head -20); cd - >/dev/null
python3 .scratch/s11/kernel_sequence.py /tmp/gp 100 60 > $OUT/seq.txt 2>&1
head -80 $OUT/seq.txt
date -u
