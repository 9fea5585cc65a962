"""Compile a .ttir file with pip triton for sm_90 (no GPU needed) and write .ptx / .sass; print counts."""
import sys, os, re, subprocess
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, IRSource, compile as tcompile

path = sys.argv[1]
num_warps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
num_stages = int(sys.argv[3]) if len(sys.argv) > 3 else 3
target = GPUTarget("cuda", 90, 32)
k = tcompile(path, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
base = os.path.splitext(path)[0]
open(base + ".ptx", "w").write(k.asm["ptx"])
open(base + ".cubin", "wb").write(k.asm["cubin"])
bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", base + ".cubin"], capture_output=True, text=True).stdout
open(base + ".sass", "w").write(sass)
res = subprocess.run([f"{bindir}/cuobjdump", "-res-usage", base + ".cubin"], capture_output=True, text=True).stdout
print(re.findall(r"REG:\d+|SHARED:\d+|STACK:\d+", res)); print("sass lines", sass.count("\n"))
