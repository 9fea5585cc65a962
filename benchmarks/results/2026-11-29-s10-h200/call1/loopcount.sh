#!/bin/bash
# loopcount.sh file.sass : instruction mix of the hottest backward-branch loop
f=$1
python3 - "$f" <<'PY'
import re, sys, collections
lines = open(sys.argv[1]).read().splitlines()
ins = []
for l in lines:
    m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", l)
    if m: ins.append((int(m.group(1), 16), m.group(2).strip()))
# loops: backward branches
best = None
for addr, txt in ins:
    m = re.search(r"BRA (?:`\(.*\)\s*)?0x([0-9a-f]+)", txt)
    if m and int(m.group(1), 16) < addr:
        tgt = int(m.group(1), 16)
        n = (addr - tgt) // 16 + 1
        if best is None or n > best[0]: best = (n, tgt, addr)
n, lo, hi = best
c = collections.Counter()
for addr, txt in ins:
    if lo <= addr <= hi:
        op = txt.split()[0]
        if op.startswith("@"): op = txt.split()[1]
        c[op.split(".")[0]] += 1
print(f"loop 0x{lo:x}-0x{hi:x}: {n} instructions;", " ".join(f"{k}:{v}" for k, v in c.most_common()))
PY
