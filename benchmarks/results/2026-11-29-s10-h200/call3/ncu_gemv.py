"""One GEMV call under ncu: python3 ncu_gemv.py KxN field=value ..."""
import sys
import jax, jax.numpy as jnp
from qlora_jax import nf4
from qlora_jax.kernels import nf4_gemv as G
k, n = (int(v) for v in sys.argv[1].split("x"))
kw = dict(kv.split("=") for kv in sys.argv[2:])
cfg = G.GemvConfig(**{a: (b if a in ("decode", "reduce", "x_layout") else int(b)) for a, b in kw.items()})
w = nf4.quantize(jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) * 0.02)
x = jax.random.normal(jax.random.PRNGKey(1), (1, k), jnp.bfloat16)
f = jax.jit(lambda x, w: G.nf4_gemv(x, w, config=cfg))
jax.block_until_ready(f(x, w)); jax.block_until_ready(f(x, w))
