"""RMSNorm of one row (batch-1 decoding) as one Pallas/Triton kernel (any number of rows when forced).

For one row (batch-1 decoding: ``x [1, 1, D]``) XLA runs ``x / rms(x) * scale`` on a GPU as two kernels,
a reduction to a scalar (the mean of squares) and an elementwise kernel that broadcasts it back, each a
launch-bound ~1.3 us kernel; a 7B decode step has 65 norms. Here one program per row loads the row once,
reduces and normalizes it in registers: 1.9 us per norm against XLA's 2.6 (H200 profile,
``benchmarks/RESULTS.md``, eleventh session). From two rows on XLA makes one normalization kernel of its own
(1.7 us at two rows), so ``"auto"`` takes this kernel for one row only.

Math (as :class:`qlora_jax.models.llama.RMSNorm`, transformers' ``LlamaRMSNorm``): fp32
``y = x * rsqrt(mean(x^2) + eps)``, rounded to ``x.dtype``, times ``scale`` in fp32, rounded to
``x.dtype``. Shapes: ``x [..., D]`` (any D: the row is padded to a power of two in registers and the
padding masked), ``scale [D]``.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qlora_jax.kernels import ForcedChoice
from qlora_jax.kernels.triton_common import pow2_at_least

AUTO_MAX_ROWS = 1  # "auto" runs the kernel for this many rows at most (module docstring); forced, any number
MAX_DIM = 32768  # a row lives in one program's registers
IMPLEMENTATIONS = ("auto", "xla", "pallas")
_choice = ForcedChoice("RMSNorm implementation", IMPLEMENTATIONS)


def use_rms_norm(name: str) -> contextlib.AbstractContextManager[None]:
    """Force ``"xla"`` or ``"pallas"`` (the kernel; interpreted off a GPU) for norms traced inside the block;
    ``"auto"``: the kernel on a GPU for at most ``AUTO_MAX_ROWS`` rows (where :func:`supports` says so), else XLA."""
    return _choice.use(name)


def rms_norm_reference(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``x [..., D]`` normalized by its root mean square over ``D``, times ``scale [D]``, in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * xf.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def supports(x: jax.Array, scale: jax.Array) -> str | None:
    """``None`` if the kernel handles these operands, else the reason."""
    if x.ndim < 1 or scale.shape != x.shape[-1:]:
        return f"scale {scale.shape} does not match x {x.shape}'s last axis"
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"dtype {x.dtype}"
    if x.shape[-1] > MAX_DIM:
        return f"D={x.shape[-1]} > {MAX_DIM}"
    return None


def _kernel(x_ref, s_ref, o_ref, *, d: int, dp: int, eps: float):
    from jax.experimental.pallas import triton as pltriton

    r = pl.program_id(0)
    cols = pl.ds(0, dp)  # the row padded to a power of two; masked loads and stores stay inside it
    ok = jax.lax.iota(jnp.int32, dp) < d
    x = pltriton.load(x_ref.at[r, cols], mask=ok, other=0.0).astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.sum(x * x) / d + eps)
    s = pltriton.load(s_ref.at[cols], mask=ok, other=0.0).astype(jnp.float32)
    pltriton.store(o_ref.at[r, cols], (s * y.astype(o_ref.dtype).astype(jnp.float32)).astype(o_ref.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def rms_norm_pallas(x: jax.Array, scale: jax.Array, eps: float, *, num_warps: int = 4,
                    interpret: bool = False) -> jax.Array:
    """The kernel: one program per row of ``x [..., D]``; the result in ``x.dtype``."""
    from jax.experimental.pallas import triton as pltriton

    reason = supports(x, scale)
    if reason is not None:
        raise ValueError(f"rms_norm_pallas: {reason}")
    d = x.shape[-1]
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    dp = pow2_at_least(d)
    out = pl.pallas_call(
        functools.partial(_kernel, d=d, dp=dp, eps=float(eps)),
        out_shape=jax.ShapeDtypeStruct((rows, d), x.dtype),
        grid=(rows,),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm",
    )(x.reshape(rows, d), scale)
    return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm_kernel(x: jax.Array, scale: jax.Array, eps: float, interpret: bool) -> jax.Array:
    return rms_norm_pallas(x, scale, eps, interpret=interpret)


def _fwd(x, scale, eps, interpret):
    return _rms_norm_kernel(x, scale, eps, interpret), (x, scale)


def _bwd(eps, interpret, res, g):
    # the kernel computes the reference's function: its gradient is the reference's
    _, vjp = jax.vjp(lambda x, s: rms_norm_reference(x, s, eps), *res)
    return vjp(g)


_rms_norm_kernel.defvjp(_fwd, _bwd)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of ``x [..., D]`` with ``scale [D]`` in ``x.dtype``: the kernel on a GPU for at most
    ``AUTO_MAX_ROWS`` rows (:func:`use_rms_norm` overrides), else :func:`rms_norm_reference` (XLA). Differentiable
    either way (the kernel's gradient is the reference's)."""
    name = _choice.value
    on_gpu = jax.default_backend() == "gpu"
    if name == "auto":
        rows = int(np.prod(x.shape[:-1], dtype=np.int64))
        name = "pallas" if on_gpu and rows <= AUTO_MAX_ROWS and supports(x, scale) is None else "xla"
    if name == "pallas":
        return _rms_norm_kernel(x, scale, float(eps), not on_gpu)
    return rms_norm_reference(x, scale, eps)
