"""4-bit weight matmuls: ``x @ W.T`` (forward) and ``dy @ W`` (input gradient).

``W`` is a :class:`~qlora_jax.nf4.QuantizedTensor` of shape ``[out, in]``
(PyTorch's ``Linear`` layout, so blocks run along the input dimension, as in
bitsandbytes checkpoints). This file holds the pure-jnp path: dequantize to the
compute dtype, then one ``dot_general`` with fp32 accumulation. It is both the
reference the fused kernels are tested against and the XLA fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlora_jax.nf4 import QuantizedTensor, dequantize


def _check(x: jax.Array, w: QuantizedTensor, dim: int, name: str) -> None:
    if len(w.shape) != 2:
        raise ValueError(f"{name}: weight must be 2-D [out, in], got shape {w.shape}")
    if x.shape[-1] != w.shape[dim]:
        raise ValueError(f"{name}: x.shape[-1]={x.shape[-1]} does not match weight shape {w.shape} (dim {dim})")


def nf4_matmul_reference(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w).T -> [..., out]`` in ``x.dtype`` (fp32 accumulation)."""
    _check(x, w, 1, "nf4_matmul")
    wd = dequantize(w, x.dtype)
    y = jax.lax.dot_general(x, wd, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def nf4_matmul_t_reference(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w) -> [..., in]`` in ``dy.dtype`` (fp32 accumulation)."""
    _check(dy, w, 0, "nf4_matmul_t")
    wd = dequantize(w, dy.dtype)
    y = jax.lax.dot_general(dy, wd, (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(dy.dtype)


def nf4_matmul_reduce(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w).T -> [..., out]`` as one fp32 multiply-and-reduce (meant for M <= 8).

    ``sum(x[:, None, :] * W[None, :, :], -1)``: no dot, so XLA can fuse the decode (unpack,
    codebook gather, scale) into the reduction and read the 4-bit weight once, where
    dequantize-then-dot writes and re-reads a full-width W. Work grows with M; use it for GEMVs.
    The weight is not rounded to ``x.dtype`` (fp32 throughout).
    """
    _check(x, w, 1, "nf4_matmul_reduce")
    wd = dequantize(w, jnp.float32)  # [N, K]; fused into the reduction by XLA
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    y = jnp.sum(x2[:, None, :] * wd[None, :, :], axis=-1)
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def nf4_matmul_t_reduce(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w) -> [..., in]`` as one fp32 multiply-and-reduce over ``out`` (M <= 8)."""
    _check(dy, w, 0, "nf4_matmul_t_reduce")
    wd = dequantize(w, jnp.float32)
    d2 = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
    y = jnp.sum(d2[:, :, None] * wd[None, :, :], axis=1)
    return y.astype(dy.dtype).reshape(*dy.shape[:-1], w.shape[1])
