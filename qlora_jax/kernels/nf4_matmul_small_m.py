"""Fused 4-bit matmuls for few rows (M <= 64: generation, small-batch training), Pallas/Triton.

Both kernels stream the packed weight once and dequantize in registers; no
dequantized weight is written to memory. They read bitsandbytes' layout
directly: for ``W [N, K]`` with ``K % blocksize == 0`` the flat packed codes
are a ``[N, K/2]`` byte matrix whose byte ``(n, j)`` holds ``W[n, 2j]`` (high
nibble) and ``W[n, 2j+1]`` (low nibble), and the block scales are ``[N, K/blocksize]``.

Decoding is two gathers per byte from the 16-entry fp32 codebook (one 64-byte
line, so a warp's gather is served by one L1 access), times the block scale, rounded
once to the compute dtype. The even and odd columns of ``W`` are kept apart (``W_hi``,
``W_lo``) and the activations are split to match (``x[:, 0::2]``, ``x[:, 1::2]``): two
half-K dots replace an interleave in registers. The decoded weight is the dots' left
operand ("swap AB": ``y.T = W @ x.T``), so it stays in registers; M, padded to 16, is
the dots' narrow side.

Double-quantized scales are decoded in the kernel, once per 64-value block:
``nested_code[q] * nested_absmax[b // 256] + offset``.

* forward  ``y = x @ W.T``: a program owns ``block_n`` rows of ``W`` and a
  slice of K (split-K); partial sums are added by XLA.
* backward ``dx = dy @ W``: a program owns ``blocks_per_step`` quantization
  blocks of K and a slice of N (split-N).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qlora_jax.kernels.nf4_matmul import operand_rows
from qlora_jax.kernels.triton_common import decode_scales, scale_operands, triton_params
from qlora_jax.nf4 import QuantizedTensor, codebook

MAX_M = 64


@dataclasses.dataclass(frozen=True)
class SmallMConfig:
    """Tile sizes. ``block_n``: rows of W per program (forward) or per inner step (backward);
    ``split``: programs sharing one output tile's reduction (split-K forward, split-N backward);
    ``blocks_per_step``: quantization blocks of K decoded per loop step (forward) or owned by
    one program (backward); ``num_warps`` / ``num_stages``: Triton's."""

    block_n: int = 128
    split: int = 4
    blocks_per_step: int = 2
    num_warps: int = 4
    num_stages: int = 3


def supports(w: QuantizedTensor, m: int) -> str | None:
    """``None`` if the small-M kernels handle this weight and row count, else the reason."""
    if len(w.shape) != 2:
        return f"weight is not 2-D: {w.shape}"
    n, k = w.shape
    if m > MAX_M:
        return f"M={m} > {MAX_M}"
    if k % w.blocksize:
        return f"K={k} is not a multiple of blocksize {w.blocksize} (blocks span rows)"
    if n % 16:
        return f"N={n} is not a multiple of 16"
    if w.packed.ndim != 1:
        return "stacked weight leaves"
    return None


def _pick_block_n(n: int, want: int) -> int:
    return max(bn for bn in (16, 32, 64, 128, 256) if bn <= max(want, 16) and n % bn == 0)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(at_most, 1) + 1) if n % d == 0)


def _decode_scaled(byte_tile, code_ref, scale, dtype):
    """uint8 ``[r, c]`` and fp32 scales ``[r]`` -> (even-column values, odd-column values),
    each ``[r, c]`` in ``dtype``: ``code[nibble] * scale`` in fp32, rounded once."""
    b = byte_tile.astype(jnp.int32)
    s = scale[:, None]
    hi = (code_ref[b >> 4] * s).astype(dtype)
    lo = (code_ref[b & 0xF] * s).astype(dtype)
    return hi, lo


def _block_scale(absmax_ref, nested_ref, ncode_ref, offset_ref, row0, bn, kb, blocks_per_row, dq):
    """fp32 ``[bn]`` scales of quantization block ``kb`` of rows ``row0 .. row0+bn``."""
    a = absmax_ref[pl.ds(row0, bn), kb]
    if not dq:
        return a
    flat = (row0 + jnp.arange(bn, dtype=jnp.int32)) * blocks_per_row + kb
    return decode_scales(a, flat, nested_ref, ncode_ref, offset_ref)


def _fwd_kernel(xe_ref, xo_ref, p_ref, a_ref, na_ref, nc_ref, off_ref, code_ref, o_ref, *,
                bn, half_bs, steps, g, blocks_per_row, dq, dtype):
    """Program (i, s): ``out[s, rows_i, :] = W[rows_i, K_s] @ x[:, K_s].T``, transposed (swap-AB:
    the decoded weight is the dot's left operand, so it never leaves registers)."""
    i, s = pl.program_id(0), pl.program_id(1)
    row0 = i * bn

    def body(c, acc):
        for b in range(g):
            kb = (s * steps + c) * g + b
            scale = _block_scale(a_ref, na_ref, nc_ref, off_ref, row0, bn, kb, blocks_per_row, dq)
            hi, lo = _decode_scaled(p_ref[pl.ds(row0, bn), pl.ds(kb * half_bs, half_bs)], code_ref, scale, dtype)
            cols = pl.ds(kb * half_bs, half_bs)
            acc += jnp.dot(hi, xe_ref[cols, :], preferred_element_type=jnp.float32)
            acc += jnp.dot(lo, xo_ref[cols, :], preferred_element_type=jnp.float32)
        return acc

    acc = jnp.zeros((bn, xe_ref.shape[1]), jnp.float32)
    o_ref[0, :, :] = jax.lax.fori_loop(0, steps, body, acc)


