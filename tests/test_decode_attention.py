"""The decode-attention kernel (one query per row over the KV cache) equals XLA's masked attention, and
decoding through it generates the tokens the XLA path does. On CPU the kernel runs in interpret mode; on
a GPU (``JAX_PLATFORMS=cuda``) compiled. Its CUDA lowering is tested in ``test_kernels.py``."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels import decode_attention as da

INTERPRET = jax.default_backend() != "gpu"


def _rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


CASES = [
    # (B, H, K, D, S, length, stacked layers (None: one layer's cache), config)
    (1, 4, 4, 64, 37, 20, None, da.DecodeAttentionConfig(block_s=16)),  # length < S, last step moved back
    (3, 6, 2, 8, 100, 77, 3, da.DecodeAttentionConfig(block_s=16, splits=3)),  # GQA (3 query heads per KV head)
    (2, 8, 8, 128, 5, 5, 2, da.DecodeAttentionConfig()),  # S below one step: the step shrinks to 4 slots
    (2, 4, 1, 64, 64, 64, None, da.DecodeAttentionConfig(block_s=16, splits=4)),  # MQA, whole cache, 4 slices
    (1, 2, 2, 32, 300, 129, 2, da.DecodeAttentionConfig()),  # auto slices
]


@pytest.mark.parametrize("b, h, k, d, s, length, layers, config", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_kernel_equals_masked_xla_attention(b, h, k, d, s, length, layers, config, dtype):
    """Random cache, random visible slots (the newest always visible), slots from ``length`` on full of
    garbage that must not count; every layer of a stacked cache."""
    # Inputs drawn with NumPy: jax.random compiles a threefry program per shape and dtype (0.2-2 s each on
    # CPU, 4 per case, about half of this test's time), and the check only needs random operands.
    rng = np.random.default_rng(b * h + s)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    q = normal(b, h, d)
    lead = () if layers is None else (layers,)
    kc, vc = np.array(normal(*lead, b, s, k, d)), normal(*lead, b, s, k, d)
    kc[..., length:, :, :] = 1e4  # never written slots: a kernel reading them would show
    kc = jnp.asarray(kc)
    mask = rng.random((b, s)) < 0.7
    mask[:, length - 1] = True
    mask = jnp.asarray(mask)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for layer in (None,) if layers is None else range(layers):
        got = da.decode_attention_pallas(q, kc, vc, mask, jnp.int32(length), layer=layer, config=config,
                                         interpret=INTERPRET)
        with jax.default_matmul_precision("highest"):  # XLA's fp32 dots on a GPU: TF32 otherwise
            want = da.decode_attention_reference(q, kc, vc, mask, jnp.int32(length), layer=layer)
        assert got.shape == (b, h, d) and got.dtype == dtype
        assert _rel_err(got, want) < tol, layer


def test_row_that_sees_no_slot_gets_zeros_and_others_are_unaffected():
    q = jax.random.normal(jax.random.key(0), (2, 2, 16))
    kc = jax.random.normal(jax.random.key(1), (2, 24, 2, 16))
    vc = jax.random.normal(jax.random.key(2), (2, 24, 2, 16))
    mask = jnp.zeros((2, 24), bool).at[1, 3:10].set(True)
    cfg = da.DecodeAttentionConfig(block_s=8, splits=3)
    got = da.decode_attention_pallas(q, kc, vc, mask, jnp.int32(10), config=cfg, interpret=INTERPRET)
    np.testing.assert_array_equal(got[0], 0.0)
    with jax.default_matmul_precision("highest"):
        want = da.decode_attention_reference(q, kc, vc, mask, jnp.int32(10))
    assert _rel_err(got[1], want[1]) < 1e-5


def test_dispatch_and_bad_input():
    """``auto`` runs XLA off a GPU; ``use_attention`` forces either; shapes the kernel cannot take say why."""
    q = jnp.ones((1, 4, 12))
    kc = jnp.ones((1, 8, 2, 12))
    assert "head_dim=12" in da.supports(q, kc)
    assert "multiple" in da.supports(jnp.ones((1, 3, 16)), jnp.ones((1, 8, 2, 16)))
    with pytest.raises(ValueError, match="head_dim=12 is not a power of two"):
        da.decode_attention_pallas(q, kc, kc, jnp.ones((1, 8), bool), jnp.int32(8), interpret=True)
    with pytest.raises(ValueError, match="not one of"):
        with da.use_attention("flash"):
            pass
    out = da.decode_attention(q, kc, kc, jnp.ones((1, 8), bool), jnp.int32(8))  # XLA: any head_dim
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_generation_through_the_kernel_gives_the_xla_tokens(stories, tmp_path):
    """Greedy and seeded-sampling decoding of left-padded prompts on stories260K (NF4) through the kernel
    (interpreted on CPU) give the XLA attention's tokens, with the stacked cache read in place (layer
    buffers, unrolled layers) and with scanned layers (one layer's cache per step)."""
    from qlora_jax.convert import convert
    from qlora_jax.generate import Generator, SamplingConfig, load_for_generation

    out = tmp_path / "nf4"
    convert(stories, out, progress=False)
    base = Generator(*load_for_generation(out))
    prompts = ["Once upon a time", "Lily and her mom went to the park. They saw"]
    kw = dict(max_new_tokens=8, chunk_size=8, seed=5)
    for options in (dict(layer_buffers=True), dict(unroll_layers=False)):
        xla = Generator(base.model, base.tokenizer, attention="xla", **options)
        kernel = Generator(base.model, base.tokenizer, attention="pallas", **options)
        for sampling in (SamplingConfig(), SamplingConfig(temperature=1.0, top_k=20)):
            want = [c.tokens for c in xla.generate(prompts, sampling=sampling, **kw)]
            calls = []
            real = da.decode_attention_pallas
            with pytest.MonkeyPatch.context() as mp:  # the kernel is what the "pallas" decode traced
                mp.setattr(da, "decode_attention_pallas", lambda *a, **k: calls.append(1) or real(*a, **k))
                got = [c.tokens for c in kernel.generate(prompts, sampling=sampling, **kw)]
            assert got == want and calls  # a new static argument: traced afresh, through the kernel
    with pytest.raises(ValueError, match="attention='flash'"):
        Generator(base.model, base.tokenizer, attention="flash")


def test_benchmark_smoke_runs(tmp_path):
    """``benchmarks/decode_attention.py`` on a tiny cache: XLA, the default and a named configuration,
    each with its error against XLA at bf16 level."""
    from benchmarks import decode_attention as bench

    out = tmp_path / "da.json"
    assert bench.main(["--batch", "2", "--slots", "40", "--heads", "4/2x16", "--layers", "2", "--runs", "1",
                       "--config", "s2=block_s:16,splits:2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["xla", "default", "s2"]
    assert rows[2]["config"]["splits"] == 2 and rows[2]["config"]["block_s"] == 16
    assert all(r["max_abs_err"] < 2e-2 and r["wall_us"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="unknown field 'warps'"):
        bench.parse_config("x=warps:8")
