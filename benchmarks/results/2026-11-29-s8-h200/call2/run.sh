#!/bin/bash
# session 8, call 2 (nvidia-h200): why the small-M kernel streams at ~0.9 TB/s: ncu + PTX of one config; more tile configs
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
R=/tmp/res_s8c2; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 ncu --kernel-name regex:nf4_matmul_small_m --launch-count 1 --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats python3 .scratch/ncu_small_m.py 4096x11008 16 blocks_per_step=4 > $R/ncu_g4.txt 2>&1
XLA_FLAGS="--xla_dump_to=/tmp/xd" timeout 60 python3 .scratch/ncu_small_m.py 4096x11008 16 blocks_per_step=4 > $R/dump.log 2>&1
ls /tmp/xd | head -50 > $R/dump_files.txt; for f in /tmp/xd/*.ptx; do cp $f $R/; done
C="--config sm_g2=kernel:small_m,blocks_per_step:2 --config sm_g4=kernel:small_m,blocks_per_step:4
 --config sm_g4_bn32=kernel:small_m,blocks_per_step:4,block_n:32 --config sm_g4_bn128=kernel:small_m,blocks_per_step:4,block_n:128
 --config sm_g4_s2=kernel:small_m,blocks_per_step:4,split:2 --config sm_g4_s8=kernel:small_m,blocks_per_step:4,split:8
 --config sm_g4_st2=kernel:small_m,blocks_per_step:4,num_stages:2 --config sm_g4_w2=kernel:small_m,blocks_per_step:4,num_warps:2
 --config sm_h_g4=kernel:small_m,blocks_per_step:4,halves:1 --config sm_h_g8=kernel:small_m,halves:1
 --config sm_g2_bn128_w8=kernel:small_m,blocks_per_step:2,block_n:128,num_warps:8"
timeout 300 python3 benchmarks/kernel_profile.py --shapes 4096x11008,11008x4096 --m 1,16,64 --trace-dir /tmp/kp1 --repeats 5 --only-extra \
  --config gemv=decode:prmt_f16x2 $C --json $R/sweep2.json > $R/sweep2.log 2>&1
date -u >> $R/gpus.txt
cd /tmp && tar czf $OUT/res.tgz res_s8c2
grep -E "Duration|Throughput|Registers|Achieved Occ|Issued Ipc|No Eligible|Executed Instructions |Shared Memory Config|Dynamic Shared|Block Size|Grid Size|Stall|Warp Cycles" $R/ncu_g4.txt | head -40
for f in $R/*.ptx; do echo "== $f"; grep -c "mma" $f; grep -oE "wgmma[.a-z0-9_]*|mma.sync[.a-z0-9_]*|ldmatrix[.a-z0-9_]*|st.shared[.a-z0-9_]*|ld.shared[.a-z0-9_]*|prmt.b32|fma.rn.bf16x2" $f | sort | uniq -c; done 2>/dev/null | head -40
grep -E "^\|" $R/sweep2.log | head -80; tail -3 $R/sweep2.log
