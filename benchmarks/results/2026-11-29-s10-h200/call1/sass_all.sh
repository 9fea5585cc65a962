#!/bin/bash
# sass_all.sh OUTDIR : lower GEMV (4096x11008 M=1) and small-M (fwd/bwd M=8) kernels and count their loops
set -e
out=$1; mkdir -p $out
cd /work/main
.venv/bin/python - "$out" <<'PY'
import sys
sys.path.insert(0, ".scratch")
import lower_ttir as L
out = sys.argv[1]
for name, t in (("gemv", L.gemv_ttir(11008, 4096)), ("smf", L.small_m_ttir(11008, 4096)), ("smb", L.small_m_ttir(11008, 4096, fn="bwd"))):
    open(f"{out}/{name}.ttir", "w").write(t[0])
PY
for n in gemv smf smb; do
  # num_warps / stages from the configs: gemv 4/3; small-M read from its params below
  /work/tools/bin/python .scratch/ttir_to_sass.py $out/$n.ttir ${NW:-4} ${NS:-3} 2>/dev/null | head -1 | tr '\n' ' '; echo -n "$n "; .scratch/loopcount.sh $out/$n.sass
done
