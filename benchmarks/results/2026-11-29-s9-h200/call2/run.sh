#!/bin/bash
# session 9, call 2 (nvidia-h200): 7B decoding with the cache written in place and the decode-attention kernel,
# against the previous commit's tree (333de7e, in .scratch/old) in the same job; a profile; compiled tests.
export PYTHONUNBUFFERED=1
R=/tmp/res_s9c2; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
PYTHONPATH=.scratch/old timeout 150 python3 .scratch/old/benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --baselines '' --runs 2 --json $R/gen_old.json > $R/gen_old.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=. timeout 220 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --baselines '' --runs 2 --attention xla,auto --json $R/gen_new.json > $R/gen_new.log 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=. timeout 100 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4 --baselines '' --runs 1 --new-tokens 64 --profile /tmp/gp2 --json $R/gen_prof.json > $R/gen_prof.log 2>&1
d=$(ls -d /tmp/gp2/*/ | head -1); PYTHONPATH=. python3 benchmarks/profile_summary.py $d --steps 64 --top 60 > $R/profile_b1.txt 2>&1
date -u >> $R/gpus.txt
PYTHONPATH=. JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_attention.py > $R/tests.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s9c2
grep -E "^\| qlora" $R/gen_old.log | tail -2; grep -E "^\| qlora" $R/gen_new.log | tail -4; grep -E "^\| qlora" $R/gen_prof.log | tail -1
sed -n '/op kind/,$p' $R/profile_b1.txt | head -40; tail -3 $R/tests.log; cat $R/gpus.txt
