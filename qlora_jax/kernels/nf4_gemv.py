"""4-bit GEMV kernels for M <= 8 rows (token-by-token decoding), Pallas/Triton, built for bandwidth.

Layout (bitsandbytes'): ``W [N, K]`` with ``K % blocksize == 0`` is stored row-major as
``packed`` uint8 ``[N*K/2]``; byte ``j`` of a row holds ``W[n, 2j]`` in the high nibble and
``W[n, 2j+1]`` in the low nibble. The kernels view it as ``[N, NB, hb]`` bytes with
``NB = K / blocksize`` quantization blocks per row and ``hb = blocksize / 2`` bytes per block
(32 for blocksize 64), and the block scales as ``[N, NB]`` (fp32, or uint8 codes when
double-quantized: ``nested_code[q] * nested_absmax[(n*NB + b) // 256] + nested_offset``).

Why this shape of program: the earlier small-M kernels (``nf4_matmul_small_m.py``) load
``[block_n, 32*g]`` tiles with g = 1..4 (32-128 bytes per row and step) and use ``tl.dot``;
they stream at 100-200 GB/s, bounded by load-issue latency, not by HBM. Here every loop step
loads a ``[block_n, blocks_per_step, hb]`` byte tile, i.e. ``blocks_per_step * hb`` contiguous
bytes per row (256-1024 for 8-32 blocks; the offsets are multiples of 32, so Triton can give each
thread 16-byte loads), and the reduction is an elementwise fp32 multiply-add per row of x, summed
either every step or once after the loop (``GemvConfig.reduce``; no ``tl.dot``: M is tiny).
Split-K (forward) and split-N (input gradient) keep enough programs in flight; XLA sums the
fp32 partials. The activations are split into even and odd columns ``[Mp, NB, hb]`` by one small
XLA op (contiguous, vectorizable loads in the kernel), or read in place with stride 2
(``GemvConfig.x_layout``); rows are zero-padded to a power of two Mp.

Decode, per byte: ``code[b >> 4]`` and ``code[b & 15]`` gathered from the 16-entry fp32
codebook (``decode="gather16"``), or one gather from a 256-entry uint32 table of byte ->
``(bf16(code[hi]) << 16 | bf16(code[lo]))`` whose halves become fp32 by a shift and a bitcast
(``decode="pair256"``: half the gathers; the code values are rounded to bf16, a relative error
of at most 2^-9 per weight, the same order as the reference's own bf16 rounding of W).
The block scale multiplies the decoded values as a ``[block_n, blocks_per_step, 1]`` broadcast;
everything after the gather is fp32.

``decode="prmt"`` (forward only; the input gradient falls back to ``"pair256"``) reads the codes
as uint32 words ``[N, NB, hb/4]`` and decodes each word into four bf16 pairs in registers with PTX
byte permutes (``prmt_decode.py``: no gathers, no table in memory); x comes as four planes per
parity ``[Mp, 4, NB, hb/4]`` (plane ``t`` = the columns of byte ``t`` of each word), and the block
scale multiplies each block's partial sum once instead of every weight.

``decode="prmt_f16x2"`` (forward only) decodes the words into fp16 pairs instead and
multiplies them by x's fp16 pairs with packed fp16x2 FMAs (``prmt_decode.dot_pairs``: four
instructions for a word's 8 products, instead of 8 FMAs plus 8 bf16 -> fp32 conversions of the
weights and 8 of x); each word's two fp16 partial sums go to fp32, and fp32 from there on. x enters
as one plane of fp16 pairs per byte position, each row scaled by a power of two into [-1, 1]
first (undone on the output), so no fp16 product or 4-term sum can overflow. The ncu profile of the
fp32-FMA kernel (``"prmt"``) showed it bound by instruction issue (0.74 warp instructions per cycle
per scheduler, 19% of DRAM bandwidth), so this variant cuts instructions per weight.

``decode="prmt_bf16x2"`` (forward only) is the same with bf16 pairs and ``fma.rn.bf16x2``: x needs no
scaling (bf16 has fp32's range), so no row reduction runs before the kernel; x's layout
(``GemvConfig.x_layout``): ``"split"``, one XLA layout pass into the planes above; ``"strided"`` /
``"pairs"``, none: the kernel reads x's bf16 pairs as they lie in memory (``[Mp, NB, hb/4, 4]`` uint32, a
free reshape) with stride 4 per byte position, or contiguously and splits them on chip (through shared
memory), and decodes each word with the even column in the lower half to match. Each word's two
4-product partial sums are rounded to bf16 (8 bits of mantissa) before fp32. ``decode="auto"`` (the
default): ``"prmt_bf16x2"`` for bf16 activations, ``"prmt_f16x2"`` otherwise.

* forward ``y [M, N] = x [M, K] @ W.T``: program ``(i, s)`` owns rows ``i*block_n ..`` and the
  ``s``-th of ``split`` K slices; partials ``[split, Mp, N]`` fp32 (``split == 1``: the output
  in ``x.dtype`` directly, no XLA epilogue).
* input gradient ``dx [M, K] = dy [M, N] @ W``: program ``(j, s)`` owns quantization blocks
  ``j*blocks_per_step ..`` of K and the ``s``-th of ``split`` N slices, looping over ``block_n``
  rows at a time; partials ``[split, Mp, NB, hb, 2]`` (even / odd columns; a free reshape of
  ``[split, Mp, K]``).

K slices (forward) and N slices (gradient) need not divide evenly into steps: the last step of
a slice is moved back so it stays inside the slice and the blocks / rows already counted get
a zero weight (no masked loads, no reads out of bounds).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
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
from qlora_jax.nf4 import QuantizedTensor, codebook

MAX_M = 8
DECODES = ("auto", "gather16", "pair256", "prmt", "prmt_f16x2", "prmt_bf16x2")
REGISTER_DECODES = ("prmt", "prmt_f16x2", "prmt_bf16x2")  # forward only; the input gradient uses "pair256"
PAIR_DECODES = {"prmt_f16x2": "float16", "prmt_bf16x2": "bfloat16"}  # packed-FMA decodes -> their half dtype


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tile sizes and variants.

    ``block_n``: rows of W per program (forward) or per loop step (gradient); rounded down to a
    power of two dividing N (forward). ``blocks_per_step``: quantization blocks per row and loop
    step (forward; ``* blocksize/2`` contiguous bytes per row) or owned by one program (gradient;
    rounded down to a power of two dividing K/blocksize). ``split``: K slices (forward; 0, the default:
    :func:`auto_split`) or N slices (gradient; 0: ``DEFAULT_T_CONFIG``'s 8). ``decode``: ``"auto"``
    (``"prmt_bf16x2"`` for bf16 x, else ``"prmt_f16x2"``), ``"prmt_bf16x2"``, ``"prmt_f16x2"`` or ``"prmt"``
    (register decodes, forward; the input gradient uses ``"pair256"``), ``"gather16"`` or ``"pair256"``
    (module docstring).
    ``scales_in_kernel``: decode double-quantized scales in the kernel (else one small XLA op
    makes fp32 ``[N, NB]`` scales first: 4 extra bytes read per 32 code bytes).
    ``reduce``: ``"end"`` keeps one elementwise fp32 accumulator per row of x the size of the byte
    tile (the word tile for the register decodes) and reduces it once after the loop (no shuffles /
    shared-memory reductions in the loop, but ``M * tile`` registers); ``"step"`` reduces every step
    into ``[block_n]`` (forward) or ``[blocks_per_step, hb]`` (gradient) accumulators; ``"auto"`` (the
    default) picks ``"end"`` for a register decode's forward with one row of x, else ``"step"`` (what
    the H200 measurements favour, below).
    ``x_layout`` (forward): ``"split"`` de-interleaves x into even / odd columns (the register decodes:
    into per-byte-position planes) with one small XLA op first, so the kernel's activation loads are
    contiguous (vectorizable); ``"strided"`` reads x in place with stride 2 (the gather decodes: scalar
    loads, one per weight and row of x) or 4 (``"prmt_bf16x2"``: one per code word and row of x);
    ``"pairs"`` (``"prmt_bf16x2"`` only) reads x in place contiguously and splits the byte positions on
    chip. ``"prmt"`` and ``"prmt_f16x2"`` always take the XLA op's planes. ``"auto"`` (the default):
    ``"pairs"`` for ``"prmt_bf16x2"``, else ``"split"``.
    ``num_warps`` / ``num_stages``: Triton's.
    """

    block_n: int = 16
    blocks_per_step: int = 8
    # 0: auto, powers of two giving about AUTO_SPLIT_PROGRAMS programs (H200, tenth session: 2-7% faster than 4
    # K slices on three of the four joined 7B decode shapes at M = 1, the same on 4096x12288)
    split: int = 0
    # register decode + packed FMAs: fp16x2 at M = 1 1.2-1.3x faster than "prmt" (fp32 FMAs) and 1.6-1.9x than
    # "gather16" on the three LLaMA shapes; at M = 8 1.6-1.9x faster than "prmt" (H200 profiles, RESULTS.md)
    decode: str = "auto"
    scales_in_kernel: bool = True
    # "auto": "end" for the register decodes at Mp = 1 (H200, sixth session: 5-10% faster on three of the four
    # joined 7B shapes, 1.5% slower on 11008x4096) and "step" otherwise ("end" 2-8% slower at M = 8; "step"
    # fastest for the gather decodes at M = 1, second session's sweep). benchmarks/RESULTS.md.
    reduce: str = "auto"
    # "auto": "pairs" for "prmt_bf16x2" (H200, tenth session: 3-10% faster per call than its XLA planes, 1.1-1.4x
    # faster than "strided"; 7B batch-1 decoding 2.76 / 2.80 / 3.32 ms per token), "split" for the other decodes
    x_layout: str = "auto"
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = GemvConfig()
DEFAULT_T_CONFIG = GemvConfig(block_n=16, blocks_per_step=4, split=8, decode="gather16")


