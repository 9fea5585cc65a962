"""The few-row RMSNorm kernel equals the model's fp32 RMSNorm (transformers' ``LlamaRMSNorm`` math) up to one
rounding step, differentiates like it, lowers for CUDA, and is what the model's norms run when forced. On CPU
the kernel runs in interpret mode; on a GPU (``JAX_PLATFORMS=cuda``) compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import mesh as mesh_lib

from qlora_jax.kernels import rms_norm as rn

GPU = jax.default_backend() == "gpu"


def _operands(lead, d, dtype, seed=0):
    kx, ks = jax.random.split(jax.random.key(seed))
    x = (jax.random.normal(kx, (*lead, d), jnp.float32) * 3.0).astype(dtype)
    scale = (1.0 + 0.1 * jax.random.normal(ks, (d,), jnp.float32)).astype(dtype)
    return x, scale


@pytest.mark.parametrize("lead, d", [((1,), 4096), ((3, 2), 172), ((1, 1), 5120), ((8,), 64), ((2,), 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_kernel_equals_the_reference(lead, d, dtype):
    """Row lengths that are and are not powers of two (the padding must not enter the mean), any leading
    axes, each float dtype; rows of very different scales (the mean is per row)."""
    x, scale = _operands(lead, d, dtype, seed=d)
    x = x * jnp.logspace(-3, 3, int(np.prod(lead)), dtype=jnp.float32).reshape(*lead, 1).astype(dtype)
    got = rn.rms_norm_pallas(x, scale, 1e-5, interpret=not GPU)
    want = rn.rms_norm_reference(x, scale, 1e-5)
    assert got.shape == x.shape and got.dtype == x.dtype
    # equal up to one rounding step of the dtype: the mean's fp32 summation order (and on a GPU its rsqrt)
    # differ from XLA's, which can move the fp32 result by an ulp and its rounding to a 16-bit dtype by one step
    rtol = {jnp.float32: 1e-5 if GPU else 1e-6, jnp.bfloat16: 2.0 ** -7, jnp.float16: 2.0 ** -10}[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=0)


def test_gradient_is_the_references():
    """``rms_norm`` through the kernel (forced) has the reference's gradient with respect to x and scale."""
    x, scale = _operands((2, 3), 96, jnp.float32)
    loss = lambda f: (lambda x, s: jnp.sum(jnp.sin(f(x, s, 1e-6))))  # noqa: E731
    with rn.use_rms_norm("pallas"):
        got = jax.grad(loss(rn.rms_norm), argnums=(0, 1))(x, scale)
    want = jax.grad(loss(rn.rms_norm_reference), argnums=(0, 1))(x, scale)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_dispatch_and_bad_input():
    """``auto`` runs XLA off a GPU (and beyond ``AUTO_MAX_ROWS`` rows); bad operands and names give clear errors."""
    x, scale = _operands((rn.AUTO_MAX_ROWS + 1,), 32, jnp.float32)
    text = str(jax.make_jaxpr(lambda x: rn.rms_norm(x, scale, 1e-6))(x))
    assert "pallas_call" not in text
    with rn.use_rms_norm("pallas"):
        assert "pallas_call" in str(jax.make_jaxpr(lambda x: rn.rms_norm(x, scale, 1e-6))(x[:2]))
    with pytest.raises(ValueError, match=r"scale \(31,\) does not match x \(2, 32\)"):
        rn.rms_norm_pallas(x, scale[:31], 1e-6, interpret=True)
    with pytest.raises(ValueError, match="dtype int32"):
        rn.rms_norm_pallas(x.astype(jnp.int32), scale, 1e-6, interpret=True)
    with pytest.raises(ValueError, match="'triton' is not one of"):
        with rn.use_rms_norm("triton"):
            pass


def test_kernel_lowers_for_cuda_on_an_abstract_h100():
    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    for (lead, d, dtype) in (((1, 1), 4096, jnp.bfloat16), ((3,), 172, jnp.float32), ((2,), 5120, jnp.float16)):
        x, scale = _operands(lead, d, dtype)
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(lambda x, s: rn.rms_norm_pallas(x, s, 1e-6)).trace(x, scale).lower(
                lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text


def test_model_norms_run_the_kernel_when_forced(monkeypatch):
    """Every RMSNorm of the model (two per layer and the final one) goes through the dispatcher: forced to the
    kernel, a forward pass runs it for each norm, never XLA's norm, and gives the same logits."""
    from flax import nnx

    from qlora_jax.models.llama import Llama, LlamaConfig, LoRAConfig, QuantConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    model = Llama(cfg, lora=LoRAConfig(r=4), quant=QuantConfig(compute_dtype="float32"), rngs=nnx.Rngs(0))
    ids = jnp.array([[3, 7]], jnp.int32)
    want = model(ids, unroll_layers=True)
    calls = []
    kernel = rn._rms_norm_kernel
    monkeypatch.setattr(rn, "_rms_norm_kernel", lambda *a: calls.append(a[0].shape) or kernel(*a))
    monkeypatch.setattr(rn, "rms_norm_reference", lambda *a: pytest.fail("XLA's norm ran"))
    with rn.use_rms_norm("pallas"):
        got = model(ids, unroll_layers=True)
    # the layers' two norms (traced once for layers that share a program) and the final one; no norm took XLA
    assert len(calls) >= 3 and set(calls) == {(1, 2, 48)}
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
