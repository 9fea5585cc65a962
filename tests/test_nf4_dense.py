"""nf4_dense / NF4Dense: forward and gradients equal a float reference through the dequantized
weight; the frozen weight gets no gradient and is never saved dequantized for the backward pass."""

from __future__ import annotations

import contextlib
import importlib
import io

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from qlora_jax import Frozen, LoRADense, NF4Dense, dequantize, nf4_dense, quantize


def _setup(in_f=172, out_f=64, r=8, batch=(2, 5), seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    w = quantize(jax.random.normal(k[0], (out_f, in_f)) * 0.05)
    x = jax.random.normal(k[1], (*batch, in_f), dtype)
    a = jax.random.normal(k[2], (in_f, r)) * 0.1
    b = jax.random.normal(k[3], (r, out_f)) * 0.1
    return w, x, a, b


def _reference(x, w_dense, a, b, scaling, bias=None):
    y = x @ w_dense.T + scaling * (x @ a @ b)
    return y if bias is None else y + bias


@pytest.mark.parametrize("batch", [(2, 5), (1,), (1, 1), (3, 2, 4)])
def test_forward_equals_float_reference(batch):
    w, x, a, b = _setup(batch=batch)
    bias = jnp.arange(64, dtype=jnp.float32) * 0.01
    y = nf4_dense(x, w, a, b, scaling=2.0, bias=bias, compute_dtype=jnp.float32)
    ref = _reference(x, dequantize(w, jnp.float32), a, b, 2.0, bias)
    assert y.shape == (*batch, 64)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_bf16_forward_close_to_float_reference():
    w, x, a, b = _setup()
    y = nf4_dense(x, w, a, b, scaling=2.0)
    assert y.dtype == jnp.bfloat16
    ref = _reference(x, dequantize(w, jnp.float32), a, b, 2.0)
    assert float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)) < 1e-2


def test_gradients_equal_float_reference_and_weight_gets_none():
    w, x, a, b = _setup()
    w_dense = dequantize(w, jnp.float32)

    def loss(x, a, b, w):
        return jnp.sum(jnp.sin(nf4_dense(x, w, a, b, scaling=2.0, compute_dtype=jnp.float32)))

    def ref_loss(x, a, b):
        return jnp.sum(jnp.sin(_reference(x, w_dense, a, b, 2.0)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), allow_int=True))(x, a, b, w)
    ref = jax.grad(ref_loss, argnums=(0, 1, 2))(x, a, b)
    for g, r in zip(grads[:3], ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    for leaf in jax.tree.leaves(grads[3]):  # the frozen weight: zero (float) or float0 (integer) cotangents
        assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))


def _dot_operand_dtypes(jaxpr, max_rank: int = 8) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general in ``jaxpr`` (nested jaxprs included) whose operands
    have at most ``max_rank`` dimensions."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and max(v.aval.ndim for v in eqn.invars) <= max_rank:
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(_dot_operand_dtypes(sub, max_rank))
    return out


def test_bf16_backward_products_take_bf16_operands_and_match_float_reference():
    """In bf16 compute every product of the forward and backward pass (LoRA ``A`` / ``B``, their
    gradients, the input gradient) takes bf16 operands (fp32 accumulation, as PyTorch's autocast),
    and the gradients stay within bf16 rounding of the fp32 reference, dropout included."""
    w, x, a, b = _setup(in_f=256, out_f=128, batch=(4, 16))
    rng = jax.random.key(3)

    def loss(x, a, b, dtype):
        y = nf4_dense(x, w, a, b, scaling=2.0, compute_dtype=dtype, dropout_rate=0.1, dropout_rng=rng)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    dtypes = _dot_operand_dtypes(jax.make_jaxpr(grad, static_argnums=3)(x, a, b, jnp.bfloat16).jaxpr)
    assert len(dtypes) >= 6 and all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes
    got = grad(x, a, b, jnp.bfloat16)
    ref = grad(x, a, b, jnp.float32)
    for g, r, name in zip(got, ref, ("x", "A", "B")):
        assert g.dtype == r.dtype, name
        err = float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
        assert err < 2e-2, (name, err)