def supports(w: QuantizedTensor, m: int) -> str | None:
    """``None`` if the GEMV kernels handle this weight and row count, else the reason."""
    return kernel_support(w, m, MAX_M)


@functools.cache
def pair_table(quant_type: str) -> np.ndarray:
    """uint32 ``[256]``: byte ``b`` -> ``bf16(code[b >> 4]) << 16 | bf16(code[b & 15])`` (bit patterns)."""
    bits = prmt_decode.bf16_code_bits(quant_type)
    b = np.arange(256)
    return ((bits[b >> 4] << 16) | bits[b & 15]).astype(np.uint32)


def _decode(tile, table_ref, decode: str):
    """uint8 tile -> (high-nibble values, low-nibble values), fp32, unscaled."""
    b = tile.astype(jnp.int32)
    if decode == "gather16":
        return table_ref[b >> 4], table_ref[b & 0xF]
    v = table_ref[b]  # uint32 pair
    return prmt_decode.upper_f32(v), prmt_decode.lower_f32(v)


def _fwd_kernel(xe_ref, xo_ref, p_ref, a_ref, na_ref, nc_ref, off_ref, t_ref, o_ref, *,
                bn, g, steps, split, nb, mp, dq_in_kernel, decode, reduce_at_end, x_strided):
    """Program (i, s): ``o[s, :, rows_i] = sum over K_s of W[rows_i, K_s] * x[:, K_s]``.

    ``x_strided``: ``xe_ref`` and ``xo_ref`` are both x ``[Mp, NB, hb, 2]`` (a free reshape of
    ``[Mp, K]``; ``[..., 0]`` even columns, ``[..., 1]`` odd, read with stride 2); else they are the
    even and odd columns ``[Mp, NB, hb]``, contiguous.
    """
    i, s = pl.program_id(0), pl.program_id(1)
    row0 = i * bn
    lo_b = (s * nb) // split
    hi_b = ((s + 1) * nb) // split
    rows = pl.ds(row0, bn)

    def body(c, accs):
        blocks, scale = k_step(c, lo_b, hi_b, g, rows, (a_ref, na_ref, nc_ref, off_ref), nb, dq_in_kernel)
        scale = scale[:, :, None]  # [bn, g, 1]
        hi, lo = _decode(p_ref[rows, blocks, :], t_ref, decode)  # [bn, g, hb] each
        whi, wlo = hi * scale, lo * scale
        out = []
        for m in range(mp):
            if x_strided:
                xe, xo = xe_ref[m, blocks, :, 0], xo_ref[m, blocks, :, 1]
            else:
                xe, xo = xe_ref[m, blocks, :], xo_ref[m, blocks, :]
            xe = xe.astype(jnp.float32)[None]  # [1, g, hb]
            xo = xo.astype(jnp.float32)[None]
            prod = whi * xe + wlo * xo
            if not reduce_at_end:
                # one axis at a time: Triton reduces one axis per op anyway, and a multi-axis
                # reduce trips a sharding check when lowered under an abstract mesh
                prod = jnp.sum(jnp.sum(prod, axis=2), axis=1)
            out.append(accs[m] + prod)
        return tuple(out)

    acc_shape = (bn, g, p_ref.shape[2]) if reduce_at_end else (bn,)
    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(mp)))
    for m in range(mp):
        acc = jnp.sum(jnp.sum(accs[m], axis=2), axis=1) if reduce_at_end else accs[m]
        o_ref[0, m, :] = acc.astype(o_ref.dtype)


