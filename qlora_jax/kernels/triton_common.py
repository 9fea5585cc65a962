"""What the Pallas/Triton 4-bit kernels share: block-scale operands and their in-kernel decode, loop
steps over a slice that need not divide evenly, power-of-two tile sizes, and Triton's compiler parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.nf4 import NESTED_BLOCKSIZE, QuantizedTensor, block_absmax

NESTED_SHIFT = NESTED_BLOCKSIZE.bit_length() - 1  # block index // 256 as a shift (indices are >= 0)
assert 1 << NESTED_SHIFT == NESTED_BLOCKSIZE


def pow2_at_most(v: int) -> int:
    """The largest power of two <= ``v`` (1 for ``v <= 1``)."""
    return 1 << (max(int(v), 1).bit_length() - 1)


def pow2_at_least(v: int) -> int:
    """The smallest power of two >= ``v`` (1 for ``v <= 1``)."""
    return pow2_at_most(2 * max(int(v), 1) - 1)


def pow2_divisor(n: int, want: int) -> int:
    """The largest power of two <= ``want`` that divides ``n``."""
    d = pow2_at_most(want)
    while n % d:
        d //= 2
    return d


def kernel_support(w: QuantizedTensor, m: int, max_m: int) -> str | None:
    """What the Triton 4-bit kernels share in ``supports``: ``None`` for one 2-D weight (not stacked layers)
    with whole blocks per row and at most ``max_m`` rows of x, else the reason."""
    if len(w.shape) != 2:
        return f"weight is not 2-D: {w.shape}"
    if w.packed.ndim != 1:
        return "stacked weight leaves"
    if m > max_m:
        return f"M={m} > {max_m}"
    if w.shape[1] % w.blocksize:
        return f"K={w.shape[1]} is not a multiple of blocksize {w.blocksize} (blocks span rows)"
    return None


def scale_operands(w: QuantizedTensor, in_kernel: bool) -> tuple[jax.Array, tuple[jax.Array, ...], bool]:
    """``(scales [nblocks], (nested_absmax, nested_code, offset [1]), decode_in_kernel)`` for a kernel.

    With double quantization and ``in_kernel``, ``scales`` are the uint8 codes and the kernel decodes
    them (:func:`decode_scales`); otherwise they are fp32 (``block_absmax``, one small XLA op) and the
    three nested operands are unused placeholders that keep one kernel signature.
    """
    if w.double_quant and in_kernel:
        return w.absmax, (w.nested_absmax, w.nested_code, w.nested_offset.reshape(-1)), True
    return block_absmax(w).astype(jnp.float32), tuple(jnp.zeros((1,), jnp.float32) for _ in range(3)), False


def decode_scales(codes: jax.Array, flat_block: jax.Array, nested_ref: Any, ncode_ref: Any, offset_ref: Any) -> jax.Array:
    """In a kernel: fp32 scales of the blocks numbered ``flat_block`` (int32, row-major over the tensor)
    from their 8-bit ``codes``: ``nested_code[q] * nested_absmax[block // 256] + offset``, where ``offset_ref``
    holds one offset, or one per block of 256 scales (tensors joined by ``nf4.concat_rows``)."""
    nested = jax.lax.shift_right_logical(flat_block, NESTED_SHIFT)
    offset = offset_ref[nested] if offset_ref.shape[0] > 1 else offset_ref[0]
    return ncode_ref[codes.astype(jnp.int32)] * nested_ref[nested] + offset


def tile_scales(scale_refs: tuple[Any, Any, Any, Any], rows: Any, blocks: Any, nb: int,
                dq_in_kernel: bool) -> jax.Array:
    """In a kernel: fp32 ``[rows.size, blocks.size]`` scales of a tile (``rows`` / ``blocks`` are ``pl.ds``
    slices of the ``[N, NB]`` scales; ``scale_refs`` = (scales, nested_absmax, nested_code, offset) as
    :func:`scale_operands` gives them), double-quant codes decoded when ``dq_in_kernel``."""
    a_ref, na_ref, nc_ref, off_ref = scale_refs
    a = a_ref[rows, blocks]
    if not dq_in_kernel:
        return a
    r = rows.start + jnp.arange(rows.size, dtype=jnp.int32)
    c = blocks.start + jnp.arange(blocks.size, dtype=jnp.int32)
    return decode_scales(a, r[:, None] * nb + c[None, :], na_ref, nc_ref, off_ref)


def slice_step(c: jax.Array, lo: jax.Array, hi: jax.Array, size: int) -> tuple[Any, jax.Array]:
    """Loop step ``c`` over the slice ``[lo, hi)`` (at least ``size`` long) in chunks of ``size``: the
    chunk it reads (``pl.ds``; the last one moved back inside the slice, so no read leaves it) and a bool
    ``[size]`` mask of the entries no earlier step counted (give the others a zero scale)."""
    start = lo + c * size
    first = jnp.minimum(start, hi - size)
    return pl.ds(first, size), (first + jnp.arange(size, dtype=jnp.int32)) >= start


def k_step(c: jax.Array, lo_b: jax.Array, hi_b: jax.Array, g: int, rows: Any, scale_refs: tuple, nb: int,
           dq_in_kernel: bool) -> tuple[Any, jax.Array]:
    """A forward loop step over a K slice ``[lo_b, hi_b)`` (in blocks): the ``g`` blocks it reads
    (``pl.ds``) and their fp32 scales ``[rows.size, g]``, zero for blocks an earlier step counted."""
    blocks, fresh = slice_step(c, lo_b, hi_b, g)
    return blocks, jnp.where(fresh[None, :], tile_scales(scale_refs, rows, blocks, nb, dq_in_kernel), 0.0)


def triton_params(config: Any):
    """Triton compiler parameters from a config's ``num_warps`` / ``num_stages``."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
