#!/bin/bash
# session 4, call 2 on nvidia-h200-x4: the fp16x2 GEMV (prmt_f16x2): kernel profiles M=1,8 per shape (GPU 0-2);
# GPU tests of the kernels, then 7B generation with the GEMV default switched to prmt_f16x2 in a copy of the tree (GPU 3).
export PYTHONPATH=. PYTHONUNBUFFERED=1
R=/tmp/res_s4c2; rm -rf $R; mkdir -p $R/g0 $R/g1 $R/g2 $R/g3
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.txt 2>&1; date -u >> $R/gpus.txt
i=0
for shape in 4096x11008 11008x4096 8192x22016; do
( export CUDA_VISIBLE_DEVICES=$i
  JAX_PLATFORMS=cuda timeout 530 python3 benchmarks/kernel_profile.py --shapes $shape --m 1,8 --trace-dir /tmp/kprof$i --repeats 5 \
    --config f16x2_bn16_g8_s2=decode:prmt_f16x2,split:2 --config f16x2_w8=decode:prmt_f16x2,num_warps:8 \
    --config f16x2_bn32_s2=decode:prmt_f16x2,block_n:32,split:2 --config f16x2_bn8=decode:prmt_f16x2,block_n:8 \
    --json $R/g$i/kernel_profile_$shape.json > $R/g$i/kernel_profile.log 2>&1 ) &
i=$((i+1))
done
( export CUDA_VISIBLE_DEVICES=3
  timeout 200 python3 -m pytest -q -x tests/test_kernels.py tests/test_prmt_decode.py -k "gemv or prmt or hfma or lower" > $R/g3/pytest_gpu.log 2>&1
  rm -rf /tmp/tree_f16 && mkdir /tmp/tree_f16 && cp -r qlora_jax benchmarks /tmp/tree_f16/ && \
  sed -i 's/^    decode: str = "prmt"$/    decode: str = "prmt_f16x2"/' /tmp/tree_f16/qlora_jax/kernels/nf4_gemv.py && grep -n 'decode: str =' /tmp/tree_f16/qlora_jax/kernels/nf4_gemv.py > $R/g3/tree_f16.txt
  (cd /tmp/tree_f16 && PYTHONPATH=/tmp/tree_f16 timeout 300 python3 benchmarks/generate.py --size 7b --batch 1,8 --variants nf4 --baselines '' --implementation auto,gemv --runs 2 --json $R/g3/generate_f16x2.json > $R/g3/generate_f16x2.log 2>&1)
  timeout 90 python3 benchmarks/generate.py --size 7b --batch 8 --variants nf4 --baselines '' --implementation gemv --runs 2 --json $R/g3/generate_prmt_b8.json > $R/g3/generate_prmt_b8.log 2>&1 ) &
wait
cd /tmp && tar czf $OUT/res.tgz res_s4c2
for f in $R/*/*.log; do echo "== $f"; grep -E "^\||passed|failed|Error" $f | tail -40; done
cat $R/g3/tree_f16.txt
