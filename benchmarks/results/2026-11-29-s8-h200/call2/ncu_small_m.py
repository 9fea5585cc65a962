import sys
import jax, jax.numpy as jnp
from qlora_jax import nf4
from qlora_jax.kernels import nf4_matmul_small_m as S
k, n = (int(v) for v in sys.argv[1].split("x"))
m = int(sys.argv[2])
kw = dict(kv.split("=") for kv in sys.argv[3:])
cfg = S.SmallMConfig(**{a: (b == "1" if a == "halves" else int(b)) for a, b in kw.items()})
w = nf4.quantize(jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) * 0.02)
x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
f = jax.jit(lambda x, w: S.nf4_matmul_small_m(x, w, config=cfg))
jax.block_until_ready(f(x, w)); jax.block_until_ready(f(x, w))
