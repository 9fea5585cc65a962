"""Where device time goes: summarize a JAX profiler trace (``*.xplane.pb``) by XLA op.

    python benchmarks/profile_summary.py TRACE_DIR [--top 40] [--steps N] [--json out.json]

Reads every ``*.xplane.pb`` under ``TRACE_DIR`` (``jax.profiler.trace`` output), takes the GPU
planes' "XLA Ops" lines (one event per executed HLO op, with its device time) and prints the
ops sorted by total time, their share, count, and a category (``--steps`` divides totals into
per-step figures). Categories come from the op's HLO name and the profiler's ``hlo_category``
stat where present: matmul (dots, cuBLAS/cuDNN GEMMs), attention (cuDNN fused attention),
collective, copy/transfer (host offload, copies), dequant-like fusions and other fusions.
``--detail N`` also prints, for the N costliest ops, what the profiler says the op computes (its
``long_name`` / ``hlo_op`` stats: the fused HLO instruction), to tell one fusion from another.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path


def _stats(ev) -> dict:
    out = {}
    for item in getattr(ev, "stats", []) or []:
        try:
            k, v = item
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return out


def category(name: str, stats: dict) -> str:
    n = name.lower()
    cat = str(stats.get("hlo_category", "")).lower()
    if "cudnn" in n or "fmha" in n or "flash" in n or "attention" in n:
        return "attention"
    if any(s in n for s in ("all-gather", "all-reduce", "reduce-scatter", "collective", "all-to-all")):
        return "collective"
    if "gemm" in n or "cublas" in n or n.startswith("dot") or "convolution" in cat or "triton_gemm" in n:
        return "matmul"
    if "copy" in n or "transpose" in n or "dynamic-update-slice" in n or "memcpy" in n:
        return "copy/layout"
    if "fusion" in n or "fusion" in cat:
        return "fusion (" + (cat or "?") + ")"
    return cat or "other"


def summarize(trace_dir: str | Path, steps: int = 1, top: int = 40) -> dict:
    from jax.profiler import ProfileData

    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    by_name: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, "", ""])
    lines_seen = set()
    datas = [ProfileData.from_file(str(f)) for f in files]
    gpu_lines = [(p.name, line) for d in datas for p in d.planes if p.name.startswith("/device:GPU") for line in p.lines]
    names = {line.name for _, line in gpu_lines}
    # "XLA Ops" has one event per HLO op; without it, fall back to the raw CUDA stream lines.
    wanted = {"XLA Ops"} if "XLA Ops" in names else {n for n in names if n.startswith("Stream")}
    for plane_name, line in gpu_lines:
        lines_seen.add(f"{plane_name}:{line.name}")
        if line.name in wanted:
            for ev in line.events:
                st = _stats(ev)
                rec = by_name[ev.name]
                rec[0] += ev.duration_ns
                rec[1] += 1
                rec[2] = rec[2] or category(ev.name, st)
                rec[3] = rec[3] or str(st.get("long_name") or st.get("hlo_op") or "")
    total = sum(v[0] for v in by_name.values())
    ops = sorted(({"name": k, "ms": v[0] / 1e6 / steps, "count": v[1] / steps, "category": v[2], "detail": v[3]}
                  for k, v in by_name.items()), key=lambda r: -r["ms"])
    cats: dict[str, float] = collections.defaultdict(float)
    for r in ops:
        cats[r["category"]] += r["ms"]
    # XLA names each unrolled layer's copy of a fusion apart (loop_add_fusion_61, _62, ...): by kind, they add up
    kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0])
    for r in ops:
        kind = kinds[re.sub(r"(_\d+)+$", "", r["name"])]
        kind[0] += r["ms"]
        kind[1] += r["count"]
    by_kind = [{"kind": k, "ms": v[0], "count": v[1]} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])]
    return {"total_ms_per_step": total / 1e6 / steps, "lines": sorted(lines_seen),
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top": ops[:top], "num_ops": len(ops),
            "by_kind": by_kind[:top]}


def profile_calls(fn, args: tuple, *, calls: int, runs: int, trace_dir: str | Path, top: int = 1) -> dict:
    """Run the compiled ``fn(*args)`` (``calls`` calls of the op being measured) ``runs`` times under
    ``jax.profiler.trace`` into ``trace_dir`` and :func:`summarize` it per call (``steps = runs * calls``)."""
    import jax

    with jax.profiler.trace(str(trace_dir)):
        for _ in range(runs):
            r = fn(*args)
        jax.block_until_ready(r)
    return summarize(trace_dir, steps=runs * calls, top=top)


def device_us_per_call(fn, args: tuple, *, calls: int, runs: int, trace_dir: str | Path | None) -> float | None:
    """Device time (us) of one of the ``calls`` calls ``fn(*args)`` makes (:func:`profile_calls`); None
    without a trace directory or when the trace holds no GPU kernels (CPU)."""
    if trace_dir is None:
        return None
    try:
        us = profile_calls(fn, args, calls=calls, runs=runs, trace_dir=trace_dir)["total_ms_per_step"] * 1e3
    except FileNotFoundError:
        return None
    return us or None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--steps", type=int, default=1, help="divide totals by this many profiled steps")
    ap.add_argument("--detail", type=int, default=0, help="print what the N costliest ops compute")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    s = summarize(a.trace_dir, a.steps, a.top)
    t = s["total_ms_per_step"]
    print(f"device op time per step: {t:.2f} ms over {s['num_ops']} distinct ops")
    for c, ms in s["categories"].items():
        print(f"  {c:<32} {ms:9.2f} ms  {100 * ms / max(t, 1e-9):5.1f}%")
    print(f"{'op':<70} {'ms/step':>9} {'%':>6} {'count':>7}  category")
    for r in s["top"]:
        print(f"{r['name'][:70]:<70} {r['ms']:9.3f} {100 * r['ms'] / max(t, 1e-9):6.1f} {r['count']:7.1f}  {r['category']}")
    print(f"\n{'op kind (numbered copies added up)':<70} {'ms/step':>9} {'%':>6} {'count':>7}")
    for r in s["by_kind"]:
        print(f"{r['kind'][:70]:<70} {r['ms']:9.3f} {100 * r['ms'] / max(t, 1e-9):6.1f} {r['count']:7.1f}")
    for r in s["top"][:a.detail]:
        print(f"\n{r['name']} ({r['ms']:.3f} ms/step, {r['count']:.0f} calls): {r['detail'][:1500] or '(no detail)'}")
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    sys.exit(main())
