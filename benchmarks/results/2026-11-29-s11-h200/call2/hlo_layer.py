import re, sys, collections
F = sys.argv[1]; body_name = sys.argv[2]; start = int(sys.argv[3]); count = int(sys.argv[4])
text = open(F).read()
comps = {}
for m in re.finditer(r"^(?:ENTRY )?(%[\w.\-]+) [^\n]*\{\n(.*?)^\}", text, re.S | re.M):
    comps[m.group(1)] = m.group(2)
body = comps[body_name]
lines = [l.strip() for l in body.splitlines() if l.strip()]
ops = []
for l in lines:
    m = re.match(r"(ROOT )?(%[\w.\-]+) = (.*?) (\w[\w\-]*)\((.*)", l)
    if not m: continue
    name, shape, opc = m.group(2), m.group(3), m.group(4)
    if opc in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"): continue
    calls = re.search(r"calls=(%[\w.\-]+)", l)
    inner = ""
    if calls and calls.group(1) in comps:
        c = collections.Counter(re.findall(r"= [^ ]+ (\w[\w\-]*)\(", comps[calls.group(1)]))
        for k in ("parameter", "get-tuple-element", "bitcast", "constant", "tuple"): c.pop(k, None)
        inner = " ".join(f"{k}:{v}" for k, v in c.most_common(8))
    tgt = re.search(r'custom_call_target="([^"]+)"', l)
    kn = re.search(r'"name":"([^"]+)"', l)
    ops.append((name, opc, shape[:60], (tgt.group(1) if tgt else "") + (" " + kn.group(1) if kn else ""), inner))
print("ops in body", len(ops))
for o in ops[start:start + count]:
    print(f"{o[0][:34]:34s} {o[1]:12s} {o[2]:60s} {o[3][:40]:40s} {o[4][:150]}")
