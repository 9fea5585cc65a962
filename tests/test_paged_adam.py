"""Paged AdamW: state in host memory, paged per layer, same result as optax.adamw."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_jax.paged_adam import PagedState, page_plan, paged_adamw, state_memory_kinds

LAYERS, DIM, RANK = 4, 48, 8


def lora_params(key=0):
    """A LoRA-shaped pytree: per-projection A [L, in, r] / B [L, r, out] stacked over layers."""
    ks = jax.random.split(jax.random.key(key), 4)
    return {
        "layers": {
            "q_proj": {"lora_a": jax.random.normal(ks[0], (LAYERS, DIM, RANK)) * 0.1,
                       "lora_b": jax.random.normal(ks[1], (LAYERS, RANK, DIM)) * 0.01},
            "down_proj": {"lora_a": jax.random.normal(ks[2], (LAYERS, 2 * DIM, RANK)) * 0.1,
                          "lora_b": jnp.zeros((LAYERS, RANK, DIM))},
        },
        "norm_bias": jax.random.normal(ks[3], (DIM,)) * 0.1,
    }


def grads_for(params, step):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1000 + step), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def run(tx, params, steps):
    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    state = tx.init(params)
    for i in range(steps):
        params, state, updates = step(params, state, grads_for(params, i))
    return params, state, updates


def moments(state, params, page_size):
    """Reassemble a PagedState's mu / nu into the parameters' tree structure."""
    leaves, treedef = jax.tree.flatten(params)
    out = {}
    for name in ("mu", "nu"):
        parts = [[] for _ in leaves]
        for page, page_state in zip(page_plan(params, page_size), state.pages):
            for chunk, x in zip(page, getattr(page_state[0], name)):
                parts[chunk.leaf].append(np.asarray(x))
        out[name] = jax.tree.unflatten(treedef, [np.concatenate(p) for p in parts])
    return out


SCHEDULE = optax.linear_schedule(1e-3, 2e-2, transition_steps=3)


@pytest.mark.parametrize("page_size,in_flight", [(None, 2), (DIM * RANK, 1), (1000, None)])
def test_paged_equals_optax_adamw(page_size, in_flight):
    """N steps of paged AdamW == optax.adamw (params, updates and both moments), to 1-2 ulp.

    (Not bit-exact in general: XLA fuses the per-page and the whole-tree graphs differently;
    even optax.adamw eager vs. jitted differs by an ulp on CPU.)
    """
    kw = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    params = lora_params()
    p_ref, s_ref, u_ref = run(optax.adamw(SCHEDULE, **kw), params, 5)
    tx = paged_adamw(SCHEDULE, **kw, page_size=page_size, pages_in_flight=in_flight)
    p_pag, s_pag, u_pag = run(tx, params, 5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p_pag, p_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), u_pag, u_ref)
    got = moments(s_pag, params, page_size)
    for name in ("mu", "nu"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12),
                     got[name], getattr(s_ref[0], name))
    assert int(s_pag.pages[0][0].count) == int(s_ref[0].count) == 5


def test_state_is_in_pinned_host_memory_and_updates_on_device():
    """init and every update leave all state leaves in pinned_host; updates are on the device."""
    params = lora_params()
    tx = paged_adamw(1e-3, page_size=DIM * RANK)
    state = tx.init(params)
    assert state_memory_kinds(state) == {"pinned_host"}
    _, state, updates = run(tx, params, 2)
    assert isinstance(state, PagedState)
    assert state_memory_kinds(state) == {"pinned_host"}
    assert state_memory_kinds(updates) == {"device"}
    assert "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}


def test_paging_off_is_plain_adamw_on_device():
    params = lora_params()
    tx = paged_adamw(1e-3, paged=False)
    state = tx.init(params)
    assert state_memory_kinds(state) == {"device"}
    ref = optax.adamw(1e-3).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref)


@pytest.mark.parametrize("in_flight", [2, None])
def test_gpu_lowering_moves_each_page_to_the_device_and_back(in_flight):
    """Lowered for CUDA, the update copies every page's state to the device and back to
    pinned_host separately (one placement per state array), chains the pages with one
    optimization barrier per page beyond the first `in_flight`, and returns the state on host."""
    params = lora_params()
    page_size = DIM * RANK  # one layer of q_proj.lora_a per page
    tx = paged_adamw(1e-3, page_size=page_size, pages_in_flight=in_flight)
    state = tx.init(params)
    plan = page_plan(params, page_size)
    assert len(plan) > LAYERS  # per-layer pages, not one per leaf

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    text = (jax.jit(step).trace(params, state, grads_for(params, 0))
            .lower(lowering_platforms=("cuda",)).as_text())
    barriers = text.count("stablehlo.optimization_barrier")
    assert barriers == (0 if in_flight is None else len(plan) - in_flight)
    arrays_per_page = [1 + 2 * len(page) for page in plan]  # count, mu chunks, nu chunks
    to_device = text.count('_xla_buffer_placement = "device"')
    to_host = text.count('_xla_buffer_placement = "pinned_host"')
    assert to_device == sum(arrays_per_page)
    assert to_host >= sum(arrays_per_page)
    results = re.search(r"func.func public @main\(.*?\) -> \((.*?)\) \{", text, re.S).group(1)
    n_state = len(jax.tree.leaves(state))
    assert results.count('mhlo.memory_kind = "pinned_host"') == n_state


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3), min_size=1, max_size=6),
    page_size=st.one_of(st.none(), st.integers(1, 200)),
)
def test_page_plan_covers_every_element_once(shapes, page_size):
    """Pages are at most page_size elements (unless one row is bigger) and tile each leaf."""
    leaves = [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in shapes]
    plan = page_plan(leaves, page_size)
    covered = [np.zeros(max(1, s[0]) if s else 1, int) for s in shapes]
    for page in plan:
        sizes = []
        for c in page:
            shape = shapes[c.leaf]
            rows = shape[0] if shape else 1
            start, stop = (0, rows) if c.start is None else (c.start, c.stop)
            covered[c.leaf][start:stop] += 1
            sizes.append((stop - start) * (math.prod(shape[1:]) if shape else 1))
        if page_size is not None and sum(sizes) > page_size:  # only a single too-big row
            assert len(page) == 1 and page[0].start is not None
            assert page[0].stop - page[0].start == 1
    for cov in covered:
        assert (cov == 1).all()


def test_state_from_other_params_is_rejected():
    tx = paged_adamw(1e-3, page_size=DIM * RANK)
    state = tx.init({"a": jnp.zeros((2, DIM, RANK))})
    with pytest.raises(ValueError, match="pages"):
        tx.update({"a": jnp.zeros((3, DIM, RANK))}, state, None)
    with pytest.raises(ValueError, match="page_size"):
        paged_adamw(1e-3, page_size=0).init({"a": jnp.zeros(3)})
    with pytest.raises(ValueError, match="pages_in_flight"):
        paged_adamw(1e-3, pages_in_flight=0)


def test_nnx_optimizer_over_nf4dense_lora_params():
    """nnx.Optimizer(wrt=LoRAParam) with paged AdamW: state stays in pinned_host and the
    trained adapter matches optax.adamw's."""
    from flax import nnx

    from qlora_jax import NF4Dense

    w = jax.random.normal(jax.random.key(0), (32, 64))
    x = jax.random.normal(jax.random.key(1), (8, 64))
    y = jax.random.normal(jax.random.key(2), (8, 32))

    @nnx.jit
    def step(layer, opt):
        def loss(m):
            return jnp.mean((m(x).astype(jnp.float32) - y) ** 2)

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
        opt.update(layer, grads)

    trained = []
    for tx in (optax.adamw(1e-2), paged_adamw(1e-2, page_size=128)):
        layer = NF4Dense(64, 32, r=4, alpha=8, weight=w, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(layer, tx, wrt=nnx.LoRAParam)
        for _ in range(3):
            step(layer, opt)
        trained.append(layer)
        if len(trained) == 2:
            assert state_memory_kinds(jax.tree.leaves(opt.opt_state)) == {"pinned_host"}
    for name in ("lora_a", "lora_b"):
        a, b = (np.asarray(getattr(m, name)[...]) for m in trained)
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_orbax_round_trip_restores_the_state_into_host_memory(tmp_path):
    """A saved PagedState restored against its abstract tree comes back equal and in pinned_host."""
    import orbax.checkpoint as ocp

    params = lora_params()
    tx = paged_adamw(1e-3, page_size=DIM * RANK)
    _, state, _ = run(tx, params, 2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "opt", state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpointer.restore(tmp_path / "opt", abstract)
    assert isinstance(restored, PagedState)
    assert state_memory_kinds(restored) == {"pinned_host"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, state)


@pytest.mark.parametrize("paged", [False, True])
def test_fp32_master_follows_the_fp32_trajectory_with_bf16_params(paged):
    """16-bit parameters with ``fp32_master=True``: the master copy equals plain fp32 AdamW on the same
    gradients step for step, the parameters are that master rounded to bf16, and the gradients may be
    bf16; without the master, tiny updates vanish in bf16 (the reason it exists)."""
    from qlora_jax.paged_adam import with_fp32_master

    p32 = {"a": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.full((3,), 1.0)}
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)  # the same starting values
    ref_tx, tx = optax.adamw(1e-4), paged_adamw(1e-4, paged=paged, page_size=16 if paged else None, fp32_master=True)
    ref_state, state = ref_tx.init(p32), tx.init(p16)
    plain_tx = optax.adamw(1e-4)
    plain_state, plain16 = plain_tx.init(p16), p16
    for i in range(5):
        g = {"a": jax.random.normal(jax.random.key(10 + i), (8, 4)).astype(jnp.bfloat16),
             "b": jnp.ones((3,), jnp.bfloat16)}  # a steady push: Adam moves b by ~lr per step
        u, ref_state = ref_tx.update(jax.tree.map(lambda x: x.astype(jnp.float32), g), ref_state, p32)
        p32 = optax.apply_updates(p32, u)
        u, state = jax.jit(tx.update)(g, state, p16)
        p16 = optax.apply_updates(p16, u)
        u, plain_state = plain_tx.update(g, plain_state, plain16)
        plain16 = optax.apply_updates(plain16, u)
    for k in p32:
        assert p16[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(p16[k]), np.asarray(p32[k].astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(plain16["b"]), np.ones(3))  # 5e-4 below bf16's step at 1.0
    assert float(p32["b"][0]) < 1.0 - 4e-4
    with pytest.raises(ValueError, match="needs the parameters"):
        with_fp32_master(optax.adamw(1e-4)).update(p16, with_fp32_master(optax.adamw(1e-4)).init(p16))
