"""Attention of one new token per sequence over the KV cache (decoding): one Pallas/Triton kernel.

XLA ran a decode step's attention as five kernels per layer on a GPU (scores, masked max, exp-sum,
weighted values, their sum; ~12 us of the ~45 us of small kernels per 7B layer on an H200,
``benchmarks/RESULTS.md``, ninth session). Here one program per (batch row, KV head, slice of slots)
reads its keys and values once and keeps the scores, an online softmax (flash attention's running
max and sum) and the weighted sum of values in registers, fp32; XLA combines the slices' partial
results (one small fusion; none with one slice).

Shapes: ``q [B, H, D]`` (one query per row, rotary applied); the cache ``k, v [B, S, K, D]``, or the
stacked ``[L, B, S, K, D]`` of every layer with ``layer`` (read in place: no copy of a layer's slice);
``H`` a multiple of ``K`` (grouped-query attention: query heads ``h*G .. h*G+G-1`` read KV head ``h``);
``slot_mask`` bool ``[B, S]``: the slots each row's query may see (written, not padding); ``length``:
int32 scalar, the slots from it on are not read (the cache's written prefix, so a long cache costs
what its filled part does). Scores are scaled by ``1/sqrt(D)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels import ForcedChoice
from qlora_jax.kernels.triton_common import pow2_at_most, slice_step, triton_params

_NEG = -1e30  # the running max before any visible slot (finite: no inf - inf)
IMPLEMENTATIONS = ("auto", "xla", "pallas")
_choice = ForcedChoice("decode attention implementation", IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """``block_s``: slots per loop step (rounded down to a power of two <= S). ``splits``: slices of the
    slots per (row, KV head), each its own program (0: enough programs for ``min_programs``, at most one
    slice per ``block_s`` slots). ``num_warps`` / ``num_stages``: Triton's.

    The defaults, from ``benchmarks/decode_attention.py`` on an H200 (ninth session, 7B heads 32 x 128,
    ``benchmarks/RESULTS.md``): a program streams too little of the cache to keep many loads in flight, so
    more, shorter slices win as long as each has a whole step: with one slice per 32 KV heads a row, one
    row took 8.1 / 7.9 / 23.4 us at 192 / 384 / 2048 slots, three slices 5.4 / 7.9 / 30.3, eight slices
    of 2048 16.9; eight rows 11.8 / 19.7 / 83.0 with one slice, 10.5 / 17.4 / 69.7 with three."""

    block_s: int = 64
    splits: int = 0
    min_programs: int = 768  # 5-6 per SM of an H100 / H200
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = DecodeAttentionConfig()


def use_attention(name: str) -> contextlib.AbstractContextManager[None]:
    """Force ``"xla"`` or ``"pallas"`` (the kernel; interpreted off a GPU) for decode attention traced
    inside the block; ``"auto"``: the kernel on a GPU where :func:`supports` says so, else XLA."""
    return _choice.use(name)


def supports(q: jax.Array, k: jax.Array) -> str | None:
    """``None`` if the kernel handles these shapes, else the reason."""
    head_dim = q.shape[-1]
    if head_dim & (head_dim - 1):
        return f"head_dim={head_dim} is not a power of two"
    if q.shape[1] % k.shape[-2]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[-2]} KV heads"
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"dtype {q.dtype}"
    return None


def _splits(config: DecodeAttentionConfig, rows: int, kv_heads: int, slots: int, bs: int) -> int:
    if config.splits:
        return max(1, min(config.splits, -(-slots // bs)))
    want = -(-config.min_programs // (rows * kv_heads))
    return max(1, min(want, slots // bs))  # at least one whole step per slice


def _kernel(q_ref, k_ref, v_ref, mask_ref, len_ref, o_ref, ml_ref, *, layer, groups, bs, chunk, slots, scale):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo = s * chunk
    hi = jnp.minimum(lo + chunk, len_ref[0])
    steps = jnp.maximum(hi - lo + bs - 1, 0) // bs
    head_dim = q_ref.shape[-1]
    qs = [q_ref[b, h * groups + g, :].astype(jnp.float32) * scale for g in range(groups)]  # [D] each
    cache_at = (() if layer is None else (layer,)) + (b,)

    def body(j, carry):
        # the last step moves back inside the cache (not the slice: its end may be < bs past lo); the
        # slots it repeats and those from hi on are masked out
        at, fresh = slice_step(j, lo, slots, bs)
        ok = fresh & (at.start + jax.lax.iota(jnp.int32, bs) < hi) & (mask_ref[b, at] != 0)
        k = k_ref[(*cache_at, at, h, slice(None))].astype(jnp.float32)  # [bs, D]
        v = v_ref[(*cache_at, at, h, slice(None))].astype(jnp.float32)
        out = []
        for g in range(groups):
            o, m, l = carry[g]
            sc = jnp.where(ok, jnp.sum(k * qs[g][None, :], axis=1), _NEG)  # [bs]
            m_new = jnp.maximum(m, jnp.max(sc))
            p = jnp.where(ok, jnp.exp(sc - m_new), 0.0)
            corr = jnp.exp(m - m_new)
            out.append((o * corr + jnp.sum(p[:, None] * v, axis=0), m_new, l * corr + jnp.sum(p)))
        return tuple(out)

    init = tuple((jnp.zeros((head_dim,), jnp.float32), jnp.float32(_NEG), jnp.float32(0.0)) for _ in range(groups))
    final = jax.lax.fori_loop(0, steps, body, init)
    two = jax.lax.iota(jnp.int32, 2)
    for g, (o, m, l) in enumerate(final):
        o_ref[s, b, h * groups + g, :] = o
        ml_ref[s, b, h * groups + g, :] = jnp.where(two == 0, m, l)


def combine(o: jax.Array, ml: jax.Array, dtype) -> jax.Array:
    """The slices' partial results ``o [P, B, H, D]``, ``(max, sum) ml [P, B, H, 2]`` -> ``[B, H, D]``
    in ``dtype`` (0 for a row that sees no slot)."""
    m, l = ml[..., 0], ml[..., 1]
    w = jnp.exp(m - jnp.max(m, axis=0, keepdims=True))
    total = jnp.sum(w * l, axis=0)
    out = jnp.sum(w[..., None] * o, axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnames=("layer", "config", "interpret"))
def decode_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, slot_mask: jax.Array, length: jax.Array, *,
                            layer: int | None = None, config: DecodeAttentionConfig = DEFAULT_CONFIG,
                            interpret: bool = False) -> jax.Array:
    """The kernel: ``[B, H, D]`` in ``q.dtype`` (module docstring for the operands)."""
    reason = supports(q, k)
    if reason is not None:
        raise ValueError(f"decode_attention_pallas: {reason}")
    rows, heads, head_dim = q.shape
    slots, kv_heads = k.shape[-3], k.shape[-2]
    bs = pow2_at_most(min(config.block_s, slots))
    splits = _splits(config, rows, kv_heads, slots, bs)
    chunk = -(-(-(-slots // splits)) // bs) * bs  # ceil(S / splits), rounded up to whole steps
    splits = -(-slots // chunk)
    kernel = functools.partial(_kernel, layer=layer, groups=heads // kv_heads, bs=bs, chunk=chunk, slots=slots,
                               scale=1.0 / math.sqrt(head_dim))
    o, ml = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((splits, rows, heads, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((splits, rows, heads, 2), jnp.float32)),
        grid=(rows, kv_heads, splits),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=(pl.no_block_spec, pl.no_block_spec),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="decode_attention",
    )(q, k, v, slot_mask.astype(jnp.int32), jnp.reshape(length, (1,)).astype(jnp.int32))
    return combine(o, ml, q.dtype)


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, slot_mask: jax.Array, length: jax.Array, *,
                               layer: int | None = None) -> jax.Array:
    """XLA's attention with the same operands and result (slots from ``length`` on masked)."""
    if layer is not None:
        k, v = k[layer], v[layer]
    visible = slot_mask & (jnp.arange(k.shape[1]) < length)[None, :]
    out = jax.nn.dot_product_attention(q[:, None], k.astype(q.dtype), v.astype(q.dtype),
                                       mask=visible[:, None, None, :], implementation="xla")
    return out[:, 0]


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, slot_mask: jax.Array, length: jax.Array, *,
                     layer: int | None = None) -> jax.Array:
    """Attention of ``q [B, H, D]`` over the cache: the kernel on a GPU (where :func:`supports` says
    so; :func:`use_attention` overrides), else XLA. ``[B, H, D]`` in ``q.dtype``."""
    name = _choice.value
    on_gpu = jax.default_backend() == "gpu"
    if name == "auto":
        name = "pallas" if on_gpu and supports(q, k) is None else "xla"
    if name == "pallas":
        return decode_attention_pallas(q, k, v, slot_mask, length, layer=layer, interpret=not on_gpu)
    return decode_attention_reference(q, k, v, slot_mask, length, layer=layer)
