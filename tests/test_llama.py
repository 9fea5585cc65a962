"""The Flax LLaMA against transformers' LlamaForCausalLM: float logits equal, NF4 logits equal a
reference built from the dequantized weights, greedy generation gives the same tokens, and the
model's machinery (scan over stacked layers, remat policies, KV cache, padding) is consistent."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.convert import convert
from qlora_jax.models.checkpoint import load_model
from qlora_jax.models.llama import (
    KVCache,
    LORA_TARGETS,
    Llama,
    LlamaConfig,
    LoRAConfig,
    QuantConfig,
    RopeScaling,
)
from qlora_jax.nf4 import QuantizedTensor, dequantize
from qlora_jax.nf4_dense import Frozen

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

F32 = QuantConfig(quantize=False, param_dtype="float32", compute_dtype="float32")


@pytest.fixture(scope="module")
def hf_stories(stories):
    return transformers.LlamaForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(stories, tmp_path_factory):
    """stories260K converted twice: fp32 weights, and NF4 (double quant, blocksize 64)."""
    root = tmp_path_factory.mktemp("converted")
    convert(stories, root / "f32", quant=F32, progress=False)
    convert(stories, root / "nf4", progress=False)
    return root


def _hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return hf(torch.tensor(ids), **kw).logits.float().numpy()


IDS = np.array([[1, 403, 407, 261, 378, 429, 260, 5, 17, 300, 2, 99], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])


def test_config_reads_transformers_keys(stories):
    """config.json keys map to the dataclass; both rope spellings (v4 rope_scaling/rope_theta and
    v5 rope_parameters) give the same config; unsupported variants fail loudly."""
    cfg = LlamaConfig.from_hf_config(stories)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 8, 512)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None
    base = json.loads((stories / "config.json").read_text())
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v4 = LlamaConfig.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **rope}})
    v5 = LlamaConfig.from_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **rope}})
    assert v4 == v5 and v4.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and v4.rope_theta == 5e5
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    mistral = LlamaConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": None})
    assert mistral == cfg
    with pytest.raises(ValueError, match="sliding_window"):
        LlamaConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": 4096})
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        LlamaConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_presets_have_llama_sizes():
    """The 7B preset has LLaMA-7B's 6.74B parameters (counted on an abstract NF4 model)."""
    cfg = LlamaConfig.preset("7b")
    model = nnx.eval_shape(lambda: Llama(cfg, lora=LoRAConfig(r=0), rngs=nnx.Rngs(0)))
    n = 0
    for _, v in nnx.to_flat_state(nnx.state(model, Frozen)):
        val = v.get_value()
        n += val.size * cfg.num_hidden_layers if isinstance(val, QuantizedTensor) else int(np.prod(val.shape))
    assert abs(n - 6_738_415_616) < 1e6, n
    assert LlamaConfig.preset("65b").num_hidden_layers == 80


def test_fp32_logits_equal_transformers_on_stories260k(converted, hf_stories):
    """With fp32 weights the logits are transformers' to float precision."""
    model = load_model(converted / "f32")
    ours = np.asarray(model(jnp.asarray(IDS)))
    ref = _hf_logits(hf_stories, IDS)
    assert ours.dtype == np.float32 and ours.shape == (2, 12, 512)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_bf16_logits_close_to_transformers_bf16(stories, hf_stories, tmp_path):
    """The 16-bit baseline (bf16 weights and compute) tracks transformers in bf16."""
    convert(stories, tmp_path / "bf16", quant=QuantConfig(quantize=False), progress=False)
    model = load_model(tmp_path / "bf16")
    assert model.layers.self_attn.q_proj.weight.get_value().dtype == jnp.bfloat16
    ours = np.asarray(model(jnp.asarray(IDS)))
    hf = transformers.LlamaForCausalLM.from_pretrained(stories, dtype=torch.bfloat16).eval()
    ref = _hf_logits(hf, IDS)
    full = _hf_logits(hf_stories, IDS)
    # Both are bf16 roundings of the fp32 model; ours is no further from it than transformers' is.
    err_ours, err_hf = np.abs(ours - full).mean(), np.abs(ref - full).mean()
    print(f"\nbf16 mean |logit error| vs fp32: ours {err_ours:.4f}, transformers {err_hf:.4f}")
    assert err_ours < 2 * err_hf + 1e-3


