"""Decode attention (one query per row over the KV cache): the Pallas kernel's configurations against XLA.

    JAX_PLATFORMS=cuda python benchmarks/decode_attention.py --trace-dir /tmp/da [--batch 1,8]
        [--slots 192,384,2048] [--heads 32/32x128] [--config NAME=block_s:32,splits:6 ...] [--json out.json]

One jitted program attends over every layer of a stacked ``[L, B, S, K, D]`` cache in turn (``--layers``
of them, > L2 together at the default sizes, as a decode step reads them), with the cache full
(``length = S``) and every slot visible; device time per call from profiler traces (as
``benchmarks/kernels.py``), wall clock otherwise. Rows: XLA's masked attention (what decoding ran
before the kernel), the kernel's default configuration and every ``--config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import fmt, meta, median_seconds, print_table, write_json  # noqa: E402
from benchmarks.profile_summary import device_us_per_call  # noqa: E402
from qlora_jax.kernels import decode_attention as da  # noqa: E402


def parse_config(text: str) -> tuple[str, da.DecodeAttentionConfig]:
    """``NAME=key:value,...`` -> (NAME, a config with those fields of the default replaced)."""
    name, _, fields = text.partition("=")
    kw = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition(":")
        if key not in {f.name for f in dataclasses.fields(da.DecodeAttentionConfig)}:
            raise SystemExit(f"--config {text!r}: unknown field {key!r}")
        kw[key] = int(value)
    return name, dataclasses.replace(da.DEFAULT_CONFIG, **kw)


def bench(batch: int, slots: int, heads: int, kv_heads: int, head_dim: int, layers: int,
          configs: list[tuple[str, da.DecodeAttentionConfig]], runs: int, trace_dir: Path | None,
          interpret: bool) -> list[dict]:
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (batch, heads, head_dim), jnp.bfloat16)
    kc = jax.random.normal(ks[1], (layers, batch, slots, kv_heads, head_dim), jnp.bfloat16)
    vc = jax.random.normal(ks[2], (layers, batch, slots, kv_heads, head_dim), jnp.bfloat16)
    mask = jnp.ones((batch, slots), bool)
    length = jnp.int32(slots)
    want = da.decode_attention_reference(q, kc, vc, mask, length, layer=0)

    def program(attend):  # a barrier per call: no XLA pass may merge the layers' products with the shared q
        return jax.jit(lambda q, kc, vc: [attend(jax.lax.optimization_barrier(q), kc, vc, mask, length, layer=i)
                                          for i in range(layers)])

    candidates = [("xla", da.decode_attention_reference)] + [
        (name, lambda *a, cfg=cfg, **kw: da.decode_attention_pallas(*a, config=cfg, interpret=interpret, **kw))
        for name, cfg in configs]
    rows = []
    kv_bytes = 2 * batch * slots * kv_heads * head_dim * 2
    for name, attend in candidates:
        f = program(attend)
        wall = median_seconds(f, q, kc, vc, runs=runs) / layers * 1e6
        dev = device_us_per_call(f, (q, kc, vc), calls=layers, runs=runs,
                                 trace_dir=trace_dir and trace_dir / f"b{batch}_s{slots}_{name}")
        err = float(jnp.max(jnp.abs(f(q, kc, vc)[0].astype(jnp.float32) - want.astype(jnp.float32))))
        us = dev if dev is not None else wall
        rows.append(dict(batch=batch, slots=slots, heads=heads, kv_heads=kv_heads, head_dim=head_dim, impl=name,
                         config=None if name == "xla" else dataclasses.asdict(dict(configs)[name]),
                         wall_us=wall, device_us=dev, kv_gbps=kv_bytes / us / 1e3, max_abs_err=err))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--slots", default="192,384,2048")
    ap.add_argument("--heads", default="32/32x128", help="query heads / KV heads x head_dim (7B: 32/32x128)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--config", action="append", default=[], help="NAME=block_s:64,splits:4,... (repeatable)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--trace-dir", type=Path, help="measure device time per call from profiler traces written here")
    ap.add_argument("--json", type=Path, default=Path("decode_attention.json"))
    args = ap.parse_args(argv)
    heads, _, rest = args.heads.partition("/")
    kv_heads, _, head_dim = rest.partition("x")
    configs = [("default", da.DEFAULT_CONFIG)] + [parse_config(c) for c in args.config]
    interpret = jax.default_backend() != "gpu"
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    rows = []
    for b in (int(v) for v in args.batch.split(",")):
        for s in (int(v) for v in args.slots.split(",")):
            rows += bench(b, s, int(heads), int(kv_heads), int(head_dim), args.layers, configs, args.runs,
                          args.trace_dir, interpret)
    xla_us = {(r["batch"], r["slots"]): r["device_us"] or r["wall_us"] for r in rows if r["impl"] == "xla"}
    for r in rows:
        r["x_xla"] = xla_us[(r["batch"], r["slots"])] / (r["device_us"] or r["wall_us"])
    print_table("decode attention, per layer's call (dev: device time from the profiler, used for GB/s and "
                "x xla where measured)", rows,
                [("B", lambda r: str(r["batch"])), ("slots", lambda r: str(r["slots"])), ("impl", lambda r: r["impl"]),
                 ("wall us", lambda r: fmt(r["wall_us"], ".2f")), ("dev us", lambda r: fmt(r["device_us"], ".2f")),
                 ("KV GB/s", lambda r: fmt(r["kv_gbps"], ".0f")), ("x xla", lambda r: fmt(r["x_xla"], ".2f")),
                 ("max err", lambda r: fmt(r["max_abs_err"], ".1e"))])
    write_json(str(args.json), {"meta": meta(argv if argv is not None else sys.argv[1:]), "device": dev.device_kind,
                                "benchmark": "decode_attention", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