def test_backward_saves_only_the_packed_weight():
    w, x, a, b = _setup(in_f=256, out_f=128)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(lambda x, a, b: nf4_dense(x, w, a, b, scaling=2.0).sum(), x, a, b)
    saved = buf.getvalue()
    assert "u8[16384]" in saved  # the packed codes
    for shape in ("[128,256]", "[256,128]"):
        assert shape not in saved, saved


def test_dropout_only_touches_the_adapter_and_is_seeded():
    w, x, a, b = _setup()
    base = nf4_dense(x, w, None, None, compute_dtype=jnp.float32)
    y0 = nf4_dense(x, w, a, b, scaling=2.0, compute_dtype=jnp.float32)
    y1 = nf4_dense(x, w, a, b, scaling=2.0, compute_dtype=jnp.float32, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    y2 = nf4_dense(x, w, a, b, scaling=2.0, compute_dtype=jnp.float32, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y0, y1)
    x_zero_lora = nf4_dense(x, w, a, jnp.zeros_like(b), scaling=2.0, compute_dtype=jnp.float32, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    np.testing.assert_allclose(x_zero_lora, base, rtol=1e-6, atol=1e-6)


def test_bad_shapes_raise_clear_errors():
    w, x, a, b = _setup()
    with pytest.raises(ValueError, match="x.shape"):
        nf4_dense(x[..., :100], w, a, b)
    with pytest.raises(ValueError, match="lora_a"):
        nf4_dense(x, w, a[:10], b)
    with pytest.raises(ValueError, match="both"):
        nf4_dense(x, w, a, None)


def test_module_trains_only_lora_params():
    layer = NF4Dense(172, 64, r=8, alpha=16, dropout=0.1, use_bias=True, compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.lora_b[...], 0)  # PEFT init: the adapter starts as a no-op
    assert float(jnp.max(jnp.abs(layer.lora_a[...]))) <= 1 / np.sqrt(172)
    opt = nnx.Optimizer(layer, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    trainable = nnx.state(layer, nnx.LoRAParam)
    assert sorted(k for k, _ in nnx.to_flat_state(trainable)) == [("lora_a",), ("lora_b",)]
    assert len(jax.tree.leaves(opt.opt_state)) == 1 + 2 * 2 + 0  # count + mu/nu of lora_a, lora_b

    frozen_before = jax.tree.map(np.asarray, nnx.state(layer, Frozen))
    x = jax.random.normal(jax.random.key(1), (4, 172))
    target = jax.random.normal(jax.random.key(2), (4, 64))

    @nnx.jit
    def step(layer, opt):
        def loss_fn(layer):
            return jnp.mean((layer(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
        opt.update(layer, grads)
        return loss

    losses = [float(step(layer, opt)) for _ in range(20)]
    assert losses[-1] < losses[0]
    frozen_after = jax.tree.map(np.asarray, nnx.state(layer, Frozen))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)


def test_module_eval_mode_is_deterministic_and_accepts_a_quantized_weight():
    w = quantize(jax.random.normal(jax.random.key(0), (32, 64)))
    layer = NF4Dense(64, 32, r=4, dropout=0.5, weight=w, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 64))
    layer.eval()
    np.testing.assert_array_equal(layer(x), layer(x))
    with pytest.raises(ValueError, match="weight shape"):
        NF4Dense(64, 16, weight=w, rngs=nnx.Rngs(0))


def test_without_adapter():
    layer = NF4Dense(64, 32, r=0, compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 64))
    np.testing.assert_allclose(layer(x), x @ dequantize(layer.weight.get_value(), jnp.float32).T, rtol=1e-5, atol=1e-6)
    assert not nnx.state(layer, nnx.LoRAParam)


def test_lora_dense_is_nf4_dense_with_a_float_weight():
    """The 16-bit baseline layer has the same parameter paths as NF4Dense and computes
    x @ W.T + scaling * x @ A @ B with its float weight; the weight gets no gradient."""
    w = jax.random.normal(jax.random.key(0), (32, 64)) * 0.1
    dense = LoRADense(64, 32, r=4, alpha=8, weight=w, param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    quant = NF4Dense(64, 32, r=4, alpha=8, weight=w, compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    paths = lambda m: sorted(k for k, _ in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam)))
    assert paths(dense) == paths(quant) == [("lora_a",), ("lora_b",)]
    b = jax.random.normal(jax.random.key(1), (4, 32))
    dense.lora_b[...] = b
    x = jax.random.normal(jax.random.key(2), (3, 64))
    np.testing.assert_allclose(dense(x), x @ w.T + 2.0 * (x @ dense.lora_a[...] @ b), rtol=1e-5, atol=1e-5)
    gw = jax.grad(lambda w: nf4_dense(x, w, compute_dtype=jnp.float32).sum())(w)
    np.testing.assert_array_equal(gw, 0)
    with pytest.raises(ValueError, match="weight shape"):
        LoRADense(64, 16, weight=w, rngs=nnx.Rngs(0))


def test_dropout_mask_drops_the_requested_share_and_rescales_exactly():
    """16-bit dropout masks: the empirical drop rate is the requested one (within sampling error),
    the rescale keeps the expectation (mean of mask / kept_share = 1), and a key gives one mask."""
    from qlora_jax.nf4_dense import dropout_keep_mask

    for rate in (0.05, 0.1, 0.5):
        keep, kept = dropout_keep_mask(jax.random.key(3), rate, (400, 1000))
        assert abs(kept - (1 - rate)) < 2**-16
        dropped = 1.0 - float(jnp.mean(keep))
        assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / keep.size)
        assert abs(float(jnp.mean(keep)) / kept - 1.0) < 5e-3
    a, _ = dropout_keep_mask(jax.random.key(4), 0.05, (64,))
    b, _ = dropout_keep_mask(jax.random.key(4), 0.05, (64,))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("first_out, joined", [(256, True), (8, False)], ids=["joined", "per-layer"])
@pytest.mark.parametrize("weights", ["nf4", "float"])
def test_fused_layers_equal_each_layer_in_eval_mode(first_out, joined, weights):
    """``fuse_dense`` + ``fused_dense`` (layers that read the same input as one: joined base weights,
    ``A`` side by side, block-diagonal ``B``) give each layer's own eval-mode output: with and without
    an adapter, with a bias, ranks and widths that differ; layers whose double-quantized scales do
    not fill whole groups of 256 (``first_out=8``) stay separate, with the same outputs."""
    from qlora_jax.nf4_dense import fuse_dense, fused_dense

    cls = NF4Dense if weights == "nf4" else LoRADense
    rngs = nnx.Rngs(params=0, dropout=1)
    kw = dict(param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs=rngs)
    layers = [cls(256, first_out, r=8, **kw), cls(256, 64, r=0, **kw), cls(256, 128, r=4, alpha=32.0, use_bias=True, **kw)]
    for i, layer in enumerate(layers):
        if layer.lora_b is not None:
            layer.lora_b[...] = jax.random.normal(jax.random.key(10 + i), layer.lora_b.shape) * 0.1
    layers[2].bias[...] = jnp.linspace(-1.0, 1.0, 128)
    x = jax.random.normal(jax.random.key(3), (2, 3, 256), jnp.float32)
    group = fuse_dense(layers)
    fused_out = fused_dense(x, group)
    assert len(group) == (1 if joined or weights == "float" else 3)
    for layer, got in zip(layers, fused_out, strict=True):
        want = layer(x, deterministic=True)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_dropout_bits_are_uniform_and_independent_across_elements_and_keys():
    """The hash behind the dropout masks: its top 16 bits are uniform (chi-square over 256 bins), and
    neither neighbouring elements (along rows and columns) nor the masks of two keys, also shifted
    against each other, are correlated beyond sampling error."""
    from qlora_jax.nf4_dense import dropout_bits

    shape = (512, 1024)
    n = np.prod(shape)
    bits = np.asarray(dropout_bits(jax.random.key(0), shape))
    counts = np.bincount((bits >> 24).ravel(), minlength=256)
    chi2 = float(np.sum((counts - n / 256) ** 2 / (n / 256)))
    assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2  # 255 degrees of freedom, 6 sigma
    u = (bits >> 16).astype(np.float64) / 65536 - 0.5
    other = (np.asarray(dropout_bits(jax.random.key(1), shape)) >> 16).astype(np.float64) / 65536 - 0.5
    bound = 6 / np.sqrt(n)  # 6 sigma for the correlation of independent uniforms
    corr = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    assert abs(corr(u[:, 1:], u[:, :-1])) < bound  # along a row
    assert abs(corr(u[1:], u[:-1])) < bound  # along a column
    for shift in (0, 1, 7, 1024):
        assert abs(corr(u.ravel()[shift:], other.ravel()[: n - shift])) < bound, shift


def test_dropout_bits_of_huge_arrays_hash_rows_and_columns():
    """Past 2**32 elements (a 32-bit index would wrap: e.g. 16 x 16384 tokens x 22016 features) the bits
    come from hashing row and column in turn: the shape is accepted (traced abstractly, nothing
    allocated), and that hash, run on a small array, is as uniform and uncorrelated as the default."""
    nd = importlib.import_module("qlora_jax.nf4_dense")

    huge = (16, 16384, 22016)
    out = jax.eval_shape(lambda k: nd.dropout_keep_mask(k, 0.05, huge)[0], jax.random.key(0))
    assert out.shape == huge and out.dtype == jnp.bool_
    seed = jax.random.bits(jax.random.key(0), (2,), jnp.uint32)
    bits = np.asarray(nd._dropout_bits_by_row(seed, (512, 1024)))
    n = bits.size
    counts = np.bincount((bits >> 24).ravel(), minlength=256)
    assert float(np.sum((counts - n / 256) ** 2 / (n / 256))) < 255 + 6 * np.sqrt(2 * 255)
    u = (bits >> 16).astype(np.float64) / 65536 - 0.5
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        assert abs(float(np.corrcoef(a.ravel(), b.ravel())[0, 1])) < 6 / np.sqrt(n)


@pytest.mark.parametrize("first_out, joined", [(256, True), (8, False)], ids=["joined", "per-layer"])
def test_shared_input_layers_train_as_each_layer_does(first_out, joined, monkeypatch):
    """``shared_input_dense`` (training: one frozen product for layers that read the same input, each
    adapter with its own dropout) gives each layer's own train-mode output and the same LoRA gradients,
    drawing the same dropout keys; weights that cannot join exactly (``first_out=8``: double-quantized
    scales short of whole groups of 256) run one product per layer."""
    nd = importlib.import_module("qlora_jax.nf4_dense")  # the module (the package exports the function)
    joins = []
    real_concat = nd.concat_rows
    monkeypatch.setattr(nd, "concat_rows", lambda ts: joins.append(len(ts)) or real_concat(ts))

    def build():
        rngs = nnx.Rngs(params=0, dropout=1)
        kw = dict(param_dtype=jnp.float32, compute_dtype=jnp.float32, dropout=0.3, rngs=rngs)
        layers = [NF4Dense(256, first_out, r=8, **kw), NF4Dense(256, 64, r=0, **kw),
                  NF4Dense(256, 128, r=4, alpha=32.0, use_bias=True, **kw)]
        for i, layer in enumerate(layers):
            if layer.lora_b is not None:
                layer.lora_b[...] = jax.random.normal(jax.random.key(10 + i), layer.lora_b.shape) * 0.1
        layers[2].bias[...] = jnp.linspace(-1.0, 1.0, 128)
        return nnx.List(layers)

    x = jax.random.normal(jax.random.key(3), (2, 3, 256), jnp.float32)

    def loss_and_grads(f):
        layers = build()

        def loss(lora, rest):
            ls = nnx.merge(graphdef, lora, rest, copy=True)
            outs = f(ls)
            return sum(jnp.sum(jnp.sin(o)) for o in outs), outs

        graphdef, lora, rest = nnx.split(layers, nnx.LoRAParam, ...)
        (_, outs), grads = jax.value_and_grad(loss, has_aux=True)(lora, rest)
        return outs, grads

    joins.clear()
    outs, grads = loss_and_grads(lambda ls: nd.shared_input_dense(x, list(ls), deterministic=False))
    assert joins == ([3] if joined else [])  # one joined weight (x gets no gradient: no backward product)
    ref_outs, ref_grads = loss_and_grads(lambda ls: [layer(x, deterministic=False) for layer in ls])
    for got, want in zip(outs, ref_outs, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