def _fwd_kernel_words(*refs, bn, g, steps, split, nb, mp, dq_in_kernel, quant_type, interpret, half,
                      reduce_at_end=False, natural_x=None):
    """The register decodes: as :func:`_fwd_kernel`, on uint32 words ``p_ref [N, NB, hb/4]``.

    ``decode="prmt"`` (``half=None``): ``refs[:2]`` are x planes ``xe / xo [Mp, 4, NB, hb/4]`` (even /
    odd columns of byte ``t`` of each word); the bf16-rounded codes times x in fp32 FMAs.
    ``decode="prmt_f16x2"`` / ``"prmt_bf16x2"`` (``half`` = ``"float16"`` / ``"bfloat16"``): ``refs[0]`` is
    ``xp [Mp, 4, NB, hb/4]`` uint32, the ``half`` pair (even column upper, odd lower) of byte ``t`` of each
    word (fp16: of x scaled into [-1, 1]); codes rounded to ``half`` times those pairs in packed FMAs, fp32
    from each word's 8-product sums on. ``natural_x`` (``"strided"`` / ``"pairs"``, bf16): ``refs[0]`` is x
    itself as uint32 pairs ``[Mp, NB, hb/4, 4]`` (pair ``t`` of word ``w``: columns ``8w + 2t`` in the lower
    half, ``+ 1`` in the upper), read with stride 4 per byte position, or contiguously and split on chip;
    the decode puts the even column lower to match.
    ``reduce_at_end``: accumulate ``scale * (word sums)`` elementwise in a ``[bn, g, hb/4]`` fp32 tile per
    row of x and reduce it once after the loop, instead of reducing every step.
    """
    x_refs, (p_ref, a_ref, na_ref, nc_ref, off_ref, o_ref) = refs[:len(refs) - 6], refs[len(refs) - 6:]
    i, s = pl.program_id(0), pl.program_id(1)
    lo_b = (s * nb) // split
    hi_b = ((s + 1) * nb) // split
    rows = pl.ds(i * bn, bn)

    def body(c, accs):
        blocks, scale = k_step(c, lo_b, hi_b, g, rows, (a_ref, na_ref, nc_ref, off_ref), nb, dq_in_kernel)  # [bn, g]
        pairs = prmt_decode.decode_words(p_ref[rows, blocks, :], quant_type, interpret=interpret,
                                         dtype=half or "bfloat16", even_upper=not natural_x)  # 4 x [bn, g, hb/4]
        if not half:
            halves = [(prmt_decode.upper_f32(p), prmt_decode.lower_f32(p)) for p in pairs]
        out = []
        for m in range(mp):
            if half:  # x's pairs of byte position t, [g, hb/4] each, broadcast over the rows
                if natural_x == "strided":  # every 4th uint32 of x (x stays in L1)
                    xp = [x_refs[0][m, blocks, :, t] for t in range(4)]
                elif natural_x == "pairs":  # [g, hb/4, 4] contiguous, split into the 4 byte positions on chip
                    xw = x_refs[0][m, blocks, :, :]
                    xp = [p.reshape(xw.shape[:2]) for p in jnp.split(xw, 4, axis=-1)]
                else:  # XLA's planes
                    xp = [x_refs[0][m, t, blocks, :] for t in range(4)]
                xp = [jnp.broadcast_to(p[None], pairs[0].shape) for p in xp]
                prod = prmt_decode.dot_pairs(pairs, xp, dtype=half, interpret=interpret)
            else:
                prod = None
                for t, (whi, wlo) in enumerate(halves):
                    xe = x_refs[0][m, t, blocks, :].astype(jnp.float32)[None]  # [1, g, hb/4]
                    xo = x_refs[1][m, t, blocks, :].astype(jnp.float32)[None]
                    term = whi * xe + wlo * xo
                    prod = term if prod is None else prod + term
            if reduce_at_end:
                out.append(accs[m] + prod * scale[:, :, None])
            else:
                out.append(accs[m] + jnp.sum(jnp.sum(prod, axis=2) * scale, axis=1))
        return tuple(out)

    acc_shape = (bn, g, p_ref.shape[2]) if reduce_at_end else (bn,)
    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(mp)))
    for m in range(mp):
        acc = jnp.sum(jnp.sum(accs[m], axis=2), axis=1) if reduce_at_end else accs[m]
        o_ref[0, m, :] = acc.astype(o_ref.dtype)


