"""4-bit weight matmuls: ``x @ W.T`` (forward) and ``dy @ W`` (input gradient).

``W`` is a :class:`~qlora_jax.nf4.QuantizedTensor` of shape ``[out, in]``
(PyTorch's ``Linear`` layout, so blocks run along the input dimension, as in
bitsandbytes checkpoints). This file holds the pure-jnp paths:

* ``*_reference``: dequantize to the compute dtype, then one ``dot_general`` with fp32
  accumulation — the reference every kernel is tested against;
* ``*_split``: the XLA path the dispatcher runs: the weight's even and odd columns are decoded
  straight from the high and low nibbles (:func:`~qlora_jax.nf4.dequantize_halves`, one pass, no
  interleave) and the contraction is split to match. In the H200 sweep (``benchmarks/RESULTS.md``)
  it is 1.07-1.13x faster than the reference at M = 2048 (4096x11008) and 1.4-2.0x at M <= 8.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qlora_jax.nf4 import QuantizedTensor, dequantize, dequantize_halves


def check_operand(x: jax.Array, w: QuantizedTensor, dim: int, name: str) -> None:
    """``w`` is 2-D and ``x [..., d]`` fits its axis ``dim``, else a ValueError naming both shapes."""
    if len(w.shape) != 2:
        raise ValueError(f"{name}: weight must be 2-D [out, in], got shape {w.shape}")
    if x.shape[-1] != w.shape[dim]:
        raise ValueError(f"{name}: x.shape[-1]={x.shape[-1]} does not match weight shape {w.shape} (dim {dim})")


def operand_rows(name: str, a: jax.Array, w: QuantizedTensor, dim: int, supports) -> int:
    """Rows M of operand ``a`` (``[..., w.shape[dim]]``) after checking it against ``w`` and a
    kernel's ``supports(w, m)`` (``None`` or the reason it does not apply)."""
    check_operand(a, w, dim, name)
    m = int(math.prod(a.shape[:-1]))
    if (reason := supports(w, m)) is not None:
        raise ValueError(f"{name}: {reason}")
    return m


def dot_dequantized(a: jax.Array, wd: jax.Array, contract: int) -> jax.Array:
    """``a [..., d]`` contracted with axis ``contract`` of a dequantized ``wd [out, in]``, fp32
    accumulation, result in ``a.dtype``.

    The product is asked for in ``a.dtype`` directly: XLA accumulates 16-bit dots in fp32 on every
    backend, and on a GPU an fp32 result would be written to memory as fp32 and converted by a second
    kernel (the 7B training step's HLO had five such fp32 ``[2048, 11008]`` GEMM outputs per layer).
    """
    return jax.lax.dot_general(a, wd, (((a.ndim - 1,), (contract,)), ((), ())), preferred_element_type=a.dtype)


def nf4_matmul_reference(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w).T -> [..., out]`` in ``x.dtype`` (fp32 accumulation)."""
    check_operand(x, w, 1, "nf4_matmul")
    return dot_dequantized(x, dequantize(w, x.dtype), 1)


def nf4_matmul_t_reference(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w) -> [..., in]`` in ``dy.dtype`` (fp32 accumulation)."""
    check_operand(dy, w, 0, "nf4_matmul_t")
    return dot_dequantized(dy, dequantize(w, dy.dtype), 0)


def _splittable(w: QuantizedTensor) -> bool:
    return len(w.shape) == 2 and w.shape[1] % w.blocksize == 0


def nf4_matmul_split(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w).T`` as ``x[..., 0::2] @ even.T + x[..., 1::2] @ odd.T`` (fp32
    accumulation, result in ``x.dtype``); the reference path where ``in % blocksize != 0``."""
    check_operand(x, w, 1, "nf4_matmul")
    if not _splittable(w):
        return nf4_matmul_reference(x, w)
    even, odd = dequantize_halves(w, x.dtype)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    y = jax.lax.dot_general(x[..., 0::2], even, dims, preferred_element_type=jnp.float32)
    y = y + jax.lax.dot_general(x[..., 1::2], odd, dims, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def nf4_matmul_t_split(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w)`` with the even and odd output columns computed apart and
    interleaved (fp32 accumulation, result in ``dy.dtype``); the reference path where
    ``in % blocksize != 0``."""
    check_operand(dy, w, 0, "nf4_matmul_t")
    if not _splittable(w):
        return nf4_matmul_t_reference(dy, w)
    even, odd = dequantize_halves(w, dy.dtype)
    dims = (((dy.ndim - 1,), (0,)), ((), ()))
    ge = jax.lax.dot_general(dy, even, dims, preferred_element_type=jnp.float32)
    go = jax.lax.dot_general(dy, odd, dims, preferred_element_type=jnp.float32)
    return jnp.stack([ge, go], axis=-1).reshape(*dy.shape[:-1], w.shape[1]).astype(dy.dtype)

def nf4_matmul_reduce(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w).T -> [..., out]`` as one fp32 multiply-and-reduce (meant for M <= 8).

    ``sum(x[:, None, :] * W[None, :, :], -1)``: no dot, so XLA can fuse the decode (unpack,
    codebook gather, scale) into the reduction and read the 4-bit weight once, where
    dequantize-then-dot writes and re-reads a full-width W. Work grows with M; use it for GEMVs.
    The weight is not rounded to ``x.dtype`` (fp32 throughout).
    """
    check_operand(x, w, 1, "nf4_matmul_reduce")
    wd = dequantize(w, jnp.float32)  # [N, K]; fused into the reduction by XLA
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    y = jnp.sum(x2[:, None, :] * wd[None, :, :], axis=-1)
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def nf4_matmul_t_reduce(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w) -> [..., in]`` as one fp32 multiply-and-reduce over ``out`` (M <= 8)."""
    check_operand(dy, w, 0, "nf4_matmul_t_reduce")
    wd = dequantize(w, jnp.float32)
    d2 = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
    y = jnp.sum(d2[:, :, None] * wd[None, :, :], axis=1)
    return y.astype(dy.dtype).reshape(*dy.shape[:-1], w.shape[1])
