"""Pieces of the training step that do not depend on the model: loss, gradient accumulation, clipping.

All functions are pure and jit-able; ``train_step`` itself (model + optimizer) builds on them.

Loss convention: a loss function returns ``(loss_sum, num_items)`` — the summed per-token loss
and the number of tokens it sums over — so that gradient accumulation over micro-batches
gives exactly the gradient of the whole batch's token mean, whatever the micro-batches'
token counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100

LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token cross entropy, summed over the tokens whose label is not ``IGNORE_INDEX``.

    Args:
      logits: ``[B, T, V]`` any float dtype (computed in float32).
      labels: ``[B, T]`` int, aligned with the inputs (Hugging Face convention): position
        ``t`` of ``logits`` predicts ``labels[:, t + 1]``.

    Returns:
      ``(loss_sum, num_tokens)``, float32 scalars.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask).astype(jnp.float32)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm of all leaves together (float32 scalar)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """Scale ``grads`` so that their global norm is at most ``max_norm``.

    Uses PyTorch's ``clip_grad_norm_`` rule, which the original QLoRA (HF Trainer,
    ``max_grad_norm=0.3``) trains with: ``g * min(1, max_norm / (norm + 1e-6))``.

    Returns:
      ``(clipped_grads, norm_before_clipping)``.
    """
    norm = global_norm(grads)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), norm


def split_micro_batches(batch: Any, num_micro: int) -> Any:
    """``[B, ...]`` leaves -> ``[num_micro, B // num_micro, ...]`` (consecutive rows per micro-batch)."""
    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"batch size {x.shape[0]} is not a multiple of {num_micro=}")
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    num_micro: int,
    *,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """Mean loss and its gradient over ``batch``, computed in ``num_micro`` micro-batches.

    A ``jax.lax.scan`` over micro-batches keeps one micro-batch's activations alive at a
    time; the gradient sums are carried in float32.

    Args:
      loss_fn: ``loss_fn(params, micro_batch) -> (loss_sum, num_items)``, or
        ``loss_fn(params, micro_batch, rng)`` when ``rng`` is given (each micro-batch gets
        its own ``jax.random.fold_in(rng, i)``).
      params: the pytree to differentiate (e.g. the LoRA parameters).
      batch: pytree of arrays ``[B, ...]``, ``B`` a multiple of ``num_micro``.
      num_micro: number of micro-batches (1 = no accumulation, no scan).

    Returns:
      ``(loss, grads)`` with ``loss = sum(loss_sum) / sum(num_items)`` and ``grads`` its
      gradient (same structure and dtypes as ``params``) — equal to what one call on the
      whole batch gives.
    """
    if num_micro < 1:
        raise ValueError(f"{num_micro=} must be >= 1")

    def sum_and_grad(micro_batch, i):
        args = (micro_batch,) if rng is None else (micro_batch, jax.random.fold_in(rng, i))

        def f(p):
            loss_sum, n = loss_fn(p, *args)
            return loss_sum.astype(jnp.float32), n.astype(jnp.float32)

        (loss_sum, n), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss_sum, n, grads

    if num_micro == 1:
        loss_sum, n, grads = sum_and_grad(batch, 0)
    else:
        micro = split_micro_batches(batch, num_micro)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(carry, xs):
            acc_loss, acc_n, acc_grads = carry
            micro_batch, i = xs
            loss_sum, n, grads = sum_and_grad(micro_batch, i)
            acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
            return (acc_loss + loss_sum, acc_n + n, acc_grads), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, n, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(num_micro)))
    denom = jnp.maximum(n, 1.0)  # a batch with no target tokens gives loss 0, grads 0
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return loss_sum / denom, grads
