"""Model-independent step pieces: LM loss, gradient accumulation, clipping by global norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qlora_jax import data
from qlora_jax.step import (
    IGNORE_INDEX,
    accumulate_gradients,
    causal_lm_loss,
    clip_by_global_norm,
    global_norm,
)

VOCAB, DIM = 512, 16


@pytest.fixture(scope="module")
def real_batch(shared):
    """8 alpaca examples tokenized with stories260K's tokenizer: very different target counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared / "models/stories260K")
    examples = data.load_records(str(shared / "data/instruct/alpaca_en_demo.json"), "alpaca")[:8]
    tokenized = data.tokenize_examples(examples, tok, source_max_len=256, target_max_len=512)
    longest = max(len(ex["input_ids"]) for ex in tokenized)
    batch = data.pad_batch(tokenized, data.bucket_length(longest, 64))
    assert len({int((row != IGNORE_INDEX).sum()) for row in batch["labels"]}) > 3
    return {k: jnp.asarray(v) for k, v in batch.items()}


def tiny_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"emb": jax.random.normal(k1, (VOCAB, DIM)), "out": jax.random.normal(k2, (DIM, VOCAB)) * 0.1}


def loss_fn(params, batch, rng=None):
    h = params["emb"][batch["input_ids"]]  # (B, T, D)
    if rng is not None:
        h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
    return causal_lm_loss(h @ params["out"], batch["labels"])


def test_causal_lm_loss_matches_torch_cross_entropy(real_batch):
    """Sum and count equal torch's shifted cross entropy with ignore_index=-100."""
    params = tiny_params()
    logits = params["emb"][real_batch["input_ids"]] @ params["out"]
    loss_sum, n = causal_lm_loss(logits, real_batch["labels"])
    t_logits = torch.from_numpy(np.array(logits[:, :-1])).reshape(-1, VOCAB)
    t_labels = torch.from_numpy(np.array(real_batch["labels"][:, 1:])).reshape(-1).long()
    expected = torch.nn.functional.cross_entropy(t_logits, t_labels, ignore_index=-100,
                                                 reduction="sum")
    assert int(n) == int((t_labels != -100).sum())
    np.testing.assert_allclose(float(loss_sum), float(expected), rtol=1e-5)


@pytest.mark.parametrize("num_micro", [2, 4, 8])
def test_accumulated_gradients_equal_one_big_batch(real_batch, num_micro):
    """K micro-batches (different token counts each) give the big batch's token-mean loss and grad."""
    params = tiny_params()
    big = jax.jit(lambda p, b: accumulate_gradients(loss_fn, p, b, 1))(params, real_batch)
    acc = jax.jit(lambda p, b: accumulate_gradients(loss_fn, p, b, num_micro))(params, real_batch)

    def direct(p):
        s, n = loss_fn(p, real_batch)
        return s / n

    loss, grads = jax.value_and_grad(direct)(params)
    np.testing.assert_allclose(big[0], loss, rtol=1e-6)
    np.testing.assert_allclose(acc[0], loss, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(big[1][name], grads[name], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(acc[1][name], grads[name], rtol=1e-4, atol=1e-7)


def test_accumulation_gives_each_micro_batch_its_own_rng(real_batch):
    """With an rng, micro-batch i uses fold_in(rng, i): equal to summing the pieces by hand."""
    params, rng = tiny_params(), jax.random.key(7)
    loss, grads = accumulate_gradients(loss_fn, params, real_batch, 2, rng=rng)
    halves = [jax.tree.map(lambda x: x[i * 4:(i + 1) * 4], real_batch) for i in range(2)]
    sums = [loss_fn(params, h, jax.random.fold_in(rng, i)) for i, h in enumerate(halves)]
    total = sum(n for _, n in sums)
    np.testing.assert_allclose(loss, sum(s for s, _ in sums) / total, rtol=1e-5)
    assert not np.allclose(loss, accumulate_gradients(loss_fn, params, real_batch, 2)[0])
    with pytest.raises(ValueError, match="multiple"):
        accumulate_gradients(loss_fn, params, real_batch, 3)


def test_clip_by_global_norm_matches_torch():
    """Same result as torch.nn.utils.clip_grad_norm_ above and below the threshold."""
    grads = {"a": jax.random.normal(jax.random.key(1), (4, 8, 3)),
             "b": jax.random.normal(jax.random.key(2), (5,)) * 3}
    for max_norm in (0.3, 100.0):
        clipped, norm = clip_by_global_norm(grads, max_norm)
        tensors = [torch.tensor(np.asarray(grads[k])) for k in ("a", "b")]
        for t in tensors:
            t.grad = t.clone()
        t_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
        np.testing.assert_allclose(norm, float(t_norm), rtol=1e-6)
        for k, t in zip(("a", "b"), tensors):
            np.testing.assert_allclose(clipped[k], t.grad.numpy(), rtol=1e-6, atol=1e-8)
        if max_norm == 0.3:
            np.testing.assert_allclose(global_norm(clipped), 0.3, rtol=1e-5)
        else:
            jax.tree.map(np.testing.assert_array_equal, clipped, grads)
