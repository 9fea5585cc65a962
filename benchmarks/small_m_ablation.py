"""Where does the small-M forward kernel's time go? Stage ablations on N=11008, K=4096, M=16 (GPU only)."""
import functools, statistics, time, sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
sys.path.insert(0, '.')
from qlora_jax import quantize
from qlora_jax.nf4 import codebook

N, K, MP = 11008, 4096, 16
HB = 32

def kern(xe_ref, xo_ref, p_ref, a_ref, code_ref, o_ref, *, bn, steps, stage, wide, hint=True, post=False):
    i, s = pl.program_id(0), pl.program_id(1)
    row0 = pl.multiple_of(i * bn, bn) if hint else i * bn
    cols_per = HB * wide
    def body(c, acc):
        kb = s * steps + c
        col0 = pl.multiple_of(kb * cols_per, cols_per) if hint else kb * cols_per
        b = p_ref[pl.ds(row0, bn), pl.ds(col0, cols_per)]
        if stage == "load":
            return acc + jnp.sum(b.astype(jnp.float32), axis=1)[:, None]
        bi = b.astype(jnp.int32)
        if stage in ("dot_raw",):
            hi = (bi >> 4).astype(jnp.bfloat16); lo = (bi & 15).astype(jnp.bfloat16)
        elif stage == "select":
            hv = bi >> 4; lv = bi & 15
            hi = jnp.zeros(b.shape, jnp.float32); lo = jnp.zeros(b.shape, jnp.float32)
            cb = codebook("nf4")
            for v in range(16):
                hi = jnp.where(hv == v, float(cb[v]), hi); lo = jnp.where(lv == v, float(cb[v]), lo)
            sc = a_ref[pl.ds(row0, bn), kb * wide][:, None]
            hi = (hi * sc).astype(jnp.bfloat16); lo = (lo * sc).astype(jnp.bfloat16)
        elif post:
            hi = code_ref[bi >> 4].astype(jnp.bfloat16); lo = code_ref[bi & 15].astype(jnp.bfloat16)
            sc = a_ref[pl.ds(row0, bn), kb * wide][:, None]
            part = jnp.dot(hi, xe_ref[pl.ds(col0, cols_per), :], preferred_element_type=jnp.float32)
            part += jnp.dot(lo, xo_ref[pl.ds(col0, cols_per), :], preferred_element_type=jnp.float32)
            return acc + part * sc
        else:
            sc = a_ref[pl.ds(row0, bn), kb * wide][:, None]
            hi = (code_ref[bi >> 4] * sc).astype(jnp.bfloat16); lo = (code_ref[bi & 15] * sc).astype(jnp.bfloat16)
        if stage in ("decode", "select_sum"):
            return acc + jnp.sum(hi.astype(jnp.float32) + lo.astype(jnp.float32), axis=1)[:, None]
        acc += jnp.dot(hi, xe_ref[pl.ds(col0, cols_per), :], preferred_element_type=jnp.float32)
        acc += jnp.dot(lo, xo_ref[pl.ds(col0, cols_per), :], preferred_element_type=jnp.float32)
        return acc
    o_ref[0] = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, MP), jnp.float32))

def make(stage, bn, split, wide, warps, hint=True, post=False):
    steps = K // 2 // (HB * wide) // split
    def f(xe, xo, p, a, code):
        return pl.pallas_call(functools.partial(kern, bn=bn, steps=steps, stage=stage, wide=wide, hint=hint, post=post),
            out_shape=jax.ShapeDtypeStruct((split, N, MP), jnp.float32), grid=(N // bn, split),
            in_specs=[pl.no_block_spec] * 5, out_specs=pl.BlockSpec((1, bn, MP), lambda i, s: (s, i, 0)),
            compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=3))(xe, xo, p, a, code)
    return f

w = quantize(jax.random.normal(jax.random.key(0), (N, K)) * 0.02, double_quant=False)
copies = 8
ps = [w.packed.reshape(N, K // 2) ^ np.uint8(i) for i in range(copies)]
a = w.absmax.reshape(N, K // 64)
x = jax.random.normal(jax.random.key(1), (K, MP), jnp.bfloat16)
xe, xo = x[0::2], x[1::2]
code = jnp.asarray(codebook("nf4"))
def bench(f):
    g = jax.jit(lambda ps: [f(xe, xo, p, a, code) for p in ps])
    jax.block_until_ready(g(ps)); jax.block_until_ready(g(ps))
    ts = []
    for _ in range(10):
        t = time.perf_counter(); jax.block_until_ready(g(ps)); ts.append(time.perf_counter() - t)
    return statistics.median(ts) / copies * 1e6
nbytes = N * K // 2
for name, stage, post, cfgs in (
    ("load", "load", False, ((128, 4, 1, 4), (64, 4, 4, 4), (32, 8, 4, 4), (64, 8, 4, 4), (128, 8, 4, 8))),
    ("decode", "decode", False, ((128, 4, 1, 4), (64, 8, 1, 4), (32, 8, 1, 4))),
    ("dot_raw", "dot_raw", False, ((128, 4, 1, 4), (64, 4, 4, 4), (64, 8, 1, 4))),
    ("full", "full", False, ((128, 4, 1, 4), (64, 8, 1, 4), (32, 8, 1, 4), (64, 8, 1, 8), (128, 8, 1, 8))),
    ("postscale", "full", True, ((128, 4, 1, 4), (64, 8, 1, 4), (32, 8, 1, 4), (64, 8, 1, 8))),
):
    for bn, split, wide, warps in cfgs:
        try:
            t = bench(make(stage, bn, split, wide, warps, post=post))
            print(f"{name:<10} bn={bn:<4} split={split} wide={wide} warps={warps}: {t:7.1f} us  {nbytes / t / 1e3:6.0f} GB/s", flush=True)
        except Exception as e:
            print(name, bn, split, wide, "failed", str(e).splitlines()[0][:100], flush=True)
# bf16 dot and plain copy roofline
wb = [jax.random.normal(jax.random.key(i), (N, K), jnp.bfloat16) for i in range(3)]
g = jax.jit(lambda ws: [jnp.dot(w_, x) for w_ in ws]); jax.block_until_ready(g(wb))
ts=[]
for _ in range(10):
    t=time.perf_counter(); jax.block_until_ready(g(wb)); ts.append(time.perf_counter()-t)
t = statistics.median(ts)/3*1e6; print(f"bf16 dot W[N,K]@x[K,16]: {t:.1f} us {2*N*K/t/1e3:.0f} GB/s")
