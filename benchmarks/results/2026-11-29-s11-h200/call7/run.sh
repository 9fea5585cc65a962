#!/bin/bash
# session 11 call 7 (nvidia-h200): the pattern train() now uses before its first step, on the GPU. (A first attempt
# ran tests/test_train.py compiled on the H200 with a carried copy of ../shared: the device has no `datasets`
# package, so those tests errored at import; this check needs none.)
export PYTHONPATH=. JAX_PLATFORMS=cuda
python3 benchmarks/results/2026-11-29-s11-h200/call7/commit_check.py
