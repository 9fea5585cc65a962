"""Fused 4-bit matmuls for few rows (M <= 64: batched generation, small-batch training), Pallas/Triton,
on the tensor cores.

The GEMV (``nf4_gemv.py``) multiplies on the CUDA cores, so its time grows with every row of x (M = 8
costs ~2.5x M = 1). Here the decoded weight goes through ``jnp.dot`` (MMA instructions), so the rows
of x, padded to a multiple of 16, cost almost nothing and a call is bounded by streaming and decoding
the 4-bit weight once. No dequantized weight is written to memory.

Layout (bitsandbytes'): ``W [N, K]``, ``K % blocksize == 0``, packed row-major, byte ``j`` of a row
holds ``W[n, 2j]`` (high nibble) and ``W[n, 2j+1]`` (low nibble). The kernels read the codes as
uint32 words ``[N, NB, wpb]`` (``NB = K / blocksize`` blocks per row, ``wpb = blocksize / 8`` words
per block) and decode each word in registers with PTX byte permutes (``prmt_decode.py``) into four
pairs of x's dtype (bf16 or fp16) already multiplied by the block scale (one ``fma.rn.bf16x2`` /
``f16x2`` per pair; code and scale rounded to that dtype, the product rounded once more: within 2-3
ulps of the reference's ``dtype(code * scale)``).

Column order: pair ``t`` of word ``j`` of block ``b`` holds columns ``c = b*blocksize + 8j + 2t``
(upper half) and ``c + 1`` (lower half). The kernels lay each pair out as ``[lower, upper]`` (a
``jnp.stack`` on the last axis, Triton's ``join``), so a ``[rows, g, wpb]`` tile of pairs ``t`` becomes
a ``[rows, 16g']`` operand whose columns are ``x``'s columns in a fixed permutation; ``x`` (or
the output gradient's product) is permuted to match by one small XLA op outside the kernel
(:func:`permute_columns` / :func:`unpermute_columns`): a dot's sum does not care about the order.

* forward ``y [M, N] = x [M, K] @ W.T``: program ``(i, s)`` owns ``block_n`` rows of W and the
  ``s``-th of ``split`` K slices (last loop step moved back inside the slice, its repeated blocks
  given scale 0), four dots per step ``W_t [block_n, 16g'] @ x_t [16g', Mp]``; fp32 partials
  ``[split, Mp, N]`` summed by XLA.
* input gradient ``dx [M, K] = dy [M, N] @ W``: program ``(j, s)`` owns ``g`` quantization blocks of K
  and the ``s``-th of ``split`` N slices, loops over ``block_n`` rows of W at a time:
  ``acc_t [16g', Mp] += W_t.T @ dy.T[rows]``; partials ``[split, 4, K/4, Mp]`` in the permuted order.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels import prmt_decode
from qlora_jax.kernels.nf4_matmul import operand_rows
from qlora_jax.kernels.triton_common import (
    k_step,
    kernel_support,
    pow2_at_least,
    pow2_at_most,
    pow2_divisor,
    scale_operands,
    slice_step,
    tile_scales,
    triton_params,
)
from qlora_jax.nf4 import QuantizedTensor

MAX_M = 64
MIN_DOT = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class SmallMConfig:
    """Tile sizes. ``block_n``: rows of W per program (forward) or per loop step (input gradient), a
    power of two dividing N, at least 16. ``blocks_per_step``: quantization blocks per row and loop step
    (forward) or per program (input gradient). ``split``: K slices (forward) or N slices (gradient).
    ``num_warps`` / ``num_stages``: Triton's."""

    # forward, H200 sweep (eighth session, benchmarks/RESULTS.md): 2 blocks per step within 0-10% of the
    # best config at M = 1, 16 and 64 on 4096x11008 and 11008x4096; 4 blocks 6-60% slower at M = 64 (shared
    # memory), 8 blocks 25% slower and out of shared memory at M = 64; 32 or 128 rows, 8 warps slower.
    block_n: int = 64
    blocks_per_step: int = 2
    split: int = 4
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = SmallMConfig()
# the input gradient: 16 N slices. Its grid is (K / (64 * blocks_per_step), split): with 4 slices, K = 4096
# makes 128 programs, fewer than the H200's 132 SMs. H200 device time at M = 1 / 16 (eighth session):
# 4096x11008 45.3 -> 26.1 / 46.9 -> 27.7 us, 8192x22016 105.8 -> 90.2 / 107.6 -> 92.0 us, 11008x4096
# 29.0 -> 30.5 / 31.0 -> 32.4 us; at M = 64 mixed (-19%, +42%, +3%).
DEFAULT_T_CONFIG = SmallMConfig(split=16)


