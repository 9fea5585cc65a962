#!/bin/bash
# session 11 call 1: GEMV scales experiment (A), large-M product dtype (B)
cd "$(dirname "$0")/../../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
git log -1 --format=%H 2>/dev/null
export PYTHONPATH=. 
timeout 280 python3 .scratch/s11/exp1.py $OUT A 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -80
timeout 250 python3 .scratch/s11/exp1.py $OUT B 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -80