def _bwd_kernel(dy_ref, p_ref, a_ref, na_ref, nc_ref, off_ref, code_ref, oe_ref, oo_ref, *,
                bn, half_bs, g, tiles_per_split, blocks_per_row, dq, dtype):
    """Program (j, s): ``out[s, K_j, :] = W[N_s, K_j].T @ dy[:, N_s].T`` for the ``g`` quantization
    blocks of K_j, even and odd columns apart."""
    j, s = pl.program_id(0), pl.program_id(1)
    mp = dy_ref.shape[1]

    def body(t, accs):
        row0 = (s * tiles_per_split + t) * bn
        dy = dy_ref[pl.ds(row0, bn), :]
        out = []
        for b in range(g):
            kb = j * g + b
            scale = _block_scale(a_ref, na_ref, nc_ref, off_ref, row0, bn, kb, blocks_per_row, dq)
            hi, lo = _decode_scaled(p_ref[pl.ds(row0, bn), pl.ds(kb * half_bs, half_bs)], code_ref, scale, dtype)
            out.append(accs[2 * b] + jnp.dot(hi.T, dy, preferred_element_type=jnp.float32))
            out.append(accs[2 * b + 1] + jnp.dot(lo.T, dy, preferred_element_type=jnp.float32))
        return tuple(out)

    zeros = tuple(jnp.zeros((half_bs, mp), jnp.float32) for _ in range(2 * g))
    accs = jax.lax.fori_loop(0, tiles_per_split, body, zeros)
    for b in range(g):
        oe_ref[0, pl.ds(b * half_bs, half_bs), :] = accs[2 * b]
        oo_ref[0, pl.ds(b * half_bs, half_bs), :] = accs[2 * b + 1]


def _weight_operands(w: QuantizedTensor):
    n, k = w.shape
    nbr = k // w.blocksize
    packed = w.packed.reshape(n, k // 2)
    scales, extra, _ = scale_operands(w, in_kernel=True)  # double-quant codes are decoded in the kernel
    return (packed, scales.reshape(n, nbr), *extra, jnp.asarray(codebook(w.quant_type)))


def _pad_rows(x2: jax.Array) -> jax.Array:
    m = x2.shape[0]
    mp = max(16, -(-m // 16) * 16)
    return jnp.pad(x2, ((0, mp - m), (0, 0)))


def _validate(name: str, a: jax.Array, w: QuantizedTensor, dim: int) -> int:
    if jnp.dtype(a.dtype).itemsize != 2:
        raise NotImplementedError(f"{name}: small-M 4-bit kernels run in bfloat16 or float16, not {jnp.dtype(a.dtype).name}")
    return operand_rows(name, a, w, dim, supports)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nf4_matmul_small_m(x: jax.Array, w: QuantizedTensor, *, config: SmallMConfig = SmallMConfig(),
                       interpret: bool = False) -> jax.Array:
    """``x [..., K] @ dequant(w [N, K]).T -> [..., N]`` in ``x.dtype`` (bf16/fp16), M = prod(...) <= 64."""
    m = _validate("nf4_matmul_small_m", x, w, 1)
    n, k = w.shape
    xt = _pad_rows(x.reshape(m, k)).T  # [K, Mp]
    mp = xt.shape[1]
    nbr = k // w.blocksize
    g = _largest_divisor(nbr, config.blocks_per_step)
    split = _largest_divisor(nbr // g, config.split)
    bn = _pick_block_n(n, config.block_n)
    kernel = functools.partial(
        _fwd_kernel, bn=bn, half_bs=w.blocksize // 2, steps=nbr // g // split, g=g, blocks_per_row=nbr,
        dq=w.double_quant, dtype=x.dtype,
    )
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, n, mp), jnp.float32),
        grid=(n // bn, split),
        in_specs=[pl.no_block_spec] * 8,
        out_specs=pl.BlockSpec((1, bn, mp), lambda i, s: (s, i, 0)),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="nf4_matmul_small_m",
    )(xt[0::2], xt[1::2], *_weight_operands(w))
    return partial.sum(0).T[:m].astype(x.dtype).reshape(*x.shape[:-1], n)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nf4_matmul_t_small_m(dy: jax.Array, w: QuantizedTensor, *, config: SmallMConfig = SmallMConfig(),
                         interpret: bool = False) -> jax.Array:
    """``dy [..., N] @ dequant(w [N, K]) -> [..., K]`` in ``dy.dtype`` (bf16/fp16), M <= 64."""
    m = _validate("nf4_matmul_t_small_m", dy, w, 0)
    n, k = w.shape
    dyt = _pad_rows(dy.reshape(m, n)).T  # [N, Mp]
    mp = dyt.shape[1]
    nbr = k // w.blocksize
    g = _largest_divisor(nbr, config.blocks_per_step)
    bn = _pick_block_n(n, config.block_n)
    tiles = n // bn
    split = _largest_divisor(tiles, config.split)
    half_bs = w.blocksize // 2
    kernel = functools.partial(
        _bwd_kernel, bn=bn, half_bs=half_bs, g=g, tiles_per_split=tiles // split,
        blocks_per_row=nbr, dq=w.double_quant, dtype=dy.dtype,
    )
    out_block = pl.BlockSpec((1, g * half_bs, mp), lambda j, s: (s, j, 0))
    even, odd = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((split, k // 2, mp), jnp.float32)] * 2,
        grid=(nbr // g, split),
        in_specs=[pl.no_block_spec] * 7,
        out_specs=[out_block, out_block],
        compiler_params=triton_params(config),
        interpret=interpret,
        name="nf4_matmul_t_small_m",
    )(dyt, *_weight_operands(w))
    dx = jnp.stack([even.sum(0), odd.sum(0)], axis=1).reshape(k, mp).T
    return dx[:m].astype(dy.dtype).reshape(*dy.shape[:-1], k)


