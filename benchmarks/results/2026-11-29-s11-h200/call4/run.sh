#!/bin/bash
# session 11 call 4: GPU tests of the fixed RMSNorm kernel; profiles of 7B decoding, batch 1 and 2, XLA norm vs kernel
export PYTHONUNBUFFERED=1 PYTHONPATH=.
date -u
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -o addopts="" -p no:cacheprovider -q -x tests/test_rms_norm.py .scratch/s11/call4/test_fp32_scales.py 2>&1 | grep -E "^E |passed|failed" | head -30
date -u
timeout 300 python3 benchmarks/generate.py --size 7b --batch 1,2 --variants nf4 --baselines '' --runs 2 --new-tokens 128 --rms-norm xla,auto --profile /tmp/gp --json $OUT/gen_prof.json > $OUT/gen_prof.log 2>&1
grep -E "^\| qlora" $OUT/gen_prof.log | tail -4
python3 - <<'PY'
import json
d = json.load(open("/root/out/gen_prof.json")) if False else None
PY
python3 -c "
import json,os
d=json.load(open(os.environ['OUT']+'/gen_prof.json'))
for r in d['rows']:
    p=r.get('profile')
    print('==', r.get('batch'), r.get('rms_norm'), r.get('decode_ms_per_step'), p and p['total_ms_per_step'])
    if p:
        for k in p['by_kind'][:16]: print('   %-40s %8.4f ms %6.1f/step' % (k['kind'], k['ms'], k['count']))
"
date -u