def pair_planes(x2: jax.Array, blocksize: int, half: str) -> tuple[jax.Array, jax.Array | None]:
    """``x2 [Mp, K]`` -> (uint32 ``[Mp, 4, NB, hb/4]`` ``half`` pairs (plane ``t``: the columns of byte ``t``
    of each code word; even column in the upper half), and fp32 ``scale [Mp]`` or None).

    ``half="float16"``: pairs of ``x2 / scale``, ``scale`` the power of two at or above each row's largest
    magnitude (1 for a zero row), so the scaled row lies in [-1, 1] (fp16's range holds any bf16 activation
    after it) and is exact to fp16 except where it falls below fp16's normal range (2^-14 of the row's
    maximum). ``half="bfloat16"``: x rounded to bf16 as it is, no scale (one layout pass).
    """
    mp, k = x2.shape
    nb, hb = k // blocksize, blocksize // 2
    scale = None
    if half == "float16":
        xf = x2.astype(jnp.float32)
        amax = jnp.max(jnp.abs(xf), axis=1)
        _, e = jnp.frexp(amax)  # amax = f * 2^e, f in [0.5, 1): 2^e >= amax
        scale = jnp.where(amax > 0, jnp.ldexp(jnp.ones_like(amax), e), 1.0)
        x2 = xf / scale[:, None]
    bits = jax.lax.bitcast_convert_type(x2.astype(half), jnp.uint16).astype(jnp.uint32)
    pairs = (bits[:, 0::2] << 16) | bits[:, 1::2]  # [Mp, K/2]
    return pairs.reshape(mp, nb, hb // 4, 4).transpose(0, 3, 1, 2), scale


def _bwd_kernel(dy_ref, p_ref, a_ref, na_ref, nc_ref, off_ref, t_ref, o_ref, *,
                bn, g, steps, split, n, nb, mp, dq_in_kernel, decode, reduce_at_end):
    """Program (j, s): ``o[s, :, blocks_j, :, 0 / 1] = sum over N_s of dy[:, N_s] * W[N_s, blocks_j]``
    for the even / odd columns (``o [split, Mp, NB, hb, 2]`` is a free reshape of ``[split, Mp, K]``)."""
    j, s = pl.program_id(0), pl.program_id(1)
    blocks = pl.ds(j * g, g)
    lo_r = (s * n) // split
    hi_r = ((s + 1) * n) // split

    def body(c, accs):
        rows, fresh = slice_step(c, lo_r, hi_r, bn)
        scale = tile_scales((a_ref, na_ref, nc_ref, off_ref), rows, blocks, nb, dq_in_kernel)
        scale = jnp.where(fresh[:, None], scale, 0.0)[:, :, None]  # [bn, g, 1]
        hi, lo = _decode(p_ref[rows, blocks, :], t_ref, decode)
        whi, wlo = hi * scale, lo * scale
        out = []
        for m in range(mp):
            d = dy_ref[m, rows].astype(jnp.float32)[:, None, None]  # [bn, 1, 1]
            pe, po = whi * d, wlo * d
            if not reduce_at_end:  # reduce over the rows every step (crosses warps)
                pe, po = jnp.sum(pe, axis=0), jnp.sum(po, axis=0)
            out += [accs[2 * m] + pe, accs[2 * m + 1] + po]
        return tuple(out)

    hb = p_ref.shape[2]
    acc_shape = (bn, g, hb) if reduce_at_end else (g, hb)
    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(2 * mp)))
    for m in range(mp):
        e, o = accs[2 * m], accs[2 * m + 1]
        if reduce_at_end:
            e, o = jnp.sum(e, axis=0), jnp.sum(o, axis=0)
        o_ref[0, m, :, :, 0] = e.astype(o_ref.dtype)
        o_ref[0, m, :, :, 1] = o.astype(o_ref.dtype)