def test_padding_mask_matches_transformers(converted, hf_stories):
    """Left and right padding: at real tokens, logits equal transformers' with the same mask."""
    model = load_model(converted / "f32")
    mask = np.ones_like(IDS)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what transformers derives from the mask
    ours = np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    with torch.no_grad():
        ref = hf_stories(torch.tensor(IDS), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def _random_hf_model(tmp_path, **overrides):
    torch.manual_seed(0)
    kw = dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    kw.update(overrides)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # norms at 1 would hide a transposed or misplaced norm weight
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    return hf


@pytest.mark.parametrize(
    "overrides", [
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "attention_bias": True, "mlp_bias": True},
    ],
    ids=["llama3", "linear", "biases"],
)
def test_random_gqa_config_with_rope_scaling_equals_transformers(tmp_path, overrides):
    """A random model with GQA (6 query / 2 KV heads), head_dim != hidden/heads, untied head, and
    RoPE scaling or linear biases: converted fp32 logits equal transformers' over 200 positions
    (past the original context, so every frequency band of llama3 scaling matters)."""
    hf = _random_hf_model(tmp_path, **overrides)
    if overrides.get("attention_bias"):
        with torch.no_grad():  # transformers initializes biases to zero, which would test nothing
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
        hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours", quant=F32, progress=False)
    model = load_model(tmp_path / "ours")
    rope_type = overrides["rope_parameters"]["rope_type"]
    assert (model.cfg.rope_scaling.rope_type if model.cfg.rope_scaling else "default") == rope_type
    assert not model.cfg.tie_word_embeddings and model.cfg.attention_bias == bool(overrides.get("attention_bias"))
    ids = np.random.default_rng(0).integers(0, 97, (2, 200))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def _dequantized_reference(model: Llama) -> Llama:
    """The same architecture with float32 linear weights equal to the model's dequantized NF4 weights."""
    ref = Llama(model.cfg, lora=model.lora, quant=F32, rngs=nnx.Rngs(1))
    deq = jax.tree.map(
        lambda v: dequantize(v, jnp.float32) if isinstance(v, QuantizedTensor) else jnp.asarray(v, jnp.float32),
        nnx.to_pure_dict(nnx.state(model, Frozen)),
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    state = nnx.state(ref, Frozen)
    nnx.replace_by_pure_dict(state, deq)
    nnx.update(ref, state)
    return ref


STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big dog. The dog was sad because he lost his ball.")


def test_nf4_logits_equal_dequantized_reference_and_stay_close_to_full_precision(converted, hf_stories, stories):
    """NF4 logits equal a float model built from the same dequantized weights; against the
    full-precision model, the KL divergence of next-token distributions on a story is small."""
    model = load_model(converted / "nf4", compute_dtype="float32")
    ours = np.asarray(model(jnp.asarray(IDS)))
    np.testing.assert_allclose(ours, np.asarray(_dequantized_reference(model)(jnp.asarray(IDS))), atol=2e-3, rtol=1e-3)

    tok = transformers.AutoTokenizer.from_pretrained(stories)
    ids = np.array([[1] + tok(STORY)["input_ids"]])
    ours = np.asarray(model(jnp.asarray(ids)))
    ref = _hf_logits(hf_stories, ids)
    lp, lq = jax.nn.log_softmax(ref), jax.nn.log_softmax(ours)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))
    agree = float(np.mean(ref.argmax(-1) == ours.argmax(-1)))
    print(f"\nstories260K NF4 vs fp32: KL(fp32 || nf4) = {kl:.4f} nats/token, top-1 agreement {agree:.2f}")
    assert kl < 0.5 and agree >= 0.6


def _greedy(model: Llama, prompt: list[int], n: int, cache_len: int = 64) -> list[int]:
    step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))
    cache = KVCache.init(model.cfg, 1, cache_len, jnp.dtype(model.quant.compute_dtype))
    logits, cache = step(model, jnp.asarray([prompt]), cache)
    out = []
    for _ in range(n):
        tok = int(jnp.argmax(logits[0, -1]))
        out.append(tok)
        logits, cache = step(model, jnp.asarray([[tok]]), cache)
    return out


def test_greedy_generation_equals_transformers(converted, hf_stories, stories):
    """40 greedy tokens from "Once upon a time" through the KV cache are transformers' tokens."""
    tok = transformers.AutoTokenizer.from_pretrained(stories)
    prompt = [1] + tok("Once upon a time")["input_ids"]
    with torch.no_grad():
        ref = hf_stories.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    ref_new = ref[0, len(prompt):].tolist()
    ours = _greedy(load_model(converted / "f32"), prompt, 40)
    print("\n" + tok.decode(prompt[1:] + ours))
    assert ours == ref_new


