"""Spike: NF4 register decode (prmt inline PTX) inside a Mosaic GPU kernel via plgpu.inline_mgpu.

Usage: python decode_spike.py lower   (CPU: lower for CUDA under an abstract H100)
       python decode_spike.py run     (GPU: run and compare with the jnp reference)
"""
import sys
import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic import gpu as mgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm
from jax.experimental.mosaic.gpu import utils as mu

from qlora_jax.kernels import prmt_decode

R, C = 128, 64  # words
LAYOUT = plgpu.Layout.WG_STRIDED((R, C), vec_size=1)


def decode_fn(t):
    asm = prmt_decode.prmt_asm("nf4", t, "bfloat16")

    @plgpu.inline_mgpu(arg_types=(LAYOUT,),
                       return_type=plgpu.ShapeDtypeStruct((R, C), jnp.uint32, layout=LAYOUT))
    def decode(ctx, arr):
        i32 = ir.IntegerType.get_signless(32)
        new = np.empty_like(arr.registers)
        for idx, reg in np.ndenumerate(arr.registers):
            word = mu.bitcast(reg, i32)
            out = llvm.inline_asm(i32, [word], asm, "=r,r")
            new[idx] = mu.bitcast(out, reg.type)
        return mgpu.FragmentedArray(_registers=new, _layout=arr.layout, _is_signed=False)

    return decode


def kernel(w_gmem, o_gmem, w_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(w_gmem, w_smem, bar)
    plgpu.barrier_wait(bar)
    words = plgpu.load(w_smem, (), layout=LAYOUT)
    for t in range(4):
        o_smem[t] = decode_fn(t)(words)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)


f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((4, R, C), jnp.uint32),
                 scratch_types=[plgpu.SMEM((R, C), jnp.uint32), plgpu.SMEM((4, R, C), jnp.uint32),
                                plgpu.Barrier(num_arrivals=1)],
                 num_threads=1, thread_name="wg")

if __name__ == "__main__":
    words = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, (R, C), dtype=np.uint32))
    if sys.argv[1] == "lower":
        from jax._src import mesh as mesh_lib
        device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(f).trace(words).lower(lowering_platforms=("cuda",)).as_text()
        print("lowered", len(text), "mosaic_gpu" in text)
    else:
        got = jax.block_until_ready(jax.jit(f)(words))
        want = jnp.stack(prmt_decode.decode_words_reference(words, "nf4"))
        print("equal:", bool(jnp.all(got == want)), "mismatches:", int(jnp.sum(got != want)))
