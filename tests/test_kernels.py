"""4-bit matmul kernels equal the pure-jnp reference (dequantize, then dot).

On CPU the Pallas kernels run in interpret mode; on a GPU (``JAX_PLATFORMS=cuda``) the
same tests run them compiled. A separate test lowers every kernel for CUDA on an
abstract H100, so a change that breaks GPU lowering fails CI without a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import mesh as mesh_lib

from qlora_jax import kernels, nf4_dense, quantize
from qlora_jax.kernels import decode_attention
from qlora_jax.kernels import nf4_dequant as dequant
from qlora_jax.kernels import nf4_gemv as gemv
from qlora_jax.kernels import nf4_matmul_small_m as small_m
from qlora_jax.kernels import prmt_decode
from qlora_jax.nf4 import dequantize

INTERPRET = jax.default_backend() != "gpu"


def _rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    """Standard normal test data drawn with NumPy: ``jax.random`` compiles a program per shape and dtype on
    CPU (0.2-2 s each), and these checks only need seeded random operands."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _weight(n, k, quant_type="nf4", double_quant=True, seed=0):
    return quantize(_normal(seed, (n, k)) * 0.05, quant_type=quant_type, double_quant=double_quant)


CASES = [
    # (lead dims of x, N, K, quant_type, double_quant, blocksize)
    ((1,), 64, 128, "nf4", True, 64),
    ((5,), 128, 256, "fp4", False, 64),
    ((2, 3), 64, 512, "nf4", False, 64),
    ((17,), 96, 256, "fp4", True, 64),
    ((64,), 32, 256, "nf4", True, 128),
    ((1,), 16, 64, "nf4", True, 32),
]