def test_kv_cache_decoding_equals_full_forward_with_padding():
    """Prefill + one-token steps through the cache give the logits of one full forward pass, with
    a left-padded row (padding slots masked, positions counted from the first real token)."""
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Llama(cfg, lora=LoRAConfig(r=2), quant=F32, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 10)))
    mask = jnp.asarray(np.array([[0, 0, 0] + [1] * 7, [1] * 10]))
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    full = model(ids, attention_mask=mask, positions=pos)
    cache = KVCache.init(cfg, 2, 16, jnp.float32)
    logits, cache = model(ids[:, :6], attention_mask=mask[:, :6], positions=pos[:, :6], cache=cache)
    steps = [logits]
    for t in range(6, 10):
        logits, cache = model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache)
        steps.append(logits)
    inc = jnp.concatenate(steps, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(inc)[real], np.asarray(full)[real], atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 10


def _eqns(jaxpr, name: str) -> list:
    """Every ``name`` equation of ``jaxpr``, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _eqns(sub, name)
    return out


def test_decode_step_writes_only_the_new_slot_into_the_stacked_cache():
    """With each layer's own arrays (the decode loop's layer buffers), every layer writes its step's keys and
    values into the stacked ``[L, B, S, K, D]`` cache as one ``[1, B, 1, K, D]`` update and nothing else
    rewrites the cache (slicing a layer's cache out and setting it back had XLA rewrite the whole slice four
    times per layer and token on a GPU); logits and cache equal the scanned layers'."""
    from flax import nnx as _nnx

    model = _tiny(quantize=False)
    model.eval()
    cfg, B, S = model.cfg, 2, 12
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, (B, 6)))
    _, cache = model(ids[:, :5], cache=KVCache.init(cfg, B, S, jnp.float32))
    _, stacked = _nnx.split(model.layers)
    layer_states = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_hidden_layers)]

    def step(cache, layer_states=None):
        return model(ids[:, 5:], cache=cache, layer_states=layer_states)

    jaxpr = jax.make_jaxpr(lambda c: step(c, layer_states))(cache).jaxpr
    writes = [e for e in _eqns(jaxpr, "dynamic_update_slice") if e.invars[0].aval.shape == cache.k.shape]
    K, D = cfg.num_key_value_heads, cfg.head_dim
    assert len(writes) == 2 * cfg.num_hidden_layers
    assert all(e.invars[1].aval.shape == (1, B, 1, K, D) for e in writes)
    others = [e for name in ("scatter", "concatenate", "select_n", "add") for e in _eqns(jaxpr, name)]
    assert all(e.outvars[0].aval.shape != cache.k.shape for e in others)
    (got, got_cache), (want, want_cache) = step(cache, layer_states), step(cache)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_cache.k, want_cache.k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_cache.v, want_cache.v, rtol=1e-5, atol=1e-6)
    assert int(got_cache.index) == int(want_cache.index) == 6


def _tiny(remat="none", quantize=True, **lora):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    quant = QuantConfig(quantize=quantize, param_dtype="float32", compute_dtype="float32")
    return Llama(cfg, lora=LoRAConfig(r=4, **lora), quant=quant, remat=remat, rngs=nnx.Rngs(0))


def _loss_and_lora_grads(model):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    # Non-zero B so that gradients reach A as well.
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        v.set_value(v.get_value() + 0.01)

    @nnx.jit
    def f(model):
        def loss_fn(model):
            logits = model(ids[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

        return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)

    return f(model)


@pytest.fixture(scope="module")
def no_remat_loss_and_grads():
    return _loss_and_lora_grads(_tiny("none"))


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_projections", "save_attention", "offload"])
def test_remat_policies_give_identical_loss_and_grads(policy, no_remat_loss_and_grads):
    """Rematerialization changes what is saved, never the numbers: loss and LoRA gradients equal
    the no-remat run (offload-to-host is skipped where the backend has no pinned_host memory)."""
    loss0, g0 = no_remat_loss_and_grads
    try:
        loss1, g1 = _loss_and_lora_grads(_tiny(policy))
    except Exception as e:  # noqa: BLE001
        if policy == "offload":
            pytest.skip(f"offload to pinned_host does not run on {jax.default_backend()}: {type(e).__name__}: {str(e)[:200]}")
        raise
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(g0))


