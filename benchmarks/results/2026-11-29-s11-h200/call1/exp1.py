"""Session 11 call-1 experiments (device time per call from profiler traces).

A: GEMV M=1 (and small-M at M=8): double-quantized scales decoded in the kernel vs fp32 scales (no DQ chain).
B: large M: the 4-bit dequantize + dot with a bf16 product vs an fp32 product + convert; the bf16 dot both ways.
"""
import dataclasses, json, sys, os
from pathlib import Path
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
from benchmarks import profile_summary
from benchmarks.kernel_sweep import weight_copies
from qlora_jax.kernels import nf4_gemv, nf4_dequant, nf4_matmul_reference
from qlora_jax.kernels import nf4_matmul_small_m as small_m
from qlora_jax.nf4 import block_absmax

OUT = Path(sys.argv[1]); TR = Path("/tmp/tr"); part = sys.argv[2]
rows = []

def prof(name, op, x, ws, tag):
    fn = jax.jit(lambda x, ws: [op(*jax.lax.optimization_barrier((x, w))) for w in ws])
    got = jax.block_until_ready(fn(x, ws))[0]
    s = profile_summary.profile_calls(fn, (x, ws), calls=len(ws), runs=10, trace_dir=TR / f"{tag}_{name}", top=6)
    r = dict(tag=tag, impl=name, us=s["total_ms_per_step"] * 1e3, kernels=[(o["name"][:90], round(o["ms"] * 1e3, 2)) for o in s["top"]])
    print(json.dumps(r), flush=True)
    rows.append(r)
    return got

def fp32_scales(q):
    return dataclasses.replace(q, absmax=block_absmax(q), nested_absmax=None, nested_offset=None, nested_code=None)

if part == "A":
    for k, n in [(4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096), (4096, 11008), (8192, 22016)]:
        qw, qws, bws = weight_copies(k, n)
        fws = [fp32_scales(q) for q in qws]
        for m in (1, 8):
            tag = f"{k}x{n}_m{m}"
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            want = nf4_matmul_reference(x, qw).astype(jnp.float32)
            prof("bf16_dot", lambda x, w: x @ w.T, x, bws, tag)
            if m == 1:
                ops = {"gemv_dq": (nf4_gemv.nf4_gemv, qws), "gemv_fp32_scales": (nf4_gemv.nf4_gemv, fws),
                       "gemv_dq_w8": (lambda x, w: nf4_gemv.nf4_gemv(x, w, config=nf4_gemv.GemvConfig(num_warps=8)), qws),
                       "gemv_dq_bn32": (lambda x, w: nf4_gemv.nf4_gemv(x, w, config=nf4_gemv.GemvConfig(block_n=32)), qws)}
            else:
                ops = {"small_m_dq": (small_m.nf4_matmul_small_m, qws), "small_m_fp32_scales": (small_m.nf4_matmul_small_m, fws)}
            for name, (op, ws) in ops.items():
                try:
                    got = prof(name, op, x, ws, tag).astype(jnp.float32)
                    print("  rel", name, float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)), flush=True)
                except Exception as e:
                    print("FAIL", tag, name, type(e).__name__, str(e)[:300], flush=True)
        del qw, qws, bws, fws

if part == "B":
    deq = nf4_dequant.dequantize_pallas
    f32 = jnp.float32
    for k, n in [(4096, 11008), (11008, 4096), (8192, 22016)]:
        qw, qws, bws = weight_copies(k, n)
        for m in (2048, 8192):
            for d in ("fwd", "bwd"):
                tag = f"{k}x{n}_{d}_m{m}"
                x = jax.random.normal(jax.random.key(1), (m, k if d == "fwd" else n), jnp.bfloat16)
                if d == "fwd":
                    ops = {"bf16_dot_f32out": (lambda x, w: jnp.dot(x, w.T, preferred_element_type=f32).astype(x.dtype), bws),
                           "bf16_dot_bf16out": (lambda x, w: jnp.dot(x, w.T), bws),
                           "nf4_bf16out": (nf4_dequant.nf4_matmul_dequant, qws),
                           "nf4_f32out": (lambda x, w: jnp.dot(x, deq(w, x.dtype).T, preferred_element_type=f32).astype(x.dtype), qws)}
                else:
                    ops = {"bf16_dot_f32out": (lambda x, w: jnp.dot(x, w, preferred_element_type=f32).astype(x.dtype), bws),
                           "bf16_dot_bf16out": (lambda x, w: jnp.dot(x, w), bws),
                           "nf4_bf16out": (nf4_dequant.nf4_matmul_t_dequant, qws),
                           "nf4_f32out": (lambda x, w: jnp.dot(x, deq(w, x.dtype), preferred_element_type=f32).astype(x.dtype), qws),
                           "nf4_wT_bf16out": (lambda x, w: jnp.dot(x, deq(w, x.dtype).T.T), qws)}
                for name, (op, ws) in ops.items():
                    try:
                        prof(name, op, x, ws, tag)
                    except Exception as e:
                        print("FAIL", tag, name, type(e).__name__, str(e)[:300], flush=True)
        del qw, qws, bws

(OUT / f"exp1{part}.json").write_text(json.dumps(rows, indent=1))