@pytest.mark.parametrize("lead, n, k, quant_type, double_quant, blocksize", CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_small_m_forward_and_backward_equal_reference(lead, n, k, quant_type, double_quant, blocksize, dtype):
    w = quantize(_normal(n + k, (n, k)) * 0.05, quant_type=quant_type,
                 double_quant=double_quant, blocksize=blocksize)
    x = _normal(1, (*lead, k), dtype)
    dy = _normal(2, (*lead, n), dtype)
    y = small_m.nf4_matmul_small_m(x, w, interpret=INTERPRET)
    dx = small_m.nf4_matmul_t_small_m(dy, w, interpret=INTERPRET)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert dx.shape == (*lead, k) and dx.dtype == dtype
    assert _rel_err(y, kernels.nf4_matmul_reference(x, w)) < 1e-2
    assert _rel_err(dx, kernels.nf4_matmul_t_reference(dy, w)) < 1e-2


def test_small_m_column_permutation_is_the_decoded_tiles_order():
    """``permute_columns`` puts x's columns in the order the kernels lay out a decoded word tile (per
    byte position t, each byte's odd column then its even one) and ``unpermute_columns`` inverts it."""
    x = jnp.arange(3 * 256).reshape(3, 256)
    p = small_m.permute_columns(x, 64)
    assert p.shape == (3, 4, 64)
    assert p[0, 0, :6].tolist() == [1, 0, 9, 8, 17, 16]  # words 0, 1, 2: byte 0 = columns (0, 1)
    assert p[0, 3, :2].tolist() == [7, 6] and p[1, 1, 16:18].tolist() == [256 + 67, 256 + 66]  # block 1 starts at 64
    assert (small_m.unpermute_columns(p, 64) == x).all()
    assert (small_m.unpermute_columns(small_m.permute_columns(x, 128), 128) == x).all()


@pytest.mark.parametrize("config", [small_m.SmallMConfig(block_n=16, split=1, blocks_per_step=1),
                                    small_m.SmallMConfig(block_n=32, split=3, blocks_per_step=4)])
def test_small_m_tile_configs_agree(config):
    w = _weight(96, 768)
    x = _normal(3, (7, 768), jnp.bfloat16)
    dy = _normal(4, (7, 96), jnp.bfloat16)
    assert _rel_err(small_m.nf4_matmul_small_m(x, w, config=config, interpret=INTERPRET),
                    kernels.nf4_matmul_reference(x, w)) < 1e-2
    assert _rel_err(small_m.nf4_matmul_t_small_m(dy, w, config=config, interpret=INTERPRET),
                    kernels.nf4_matmul_t_reference(dy, w)) < 1e-2


@pytest.mark.slow
def test_small_m_llama7b_sizes():
    """The 7B MLP shapes, both orientations (down_proj [4096, 11008] and up_proj [11008, 4096])."""
    for n, k in ((4096, 11008), (11008, 4096)):
        w = _weight(n, k)
        x = _normal(5, (1, k), jnp.bfloat16)
        dy = _normal(6, (1, n), jnp.bfloat16)
        cfg = small_m.SmallMConfig(block_n=128, split=2, blocks_per_step=4)
        assert _rel_err(small_m.nf4_matmul_small_m(x, w, config=cfg, interpret=INTERPRET),
                        kernels.nf4_matmul_reference(x, w)) < 1e-2
        assert _rel_err(small_m.nf4_matmul_t_small_m(dy, w, config=cfg, interpret=INTERPRET),
                        kernels.nf4_matmul_t_reference(dy, w)) < 1e-2


def test_unsupported_shapes_are_rejected_with_a_reason():
    w = _weight(64, 172)  # stories260K's FFN: blocks span rows
    assert "multiple of blocksize" in small_m.supports(w, 1)
    assert "M=65" in small_m.supports(_weight(64, 128), 65)
    assert "N=72 is not a multiple of 16" in small_m.supports(_weight(72, 128), 1)
    w32 = quantize(jnp.ones((16, 96)), blocksize=32)  # 3 blocks of 32: a dot needs 2 (16 columns of a byte position)
    assert "not a multiple of the 2 blocks" in small_m.supports(w32, 1)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        small_m.nf4_matmul_small_m(jnp.ones((1, 172), jnp.bfloat16), w, interpret=True)
    with pytest.raises(NotImplementedError, match="float32"):
        small_m.nf4_matmul_small_m(jnp.ones((1, 128), jnp.float32), _weight(64, 128), interpret=True)


@pytest.mark.parametrize("n, k", [(64, 172), (172, 64), (64, 128)])
@pytest.mark.parametrize("lead", [(1,), (3, 70)])
def test_entry_point_equals_reference_on_any_shape(n, k, lead):
    """The entry point (whatever it picks on this platform) on stories260K's sizes and beyond."""
    w = _weight(n, k)
    x = _normal(7, (*lead, k), jnp.bfloat16)
    dy = _normal(8, (*lead, n), jnp.bfloat16)
    assert _rel_err(kernels.nf4_matmul(x, w), kernels.nf4_matmul_reference(x, w)) < 1e-2
    assert _rel_err(kernels.nf4_matmul_t(dy, w), kernels.nf4_matmul_t_reference(dy, w)) < 1e-2


def test_kernels_lower_for_cuda_on_an_abstract_h100():
    """Pallas -> Triton lowering of every kernel for CUDA, without a GPU (double quantization with one
    offset, one per group of 256 scales as ``concat_rows`` makes, and none)."""
    from qlora_jax.nf4 import concat_rows

    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    x = jnp.ones((3, 512), jnp.bfloat16)
    dy = jnp.ones((3, 256), jnp.bfloat16)
    joined = concat_rows([_weight(128, 512), _weight(128, 512, seed=1)])
    for w in (_weight(256, 512), joined, _weight(256, 512, double_quant=False)):
        with jax.sharding.use_abstract_mesh(mesh):
            for fn, arg in ((small_m.nf4_matmul_small_m, x), (small_m.nf4_matmul_t_small_m, dy)):
                text = jax.jit(fn).trace(arg, w).lower(lowering_platforms=("cuda",)).as_text()
                assert "xla.gpu.triton" in text
            for cfg in (gemv.GemvConfig(decode="gather16", reduce="end"),
                        gemv.GemvConfig(decode="pair256", scales_in_kernel=False, reduce="step", split=1,
                                        x_layout="strided"),
                        gemv.GemvConfig(decode="prmt"), gemv.GemvConfig(decode="prmt_f16x2", split=1),
                        gemv.GemvConfig(decode="prmt_f16x2", reduce="end"), gemv.GemvConfig(decode="prmt_bf16x2", split=1, x_layout="split"),
                        gemv.GemvConfig(x_layout="strided"), gemv.GemvConfig()):
                for fn, arg in ((gemv.nf4_gemv, x), (gemv.nf4_gemv_t, dy)):
                    f = functools.partial(fn, config=cfg)
                    text = jax.jit(f).trace(arg, w).lower(lowering_platforms=("cuda",)).as_text()
                    assert "xla.gpu.triton" in text
            for cfg in (dequant.DequantConfig(), dequant.DequantConfig(scales_in_kernel=True)):
                for dtype in (jnp.bfloat16, jnp.float16):
                    f = functools.partial(dequant.dequantize_pallas, dtype=dtype, config=cfg)
                    text = jax.jit(f).trace(w).lower(lowering_platforms=("cuda",)).as_text()
                    assert "xla.gpu.triton" in text
    # decode attention over a stacked bf16 cache (GQA, one layer of four) and one layer's fp32 cache
    length = jax.ShapeDtypeStruct((), jnp.int32)
    for q, cache, layer in ((jnp.ones((2, 8, 128), jnp.bfloat16), jnp.ones((4, 2, 192, 2, 128), jnp.bfloat16), 2),
                            (jnp.ones((1, 4, 64), jnp.float32), jnp.ones((1, 50, 4, 64), jnp.float32), None)):
        f = functools.partial(decode_attention.decode_attention_pallas, layer=layer)
        slot_mask = jnp.ones(cache.shape[-4:-2], bool)
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(f).trace(q, cache, cache, slot_mask, length).lower(
                lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text


# --- GEMV (M <= 8), Pallas dequantize, XLA multiply-and-reduce -------------------------------

GEMV_CASES = [
    # (M, N, K, quant_type, double_quant, config)
    (1, 64, 128, "nf4", True, gemv.GemvConfig()),
    (1, 64, 256, "nf4", True, gemv.GemvConfig(decode="gather16", split=1, reduce="step", x_layout="strided")),  # x.dtype out
    (3, 172, 640, "fp4", False, gemv.GemvConfig(decode="gather16", block_n=8, blocks_per_step=4, split=3)),  # uneven K slices
    (8, 64, 512, "nf4", False, gemv.GemvConfig(decode="pair256", split=2, reduce="end")),
    (8, 96, 768, "fp4", True, gemv.GemvConfig(decode="pair256", scales_in_kernel=False, split=5, blocks_per_step=2)),
    (3, 128, 256, "nf4", True, gemv.GemvConfig(decode="gather16", block_n=64, blocks_per_step=32, split=1)),
    # the register (prmt) decode: uneven K slices, FP4, fp32 scales, one slice (x.dtype out)
    (1, 172, 640, "nf4", True, gemv.GemvConfig(decode="prmt", block_n=4, blocks_per_step=4, split=3)),
    (5, 64, 512, "fp4", False, gemv.GemvConfig(decode="prmt", scales_in_kernel=False, split=2)),
    (1, 64, 256, "nf4", False, gemv.GemvConfig(decode="prmt", split=1)),
    # packed fp16x2 FMAs: the same, and M = 8
    (1, 172, 640, "nf4", True, gemv.GemvConfig(decode="prmt_f16x2", block_n=4, blocks_per_step=4, split=3)),
    (8, 64, 512, "fp4", False, gemv.GemvConfig(decode="prmt_f16x2", scales_in_kernel=False, split=2)),
    (1, 64, 256, "nf4", False, gemv.GemvConfig(decode="prmt_f16x2", split=1)),
    # register decodes reducing once after the loop
    (1, 172, 640, "nf4", True, gemv.GemvConfig(decode="prmt_f16x2", reduce="end", block_n=4, blocks_per_step=4, split=3)),
    (3, 64, 512, "fp4", False, gemv.GemvConfig(decode="prmt", reduce="end", split=2)),
    # packed bf16x2 FMAs on x as it is (the bf16 default), x in planes, in place with stride 4 and split on
    # chip: uneven K slices, M = 8, one slice (x.dtype out)
    (1, 172, 640, "nf4", True, gemv.GemvConfig(decode="prmt_bf16x2", block_n=4, blocks_per_step=4, split=3, x_layout="split")),
    (8, 64, 512, "fp4", False, gemv.GemvConfig(decode="prmt_bf16x2", scales_in_kernel=False, split=2, x_layout="strided")),
    (3, 172, 640, "nf4", True, gemv.GemvConfig(decode="prmt_bf16x2", block_n=4, blocks_per_step=4, split=3,
                                                x_layout="pairs")),
    (1, 64, 256, "nf4", False, gemv.GemvConfig(split=1, x_layout="strided")),
    (1, 64, 256, "nf4", False, gemv.GemvConfig(split=1, x_layout="pairs")),
]


@pytest.mark.parametrize("m, n, k, quant_type, double_quant, config", GEMV_CASES)
def test_gemv_forward_and_backward_equal_reference(m, n, k, quant_type, double_quant, config):
    w = _weight(n, k, quant_type, double_quant, seed=n + k)
    x = _normal(1, (m, k), jnp.bfloat16)
    dy = _normal(2, (m, n), jnp.bfloat16)
    y = gemv.nf4_gemv(x, w, config=config, interpret=INTERPRET)
    dx = gemv.nf4_gemv_t(dy, w, config=config, interpret=INTERPRET)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert dx.shape == (m, k) and dx.dtype == jnp.bfloat16
    assert _rel_err(y, kernels.nf4_matmul_reference(x, w)) < 1e-2
    assert _rel_err(dx, kernels.nf4_matmul_t_reference(dy, w)) < 1e-2


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gemv_f16x2_keeps_precision_at_any_activation_scale(dtype, split):
    """``decode="prmt_f16x2"`` scales each row of x by a power of two into [-1, 1] before
    the fp16 products: rows far outside fp16's range (bf16: 1e6 and 1e-6), a zero row, rows with one
    outlier (3e4; 6e4, near fp16's top), and a row whose halves differ by 10^8, all stay at bf16-level
    error; bf16 and fp16 activations, one K slice or four."""
    w = _weight(96, 512, seed=5)
    x = _normal(9, (7, 512), jnp.float32) * 0.5
    big, tiny = (1e6, 1e-6) if dtype == jnp.bfloat16 else (2e4, 1e-2)  # fp16: outputs stay normal fp16 numbers
    x = x * jnp.asarray([big, tiny, 0.0, 1.0, 1.0, 1.0, 1.0])[:, None]
    x = x.at[4, 17].set(3e4)
    x = x.at[5, :256].multiply(1e4).at[5, 256:].multiply(1e-4)
    x = x.at[6, 300].set(6e4).astype(dtype)
    want = kernels.nf4_matmul_reference(x.astype(jnp.float32), w)
    y = gemv.nf4_gemv(x, w, config=gemv.GemvConfig(decode="prmt_f16x2", split=split), interpret=INTERPRET)
    assert y.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert not bool(jnp.any(y[2]))
    for r in (0, 1, 3, 4, 5, 6):
        assert _rel_err(y[r], want[r]) < 1e-2, r


@pytest.mark.parametrize("split", [1, 4])
def test_gemv_bf16x2_keeps_precision_at_any_activation_scale(split):
    """The bf16 default (``decode="auto"`` -> ``"prmt_bf16x2"``): x as it is, no scaling. Rows at 1e15 and
    1e-15 (far outside fp16's range), a zero row, an outlier of 3e4, a row whose halves differ by 10^8:
    bf16-level error; and the decode the default resolves to is the bf16 one."""
    bf16, f16 = gemv.resolve_decode(gemv.GemvConfig(), jnp.bfloat16), gemv.resolve_decode(gemv.GemvConfig(), jnp.float16)
    assert (bf16.decode, bf16.x_layout, f16.decode, f16.x_layout) == ("prmt_bf16x2", "pairs", "prmt_f16x2", "split")
    w = _weight(96, 512, seed=5)
    x = _normal(9, (6, 512), jnp.float32) * 0.5
    x = x * jnp.asarray([1e15, 1e-15, 0.0, 1.0, 1.0, 1.0])[:, None]
    x = x.at[4, 17].set(3e4)
    x = x.at[5, :256].multiply(1e4).at[5, 256:].multiply(1e-4).astype(jnp.bfloat16)
    want = kernels.nf4_matmul_reference(x.astype(jnp.float32), w)
    y = gemv.nf4_gemv(x, w, config=gemv.GemvConfig(split=split), interpret=INTERPRET)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert not bool(jnp.any(y[2]))
    for r in (0, 1, 3, 4, 5):
        assert _rel_err(y[r], want[r]) < 1e-2, r


def test_gemv_f16x2_with_float32_activations():
    """fp32 x with the default config: fp16 pairs of the scaled x, bf16-level error."""
    w = _weight(64, 256, seed=6)
    x = _normal(4, (3, 256), jnp.float32) * 1e5
    y = gemv.nf4_gemv(x, w, interpret=INTERPRET)
    with jax.default_matmul_precision("highest"):
        want = kernels.nf4_matmul_reference(x, w)
    assert y.dtype == jnp.float32 and _rel_err(y, want) < 1e-2


def test_gemv_float32_and_lead_dims():
    w = _weight(64, 192)  # K/64 = 3 blocks: not a power of two
    x = _normal(3, (2, 1, 192), jnp.float32)
    y = gemv.nf4_gemv(x, w, config=gemv.GemvConfig(decode="gather16"), interpret=INTERPRET)
    assert y.shape == (2, 1, 64) and y.dtype == jnp.float32
    with jax.default_matmul_precision("highest"):  # a GPU's default fp32 dot is TF32
        want = kernels.nf4_matmul_reference(x, w)
    assert _rel_err(y, want) < 1e-5  # fp32 end to end (the gather decode keeps the fp32 codebook)


def test_gemv_rejects_what_it_does_not_handle():
    assert "multiple of blocksize" in gemv.supports(_weight(64, 172), 1)
    assert "M=9" in gemv.supports(_weight(64, 128), 9)
    with pytest.raises(ValueError, match="M=16"):
        gemv.nf4_gemv(jnp.ones((16, 128), jnp.bfloat16), _weight(64, 128), interpret=True)
    with pytest.raises(ValueError, match="x_layout='pairs'.*decode is 'prmt_f16x2'"):
        gemv.nf4_gemv(jnp.ones((1, 128), jnp.float16), _weight(64, 128), config=gemv.GemvConfig(x_layout="pairs"),
                      interpret=True)


def test_gemv_auto_split_targets_about_2560_programs():
    """``split=0``: the power of two (at most 8) nearest in ratio to 2560 programs over the row tiles — the
    joined 7B decode shapes get 2 (N = 22016), 4 (N = 12288) and 8 (N = 4096) K slices."""
    assert [gemv.auto_split(n // 16) for n in (22016, 12288, 4096, 172 * 16, 64)] == [2, 4, 8, 8, 8]
    assert gemv.auto_split(2560) == 1 and gemv.auto_split(10**6) == 1 and gemv.auto_split(1) == 8


def test_gemv_llama7b_size():
    """down_proj-sized weight [N=4096, K=11008] (K/64 = 172 blocks), M = 1, default configs."""
    w = _weight(4096, 11008)
    x = _normal(5, (1, 11008), jnp.bfloat16)
    dy = _normal(6, (1, 4096), jnp.bfloat16)
    assert _rel_err(gemv.nf4_gemv(x, w, config=gemv.GemvConfig(block_n=256, blocks_per_step=32, split=2),
                                  interpret=INTERPRET), kernels.nf4_matmul_reference(x, w)) < 1e-2
    assert _rel_err(gemv.nf4_gemv_t(dy, w, config=gemv.GemvConfig(block_n=256, blocks_per_step=4, split=2),
                                    interpret=INTERPRET), kernels.nf4_matmul_t_reference(dy, w)) < 1e-2


@pytest.mark.parametrize("n, k, quant_type, double_quant, blocksize", [
    (64, 128, "nf4", True, 64), (172, 64, "fp4", False, 64), (64, 172, "nf4", True, 64),  # blocks span rows
    (96, 768, "fp4", True, 128), (1, 64, "nf4", False, 64),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_pallas_dequantize_is_bit_exact(n, k, quant_type, double_quant, blocksize, dtype):
    w = quantize(_normal(n * k, (n, k)) * 0.05, quant_type=quant_type,
                 double_quant=double_quant, blocksize=blocksize)
    want = np.asarray(jax.lax.bitcast_convert_type(dequantize(w, dtype), jnp.uint16))
    for config in (dequant.DequantConfig(block_rows=16), dequant.DequantConfig(scales_in_kernel=True)):
        got = dequant.dequantize_pallas(w, dtype, config=config, interpret=INTERPRET)
        assert got.shape == (n, k) and got.dtype == dtype
        # in-kernel scale decoding may round differently on a GPU (FMA); in interpret mode it is XLA's
        if not (config.scales_in_kernel and double_quant and not INTERPRET):
            np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint16)), want)
    x = _normal(1, (5, k), dtype)
    dy = _normal(2, (5, n), dtype)
    dq = functools.partial(dequant.nf4_matmul_dequant, interpret=INTERPRET)
    dq_t = functools.partial(dequant.nf4_matmul_t_dequant, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(dq(x, w)), np.asarray(kernels.nf4_matmul_reference(x, w)))
    np.testing.assert_array_equal(np.asarray(dq_t(dy, w)), np.asarray(kernels.nf4_matmul_t_reference(dy, w)))
    assert "float32" in dequant.supports(w, jnp.float32)


@pytest.mark.parametrize("n, k", [(64, 172), (172, 64), (128, 256)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_xla_reduce_equals_reference(n, k, m):
    w = _weight(n, k, double_quant=n != 172)
    x = _normal(7, (m, k), jnp.bfloat16)
    dy = _normal(8, (m, n), jnp.bfloat16)
    with kernels.use_implementation("xla_reduce"):
        assert kernels.select_implementation(x, w) == "xla_reduce"
        y, dx = jax.jit(kernels.nf4_matmul)(x, w), jax.jit(kernels.nf4_matmul_t)(dy, w)
        assert kernels.select_implementation(jnp.ones((9, k)), w) == "xla"  # M > 8
    assert _rel_err(y, kernels.nf4_matmul_reference(x, w)) < 1e-2
    assert _rel_err(dx, kernels.nf4_matmul_t_reference(dy, w)) < 1e-2


@pytest.mark.parametrize("impl", ["gemv", "pallas_dequant", "xla_reduce", "small_m"])
def test_grad_through_nf4_dense_with_each_implementation(monkeypatch, impl):
    """jax.grad through nf4_dense with each implementation forced (Pallas in interpret mode on CPU)
    runs its forward and input-gradient kernels and equals the gradient through the XLA path."""
    w = _weight(64, 256)
    x = _normal(9, (2, 3, 256), jnp.bfloat16)  # M = 6 <= 8
    a = _normal(10, (256, 8)) * 0.1
    b = _normal(11, (8, 64)) * 0.1

    def loss(x, a, b):
        return jnp.sum(nf4_dense(x, w, a, b, scaling=2.0).astype(jnp.float32) ** 2)

    with kernels.use_implementation("xla"):
        ref = jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
    calls = []
    monkeypatch.setattr(kernels, "select_implementation", lambda x, w, **kw: calls.append(x.shape) or impl)
    for mod, name in ((gemv, "nf4_gemv"), (gemv, "nf4_gemv_t"), (dequant, "nf4_matmul_dequant"),
                      (dequant, "nf4_matmul_t_dequant"), (small_m, "nf4_matmul_small_m"), (small_m, "nf4_matmul_t_small_m")):
        monkeypatch.setattr(mod, name, functools.partial(getattr(mod, name), interpret=INTERPRET))
    got = jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
    assert len(calls) == 2
    for g, r in zip(got, ref):
        assert _rel_err(g, r) < 2e-2


def test_select_implementation_falls_back_off_gpu_and_on_unsupported_shapes():
    w, x = _weight(64, 128), jnp.ones((1, 128), jnp.bfloat16)
    for name in ("gemv", "pallas_dequant", "pallas"):
        with kernels.use_implementation(name):
            expected = "xla" if jax.default_backend() != "gpu" else ("pallas_dequant" if name == "pallas_dequant" else "gemv")
            assert kernels.select_implementation(x, w) == expected
            # K not a multiple of the blocksize: the GEMV does not apply
            w172 = _weight(64, 172)
            assert kernels.select_implementation(jnp.ones((1, 172), jnp.bfloat16), w172) in ("xla", "pallas_dequant")
    with kernels.use_implementation("auto"):
        assert kernels.select_implementation(x, w) == ("xla" if jax.default_backend() != "gpu" else "gemv")


def test_auto_picks_the_measured_kernels_on_a_gpu(monkeypatch):
    """``auto`` on a GPU (backend faked here): the GEMV for a forward of up to 2 rows, the small-M
    kernel for up to 64 rows (forward and input gradient), the Pallas dequantize for more rows, XLA
    for fp32, stacked leaves and off-GPU."""
    w, wodd = _weight(64, 128), _weight(64, 172)
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    pick = kernels.select_implementation
    assert pick(jnp.ones((1, 128), jnp.bfloat16), w) == "gemv"
    assert pick(jnp.ones((2, 1, 128), jnp.float16), w) == "gemv"  # batch-2 decoding
    assert pick(jnp.ones((3, 1, 128), jnp.bfloat16), w) == "small_m"
    assert pick(jnp.ones((8, 1, 128), jnp.float16), w) == "small_m"  # batch-8 decoding
    assert pick(jnp.ones((64, 128), jnp.bfloat16), w) == "small_m"
    assert pick(jnp.ones((65, 128), jnp.bfloat16), w) == "pallas_dequant"
    assert pick(jnp.ones((1, 1, 64), jnp.bfloat16), w, transpose=True) == "small_m"
    assert pick(jnp.ones((1, 65, 64), jnp.bfloat16), w, transpose=True) == "pallas_dequant"
    assert pick(jnp.ones((1, 128), jnp.bfloat16), _weight(72, 128)) == "gemv"  # N % 16 != 0: no small-M kernel
    assert pick(jnp.ones((4, 128), jnp.bfloat16), _weight(72, 128)) == "pallas_dequant"
    assert pick(jnp.ones((4, 512, 128), jnp.bfloat16), w) == "pallas_dequant"
    assert pick(jnp.ones((1, 172), jnp.bfloat16), wodd) == "pallas_dequant"  # whole blocks overall, K % 64 != 0
    assert pick(jnp.ones((1, 128), jnp.float32), w) == "xla"
    stacked = jax.vmap(lambda a: quantize(a))(jnp.ones((2, 64, 128)))
    assert pick(jnp.ones((3, 128), jnp.bfloat16), stacked) == "xla"
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "cpu")
    assert pick(jnp.ones((1, 128), jnp.bfloat16), w) == "xla"


class _FakeGpu:
    platform = "gpu"

    def __init__(self, compute_capability: str):
        self.compute_capability = compute_capability


def test_gpus_before_ampere_get_no_bf16x2_ptx(monkeypatch):
    """On a CUDA GPU older than compute capability 8.0 (faked here: a T4 is 7.5) the bf16 paths that emit
    bf16x2 PTX are not chosen: bf16 activations take the fp16x2 GEMV and the Pallas dequantize instead of
    the small-M kernel; fp16 keeps the small-M kernel; Ampere and Hopper keep the bf16 paths."""
    w = _weight(64, 128)
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    for cc, bf16_ok in (("7.5", False), ("7.0", False), ("8.0", True), ("9.0", True)):
        monkeypatch.setattr(jax, "devices", lambda cc=cc: [_FakeGpu(cc)])
        assert prmt_decode.bf16x2_supported() == bf16_ok, cc
        want = "prmt_bf16x2" if bf16_ok else "prmt_f16x2"
        assert gemv.resolve_decode(gemv.GemvConfig(), jnp.bfloat16).decode == want, cc
        assert gemv.resolve_decode(gemv.GemvConfig(), jnp.float16).decode == "prmt_f16x2"
        pick = kernels.select_implementation
        assert pick(jnp.ones((8, 128), jnp.bfloat16), w) == ("small_m" if bf16_ok else "pallas_dequant"), cc
        assert pick(jnp.ones((8, 128), jnp.float16), w) == "small_m"
        assert pick(jnp.ones((1, 128), jnp.bfloat16), w) == "gemv"
        with kernels.use_implementation("small_m"):
            assert pick(jnp.ones((8, 128), jnp.bfloat16), w) == ("small_m" if bf16_ok else "xla"), cc
    monkeypatch.setattr(jax, "devices", lambda: [_FakeGpu("gfx90a")])  # not a CUDA capability
    assert prmt_decode.bf16x2_supported()


def test_use_implementation_rejects_unknown_names():
    with pytest.raises(ValueError, match="not one of"):
        with kernels.use_implementation("cuda-magic"):
            pass


@pytest.mark.parametrize("lead,n,k,quant_type,double_quant", [
    ((1,), 64, 128, "nf4", True), ((2, 5), 172, 64, "fp4", False), ((3,), 64, 172, "nf4", True), ((7,), 96, 256, "nf4", False),
])
def test_split_xla_path_equals_the_reference(lead, n, k, quant_type, double_quant):
    """The dispatcher's XLA path (even/odd columns decoded apart, contraction split) equals dequantize +
    dot: to fp32 rounding in fp32, at bf16 level in bf16, forward and input gradient, with leading axes;
    K = 172 (blocks spanning rows) takes the reference path."""
    from qlora_jax.kernels.nf4_matmul import nf4_matmul_split, nf4_matmul_t_split

    w = quantize(_normal(1, (n, k)) * 0.05, quant_type=quant_type, double_quant=double_quant)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        x = _normal(2, (*lead, k), dtype)
        dy = _normal(3, (*lead, n), dtype)
        y = nf4_matmul_split(x, w)
        dx = nf4_matmul_t_split(dy, w)
        assert y.shape == (*lead, n) and y.dtype == dtype and dx.shape == (*lead, k) and dx.dtype == dtype
        assert _rel_err(y, kernels.nf4_matmul_reference(x, w)) < tol
        assert _rel_err(dx, kernels.nf4_matmul_t_reference(dy, w)) < tol


def test_kernel_profile_benchmark_runs_and_checks_every_candidate(tmp_path):
    """``benchmarks/kernel_profile.py --tiny`` (CPU smoke test): every GEMV candidate runs and equals the
    XLA reference to bf16 level; the JSON holds one row per candidate."""
    import json

    from benchmarks import kernel_profile

    out = tmp_path / "profile.json"
    assert kernel_profile.main(["--tiny", "--trace-dir", str(tmp_path / "trace"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == list(kernel_profile.CANDIDATES)
    for r in rows:
        assert "error" not in r, r
        if r["impl"] != "bf16_dot":
            assert r["rel_err"] < 1e-2, r


def test_kernels_benchmark_runs_with_device_timing_requested(tmp_path):
    """``benchmarks/kernels.py`` (issue 3's table) on one small shape with ``--trace-dir``: both directions,
    the dispatcher's kernel within bf16 level of XLA's dequantize + dot; on CPU the profiler sees no GPU
    kernels, so the rows say their speed columns are wall-clock."""
    import json

    from benchmarks import kernels as kernels_bench

    out = tmp_path / "kernels.json"
    assert kernels_bench.main(["--m", "3", "--shapes", "128x192", "--runs", "1", "--json", str(out),
                               "--trace-dir", str(tmp_path / "trace")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["direction"], r["m"]) for r in rows] == [("fwd", 3), ("bwd", 3)]
    for r in rows:
        assert r["rel_err_vs_xla"] < 1e-2 and r["fused_us"] > 0
        if jax.default_backend() == "gpu":
            assert r["timing"] == "device" and r["fused_device_us"] > 0, r
        else:
            assert r["timing"] == "wall" and r["fused_device_us"] is None, r


def test_kernels_read_joined_tensors_with_one_offset_per_scale_group():
    """A weight joined by ``concat_rows`` (q/k/v as one) carries one double-quant offset per group of
    256 scales; the GEMV (both register decodes and in-kernel / XLA scales), the small-M kernels and the
    Pallas dequantize read it exactly as the reference does."""
    from qlora_jax.nf4 import concat_rows

    k = 512
    w = concat_rows([quantize(_normal(i, (n, k)) * s) for i, (n, s) in
                     enumerate([(64, 0.02), (32, 2.0), (48, 0.4)])])
    x = _normal(7, (2, k), jnp.bfloat16)
    ref = kernels.nf4_matmul_reference(x, w)
    for config in (gemv.GemvConfig(), gemv.GemvConfig(decode="prmt", split=2), gemv.GemvConfig(scales_in_kernel=False),
                   gemv.GemvConfig(decode="gather16", block_n=8)):
        assert _rel_err(gemv.nf4_gemv(x, w, config=config, interpret=INTERPRET), ref) < 1e-2, config
    assert _rel_err(small_m.nf4_matmul_small_m(x, w, interpret=INTERPRET), ref) < 1e-2
    dy = _normal(8, (5, w.shape[0]), jnp.bfloat16)
    assert _rel_err(small_m.nf4_matmul_t_small_m(dy, w, interpret=INTERPRET), kernels.nf4_matmul_t_reference(dy, w)) < 1e-2
    got = dequant.dequantize_pallas(w, jnp.float16, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(dequantize(w, jnp.float16), np.float32),
                               rtol=1e-3, atol=0)
