"""Standalone 4-bit dequantization at HBM bandwidth (Pallas/Triton), for "dequantize + XLA dot" at large M.

XLA's own dequantize fusion runs at roughly a quarter of HBM bandwidth on an H200 (~130 us for
a 4096x11008 weight that moves 23 MB in and 90 MB out), which is most of the gap between
dequant+dot and a bf16 dot at M = 2048. This kernel does only the dequantization, with wide,
contiguous tiles and a large grid.

Layout: the ``n`` values of the tensor (``n % blocksize == 0``; blocks may span rows, so any
2-D shape works) are ``nbt = n / blocksize`` blocks of ``hb = blocksize / 2`` packed bytes,
viewed as a uint8 ``[nbt, hb]`` matrix; byte ``j`` of a block holds value ``2j`` (high nibble)
and ``2j + 1`` (low nibble). Block scales are fp32 ``[nbt]``.

Program ``i`` decodes blocks ``i*block_rows .. (i+1)*block_rows``: a ``[block_rows, hb]`` byte
tile -> two codebook gathers per byte -> times the block scale in fp32 -> rounded once to the
output dtype (bf16 or fp16), exactly as :func:`qlora_jax.nf4.dequantize` computes it. The two
16-bit results of a byte are packed into one uint32 (even value in the low half: little-endian
memory order), so each program stores a contiguous ``[block_rows, hb]`` uint32 tile, and the
result is bitcast (free) to ``[nbt, hb, 2]`` = ``[n]`` values of the output dtype.

Double-quantized scales are decoded by one small XLA op first (``block_absmax``: reads 1 byte,
writes 4 per 64 values, ~3% of the kernel's traffic), so the result is bit-identical to
``dequantize``; ``scales_in_kernel=True`` decodes them in the kernel instead (the fp32 result of
``code * nested_absmax + offset`` may then differ from XLA's in the last bit where the compiler
contracts it into an FMA).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels.nf4_matmul import check_operand, dot_dequantized
from qlora_jax.kernels.triton_common import decode_scales, pow2_divisor, scale_operands, triton_params
from qlora_jax.nf4 import QuantizedTensor, codebook

OUT_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class DequantConfig:
    """``block_rows``: quantization blocks per program (rounded down to a power of two dividing
    the block count; ``block_rows * blocksize/2`` bytes in, ``* 2 * blocksize`` bytes out);
    ``scales_in_kernel``: decode double-quantized scales in the kernel (see the module docstring);
    ``num_warps`` / ``num_stages``: Triton's."""

    block_rows: int = 64  # fastest in the H200 sweep (benchmarks/RESULTS.md)
    scales_in_kernel: bool = False
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = DequantConfig()


def supports(w: QuantizedTensor, dtype) -> str | None:
    """``None`` if :func:`dequantize_pallas` handles this weight and output dtype, else the reason."""
    if w.packed.ndim != 1:
        return "stacked weight leaves"
    if w.size % w.blocksize:
        return f"{w.size} values are not a whole number of blocks of {w.blocksize}"
    if jnp.dtype(dtype).name not in OUT_DTYPES:
        return f"output dtype {jnp.dtype(dtype).name} is not one of {OUT_DTYPES}"
    return None


def _bits32(v: jax.Array, dtype) -> jax.Array:
    """fp32 -> the 16-bit pattern of ``v.astype(dtype)`` in the low half of a uint32."""
    return jax.lax.bitcast_convert_type(v.astype(dtype), jnp.uint16).astype(jnp.uint32)


def _kernel(p_ref, a_ref, na_ref, nc_ref, off_ref, code_ref, o_ref, *, rows, dq_in_kernel, dtype):
    b = p_ref[...].astype(jnp.int32)  # [rows, hb]
    s = a_ref[...]  # [rows]
    if dq_in_kernel:
        blk = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)
        s = decode_scales(s, blk, na_ref, nc_ref, off_ref)
    s = s[:, None]
    even = code_ref[b >> 4] * s
    odd = code_ref[b & 0xF] * s
    o_ref[...] = _bits32(even, dtype) | (_bits32(odd, dtype) << 16)


@functools.partial(jax.jit, static_argnames=("dtype", "config", "interpret"))
def dequantize_pallas(w: QuantizedTensor, dtype=jnp.bfloat16, *, config: DequantConfig = DEFAULT_CONFIG,
                      interpret: bool = False) -> jax.Array:
    """``w`` as a ``dtype`` (bf16 / fp16) array of shape ``w.shape``; equals ``dequantize(w, dtype)``."""
    if (reason := supports(w, dtype)) is not None:
        raise ValueError(f"dequantize_pallas: {reason}")
    hb = w.blocksize // 2
    nbt = w.size // w.blocksize
    packed = w.packed.reshape(nbt, hb)
    scales, extra, dq_in_kernel = scale_operands(w, config.scales_in_kernel)
    rows = pow2_divisor(nbt, config.block_rows)
    words = pl.pallas_call(
        functools.partial(_kernel, rows=rows, dq_in_kernel=dq_in_kernel, dtype=jnp.dtype(dtype)),
        out_shape=jax.ShapeDtypeStruct((nbt, hb), jnp.uint32),
        grid=(nbt // rows,),
        in_specs=[pl.BlockSpec((rows, hb), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))]
        + [pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((rows, hb), lambda i: (i, 0)),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="nf4_dequantize",
    )(packed, scales, *extra, jnp.asarray(codebook(w.quant_type)))
    return jax.lax.bitcast_convert_type(words, dtype).reshape(w.shape)


def nf4_matmul_dequant(x: jax.Array, w: QuantizedTensor, *, config: DequantConfig = DEFAULT_CONFIG,
                       interpret: bool = False) -> jax.Array:
    """``x [..., K] @ dequantize_pallas(w [N, K]).T -> [..., N]`` in ``x.dtype`` (bf16/fp16), fp32 accumulation."""
    check_operand(x, w, 1, "nf4_matmul_dequant")
    return dot_dequantized(x, dequantize_pallas(w, x.dtype, config=config, interpret=interpret), 1)


def nf4_matmul_t_dequant(dy: jax.Array, w: QuantizedTensor, *, config: DequantConfig = DEFAULT_CONFIG,
                         interpret: bool = False) -> jax.Array:
    """``dy [..., N] @ dequantize_pallas(w [N, K]) -> [..., K]`` in ``dy.dtype`` (bf16/fp16)."""
    check_operand(dy, w, 0, "nf4_matmul_t_dequant")
    return dot_dequantized(dy, dequantize_pallas(w, dy.dtype, config=config, interpret=interpret), 0)


__all__ = ["DequantConfig", "dequantize_pallas", "nf4_matmul_dequant", "nf4_matmul_t_dequant", "supports"]
