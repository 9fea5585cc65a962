"""Device time per call of the few-row (M <= 64) 4-bit matmuls, from profiler traces (GPU).

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/kernel_profile.py --trace-dir /tmp/prof --json $OUT/profile.json
    PYTHONPATH=. python3 benchmarks/kernel_profile.py --tiny --trace-dir /tmp/prof   # CPU smoke test

Wall-clock timing of a program of many small calls (``kernel_sweep.py``) includes the launch gaps
between them (~25 us per call on an H200), which a decode loop on the device does not pay. Here
each candidate runs as one jitted program of calls on distinct weight copies (together more than
3x the L2, as in ``kernel_sweep.py``), ``--repeats`` times under ``jax.profiler.trace``, and the table gives the device
time of one call (the sum of its kernels, :mod:`benchmarks.profile_summary`), the 4-bit weight's
GB/s, and the relative error against the XLA reference, for M = ``--m`` rows of x. Candidates: the
bf16 dot, the Pallas dequantize + XLA dot, the GEMV (M <= 8) with the gather decode and with the
register decodes (``prmt``: fp32 FMAs; ``prmt_f16x2`` / ``prmt_bf16x2``: packed fp16x2 / bf16x2 FMAs) in several tile
configurations, and the tensor-core small-M kernel (``nf4_matmul_small_m.py``, M <= 64); ``--config``
adds more (``kernel:small_m`` for the small-M kernel, else a GEMV).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import profile_summary  # noqa: E402
from benchmarks._common import fmt, meta, print_table, write_json  # noqa: E402
from benchmarks.kernel_sweep import weight_copies  # noqa: E402
from qlora_jax.kernels import nf4_dequant, nf4_gemv, nf4_matmul_reference, nf4_matmul_t_reference  # noqa: E402
from qlora_jax.kernels import nf4_matmul_small_m as small_m  # noqa: E402
from qlora_jax.nf4 import expand_scales  # noqa: E402

G = nf4_gemv.GemvConfig
S = small_m.SmallMConfig
CANDIDATES = {  # name -> GEMV / small-M config (None: the bf16 dot; "dequant": Pallas dequantize + XLA dot)
    "bf16_dot": None,
    "pallas_dequant_dot": "dequant",
    "gemv_gather16": G(decode="gather16"),
    "gemv_prmt": G(decode="prmt"),
    "gemv_prmt_bn32_g4": G(decode="prmt", block_n=32, blocks_per_step=4),
    "gemv_prmt_bn8": G(decode="prmt", block_n=8),
    "gemv_prmt_g16_s2": G(decode="prmt", blocks_per_step=16, split=2),
    "gemv_prmt_g4_s8": G(decode="prmt", blocks_per_step=4, split=8),
    "gemv_prmt_f16x2": G(decode="prmt_f16x2"),
    "gemv_prmt_f16x2_bn32_g4": G(decode="prmt_f16x2", block_n=32, blocks_per_step=4),
    "gemv_prmt_f16x2_g16": G(decode="prmt_f16x2", blocks_per_step=16),
    "gemv_prmt_f16x2_s8": G(decode="prmt_f16x2", split=8),
    "gemv_prmt_bf16x2": G(decode="prmt_bf16x2"),
    "gemv_prmt_bf16x2_s1": G(decode="prmt_bf16x2", split=1),
    "gemv_prmt_bf16x2_s2": G(decode="prmt_bf16x2", split=2),
    "small_m": S(),
}


def parse_config(text: str) -> tuple[str, nf4_gemv.GemvConfig | small_m.SmallMConfig]:
    """``NAME=field:value,...`` (GemvConfig fields, or SmallMConfig fields after ``kernel:small_m``) ->
    (name, config); e.g. ``bn32=block_n:32,num_warps:8`` or ``sm128=kernel:small_m,block_n:128``."""
    name, _, body = text.partition("=")
    if not name or not body:
        raise SystemExit(f"error: --config {text!r}: expected NAME=field:value,...")
    items = [item.partition(":")[::2] for item in body.split(",")]
    cls = S if ("kernel", "small_m") in items else G
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in items:
        if key == "kernel":
            if value not in ("small_m", "gemv"):
                raise SystemExit(f"error: --config {text!r}: kernel {value!r} is not 'small_m' or 'gemv'")
            continue
        if key not in fields:
            raise SystemExit(f"error: --config {text!r}: {key!r} is not a {cls.__name__} field {tuple(fields)}")
        kw[key] = value if fields[key] in ("str", str) else (value == "1" if fields[key] in ("bool", bool) else int(value))
    return name, cls(**kw)


def profile_shape(k: int, n: int, *, copies: int | None, repeats: int, trace_dir: Path, interpret: bool, m: int = 1,
                  candidates: dict[str, nf4_gemv.GemvConfig | None] = CANDIDATES, direction: str = "fwd",
                  fp32_scales: bool = False) -> list[dict]:
    """One row per candidate; ``direction`` ``"fwd"``: ``x [m, k] @ W.T``, ``"bwd"``: ``dy [m, n] @ W``;
    ``fp32_scales``: the 4-bit weights with their block scales decoded to fp32 (as decoding's layer buffers hold
    them, ``nf4.expand_scales``) instead of double-quantized."""
    qw, qws, bws = weight_copies(k, n, copies)
    if fp32_scales:
        qw, qws = expand_scales(qw), [expand_scales(q) for q in qws]
    fwd = direction == "fwd"
    x = jax.random.normal(jax.random.key(1), (m, k if fwd else n), jnp.bfloat16)
    want = (nf4_matmul_reference if fwd else nf4_matmul_t_reference)(x, qw).astype(jnp.float32)
    gemv_fn, small_fn = ((nf4_gemv.nf4_gemv, small_m.nf4_matmul_small_m) if fwd
                         else (nf4_gemv.nf4_gemv_t, small_m.nf4_matmul_t_small_m))
    dequant_fn = nf4_dequant.nf4_matmul_dequant if fwd else nf4_dequant.nf4_matmul_t_dequant
    rows = []
    for name, cfg in candidates.items():
        if cfg is None:
            op, ws = ((lambda x, w: x @ w.T) if fwd else (lambda x, w: x @ w)), bws
        elif cfg == "dequant":
            op, ws = (lambda x, w: dequant_fn(x, w, interpret=interpret)), qws
        elif isinstance(cfg, S):
            op, ws = (lambda x, w, cfg=cfg: small_fn(x, w, config=cfg, interpret=interpret)), qws
        elif m > nf4_gemv.MAX_M or (not fwd and cfg.decode in ("auto", *nf4_gemv.REGISTER_DECODES)):
            continue  # the GEMV takes at most MAX_M rows; its gradient has no register decode
        else:
            op, ws = (lambda x, w, cfg=cfg: gemv_fn(x, w, config=cfg, interpret=interpret)), qws
        # each call through its own barrier: its x preparation (the GEMV's fp16 packing, the small-M kernel's
        # column permutation) is counted per call, as in decoding, not done once for all copies
        fn = jax.jit(lambda x, ws, op=op: [op(*jax.lax.optimization_barrier((x, w))) for w in ws])
        row = {"shape": f"{k}x{n}", "direction": direction, "m": m, "impl": name, "fp32_scales": fp32_scales,
               "config": vars(cfg) if isinstance(cfg, (G, S)) else cfg}
        try:
            got = jax.block_until_ready(fn(x, ws))[0].astype(jnp.float32)
            if cfg is not None:  # not the bf16 dot
                row["rel_err"] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            s = profile_summary.profile_calls(fn, (x, ws), calls=len(ws), runs=repeats,
                                              trace_dir=trace_dir / f"{k}x{n}_{direction}_m{m}_{name}", top=5)
            row["us"] = s["total_ms_per_step"] * 1e3
            row["kernels"] = [(o["name"], o["ms"] * 1e3) for o in s["top"]]
            nbytes = 2 * n * k if cfg is None else qw.nbytes
            row["gbps"] = nbytes / (row["us"] * 1e-6) / 1e9 if row["us"] else None
        except Exception as e:  # noqa: BLE001 - a config may fail to compile; report it and go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
    bf16 = next((r.get("us") for r in rows if r["impl"] == "bf16_dot"), None)
    for r in rows:
        r["x_bf16"] = bf16 / r["us"] if bf16 and r.get("us") else None  # > 1: faster than the bf16 dot
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x11008,11008x4096,8192x22016", help="KxN,...")
    ap.add_argument("--copies", type=int, help="weight copies per program (default: > 3x the L2 together)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--m", default="1", help="comma-separated rows of x (<= 64; the GEMV runs at <= 8), e.g. 1,8,16")
    ap.add_argument("--direction", default="fwd", help="fwd (x @ W.T), bwd (dy @ W, the input gradient) or fwd,bwd")
    ap.add_argument("--trace-dir", type=Path, required=True)
    ap.add_argument("--json")
    ap.add_argument("--config", action="append", default=[], type=parse_config,
                    help="an extra GEMV candidate NAME=field:value,... (repeatable), e.g. bn32_w8=block_n:32,num_warps:8")
    ap.add_argument("--only-extra", action="store_true", help="profile the bf16 dot, the dequantize + dot and the --config candidates only")
    ap.add_argument("--fp32-scales", action="store_true",
                    help="4-bit weights with fp32 block scales (decoding's layer buffers), not double-quantized")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: one small shape, interpret mode")
    args = ap.parse_args(argv)
    baselines = ("bf16_dot", "pallas_dequant_dot")
    candidates = {k: v for k, v in CANDIDATES.items() if k in baselines or not args.only_extra}
    candidates.update(args.config)
    interpret = jax.default_backend() != "gpu"
    shapes = "128x192" if args.tiny else args.shapes
    copies, repeats = (2, 1) if args.tiny else (args.copies, args.repeats)
    rows = []
    for s in shapes.split(","):
        k, n = (int(v) for v in s.split("x"))
        for direction in args.direction.split(","):
            if direction not in ("fwd", "bwd"):
                raise SystemExit(f"error: --direction {direction!r} is not fwd or bwd")
            for m in (int(v) for v in args.m.split(",")):
                rows += profile_shape(k, n, m=m, copies=copies, repeats=repeats, trace_dir=args.trace_dir,
                                      interpret=interpret, candidates=candidates, direction=direction,
                                      fp32_scales=args.fp32_scales)
    table = print_table(
        f"device time per call ({jax.devices()[0].device_kind})", rows,
        [("shape", lambda r: r["shape"]), ("dir", lambda r: r["direction"]), ("M", lambda r: str(r["m"])),
         ("impl", lambda r: r["impl"]),
         ("us", lambda r: fmt(r.get("us"), ".1f") if "error" not in r else r["error"][:60]),
         ("GB/s", lambda r: fmt(r.get("gbps"), ",.0f")), ("x bf16", lambda r: fmt(r.get("x_bf16"), ".2f")),
         ("rel err", lambda r: fmt(r.get("rel_err"), ".1e"))])
    write_json(args.json, {"meta": meta(argv), "benchmark": "kernel_profile", "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
