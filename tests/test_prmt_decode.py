"""The register-only decode's PTX (``qlora_jax.kernels.prmt_decode``) executed instruction by
instruction by a small emulator of the PTX it uses (mov, and, shr, shl, prmt, lop3, the half-pair
fma) equals the codebook lookup bit for bit, for NF4 and FP4, bf16 and fp16 tables, on every byte
value in every byte position, and so does its scaled form (the small-M kernels'); the packed fp16x2 /
bf16x2 FMA PTX, emulated with numpy's IEEE fp16 / ml_dtypes' bf16 (one rounding per operation), equals
its jnp reference."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qlora_jax.kernels import prmt_decode

M32 = np.uint64(0xFFFFFFFF)


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX ``prmt.b32`` default mode: output byte i = byte ``sel & 7`` of ``{b, a}``, or its sign
    replicated (0x00 / 0xFF) if ``sel & 8``; ``sel`` = nibble i of ``c``."""
    src = [(a >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)] + \
          [(b >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)]
    src = np.stack(src)  # [8, n]
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = np.take_along_axis(src, (sel & np.uint64(7)).astype(np.int64)[None], axis=0)[0]
        sign = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        byte = np.where(sel & np.uint64(8), sign, byte)
        out |= byte << np.uint64(8 * i)
    return out


def _lop3(a, b, c, lut: int) -> np.ndarray:
    out = np.zeros_like(a)
    for j in range(32):
        k = (((a >> np.uint64(j)) & np.uint64(1)) << np.uint64(2)) | (((b >> np.uint64(j)) & np.uint64(1)) << np.uint64(1)) \
            | ((c >> np.uint64(j)) & np.uint64(1))
        out |= ((np.uint64(lut) >> k) & np.uint64(1)) << np.uint64(j)
    return out


def _statements(asm: str):
    """``(opcode with its type suffixes, operands)`` of each PTX statement in ``asm`` (braces and
    ``.reg`` declarations skipped; a ``{a, b}`` vector operand stays one operand)."""
    for line in asm.splitlines():
        line = line.strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        m = re.fullmatch(r"([\w.]+) (.+);", line)
        assert m, f"unexpected PTX line {line!r}"
        yield m.group(1), [t.strip() for t in re.split(r",(?![^{]*})", m.group(2))]


def _half_type(dtype: str) -> type:
    """numpy's type for ``dtype``: float16, or ml_dtypes' bfloat16."""
    import ml_dtypes

    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16


