"""Sweep every 4-bit matmul implementation and a grid of kernel configs on LLaMA-sized weights (GPU).

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/kernel_sweep.py --json $OUT/sweep.json
    PYTHONPATH=. python3 benchmarks/kernel_sweep.py --tiny --json /tmp/sweep.json   # CPU smoke test

Shapes are ``KxN`` (in x out): ``W [N, K]`` in NF4 + double quantization, blocksize 64; activations
bf16. For every shape:

* M in ``--gemv-m`` (default 1, 8), forward ``x [M, K] @ W.T`` and input gradient ``dy [M, N] @ W``:
  the bf16 dot, XLA dequant+dot (``xla``), ``xla_reduce``, ``small_m`` (default config), the
  Pallas dequantize + dot (``pallas_dequant``, default config), and ``gemv`` / ``gemv_t``
  (``nf4_gemv.py``) over a grid of configs;
* M in ``--large-m`` (default 2048), both directions: bf16 dot, ``xla``, and Pallas dequantize +
  dot over the dequantize configs;
* the dequantization alone: XLA ``nf4.dequantize`` vs ``dequantize_pallas`` configs.

Each time is one call, the median over ``--runs`` runs of one jitted program that makes the call
for ``reps`` activations x ``copies`` weight copies (copies together >= 3x a 60 MB L2, so the
weight comes from HBM). "GB/s" counts the 4-bit weight (codes + scales) once; for the
dequantization alone it also counts the bf16 weight written ("rw GB/s"). Every config is checked
against XLA dequant+dot (relative error); one that fails to compile or run is printed and
skipped. ``--budget-s`` stops starting new configs once the run has taken that long.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import median_seconds  # noqa: E402
from qlora_jax import quantize  # noqa: E402
from qlora_jax.kernels import nf4_dequant as dequant  # noqa: E402
from qlora_jax.kernels import nf4_gemv as gemv  # noqa: E402
from qlora_jax.kernels.nf4_matmul import (  # noqa: E402
    nf4_matmul_reduce,
    nf4_matmul_reference,
    nf4_matmul_split,
    nf4_matmul_t_split,
    nf4_matmul_t_reduce,
    nf4_matmul_t_reference,
)
from qlora_jax.kernels import nf4_matmul_small_m as small_m  # noqa: E402
from qlora_jax.nf4 import dequantize  # noqa: E402

L2_BYTES = 60 * 2**20
G = gemv.GemvConfig
D = dequant.DequantConfig

# 13 forward, 5 input-gradient and 5 dequantize configs (~70 timed programs per shape): the
# default run stays near 4 min on an H200; --budget-s cuts it off in any case.
GEMV_CONFIGS = [
    G(),  # block_n=16, blocks_per_step=8 (256 B per row and step), split=4
    G(block_n=16, blocks_per_step=16, split=2),
    G(block_n=16, blocks_per_step=32, split=1),
    G(block_n=8, blocks_per_step=16, split=4),
    G(block_n=4, blocks_per_step=32, split=4),
    G(block_n=32, blocks_per_step=8, split=4),
    G(block_n=32, blocks_per_step=16, split=2, num_warps=8),
    G(block_n=16, blocks_per_step=8, split=8),
    G(decode="pair256"),
    G(scales_in_kernel=False),
    G(reduce="step"),
    G(reduce="end"),
    G(x_layout="strided"),
]
GEMV_T_CONFIGS = [
    gemv.DEFAULT_T_CONFIG,  # block_n=16 rows per step, 4 blocks (128 B) per row, split=8
    G(block_n=32, blocks_per_step=4, split=8),
    G(block_n=16, blocks_per_step=8, split=8),
    G(block_n=64, blocks_per_step=2, split=16),
    G(block_n=16, blocks_per_step=4, split=16, decode="pair256"),
]
DEQUANT_CONFIGS = [D(block_rows=64), D(), D(block_rows=512), D(block_rows=1024, num_warps=8),
                   D(scales_in_kernel=True)]
TINY = dict(gemv=[G(), G(block_n=8, blocks_per_step=4, split=1, decode="pair256")],
            gemv_t=[gemv.DEFAULT_T_CONFIG], dequant=[D(block_rows=128), D(scales_in_kernel=True)])


def _cfg_str(cfg) -> str:
    if cfg is None:
        return "-"
    default = type(cfg)()
    diff = {k: v for k, v in vars(cfg).items() if getattr(default, k) != v}
    return ",".join(f"{k}={v}" for k, v in diff.items()) or "default"


class Bench:
    def __init__(self, runs: int, budget_s: float, interpret: bool):
        self.runs, self.budget_s, self.interpret = runs, budget_s, interpret
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def time_calls(self, op, xs, ws) -> float:
        """Seconds per ``op(x, w)``: one jitted program over every (x, w) pair, median of runs."""
        # a barrier per call: XLA's GPU compiler would merge the dots that share a weight (benchmarks/kernels.py)
        fn = jax.jit(lambda xs, ws: [op(x, jax.lax.optimization_barrier(w)) for x in xs for w in ws])
        return median_seconds(fn, xs, ws, runs=self.runs) / (len(xs) * len(ws))

    def record(self, **row) -> None:
        self.rows.append(row)
        us = f"{row['us']:9.1f}" if row.get("us") else "   failed"
        extra = f"err {row['rel_err']:.1e}" if row.get("rel_err") is not None else row.get("error", "")
        print(f"  {row['shape']:<11}{row['dir']:<8}M={row['m']:<5}{row['impl']:<18}{row['config']:<48}{us} us  "
              f"{row.get('gbps') or 0:6.0f} GB/s  {extra}", flush=True)

    def run(self, *, impl, cfg, shape, m, direction, op, xs, ws, want, nbytes, extra_bytes=0):
        base = dict(impl=impl, config=_cfg_str(cfg), config_full=vars(cfg) if cfg is not None else None,
                    shape=shape, m=m, dir=direction)
        if self.over_budget():
            self.record(**base, us=None, error="skipped: over --budget-s")
            return None
        try:
            t = self.time_calls(op, xs, ws)
            got = op(xs[0], ws[0])
            rel = None
            if want is not None:
                a, b = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
                rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        except Exception as e:  # noqa: BLE001 - a config may not compile (registers, shared memory)
            self.record(**base, us=None, error=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            return None
        self.record(**base, us=t * 1e6, gbps=nbytes / t / 1e9,
                    rw_gbps=(nbytes + extra_bytes) / t / 1e9 if extra_bytes else None, rel_err=rel)
        return t


def _copies(nbytes: int) -> int:
    return min(32, max(2, math.ceil(3 * L2_BYTES / nbytes)))


def weight_copies(k: int, n: int, copies: int | None = None):
    """A random ``W [n, k]`` (std 0.02) in NF4 + double quantization, and distinct copies of it for
    timing: ``(qw, NF4 copies, bf16 copies)``; by default enough copies of each to exceed 3x the L2
    together (so every call reads its weight from HBM), else ``copies`` of each."""
    w32 = jax.random.normal(jax.random.key(k * 7 + n), (n, k), jnp.float32) * 0.02
    w_bf16 = w32.astype(jnp.bfloat16)
    qw = quantize(w32)
    del w32
    nq = copies or _copies(qw.nbytes)
    qws = [jax.tree.map(lambda a, i=i: a ^ np.uint8(i) if a.dtype == jnp.uint8 else a + 0, qw) for i in range(nq)]
    bws = [w_bf16 + jnp.asarray(0, jnp.bfloat16) * i for i in range(copies or _copies(2 * n * k))]
    return qw, qws, bws


def sweep_shape(b: Bench, k: int, n: int, gemv_ms, large_ms, configs) -> None:
    shape = f"{k}x{n}"
    qw, qws, bws = weight_copies(k, n)
    ip = b.interpret
    dense_f = lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dense_t = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    # the dequantization alone
    out_bytes = 2 * n * k
    t_xd = b.run(impl="xla_dequantize", cfg=None, shape=shape, m=0, direction="dequant",
                 op=lambda _, w: dequantize(w, jnp.bfloat16), xs=[None], ws=qws, want=None,
                 nbytes=qw.nbytes, extra_bytes=out_bytes)
    want_w = dequantize(qw, jnp.bfloat16)
    for cfg in configs["dequant"]:
        t = b.run(impl="pallas_dequantize", cfg=cfg, shape=shape, m=0, direction="dequant",
                  op=lambda _, w, cfg=cfg: dequant.dequantize_pallas(w, jnp.bfloat16, config=cfg, interpret=ip),
                  xs=[None], ws=qws, want=want_w, nbytes=qw.nbytes, extra_bytes=out_bytes)
        if t and t_xd:
            b.rows[-1]["x_xla"] = t_xd / t
    del want_w

    for m in list(gemv_ms) + list(large_ms):
        reps = 2 if m <= 64 else 1
        for direction in ("fwd", "bwd"):
            in_dim = k if direction == "fwd" else n
            xs = [jax.random.normal(jax.random.key(r), (m, in_dim), jnp.bfloat16) for r in range(reps)]
            xla = nf4_matmul_reference if direction == "fwd" else nf4_matmul_t_reference
            want = xla(xs[0], qw)
            common = dict(shape=shape, m=m, direction=direction, xs=xs, want=want,
                          nbytes=qw.nbytes + 2 * m * (n + k))
            t_bf = b.run(impl="bf16_dot", cfg=None, op=dense_f if direction == "fwd" else dense_t,
                         **{**common, "ws": bws, "want": None, "nbytes": 2 * n * k + 2 * m * (n + k)})
            t_x = b.run(impl="xla", cfg=None, op=xla, ws=qws, **common)
            cands = [("xla_split", None, nf4_matmul_split if direction == "fwd" else nf4_matmul_t_split)]
            if m <= gemv.MAX_M:
                red = nf4_matmul_reduce if direction == "fwd" else nf4_matmul_t_reduce
                cands.append(("xla_reduce", None, red))
                sm, sm_cfg = ((small_m.nf4_matmul_small_m, small_m.DEFAULT_CONFIG) if direction == "fwd"
                              else (small_m.nf4_matmul_t_small_m, small_m.DEFAULT_T_CONFIG))
                cands.append(("small_m", sm_cfg, lambda x, w, sm=sm: sm(x, w, interpret=ip)))
                dd = dequant.nf4_matmul_dequant if direction == "fwd" else dequant.nf4_matmul_t_dequant
                cands.append(("pallas_dequant", dequant.DEFAULT_CONFIG, lambda x, w, dd=dd: dd(x, w, interpret=ip)))
                fn, name, cfgs = ((gemv.nf4_gemv, "gemv", configs["gemv"]) if direction == "fwd"
                                  else (gemv.nf4_gemv_t, "gemv_t", configs["gemv_t"]))
                for cfg in cfgs:
                    cands.append((name, cfg, lambda x, w, cfg=cfg, fn=fn: fn(x, w, config=cfg, interpret=ip)))
            else:  # every dequantize config forward; the default one for the gradient
                dd = dequant.nf4_matmul_dequant if direction == "fwd" else dequant.nf4_matmul_t_dequant
                for cfg in configs["dequant"] if direction == "fwd" else [dequant.DEFAULT_CONFIG]:
                    cands.append(("pallas_dequant", cfg,
                                  lambda x, w, cfg=cfg, dd=dd: dd(x, w, config=cfg, interpret=ip)))
            if t_bf and t_x:
                b.rows[-1].update(x_bf16=t_bf / t_x, x_xla=1.0)
            for impl, cfg, op in cands:
                t = b.run(impl=impl, cfg=cfg, op=op, ws=qws, **common)
                if t:
                    b.rows[-1]["x_bf16"] = t_bf / t if t_bf else None  # > 1: faster than the bf16 dot
                    b.rows[-1]["x_xla"] = t_x / t if t_x else None  # > 1: faster than XLA dequant+dot
    del qws, bws


def summary(rows: list[dict]) -> None:
    hdr = (f"{'shape KxN':<12}{'dir':<8}{'M':>5}  {'impl':<18}{'config':<48}{'us':>9}{'GB/s':>7}"
           f"{'bf16/it':>8}{'xla/it':>8}{'relerr':>9}{'rwGB/s':>8}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        if not r.get("us"):
            continue
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"
        print(f"{r['shape']:<12}{r['dir']:<8}{r['m']:>5}  {r['impl']:<18}{r['config']:<48}{r['us']:>9.1f}"
              f"{r['gbps']:>7.0f}{f(r.get('x_bf16'), '.2f'):>8}{f(r.get('x_xla'), '.2f'):>8}"
              f"{f(r.get('rel_err'), '.1e'):>9}{f(r.get('rw_gbps'), '.0f'):>8}")
    print("\nbest per (shape, dir, M) (bf16/it, xla/it: the bf16 dot's / XLA dequant+dot's time over this one's;"
          " > 1 is faster):")
    groups: dict = {}
    for r in rows:
        if r.get("us"):
            groups.setdefault((r["shape"], r["dir"], r["m"]), []).append(r)
    for (shape, d, m), rs in groups.items():
        best = min((r for r in rs if r["impl"] not in ("bf16_dot",)), key=lambda r: r["us"], default=None)
        if best is not None:
            print(f"  {shape:<12}{d:<8}M={m:<5} {best['impl']} [{best['config']}] {best['us']:.1f} us "
                  f"({best['gbps']:.0f} GB/s; bf16/it {best.get('x_bf16') or 0:.2f}, xla/it {best.get('x_xla') or 1:.2f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x11008,11008x4096,8192x22016", help="KxN,...")
    ap.add_argument("--gemv-m", default="1,8")
    ap.add_argument("--large-m", default="2048")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=210.0, help="start no new config after this many seconds")
    ap.add_argument("--json", type=Path, default=Path("sweep.json"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, 2 configs each, interpret mode")
    args = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]
    shapes, gemv_ms, large_ms, configs = args.shapes, ints(args.gemv_m), ints(args.large_m), dict(
        gemv=GEMV_CONFIGS, gemv_t=GEMV_T_CONFIGS, dequant=DEQUANT_CONFIGS)
    if args.tiny:
        shapes, large_ms, configs, args.runs = "256x192", [64], TINY, 1
    interpret = jax.default_backend() != "gpu"
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, interpret={interpret}",
          flush=True)
    b = Bench(args.runs, args.budget_s, interpret)
    for s in shapes.split(","):
        k, n = (int(v) for v in s.split("x"))
        sweep_shape(b, k, n, gemv_ms, large_ms, configs)
    summary(b.rows)
    meta = dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
                elapsed_s=time.perf_counter() - b.t0,
                command=" ".join(["python3", "benchmarks/kernel_sweep.py", *(argv if argv is not None else sys.argv[1:])]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(meta=meta, rows=b.rows), indent=2, default=str))
    print(f"wrote {args.json} ({len(b.rows)} rows, {meta['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
