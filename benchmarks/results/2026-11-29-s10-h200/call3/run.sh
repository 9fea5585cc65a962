#!/bin/bash
# session 10, call 3 (nvidia-h200): why the bf16x2 GEMV streams at ~1.4 TB/s (ncu, 4096x11008, M = 1, default and
# 2 K slices); where a batch-1 7B decode step goes now (profile of one generate call).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=/tmp/res_s10c3; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
S="--section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats"
JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 ncu --kernel-name regex:nf4_gemv --launch-count 1 $S python3 .scratch/ncu_gemv.py 4096x11008 > $R/ncu_default.txt 2>&1
date -u >> $R/gpus.txt
JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 ncu --kernel-name regex:nf4_gemv --launch-count 1 $S python3 .scratch/ncu_gemv.py 4096x11008 split=2 blocks_per_step=16 > $R/ncu_s2g16.txt 2>&1
date -u >> $R/gpus.txt
timeout 150 python3 benchmarks/generate.py --size 7b --batch 1 --variants nf4 --baselines '' --runs 1 --new-tokens 64 --profile /tmp/gp --json $R/gen_profile.json > $R/gen_profile.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s10c3
for f in $R/ncu_*.txt; do echo "== $f"; grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occ|Theoretical Occ|Issued Ipc|No Eligible|Executed Instructions  |Block Size|Grid Size|Warp Cycles Per Issued|Active Warps Per|Eligible Warps" $f | head -20; grep -iE "stall|L1TEX|long scoreboard|barrier" $f | head -12; done
grep -E "^\| qlora" $R/gen_profile.log | tail -1; python3 - <<'PY'
import json; d=json.load(open("/tmp/res_s10c3/gen_profile.json"))
for r in d.get("rows", []):
    p = r.get("extra", {}).get("profile") or r.get("profile")
    if p: print(json.dumps(p)[:3500])
PY
cat $R/gpus.txt
