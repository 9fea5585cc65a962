#!/bin/bash
# session 5, call 4 on nvidia-h200-x4 (independent single-GPU jobs): the fp16x2 GEMV reading x as it is (scaled per
# program in the kernel, no XLA op before it).
# GPU 0: GEMV device times at M = 1 and 8 (default config) on the 7B / 65B / joined shapes; ncu and the PTX of the kernel.
# GPU 1: 7B generation, joined projections: NF4, NF4 + adapter, bf16; batch 1 and 8.
# GPU 2: the transformers baselines (bitsandbytes 4-bit, bf16), same call.
# GPU 3: GPU tests of kernels, generation and the layer.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=/tmp/res_s5c4; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2 $R/g3
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
( export CUDA_VISIBLE_DEVICES=0
  JAX_PLATFORMS=cuda timeout 200 python3 benchmarks/kernel_profile.py --m 1,8 --shapes 4096x4096,4096x11008,11008x4096,8192x22016,4096x12288,4096x22016 --trace-dir /tmp/kprof --repeats 5 --only-extra \
    --config gemv=decode:prmt_f16x2 --json $R/g0/gemv_m1_m8.json > $R/g0/gemv.log 2>&1
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 ncu --kernel-name regex:nf4_gemv --launch-count 1 --section SpeedOfLight --section WarpStateStats --section Occupancy --section SchedulerStats --section InstructionStats --section LaunchStats python3 .scratch/ncu_gemv.py 4096x11008 > $R/g0/ncu_4096x11008.txt 2>&1
  XLA_FLAGS=--xla_dump_to=/tmp/xdump timeout 60 python3 .scratch/ncu_gemv.py 4096x11008 > /dev/null 2>&1
  mkdir -p $R/g0/ptx && cp $(grep -l "nf4_gemv" /tmp/xdump/*.ptx 2>/dev/null | head -2) $R/g0/ptx/ 2>/dev/null; ls /tmp/xdump | head -50 > $R/g0/xdump_files.txt ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 420 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4,nf4_lora,bf16 --join-projections 1 --baselines '' --runs 2 --json $R/g1/generate.json > $R/g1/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2
  timeout 420 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants '' --baselines bnb4,hf_bf16 --runs 2 --tmp-dir /tmp/gen --json $R/g2/generate_baselines.json > $R/g2/generate.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=3
  timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_generate.py tests/test_nf4_dense.py tests/test_prmt_decode.py > $R/g3/pytest_gpu.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s5c4
for f in $R/g1/*.log $R/g2/*.log $R/g3/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error|error:" $f | tail -10; done
grep -E "^\|" $R/g0/gemv.log | grep -v "\-\-\-"
grep -E "Duration|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occ|Issued Instructions  " $R/g0/ncu*.txt
ls $R/g0/ptx