AUTO_SPLIT_PROGRAMS = 2560


def auto_split(row_tiles: int) -> int:
    """K slices for ``split=0``: the power of two (1-8) nearest, in ratio, to ``AUTO_SPLIT_PROGRAMS / row_tiles``
    (H200 sweep, tenth session: 7B's joined decode shapes ran fastest at 2,000-3,000 programs: 4096x22016
    with 2 slices, 4096x12288 with 4, 11008x4096 and 4096x4096 with 8)."""
    return int(min(8, max(1, 2 ** round(np.log2(AUTO_SPLIT_PROGRAMS / row_tiles)))))


def resolve_decode(config: GemvConfig, dtype) -> GemvConfig:
    """``decode="auto"`` -> ``"prmt_bf16x2"`` for bf16 activations (x read as it is), ``"prmt_f16x2"`` for the
    others (fp16 products of x scaled into [-1, 1]) and on GPUs older than Ampere (no bf16x2 FMAs);
    ``x_layout="auto"`` -> ``"pairs"`` for ``"prmt_bf16x2"``, else ``"split"``."""
    if config.decode == "auto":
        bf16 = jnp.dtype(dtype) == jnp.bfloat16 and prmt_decode.bf16x2_supported()
        config = dataclasses.replace(config, decode="prmt_bf16x2" if bf16 else "prmt_f16x2")
    if config.x_layout == "auto":
        config = dataclasses.replace(config, x_layout="pairs" if config.decode == "prmt_bf16x2" else "split")
    return config


