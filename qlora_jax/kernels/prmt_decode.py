"""Register-only 4-bit decode for the Pallas/Triton kernels: PTX byte permutes (``prmt``) instead of
codebook gathers.

The gather decode (``table[code]`` per weight) costs an address computation and a load per weight,
which is what bounds the Triton GEMV at ~1 TB/s of 4-bit weight (H200 profile in
``benchmarks/RESULTS.md``). Here one 32-bit word of packed codes (4 bytes, 8 weights) becomes four
bf16 pairs with 21 integer instructions (once ptxas has merged the four statements' shared part)
and no memory access:

* the 16 codebook values, rounded to bf16, are split into a high-byte table and a low-byte table of
  16 bytes each, held as eight 32-bit immediates (``TH0..TH3``, ``TL0..TL3``);
* ``prmt.b32 d, a, b, s`` picks, for each of 4 output bytes, one of the 8 bytes of ``{b, a}`` by a
  3-bit index in the selector nibble ``s``: with ``s = codes & 0x7`` one permute looks up entries 0-7,
  a second entries 8-15, and a ``lop3`` select keyed on bit 3 of each code (spread to a byte mask by
  a sign-replicating permute) keeps the right one;
* two more permutes interleave the high and low bytes into ``bf16(hi nibble) << 16 | bf16(lo
  nibble)`` per packed byte, the layout of :func:`qlora_jax.kernels.nf4_gemv.pair_table`.

Output ``t`` (0..3) of a word holds packed byte ``t`` (little-endian: bits ``8t..8t+7``): its high
nibble (the even column, ``W[2j]``) as the upper bf16 half, its low nibble (``W[2j+1]``) as the lower.
A bf16 half becomes fp32 by a mask (upper) or a shift (lower). Values are the codebook rounded to
bf16: a relative error of at most 2^-9 per weight, the order of the reference's own bf16 rounding.

``decode_words`` emits the inline PTX on a GPU and an equivalent jnp table lookup in interpret mode
(the PTX itself is checked bit for bit on CPU by an emulator in ``tests/test_prmt_decode.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.nf4 import codebook


HALF_DTYPES = ("bfloat16", "float16")


@functools.cache
def code_bits(quant_type: str, dtype: str = "bfloat16") -> np.ndarray:
    """uint32 ``[16]``: the bit pattern of ``code[c]`` rounded to ``dtype`` (bfloat16 or float16)."""
    import ml_dtypes

    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {HALF_DTYPES}")
    half = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    return codebook(quant_type).astype(half).view(np.uint16).astype(np.uint32)


def bf16_code_bits(quant_type: str) -> np.ndarray:
    """uint32 ``[16]``: the bit pattern of ``bf16(code[c])``."""
    return code_bits(quant_type, "bfloat16")


def _table_words(bytes16: np.ndarray) -> list[int]:
    """16 bytes -> four little-endian 32-bit words (entries 0-3, 4-7, 8-11, 12-15)."""
    return [int(sum(int(bytes16[4 * w + i]) << (8 * i) for i in range(4))) for w in range(4)]


@functools.cache
def prmt_asm(quant_type: str, t: int, dtype: str = "bfloat16", scaled: bool = False,
             even_upper: bool = True) -> str:
    """The PTX body: ``$1`` = a packed uint32 word, ``$0`` = the ``dtype`` (bf16 or fp16) pair of its
    byte ``t`` (0..3): the high nibble's value (the even column) in the upper half, or with
    ``even_upper=False`` in the lower half (the order of a row's bf16 pairs in memory). ``scaled``: ``$2``
    is a ``dtype`` pair and ``$0`` the decoded pair times it (one
    ``fma.rn.bf16x2`` / ``fma.rn.f16x2`` with -0.0 added: the product rounded once, signed zeros kept).

    One statement per output byte (jax's Triton lowering of inline asm takes one result); the four
    statements of a word share all but their last instruction(s), which ptxas computes once.
    """
    bits = code_bits(quant_type, dtype)
    th = _table_words(bits >> 8)
    tl = _table_words(bits & 0xFF)
    group, half = divmod(t, 2)
    # the mask permute reads the sign bits of {w << 4, w}: mask byte i = 0xFF iff bit 3 of nibble i of
    # the group (bytes 2g, 2g+1) is set
    mask_sel = ("0xD9C8", "0xFBEA")[group]
    lines = [
        "{",
        f".reg .b32 s, a4, m, lo, hi, h, l, t0, t1, t2, t3, u0, u1, u2, u3{', r, nz' if scaled else ''};",
        *[f"mov.b32 t{i}, 0x{v:08x};" for i, v in enumerate(th)],
        *[f"mov.b32 u{i}, 0x{v:08x};" for i, v in enumerate(tl)],
        "and.b32 s, $1, 0x77777777;",  # 3-bit table indices of all 8 nibbles
        *(["shr.b32 s, s, 16;"] if group else []),  # bytes 2-3's indices into the selector's low half
        "shl.b32 a4, $1, 4;",  # low nibbles' bit 3 moved to their byte's sign bit
        f"prmt.b32 m, a4, $1, {mask_sel};",
        "prmt.b32 lo, t0, t1, s;",  # high bytes of entries 0-7
        "prmt.b32 hi, t2, t3, s;",  # ... of entries 8-15
        "lop3.b32 h, lo, hi, m, 0xD8;",  # m ? hi : lo, bitwise
        "prmt.b32 lo, u0, u1, s;",  # low bytes
        "prmt.b32 hi, u2, u3, s;",
        "lop3.b32 l, lo, hi, m, 0xD8;",
        # byte 2g + half: [L(lo nibble), H(lo nibble), L(hi nibble), H(hi nibble)]
        f"prmt.b32 {'r' if scaled else '$0'}, l, h, {(('0x4051', '0x6273'), ('0x5140', '0x7362'))[even_upper][half]};",
        *(["mov.b32 nz, 0x80008000;", f"fma.rn.{'bf16x2' if dtype == 'bfloat16' else 'f16x2'} $0, r, $2, nz;"]
          if scaled else []),
        "}",
    ]
    return "\n".join(lines)


def rocm_backend() -> bool:
    """Whether the default backend is ROCm, where the inline PTX cannot compile (a CPU still lowers
    kernels for CUDA, e.g. the abstract-device lowering test)."""
    return "rocm" in jax.devices()[0].client.platform_version.lower()


def bf16x2_supported() -> bool:
    """Whether the default device runs the bf16 PTX the kernels emit (``fma.rn.bf16x2``, and Triton's bf16
    ``tl.dot``): every device but a CUDA GPU older than compute capability 8.0 (Ampere). A CPU says yes: it
    only interprets the kernels or lowers them for an abstract H100."""
    dev = jax.devices()[0]
    try:
        major = int(str(getattr(dev, "compute_capability", "")).split(".")[0])
    except ValueError:  # not a CUDA device (no or a non-numeric capability)
        return True
    return dev.platform != "gpu" or major >= 8


def decode_words_reference(words: jax.Array, quant_type: str, dtype: str = "bfloat16",
                           even_upper: bool = True) -> tuple[jax.Array, ...]:
    """What the PTX computes, as jnp gathers: uint32 ``words`` -> four uint32 arrays of ``dtype`` pairs."""
    bits = [int(b) for b in code_bits(quant_type, dtype)]

    def lookup(code: jax.Array) -> jax.Array:  # a select chain: no captured table (fine in a kernel)
        out = jnp.zeros_like(code)
        for c, b in enumerate(bits):
            out = jnp.where(code == c, jnp.uint32(b), out)
        return out

    out = []
    for t in range(4):
        byte = (words >> (8 * t)) & 0xFF
        hi, lo = lookup(byte >> 4), lookup(byte & 0xF)
        out.append((hi << 16) | lo if even_upper else (lo << 16) | hi)
    return tuple(out)


def _half_bits(v: jax.Array, dtype: str) -> jax.Array:
    return jax.lax.bitcast_convert_type(v.astype(dtype), jnp.uint16).astype(jnp.uint32)


def half_pair(v: jax.Array, dtype: str = "bfloat16") -> jax.Array:
    """fp32 ``v`` -> uint32 ``h << 16 | h``, ``h`` = the bits of ``v`` rounded to ``dtype`` (bf16 / fp16)."""
    b = _half_bits(v, dtype)
    return (b << 16) | b


def pair_halves_f32(pair: jax.Array, dtype: str = "bfloat16") -> tuple[jax.Array, jax.Array]:
    """uint32 ``dtype`` pair -> (upper, lower) as fp32."""
    if dtype == "bfloat16":
        return upper_f32(pair), lower_f32(pair)
    return _f16_halves(pair)


def mul_pairs_reference(a: jax.Array, b: jax.Array, dtype: str = "bfloat16") -> jax.Array:
    """What ``fma.rn.{bf16x2,f16x2} d, a, b, -0.0`` computes, in jnp: uint32 ``dtype`` pairs ``a * b``,
    each half rounded once (a product of two 16-bit floats is exact in fp32)."""
    (ah, al), (bh, bl) = pair_halves_f32(a, dtype), pair_halves_f32(b, dtype)
    return (_half_bits(ah * bh, dtype) << 16) | _half_bits(al * bl, dtype)


def decode_words(words: jax.Array, quant_type: str, *, interpret: bool, dtype: str = "bfloat16",
                 scale_pairs: jax.Array | None = None, even_upper: bool = True) -> tuple[jax.Array, ...]:
    """Inside a Pallas/Triton kernel: uint32 ``words`` (any shape) -> four uint32 arrays of the same
    shape; output ``t`` is ``half(code[hi nibble]) << 16 | half(code[lo nibble])`` of byte ``t``
    (halves swapped with ``even_upper=False``), ``half`` = ``dtype`` (bfloat16 or float16).
    ``scale_pairs`` (uint32 :func:`half_pair` values of
    ``words``' shape): each pair multiplied by it in ``dtype`` (:func:`mul_pairs_reference`)."""
    scaled = scale_pairs is not None
    if interpret:
        pairs = decode_words_reference(words, quant_type, dtype, even_upper)
        return tuple(mul_pairs_reference(p, scale_pairs, dtype) for p in pairs) if scaled else pairs
    from jax.experimental.pallas import triton as pltriton

    # Triton's integers are signless: int32 in and out (an unsigned MLIR type fails to parse), bitcast back
    out = jax.ShapeDtypeStruct(words.shape, jnp.int32)
    args = [jax.lax.bitcast_convert_type(a, jnp.int32) for a in ((words, scale_pairs) if scaled else (words,))]
    constraints = "=r" + ",r" * len(args)
    return tuple(jax.lax.bitcast_convert_type(
        pltriton.elementwise_inline_asm(prmt_asm(quant_type, t, dtype, scaled, even_upper), args=args,
                                        constraints=constraints,
                                        pack=1, result_shape_dtypes=[out])[0], jnp.uint32) for t in range(4))


def upper_f32(pair: jax.Array) -> jax.Array:
    """The upper bf16 half of uint32 ``pair`` as fp32 (the even column)."""
    return jax.lax.bitcast_convert_type(pair & jnp.uint32(0xFFFF0000), jnp.float32)


def lower_f32(pair: jax.Array) -> jax.Array:
    """The lower bf16 half of uint32 ``pair`` as fp32 (the odd column)."""
    return jax.lax.bitcast_convert_type(pair << 16, jnp.float32)


@functools.cache
def dot_pairs_asm(dtype: str = "float16") -> str:
    """PTX: ``$0`` (fp32 bits) = the sum over t < 4 of the two halves of ``$(1+t) * $(5+t)``: four packed
    ``dtype`` (fp16 or bf16) pairs of weights times four of activations in one chain of ``dtype``x2 FMAs
    (one rounding to ``dtype`` per operation; the first adds -0.0, which keeps signed zeros), then the
    two partial sums converted to fp32 and added. fp16: each half sums 4 products; with weights and
    activations in [-1, 1] (the GEMV scales x by a power of two first) no partial sum leaves fp16's
    range. bf16: x as it is (bf16's range is fp32's), each partial sum rounded to 8 bits of mantissa."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {HALF_DTYPES}")
    op = "fma.rn.bf16x2" if dtype == "bfloat16" else "fma.rn.f16x2"
    to_f32 = (["shl.b32 fl, acc, 16;", "and.b32 fh, acc, 0xFFFF0000;"] if dtype == "bfloat16" else
              ["mov.b32 {al, ah}, acc;", "cvt.f32.f16 fl, al;", "cvt.f32.f16 fh, ah;"])
    return "\n".join([
        "{",
        ".reg .b32 acc, nz;",
        ".reg .b16 al, ah;",
        ".reg .f32 fl, fh;",
        "mov.b32 nz, 0x80008000;",
        f"{op} acc, $1, $5, nz;",
        *[f"{op} acc, ${1 + t}, ${5 + t}, acc;" for t in range(1, 4)],
        *to_f32,
        "add.f32 fl, fl, fh;",
        "mov.b32 $0, fl;",
        "}",
    ])


def _f16_halves(pair: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 fp16 pair -> (upper, lower) as fp32."""
    f16 = lambda h: jax.lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.float16).astype(jnp.float32)  # noqa: E731
    return f16(pair >> 16), f16(pair & jnp.uint32(0xFFFF))


def dot_pairs_reference(pairs: tuple[jax.Array, ...], xpairs: tuple[jax.Array, ...],
                        dtype: str = "float16") -> jax.Array:
    """What :func:`dot_pairs_asm` computes, in jnp (fp32 arithmetic rounded to ``dtype`` after every
    operation; a product of two 16-bit floats is exact in fp32, so only a sum can round twice)."""
    acc = None
    for p, x in zip(pairs, xpairs):
        (ph, pl_), (xh, xl) = pair_halves_f32(p, dtype), pair_halves_f32(x, dtype)
        if acc is None:
            acc = ((ph * xh).astype(dtype), (pl_ * xl).astype(dtype))
        else:
            acc = ((ph * xh + acc[0].astype(jnp.float32)).astype(dtype),
                   (pl_ * xl + acc[1].astype(jnp.float32)).astype(dtype))
    return acc[1].astype(jnp.float32) + acc[0].astype(jnp.float32)


def dot_pairs(pairs: tuple[jax.Array, ...], xpairs: tuple[jax.Array, ...], *, dtype: str, interpret: bool) -> jax.Array:
    """Inside a Pallas/Triton kernel: four uint32 arrays of ``dtype`` (fp16 / bf16) weight pairs
    (``decode_words(..., dtype=dtype)``) and four of activation pairs, all the same shape -> fp32, per
    element the sum of the 8 products (packed FMAs: a quarter of the fp32 FMAs' instructions)."""
    if interpret:
        return dot_pairs_reference(pairs, xpairs, dtype)
    from jax.experimental.pallas import triton as pltriton

    args = [jax.lax.bitcast_convert_type(a, jnp.int32) for a in (*pairs, *xpairs)]
    out = pltriton.elementwise_inline_asm(dot_pairs_asm(dtype), args=args, constraints="=r" + ",r" * 8, pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.int32)])[0]
    return jax.lax.bitcast_convert_type(out, jnp.float32)