def _half(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Integer 16-bit patterns -> ``dtype`` (float16 / bfloat16) values."""
    return bits.astype(np.uint16).view(_half_type(dtype))


def _half_pair_mul(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """``fma.rn.{bf16x2,f16x2} d, a, b, -0.0`` on uint64-held 32-bit pairs: each half's exact product
    (float64) rounded once to ``dtype`` (ml_dtypes / numpy round to nearest even)."""
    out = np.zeros_like(a)
    for shift in (0, 16):
        s = np.uint64(shift)
        ha = _half((a >> s) & np.uint64(0xFFFF), dtype).astype(np.float64)
        hb = _half((b >> s) & np.uint64(0xFFFF), dtype).astype(np.float64)
        out |= (ha * hb).astype(_half_type(dtype)).view(np.uint16).astype(np.uint64) << s
    return out


def run_ptx(asm: str, word: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Execute one decode statement's PTX on uint32 ``word`` (and ``$2`` = ``scale``, uint32 half pairs,
    for the scaled decode; numpy, vectorized); returns ``$0``."""
    regs: dict[str, np.ndarray] = {"$1": word.astype(np.uint64)}
    if scale is not None:
        regs["$2"] = scale.astype(np.uint64)

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok.startswith("0x"):
            return np.full_like(regs["$1"], int(tok, 16))
        if tok.isdigit():
            return np.full_like(regs["$1"], int(tok))
        return regs[tok]

    for opcode, args in _statements(asm):
        op, _, kind = opcode.partition(".")
        d = args[0]
        if opcode in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            assert args[3] == "nz" and int(regs["nz"][0]) == 0x80008000, "the scaled decode adds -0.0"
            regs[d] = _half_pair_mul(val(args[1]), val(args[2]), "bfloat16" if "bf16" in opcode else "float16")
            continue
        assert kind == "b32", f"unexpected PTX type in {opcode!r}"
        if op == "mov":
            regs[d] = val(args[1])
        elif op == "and":
            regs[d] = val(args[1]) & val(args[2])
        elif op == "shr":
            regs[d] = (val(args[1]) >> np.uint64(int(args[2]))) & M32
        elif op == "shl":
            regs[d] = (val(args[1]) << np.uint64(int(args[2]))) & M32
        elif op == "prmt":
            regs[d] = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "lop3":
            regs[d] = _lop3(val(args[1]), val(args[2]), val(args[3]), int(args[4], 16))
        else:
            raise AssertionError(f"emulator lacks {op}")
    return regs["$0"].astype(np.uint32)


def _expected(words: np.ndarray, quant_type: str, dtype: str = "bfloat16", even_upper: bool = True) -> list[np.ndarray]:
    bits = prmt_decode.code_bits(quant_type, dtype)
    out = []
    for t in range(4):
        byte = (words >> np.uint32(8 * t)) & np.uint32(0xFF)
        hi, lo = bits[byte >> 4], bits[byte & 0xF]
        out.append(((hi << 16) | lo if even_upper else (lo << 16) | hi).astype(np.uint32))
    return out


@pytest.mark.parametrize("even_upper", [True, False])
@pytest.mark.parametrize("dtype", prmt_decode.HALF_DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ptx_decode_equals_codebook_lookup_bit_for_bit(quant_type, dtype, even_upper):
    """Both pair orders: the even column (high nibble) in the upper half, or in the lower (x's order in memory)."""
    b = np.arange(256, dtype=np.uint32)
    rng = np.random.default_rng(0)
    words = np.concatenate([b << np.uint32(8 * t) | rng.integers(0, 2**32, 256, dtype=np.uint32) & ~(np.uint32(0xFF) << np.uint32(8 * t))
                            for t in range(4)] + [rng.integers(0, 2**32, 4096, dtype=np.uint32)])
    ref = prmt_decode.decode_words_reference(words, quant_type, dtype, even_upper)
    for t, e in enumerate(_expected(words, quant_type, dtype, even_upper)):
        asm = prmt_decode.prmt_asm(quant_type, t, dtype, even_upper=even_upper)
        np.testing.assert_array_equal(run_ptx(asm, words), e, err_msg=f"byte {t}")
        np.testing.assert_array_equal(np.asarray(ref[t]), e)


@pytest.mark.parametrize("dtype", prmt_decode.HALF_DTYPES)
def test_scaled_ptx_decode_equals_decode_times_scale_rounded_once(dtype):
    """The small-M kernels' decode (``prmt_asm(..., scaled=True)``): each decoded pair times a scale
    pair, each half rounded once, equals ``decode_words(..., scale_pairs=...)`` in interpret mode."""
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    words = rng.integers(0, 2**32, 4096, dtype=np.uint32)
    scales = np.concatenate([rng.uniform(1e-3, 4.0, 4090), [0.0, 1.0, 3.3e-5, 65504.0, 0.1, 7.0]]).astype(np.float32)
    if dtype == "bfloat16":
        scales[-3] = 1e30  # far outside fp16's range, fine in bf16
    pairs = np.asarray(prmt_decode.half_pair(jnp.asarray(scales), dtype))
    want = prmt_decode.decode_words(jnp.asarray(words), "nf4", interpret=True, dtype=dtype, scale_pairs=jnp.asarray(pairs))
    for t, w in enumerate(want):
        got = run_ptx(prmt_decode.prmt_asm("nf4", t, dtype, scaled=True), words, pairs)
        np.testing.assert_array_equal(got, np.asarray(w), err_msg=f"byte {t}")
    # and that is the codebook value times the scale, both rounded to dtype, then the product rounded
    half = _half_type(dtype)
    code = _half(prmt_decode.code_bits(dtype=dtype, quant_type="nf4"), dtype).astype(np.float64)
    hi = (words >> np.uint32(4)) & np.uint32(0xF)  # byte 0's high nibble: the upper half of output 0
    expect = (code[hi] * scales.astype(half).astype(np.float64)).astype(half)
    got_hi = _half(np.asarray(want[0]) >> np.uint32(16), dtype)
    np.testing.assert_array_equal(got_hi, expect)


def test_reference_decode_matches_expected_and_halves_are_the_codebook():
    import jax.numpy as jnp

    from qlora_jax.nf4 import codebook

    words = np.random.default_rng(1).integers(0, 2**32, 1000, dtype=np.uint32)
    got = prmt_decode.decode_words_reference(jnp.asarray(words), "nf4")
    for g, e in zip(got, _expected(words, "nf4")):
        np.testing.assert_array_equal(np.asarray(g), e)
    # byte 0x7A: high nibble 7 (upper half), low nibble 10 (lower half), as bf16-rounded fp32
    pair = prmt_decode.decode_words_reference(jnp.asarray([0x7A], jnp.uint32), "nf4")[0]
    code = codebook("nf4")
    np.testing.assert_allclose(float(prmt_decode.upper_f32(pair)[0]), code[7], rtol=2**-8)
    np.testing.assert_allclose(float(prmt_decode.lower_f32(pair)[0]), code[10], rtol=2**-8)


def run_dot_pairs_ptx(asm: str, args: list[np.ndarray], dtype: str) -> np.ndarray:
    """Execute :func:`prmt_decode.dot_pairs_asm` on uint32 ``args`` (``$1..$8``): ``fma.rn.{f16x2,bf16x2}``
    as numpy ``dtype`` with one rounding (exact float64 product and sum first), ``mov`` of immediates and
    registers and the unpacking ``mov``, ``cvt.f32.f16``, ``shl`` / ``and`` on bit patterns, ``add.f32``;
    returns ``$0`` as fp32."""
    pair = lambda a: (_half(a >> np.uint32(16), dtype), _half(a & np.uint32(0xFFFF), dtype))  # noqa: E731
    regs: dict[str, object] = {f"${i + 1}": pair(a) for i, a in enumerate(args)}
    n = len(args[0])
    for op, ops in _statements(asm):
        if op in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            assert op.endswith("bf16x2") == (dtype == "bfloat16")
            a, b, c = regs[ops[1]], regs[ops[2]], regs[ops[3]]
            regs[ops[0]] = tuple((x.astype(np.float64) * y.astype(np.float64) + z.astype(np.float64)).astype(x.dtype)
                                 for x, y, z in zip(a, b, c))
        elif op == "mov.b32" and ops[1].startswith("0x"):
            regs[ops[0]] = pair(np.full(n, int(ops[1], 16), np.uint32))
        elif op == "mov.b32" and ops[0].startswith("{"):
            hi, lo = regs[ops[1]]
            names = [t.strip() for t in ops[0].strip("{}").split(",")]
            regs[names[0]], regs[names[1]] = lo, hi  # {low half, high half}
        elif op == "cvt.f32.f16":
            regs[ops[0]] = regs[ops[1]].astype(np.float32)
        elif op == "shl.b32":  # the lower bf16 half moved up: its fp32 value
            assert ops[2] == "16"
            regs[ops[0]] = regs[ops[1]][1].astype(np.float32)
        elif op == "and.b32":  # the upper bf16 half kept: its fp32 value
            assert ops[2] == "0xFFFF0000"
            regs[ops[0]] = regs[ops[1]][0].astype(np.float32)
        elif op == "add.f32":
            regs[ops[0]] = regs[ops[1]] + regs[ops[2]]
        elif op == "mov.b32":
            regs[ops[0]] = regs[ops[1]]
        else:
            raise AssertionError(f"emulator lacks {op}")
    return regs["$0"]


@pytest.mark.parametrize("dtype", prmt_decode.HALF_DTYPES)
def test_dot_pairs_ptx_equals_its_reference(dtype):
    """Four ``dtype`` weight pairs (decoded codes) times four activation pairs (fp16: in [-1, 1]; bf16: any
    magnitude): the PTX's fp32 result equals ``dot_pairs_reference`` and is within ``dtype`` rounding of the
    exact sum (3 roundings per half, each at most half an ulp of a partial sum)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    n = 4096
    pairs = prmt_decode.decode_words_reference(jnp.asarray(rng.integers(0, 2**32, n, dtype=np.uint32)), "nf4", dtype)
    pairs = [np.asarray(p) for p in pairs]
    mag = 1.0 if dtype == "float16" else np.exp(rng.uniform(-20, 20, n))  # bf16: unscaled x, any range
    xs = []
    for _ in range(4):
        v = rng.uniform(-1, 1, (2, n)) * mag
        h = np.asarray(jnp.asarray(v, jnp.float32).astype(dtype)).view(np.uint16).astype(np.uint32)
        xs.append((h[0] << np.uint32(16)) | h[1])
    got = run_dot_pairs_ptx(prmt_decode.dot_pairs_asm(dtype), pairs + xs, dtype)
    ref = prmt_decode.dot_pairs_reference(tuple(map(jnp.asarray, pairs)), tuple(map(jnp.asarray, xs)), dtype)
    np.testing.assert_array_equal(got, np.asarray(ref))
    halves = lambda a: (_half(a >> np.uint32(16), dtype).astype(np.float64),  # noqa: E731
                        _half(a & np.uint32(0xFFFF), dtype).astype(np.float64))
    products = [ph * xh for p, x in zip(pairs, xs) for ph, xh in zip(halves(p), halves(x))]
    exact, bound = sum(products), sum(np.abs(v) for v in products)
    ulp = 2.0**-11 if dtype == "float16" else 2.0**-8  # half an ulp, relative
    assert np.all(np.abs(got - exact) <= 4 * ulp * bound + 1e-30)