def _reduce_at_end(config: GemvConfig, mp: int, direction: str = "fwd") -> bool:
    if config.reduce not in ("auto", "end", "step"):
        raise ValueError(f"reduce={config.reduce!r} is not one of ('auto', 'end', 'step')")
    if config.reduce == "auto":
        return direction == "fwd" and config.decode in REGISTER_DECODES and mp == 1
    return config.reduce == "end"


def _weight_operands(w: QuantizedTensor, config: GemvConfig):
    """(packed [N, NB, hb] u8, scales [N, NB], nested_absmax, nested_code, offset [1], table),
    and whether the scales are double-quant codes to decode in the kernel. ``decode="prmt"``: the
    codes as uint32 words ``[N, NB, hb/4]`` and no table."""
    n, k = w.shape
    nb, hb = k // w.blocksize, w.blocksize // 2
    packed = w.packed.reshape(n, nb, hb)
    scales, extra, dq_in_kernel = scale_operands(w, config.scales_in_kernel)
    absmax = scales.reshape(n, nb)
    if config.decode in REGISTER_DECODES:
        if hb % 4:
            raise ValueError(f"decode={config.decode!r} needs blocksize % 8 == 0, got {w.blocksize}")
        words = jax.lax.bitcast_convert_type(packed.reshape(n, nb, hb // 4, 4), jnp.uint32)
        return (words, absmax, *extra), dq_in_kernel
    if config.decode == "gather16":
        table = jnp.asarray(codebook(w.quant_type))
    elif config.decode == "pair256":
        table = jnp.asarray(pair_table(w.quant_type))
    else:
        raise ValueError(f"decode={config.decode!r} is not one of {DECODES}")
    return (packed, absmax, *extra, table), dq_in_kernel


def _validate(name: str, a: jax.Array, w: QuantizedTensor, dim: int) -> int:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating operand, got {a.dtype}")
    return operand_rows(name, a, w, dim, supports)


def _pad_m(a2: jax.Array) -> jax.Array:
    m = a2.shape[0]
    return jnp.pad(a2, ((0, pow2_at_least(m) - m), (0, 0)))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nf4_gemv(x: jax.Array, w: QuantizedTensor, *, config: GemvConfig = DEFAULT_CONFIG,
             interpret: bool = False) -> jax.Array:
    """``x [..., K] @ dequant(w [N, K]).T -> [..., N]`` in ``x.dtype``; M = prod(...) <= 8.

    fp32 accumulation; with a packed-FMA decode (the default) each code word's 8 products are summed in
    fp16 / bf16 first (``GemvConfig.decode``).
    """
    m = _validate("nf4_gemv", x, w, 1)
    config = resolve_decode(config, x.dtype)
    if config.x_layout not in ("split", "strided", "pairs") or (
            config.x_layout == "pairs" and config.decode != "prmt_bf16x2"):
        raise ValueError(f"x_layout={config.x_layout!r}: 'split' or 'strided' (any decode), or 'pairs' "
                         f"(decode 'prmt_bf16x2'); decode is {config.decode!r}")
    if config.decode in REGISTER_DECODES and not interpret and prmt_decode.rocm_backend():
        # the same bf16-rounded codes, by table (x de-interleaved by XLA where the register decode read it in place)
        config = dataclasses.replace(config, decode="pair256",
                                     x_layout="split" if config.x_layout == "pairs" else config.x_layout)
    n, k = w.shape
    nb, hb = k // w.blocksize, w.blocksize // 2
    x2 = _pad_m(x.reshape(m, k))
    mp = x2.shape[0]
    bn = pow2_divisor(n, config.block_n)
    split = max(1, min(config.split or auto_split(n // bn), nb))
    g = min(pow2_at_most(config.blocks_per_step), pow2_at_most(nb // split))
    steps = -(-(-(-nb // split)) // g)  # ceil(ceil(nb / split) / g)
    operands, dq = _weight_operands(w, config)
    x_scale = None
    natural_x = None
    if config.decode == "prmt_bf16x2" and config.x_layout in ("strided", "pairs"):
        # x as it is: its bf16 pairs, a free reshape (no XLA op before the kernel)
        pairs = jax.lax.bitcast_convert_type(x2.astype(jnp.bfloat16).reshape(mp, k // 2, 2), jnp.uint32)
        xs, natural_x = (pairs.reshape(mp, nb, hb // 4, 4),), config.x_layout
    elif config.decode in PAIR_DECODES:
        xp, x_scale = pair_planes(x2, w.blocksize, PAIR_DECODES[config.decode])
        xs = (xp,)
    elif config.decode == "prmt":
        planes = lambda half: half.reshape(mp, nb, hb // 4, 4).transpose(0, 3, 1, 2)  # [Mp, 4, NB, hb/4]
        xs = (planes(x2[:, 0::2]), planes(x2[:, 1::2]))
    if config.decode in REGISTER_DECODES:
        kernel = functools.partial(_fwd_kernel_words, bn=bn, g=g, steps=steps, split=split, nb=nb, mp=mp,
                                   dq_in_kernel=dq, quant_type=w.quant_type, interpret=interpret,
                                   half=PAIR_DECODES.get(config.decode),
                                   natural_x=natural_x,
                                   reduce_at_end=_reduce_at_end(config, mp))
    else:
        if config.x_layout == "strided":
            x4 = x2.reshape(mp, nb, hb, 2)
            xs = (x4, x4)
        elif config.x_layout == "split":
            xs = (x2[:, 0::2].reshape(mp, nb, hb), x2[:, 1::2].reshape(mp, nb, hb))
        else:
            raise AssertionError(config.x_layout)  # ruled out above
        kernel = functools.partial(_fwd_kernel, bn=bn, g=g, steps=steps, split=split, nb=nb, mp=mp,
                                   dq_in_kernel=dq, decode=config.decode, x_strided=config.x_layout == "strided",
                                   reduce_at_end=_reduce_at_end(config, mp))
    # one K slice: write x.dtype directly (no XLA epilogue); else fp32 partials summed by XLA. fp32 also
    # when x was scaled: the power of two that undoes it may lie outside x.dtype's range (fp16: 2^16)
    out_dtype = x.dtype if split == 1 and x_scale is None else jnp.float32
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, mp, n), out_dtype),
        grid=(n // bn, split),
        in_specs=[pl.no_block_spec] * (len(xs) + len(operands)),
        out_specs=pl.BlockSpec((1, mp, bn), lambda i, s: (s, 0, i)),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="nf4_gemv",
    )(*xs, *operands)
    y = partial[0] if split == 1 else partial.sum(0)
    if x_scale is not None:
        y = y * x_scale[:, None]  # a power of two: exact
    return y[:m].astype(x.dtype).reshape(*x.shape[:-1], n)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nf4_gemv_t(dy: jax.Array, w: QuantizedTensor, *, config: GemvConfig = DEFAULT_T_CONFIG,
               interpret: bool = False) -> jax.Array:
    """``dy [..., N] @ dequant(w [N, K]) -> [..., K]`` in ``dy.dtype``; M = prod(...) <= 8."""
    m = _validate("nf4_gemv_t", dy, w, 0)
    if config.decode in ("auto", *REGISTER_DECODES):  # the register decodes are forward-only; bf16-rounded codes
        config = dataclasses.replace(config, decode="pair256")
    n, k = w.shape
    nb, hb = k // w.blocksize, w.blocksize // 2
    dy2 = _pad_m(dy.reshape(m, n))
    mp = dy2.shape[0]
    g = pow2_divisor(nb, config.blocks_per_step)
    split = max(1, min(config.split or DEFAULT_T_CONFIG.split, n))
    bn = min(pow2_at_most(config.block_n), pow2_at_most(n // split))
    steps = -(-(-(-n // split)) // bn)
    operands, dq = _weight_operands(w, config)
    kernel = functools.partial(_bwd_kernel, bn=bn, g=g, steps=steps, split=split, n=n, nb=nb, mp=mp,
                               dq_in_kernel=dq, decode=config.decode,
                               reduce_at_end=_reduce_at_end(config, 2 * mp, "t"))
    out_dtype = dy.dtype if split == 1 else jnp.float32
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, mp, nb, hb, 2), out_dtype),
        grid=(nb // g, split),
        in_specs=[pl.no_block_spec] * 7,
        out_specs=pl.BlockSpec((1, mp, g, hb, 2), lambda j, s: (s, 0, j, 0, 0)),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="nf4_gemv_t",
    )(dy2, *operands)
    dx = (partial[0] if split == 1 else partial.sum(0)).reshape(mp, k)
    return dx[:m].astype(dy.dtype).reshape(*dy.shape[:-1], k)
