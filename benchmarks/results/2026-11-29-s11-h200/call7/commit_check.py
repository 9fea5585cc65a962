"""GPU check of train()'s commit-before-first-step: device_put(a, a.sharding) on fresh (uncommitted) device arrays and
on the paged optimizer's pinned_host state, then a donated jitted step called 3 times compiles once."""
import jax, jax.numpy as jnp, optax
from qlora_jax.paged_adam import paged_adamw
lora = {"a": jnp.ones((4, 256, 64)), "b": jnp.zeros((4, 64, 256))}
tx = paged_adamw(1e-3) if True else optax.adamw(1e-3)
opt = tx.init(lora)
print("before:", sorted({(l.committed, str(l.sharding.memory_kind)) for l in jax.tree.leaves((lora, opt))}))
lora, opt = jax.tree.map(lambda a: jax.device_put(a, a.sharding), (lora, opt))
print("after:", sorted({(l.committed, str(l.sharding.memory_kind)) for l in jax.tree.leaves((lora, opt))}))
def step(lora, opt):
    g = jax.tree.map(lambda x: x * 0.01 + 1.0, lora)
    u, opt = tx.update(g, opt, lora)
    return optax.apply_updates(lora, u), opt
f = jax.jit(step, donate_argnums=(0, 1))
for _ in range(3):
    lora, opt = f(lora, opt)
jax.block_until_ready(lora)
print("cache size:", f._cache_size(), "finite:", bool(jnp.all(jnp.isfinite(lora["a"]))))
