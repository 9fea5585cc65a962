"""Lower Pallas/Triton kernels for CUDA on CPU and write each kernel's Triton IR (text) to OUTDIR/name_i.ttir."""
import sys, functools, os, json
import jax, jax.numpy as jnp
from jax._src import mesh as mesh_lib
from jax._src.pallas.triton import pallas_call_registration as reg
from qlora_jax.kernels import nf4_gemv as gemv
from qlora_jax import nf4

CAPTURED = []
_orig = reg.lowering.lower_jaxpr_to_triton_module
def _capture(*a, **kw):
    res = _orig(*a, **kw)
    CAPTURED.append(res.module.operation.get_asm(enable_debug_info=False, print_generic_op_form=True))
    return res
reg.lowering.lower_jaxpr_to_triton_module = _capture

def lower(fn, *args):
    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))

def gemv_ttir(n, k, m=1, config=gemv.GemvConfig()):
    CAPTURED.clear()
    w = jax.eval_shape(lambda: nf4.quantize(jnp.zeros((n, k), jnp.float32), double_quant=True))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    lower(functools.partial(gemv.nf4_gemv, config=config), x, w)
    return list(CAPTURED)

if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    t = gemv_ttir(11008, 4096)
    for i, s in enumerate(t):
        open(f"{out}/gemv_{i}.ttir", "w").write(s)
    print(len(t), [len(s) for s in t])

def small_m_ttir(n, k, m=8, fn="fwd"):
    from qlora_jax.kernels import nf4_matmul_small_m as sm
    CAPTURED.clear()
    w = jax.eval_shape(lambda: nf4.quantize(jnp.zeros((n, k), jnp.float32), double_quant=True))
    if fn == "fwd":
        lower(sm.nf4_matmul_small_m, jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w)
    else:
        lower(sm.nf4_matmul_t_small_m, jax.ShapeDtypeStruct((m, n), jnp.bfloat16), w)
    return list(CAPTURED)

def gemv_cfg_ttir(spec, n=11008, k=4096, m=1):
    import dataclasses
    kw = {}
    for item in spec.split(","):
        if item:
            a, b = item.split(":")
            f = {f.name: f.type for f in dataclasses.fields(gemv.GemvConfig)}[a]
            kw[a] = int(b) if f in (int, "int") else b
    return gemv_ttir(n, k, m, gemv.GemvConfig(**kw))