def test_bf16_training_gradient_runs_every_product_on_bf16_operands():
    """The LoRA gradient of a bf16 NF4 model (the training configuration) runs every linear-layer and
    ``lm_head`` product on bf16 operands: the adapters' backward products and the ``lm_head`` input
    gradient take the fp32 cotangents rounded to bf16, never fp32 copies of bf16 tensors (as PyTorch's
    autocast). (XLA's attention, whose products have 4-5-D operands, is left out: on a GPU cuDNN's
    fused attention replaces it.)"""
    from test_nf4_dense import _dot_operand_dtypes

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Llama(cfg, lora=LoRAConfig(r=4, dropout=0.1), quant=QuantConfig(quantize=True), remat="full",
                  rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    model.train()
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora):
        logits = nnx.merge(graphdef, lora, rest, copy=True)(ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr, max_rank=3)
    assert len(dtypes) > 30
    assert all(d == ("bfloat16", "bfloat16") for d in dtypes), sorted(set(dtypes))


def test_layers_are_stacked_and_scanned():
    """Every layer parameter has a leading layer axis and the forward jaxpr does not grow with depth."""
    def n_eqns(layers):
        cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16)
        m = Llama(cfg, lora=LoRAConfig(r=2), rngs=nnx.Rngs(0))
        for _, v in nnx.to_flat_state(nnx.state(m.layers)):
            for leaf in jax.tree.leaves(v.get_value()):
                assert leaf.shape[0] == layers
        graphdef, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 4), jnp.int32)))(state)
        return len(jaxpr.eqns)

    assert n_eqns(2) == n_eqns(6)


def test_lora_targets_and_16bit_variant_share_parameter_paths():
    """LoRA goes only where targeted; the 16-bit model has exactly the NF4 model's LoRA paths and
    shapes (adapters are interchangeable), and a fresh adapter does not change the logits."""
    partial = _tiny(targets=("q_proj", "v_proj"))
    names = {p[-2] for p, _ in nnx.to_flat_state(nnx.state(partial, nnx.LoRAParam))}
    assert names == {"q_proj", "v_proj"}
    nf4, bf = _tiny(), _tiny(quantize=False)
    shapes = lambda m: {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam))}
    assert shapes(nf4) == shapes(bf) and {p[-2] for p in shapes(nf4)} == set(LORA_TARGETS)
    no_lora = Llama(nf4.cfg, lora=LoRAConfig(r=0), quant=nf4.quant, rngs=nnx.Rngs(0))
    nnx.update(no_lora, nnx.state(nf4, Frozen))
    ids = jnp.ones((1, 5), jnp.int32)
    np.testing.assert_allclose(nf4(ids), no_lora(ids), rtol=1e-6, atol=1e-6)


def test_lora_dropout_is_active_only_in_train_mode():
    """With LoRA dropout, train mode draws fresh masks per call; eval mode is deterministic."""
    m = _tiny(dropout=0.5)
    for _, v in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam)):
        v.set_value(v.get_value() + 0.05)
    ids = jnp.ones((1, 6), jnp.int32)
    m.train()
    assert not np.allclose(m(ids), m(ids))
    m.eval()
    np.testing.assert_array_equal(m(ids), m(ids))


def test_lora_finetuning_lowers_the_loss_and_leaves_frozen_weights(converted):
    """A few AdamW steps on the LoRA parameters of the NF4 stories260K model (dropout on, full
    remat) lower the loss on a batch; the optimizer holds moments only for LoRA leaves; the frozen
    NF4 weights, embeddings and norms are bit-identical afterwards."""
    import optax

    model = load_model(converted / "nf4", lora=LoRAConfig(r=8, alpha=16, dropout=0.05), remat="full")
    opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.LoRAParam)
    n_lora = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert n_lora == 2 * 7 and len(jax.tree.leaves(opt.opt_state)) == 1 + 2 * n_lora
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, Frozen))
    ids = jnp.asarray(IDS)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits = model(ids[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    model.train()
    losses = [float(step(model, opt)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, Frozen)), frozen_before)


def test_right_padded_training_loss_needs_no_padding_mask():
    """The training loss leaves the padding mask out (so GPUs run fused causal attention): on
    right-padded batches, loss and LoRA gradients equal those computed with the mask."""
    from qlora_jax.step import IGNORE_INDEX, causal_lm_loss
    from qlora_jax.trainer import _lm_loss

    model = _tiny("none")
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        v.set_value(v.get_value() + 0.01)
    ids = np.random.default_rng(3).integers(0, 64, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 2:] = 0
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def masked(lora):
        m = nnx.merge(graphdef, lora, rest, copy=True)
        s, n = causal_lm_loss(m(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"])
        return s / n

    def trained(lora):
        s, n = _lm_loss(nnx.merge(graphdef, lora, rest, copy=True), batch)
        return s / n

    (l0, g0), (l1, g1) = jax.value_and_grad(masked)(lora), jax.value_and_grad(trained)(lora)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
