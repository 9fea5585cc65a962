#!/bin/bash
# sass_gemv.sh SPEC [N K M] : loop instruction mix of the GEMV with GemvConfig fields "a:1,b:2"
cd /work/main
out=/tmp/sg_$(echo "$1_$2_$3_$4" | tr ':,' '__'); mkdir -p $out
.venv/bin/python -c "
import sys; sys.path.insert(0, '.scratch'); import lower_ttir as L
args = [int(a) for a in sys.argv[2:]]
open('$out/g.ttir', 'w').write(L.gemv_cfg_ttir(sys.argv[1], *args)[0])" "$@"
nw=$(echo "$1" | grep -o "num_warps:[0-9]*" | cut -d: -f2); ns=$(echo "$1" | grep -o "num_stages:[0-9]*" | cut -d: -f2)
TRITON_DEFAULT_FP_FUSION=1 /work/tools/bin/python .scratch/ttir_to_sass.py $out/g.ttir ${nw:-4} ${ns:-3} 2>/dev/null | head -1 | tr '\n' ' '
.scratch/loopcount.sh $out/g.sass
