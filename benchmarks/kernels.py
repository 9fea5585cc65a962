"""4-bit matmul speed: what the dispatcher runs (``auto``: Pallas GEMV / small-M kernel / Pallas dequantize +
dot on a GPU) vs the plain XLA dequantize + dot vs a bf16 dot.

    python benchmarks/kernels.py [--m 1,16,64,2048] [--shapes 4096x11008,...] [--json out.json] [--trace-dir DIR]

Shapes are ``KxN`` (in x out): the forward is ``x [M, K] @ W.T`` with ``W [N, K]`` stored
in 4 bits (NF4 + double quantization, blocksize 64); the backward is ``dy [M, N] @ W``.
Several copies of each weight are cycled so the 4-bit weight never sits in L2, and
each timing is one jitted program running many calls (no per-call dispatch in the
number). Prints one table and writes JSON.

Wall-clock time per call includes the gaps between the program's kernels (~25 us per call on an H200),
which swamp the small-M rows (M <= 64: 15-100 us kernels). With ``--trace-dir`` the same programs also
run under ``jax.profiler.trace`` and every row gets device times (the sum of one call's kernels,
``benchmarks/profile_summary.py``, as ``kernel_profile.py`` measures them); the table's speed
columns then use those.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import median_seconds  # noqa: E402
from benchmarks.profile_summary import device_us_per_call  # noqa: E402
from qlora_jax import kernels, quantize  # noqa: E402

L2_BYTES = 60 * 2**20  # at least H100/H200's L2


def _calls(op, reps: int):
    """jit(xs, ws) running ``op(xs[r], ws[c])`` for every rep r and copy c; returns all outputs.

    Each call gets its weight through its own ``optimization_barrier``: XLA's GPU compiler otherwise merges
    the dots that share a weight into one dot over the reps' stacked rows (and computes a shared dequantize
    once), which made the bf16 and XLA columns at M <= 64 up to ``reps`` times too fast (ninth session)."""

    def run(xs, ws):
        return [op(xs[r], jax.lax.optimization_barrier(w)) for r in range(reps) for w in ws]

    return jax.jit(run)


def bench_shape(k: int, n: int, m: int, runs: int, trace_dir: Path | None = None) -> list[dict]:
    key = jax.random.key(k * 7 + n)
    w_f32 = jax.random.normal(key, (n, k), jnp.float32) * 0.02
    w_bf16 = w_f32.astype(jnp.bfloat16)
    qw = quantize(w_f32)
    del w_f32
    copies = min(32, max(2, -(-3 * L2_BYTES // qw.nbytes)))
    qws = [jax.tree.map(lambda a, i=i: a + 0 if a.dtype != jnp.uint8 else a ^ np.uint8(i % 256), qw) for i in range(copies)]
    bws = [w_bf16 + jnp.asarray(i, jnp.bfloat16) * 0 for i in range(min(32, max(2, -(-3 * L2_BYTES // (2 * n * k)))))]
    reps = 4 if m <= 64 else 1
    rows = []
    for direction in ("fwd", "bwd"):
        in_dim = k if direction == "fwd" else n
        xs = [jax.random.normal(jax.random.key(r), (m, in_dim), jnp.bfloat16) for r in range(reps)]
        if direction == "fwd":
            fused, xla = kernels.nf4_matmul, kernels.nf4_matmul_reference
            # the product asked for in bf16: an fp32 product and a conversion was 4-16% slower on 11 of 12 large-M rows
            # (H200, RESULTS.md, eleventh session), as it is for the 4-bit path (nf4_matmul.dot_dequantized)
            dense = lambda x, w: jnp.dot(x, w.T)
        else:
            fused, xla = kernels.nf4_matmul_t, kernels.nf4_matmul_t_reference
            dense = lambda x, w: jnp.dot(x, w)
        impl = kernels.select_implementation(xs[0], qw, transpose=direction == "bwd")
        tag = f"{k}x{n}_{direction}_m{m}"

        def device_us(f, args, calls, name):  # f already compiled (median_seconds ran it)
            out = trace_dir and trace_dir / f"{tag}_{name}"
            return device_us_per_call(f, args, calls=calls, runs=runs, trace_dir=out)

        with kernels.use_implementation("auto"):  # "fused" columns: what the dispatcher runs here
            f_fused = _calls(fused, reps)
            t_fused = median_seconds(f_fused, xs, qws, runs=runs) / (reps * len(qws))
            d_fused = device_us(f_fused, (xs, qws), reps * len(qws), "fused")
            y_f = fused(xs[0], qw)
        f_xla, f_bf16 = _calls(xla, reps), _calls(dense, reps)
        t_xla = median_seconds(f_xla, xs, qws, runs=runs) / (reps * len(qws))
        t_bf16 = median_seconds(f_bf16, xs, bws, runs=runs) / (reps * len(bws))
        d_xla = device_us(f_xla, (xs, qws), reps * len(qws), "xla")
        d_bf16 = device_us(f_bf16, (xs, bws), reps * len(bws), "bf16")
        # check the fused path against the XLA path on this shape
        y_x = xla(xs[0], qw)
        rel = float(jnp.linalg.norm((y_f - y_x).astype(jnp.float32)) / jnp.linalg.norm(y_x.astype(jnp.float32)))
        out_dim = n if direction == "fwd" else k
        act_bytes = 2 * m * (in_dim + out_dim)
        device = None not in (d_fused, d_xla, d_bf16)
        # the speed columns: device time where it was measured, else wall-clock time
        tf, tx, tb = (d_fused * 1e-6, d_xla * 1e-6, d_bf16 * 1e-6) if device else (t_fused, t_xla, t_bf16)
        rows.append(
            dict(
                shape=f"{k}x{n}", direction=direction, m=m, implementation=impl,
                fused_us=t_fused * 1e6, xla_dequant_dot_us=t_xla * 1e6, bf16_dot_us=t_bf16 * 1e6,
                fused_device_us=d_fused, xla_dequant_dot_device_us=d_xla, bf16_dot_device_us=d_bf16,
                timing="device" if device else "wall",
                fused_gbps=(qw.nbytes + act_bytes) / tf / 1e9,
                bf16_gbps=(2 * n * k + act_bytes) / tb / 1e9,
                fused_tflops=2 * m * n * k / tf / 1e12,
                speedup_vs_bf16=tb / tf, speedup_vs_xla=tx / tf,
                rel_err_vs_xla=rel,
            )
        )
    return rows


def sweep(k: int, n: int, m: int, runs: int) -> list[dict]:
    """Time every small-M tile config on one shape (both directions); check each against XLA."""
    import itertools

    from qlora_jax.kernels import nf4_matmul_small_m as small_m

    w = quantize(jax.random.normal(jax.random.key(0), (n, k), jnp.float32) * 0.02)
    copies = min(32, max(2, -(-3 * L2_BYTES // w.nbytes)))
    ws = [jax.tree.map(lambda a, i=i: a + 0 if a.dtype != jnp.uint8 else a ^ np.uint8(i % 256), w) for i in range(copies)]
    out = []
    for direction, (bn, split, g, warps) in itertools.product(
        ("fwd", "bwd"), itertools.product((64, 128, 256), (1, 2, 4, 8), (1, 2, 4), (4,))
    ):
        cfg = small_m.SmallMConfig(block_n=bn, split=split, blocks_per_step=g, num_warps=warps)
        fn = small_m.nf4_matmul_small_m if direction == "fwd" else small_m.nf4_matmul_t_small_m
        ref = kernels.nf4_matmul_reference if direction == "fwd" else kernels.nf4_matmul_t_reference
        xs = [jax.random.normal(jax.random.key(r), (m, k if direction == "fwd" else n), jnp.bfloat16) for r in range(4)]
        op = lambda x, w, cfg=cfg, fn=fn: fn(x, w, config=cfg)
        try:
            t = median_seconds(_calls(op, 4), xs, ws, runs=runs) / (4 * copies)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers for this tile
            print(f"  {direction} {cfg}: failed: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        y, r = op(xs[0], w), ref(xs[0], w)
        rel = float(jnp.linalg.norm((y - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32)))
        out.append(dict(direction=direction, m=m, shape=f"{k}x{n}", config=dataclasses.asdict(cfg), us=t * 1e6,
                        gbps=(w.nbytes + 2 * m * (n + k)) / t / 1e9, rel_err_vs_xla=rel))
        print(f"  {direction} M={m} bn={bn} split={split} g={g} warps={warps}: {t * 1e6:.1f} us "
              f"{out[-1]['gbps']:.0f} GB/s err {rel:.1e}", flush=True)
    for direction in ("fwd", "bwd"):
        best = min((r for r in out if r["direction"] == direction), key=lambda r: r["us"])
        print(f"best {direction} {k}x{n} M={m}: {best['config']} {best['us']:.1f} us {best['gbps']:.0f} GB/s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,64,512,2048,8192")
    ap.add_argument("--shapes", default="4096x11008,11008x4096,8192x22016")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", type=Path, default=Path("kernels.json"))
    ap.add_argument("--sweep", metavar="KxN", help="sweep the small-M kernels' tile configs on this shape instead")
    ap.add_argument("--trace-dir", type=Path,
                    help="also measure device time per call from profiler traces written here")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    if args.sweep:
        k, n = (int(v) for v in args.sweep.split("x"))
        res = [r for m in (int(v) for v in args.m.split(",")) for r in sweep(k, n, m, args.runs)]
        args.json.write_text(json.dumps(dict(device=dev.device_kind, sweep=res), indent=2))
        return 0
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.m.split(",")):
            rows += bench_shape(k, n, m, args.runs, args.trace_dir)
            for r in rows[-2:]:
                print(f"  {shape} {r['direction']} M={m}: {r['implementation']} {r['fused_us']:.1f} us, "
                      f"xla {r['xla_dequant_dot_us']:.1f} us, bf16 {r['bf16_dot_us']:.1f} us (wall)", flush=True)
    dev_col = lambda v: f"{v:>10.1f}" if v is not None else f"{'-':>10}"  # noqa: E731
    hdr = (f"{'shape KxN':<12}{'dir':<5}{'M':>6}  {'impl':<15}{'fused us':>10}{'xla us':>10}{'bf16 us':>10}"
           f"{'fused dev':>10}{'xla dev':>10}{'bf16 dev':>10}{'GB/s':>8}{'TFLOP/s':>9}{'x bf16':>8}{'x xla':>7}"
           f"{'relerr':>9}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['shape']:<12}{r['direction']:<5}{r['m']:>6}  {r['implementation']:<15}{r['fused_us']:>10.1f}"
              f"{r['xla_dequant_dot_us']:>10.1f}{r['bf16_dot_us']:>10.1f}{dev_col(r['fused_device_us'])}"
              f"{dev_col(r['xla_dequant_dot_device_us'])}{dev_col(r['bf16_dot_device_us'])}{r['fused_gbps']:>8.0f}"
              f"{r['fused_tflops']:>9.1f}{r['speedup_vs_bf16']:>8.2f}{r['speedup_vs_xla']:>7.2f}{r['rel_err_vs_xla']:>9.1e}")
    print("(us: wall-clock per call; dev: device time per call from the profiler; GB/s, TFLOP/s and the ratios "
          "use device time where it was measured)")
    meta = dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
                command=" ".join(["python", "benchmarks/kernels.py", *(argv if argv is not None else sys.argv[1:])]))
    args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