def supports(w: QuantizedTensor, m: int) -> str | None:
    """``None`` if the small-M kernels handle this weight and row count, else the reason."""
    if reason := kernel_support(w, m, MAX_M):
        return reason
    n, k = w.shape
    if w.blocksize % 8:
        return f"blocksize {w.blocksize} is not a multiple of 8 (whole 32-bit code words per block)"
    if n % MIN_DOT:
        return f"N={n} is not a multiple of {MIN_DOT}"
    group = _dot_blocks(w.blocksize)
    if (k // w.blocksize) % group:
        return (f"K={k} has {k // w.blocksize} blocks of {w.blocksize}, not a multiple of the {group} blocks "
                f"one dot needs ({MIN_DOT} columns of one byte position)")
    return None


def permute_columns(a: jax.Array, blocksize: int) -> jax.Array:
    """``a [..., K]`` -> ``[..., 4, K/4]``: plane ``t`` holds, for each code word ``(b, j)``, columns
    ``b*blocksize + 8j + 2t + 1`` then ``+ 0`` (the kernels' ``[lower, upper]`` pair order)."""
    *lead, k = a.shape
    wpb = blocksize // 8
    a = a.reshape(*lead, k // blocksize, wpb, 4, 2)[..., ::-1]  # [..., NB, wpb, t, (odd, even)]
    a = jnp.moveaxis(a, -2, -4)  # [..., t, NB, wpb, 2]
    return a.reshape(*lead, 4, k // 4)


def unpermute_columns(p: jax.Array, blocksize: int) -> jax.Array:
    """The inverse of :func:`permute_columns`: ``[..., 4, K/4]`` -> ``[..., K]``."""
    *lead, _, kq = p.shape
    k = 4 * kq
    wpb = blocksize // 8
    p = p.reshape(*lead, 4, k // blocksize, wpb, 2)[..., ::-1]
    return jnp.moveaxis(p, -4, -2).reshape(*lead, k)


def _operand_tiles(words, scale, quant_type, dtype, interpret):
    """uint32 words ``[r, g, wpb]``, fp32 scales ``[r, g]`` -> four ``dtype`` (bf16 / fp16) tiles
    ``[r, g * wpb * 2]`` (pairs ``t`` = 0..3, scaled, each pair as ``[lower, upper]``).

    (Eight tiles, lower and upper halves apart with x split to match, ran 5-50% slower on the H200:
    benchmarks/RESULTS.md, eighth session.)"""
    r, g, wpb = words.shape
    sp = jnp.broadcast_to(prmt_decode.half_pair(scale, dtype)[:, :, None], words.shape)
    half = lambda v: jax.lax.bitcast_convert_type(v.astype(jnp.uint16), dtype)  # noqa: E731
    tiles = []
    for p in prmt_decode.decode_words(words, quant_type, interpret=interpret, dtype=dtype, scale_pairs=sp):
        tiles.append(jnp.stack([half(p), half(p >> 16)], axis=-1).reshape(r, g * wpb * 2))
    return tiles


def _fwd_kernel(x_ref, p_ref, a_ref, na_ref, nc_ref, off_ref, o_ref, *, bn, g, steps, split, nb, dq, quant_type,
                dtype, interpret):
    """Program (i, s): ``o[s, :, rows_i] = (W[rows_i, K_s] @ x[:, K_s].T).T`` (x in permuted planes
    ``x_ref [4, K/4, Mp]``)."""
    i, s = pl.program_id(0), pl.program_id(1)
    lo_b = (s * nb) // split
    hi_b = ((s + 1) * nb) // split
    rows = pl.ds(i * bn, bn)
    kc = g * p_ref.shape[2] * 2  # columns per plane and step

    def body(c, acc):
        blocks, scale = k_step(c, lo_b, hi_b, g, rows, (a_ref, na_ref, nc_ref, off_ref), nb, dq)  # [bn, g]
        tiles = _operand_tiles(p_ref[rows, blocks, :], scale, quant_type, dtype, interpret)
        cols = pl.ds(blocks.start * (kc // g), kc)
        for t, w in enumerate(tiles):
            acc += jnp.dot(w, x_ref[t, cols, :], preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, x_ref.shape[2]), jnp.float32))
    o_ref[0, :, :] = acc.T


def _bwd_kernel(dy_ref, p_ref, a_ref, na_ref, nc_ref, off_ref, o_ref, *, bn, g, steps, split, n, nb, dq,
                quant_type, dtype, interpret):
    """Program (j, s): ``o[s, t, cols_j, :] = W_t[N_s, cols_j].T @ dy.T[N_s]`` (permuted column planes)."""
    j, s = pl.program_id(0), pl.program_id(1)
    blocks = pl.ds(j * g, g)
    lo_r = (s * n) // split
    hi_r = ((s + 1) * n) // split
    kc = g * p_ref.shape[2] * 2

    def body(c, accs):
        rows, fresh = slice_step(c, lo_r, hi_r, bn)
        scale = jnp.where(fresh[:, None], tile_scales((a_ref, na_ref, nc_ref, off_ref), rows, blocks, nb, dq), 0.0)
        tiles = _operand_tiles(p_ref[rows, blocks, :], scale, quant_type, dtype, interpret)
        d = dy_ref[rows, :]  # [bn, Mp]
        return tuple(acc + jnp.dot(w.T, d, preferred_element_type=jnp.float32) for acc, w in zip(accs, tiles))

    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((kc, dy_ref.shape[1]), jnp.float32) for _ in range(4)))
    for t in range(4):
        o_ref[0, t, :, :] = accs[t]


def _weight_operands(w: QuantizedTensor):
    """(words ``[N, NB, wpb]`` uint32, scales ``[N, NB]``, nested_absmax, nested_code, offset), and
    whether the scales are double-quant codes to decode in the kernel."""
    n, k = w.shape
    nb, wpb = k // w.blocksize, w.blocksize // 8
    words = jax.lax.bitcast_convert_type(w.packed.reshape(n, nb, wpb, 4), jnp.uint32)
    scales, extra, dq = scale_operands(w, in_kernel=True)
    return (words, scales.reshape(n, nb), *extra), dq


def _pad_rows(a2: jax.Array) -> jax.Array:
    m = a2.shape[0]
    return jnp.pad(a2, ((0, max(MIN_DOT, -(-m // MIN_DOT) * MIN_DOT) - m), (0, 0)))


def _validate(name: str, a: jax.Array, w: QuantizedTensor, dim: int) -> int:
    if jnp.dtype(a.dtype).name not in prmt_decode.HALF_DTYPES:
        raise NotImplementedError(f"{name}: the small-M 4-bit kernels run in bfloat16 or float16, "
                                  f"not {jnp.dtype(a.dtype).name}")
    return operand_rows(name, a, w, dim, supports)


def _dot_blocks(blocksize: int) -> int:
    """The fewest quantization blocks, a power of two, whose plane operand has at least ``MIN_DOT`` columns
    (``blocksize / 4`` per block): a loop step's (forward) or a program's (gradient) smallest group."""
    return pow2_at_least(-(-MIN_DOT // (blocksize // 4)))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nf4_matmul_small_m(x: jax.Array, w: QuantizedTensor, *, config: SmallMConfig = DEFAULT_CONFIG,
                       interpret: bool = False) -> jax.Array:
    """``x [..., K] @ dequant(w [N, K]).T -> [..., N]`` in ``x.dtype`` (bf16 / fp16); M = prod(...) <= 64;
    fp32 accumulation."""
    m = _validate("nf4_matmul_small_m", x, w, 1)
    n, k = w.shape
    nb = k // w.blocksize
    gmin = _dot_blocks(w.blocksize)
    split = max(1, min(config.split, nb // gmin))
    g = max(gmin, min(pow2_at_most(config.blocks_per_step), pow2_at_most(nb // split)))
    steps = -(-(-(-nb // split)) // g)  # ceil(ceil(nb / split) / g)
    bn = pow2_divisor(n, max(config.block_n, MIN_DOT))
    xp = jnp.moveaxis(permute_columns(_pad_rows(x.reshape(m, k)), w.blocksize), 0, -1)  # [4, K/4, Mp]
    mp = xp.shape[2]
    operands, dq = _weight_operands(w)
    kernel = functools.partial(_fwd_kernel, bn=bn, g=g, steps=steps, split=split, nb=nb, dq=dq,
                               quant_type=w.quant_type, dtype=jnp.dtype(x.dtype).name, interpret=interpret)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, mp, n), jnp.float32),
        grid=(n // bn, split),
        in_specs=[pl.no_block_spec] * (1 + len(operands)),
        out_specs=pl.BlockSpec((1, mp, bn), lambda i, s: (s, 0, i)),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="nf4_matmul_small_m",
    )(xp, *operands)
    return partial.sum(0)[:m].astype(x.dtype).reshape(*x.shape[:-1], n)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nf4_matmul_t_small_m(dy: jax.Array, w: QuantizedTensor, *, config: SmallMConfig = DEFAULT_T_CONFIG,
                         interpret: bool = False) -> jax.Array:
    """``dy [..., N] @ dequant(w [N, K]) -> [..., K]`` in ``dy.dtype`` (bf16 / fp16); M = prod(...) <= 64;
    fp32 accumulation."""
    m = _validate("nf4_matmul_t_small_m", dy, w, 0)
    n, k = w.shape
    nb = k // w.blocksize
    g = pow2_divisor(nb, max(config.blocks_per_step, _dot_blocks(w.blocksize)))  # >= _dot_blocks: supports()
    bn = pow2_divisor(n, max(config.block_n, MIN_DOT))
    split = max(1, min(config.split, n // bn))
    steps = -(-(-(-n // split)) // bn)
    dyt = _pad_rows(dy.reshape(m, n)).T  # [N, Mp]
    mp = dyt.shape[1]
    kc = g * w.blocksize // 4
    operands, dq = _weight_operands(w)
    kernel = functools.partial(_bwd_kernel, bn=bn, g=g, steps=steps, split=split, n=n, nb=nb, dq=dq,
                               quant_type=w.quant_type, dtype=jnp.dtype(dy.dtype).name, interpret=interpret)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, 4, k // 4, mp), jnp.float32),
        grid=(nb // g, split),
        in_specs=[pl.no_block_spec] * (1 + len(operands)),
        out_specs=pl.BlockSpec((1, 4, kc, mp), lambda j, s: (s, 0, j, 0)),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="nf4_matmul_t_small_m",
    )(dyt, *operands)
    dx = unpermute_columns(jnp.moveaxis(partial.sum(0), -1, 0), w.blocksize)  # [Mp, K]
    return dx[:m].astype(dy.dtype).reshape(*dy.shape[:-1], k)
