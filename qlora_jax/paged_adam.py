"""Paged AdamW: the optimizer state lives in host memory and visits the device one page at a time.

QLoRA's paged optimizers (bitsandbytes ``PagedAdamW``) keep Adam's two moments in CUDA
unified memory so that a memory spike evicts them to the CPU instead of failing. JAX has no
unified memory; the explicit equivalent used here is:

* ``init`` places every state leaf in host memory (``pinned_host``, JAX's ``Space.Host``);
* ``update`` (called inside ``jit``) splits the state into *pages*; for each page it copies
  the page to the device (``jax.device_put(x, jax.memory.Space.Device)``), runs
  ``optax.adamw``'s update on it and copies the new state back to ``pinned_host``. The
  updates themselves (same shapes as the parameters) stay on the device. Optimization
  barriers chain the pages so that at most ``pages_in_flight`` of them are on the device.

Because each page runs ``optax.adamw`` itself, and Adam is elementwise, the math is that of
unpaged ``optax.adamw``; results agree to float rounding (1-2 ulp, from XLA fusing the paged
and the whole-tree graphs differently). ``paged=False`` returns plain ``optax.adamw``.

A page is at most ``page_size`` elements of one moment: small leaves are packed together,
leaves bigger than a page are cut along axis 0 (for per-layer stacked LoRA weights
``[L, in, r]`` a page of ``in * r`` elements is one layer). ``page_size=None`` makes every
leaf its own page. The layout depends only on the parameters' shapes, so it is recomputed
(statically) in ``update`` and is not stored.

On GPU the transfers lower to XLA host-offload annotations (``annotate_device_placement``);
on the CPU backend the memory kinds exist (``device``, ``pinned_host``, ``unpinned_host``)
but all are the same RAM, and JAX lowers ``device_put`` inside ``jit`` to nothing there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

HOST_MEMORY_KIND = "pinned_host"


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` along axis 0 of flattened leaf ``leaf`` (``start=None``: all of it)."""

    leaf: int
    start: int | None = None
    stop: int | None = None

    def take(self, x: jax.Array) -> jax.Array:
        return x if self.start is None else x[self.start : self.stop]


Page = tuple[Chunk, ...]


class PagedState(NamedTuple):
    """One ``optax.adamw`` state per page; every array leaf sits in host memory.

    ``pages[i]`` is the inner state for page ``i`` of ``page_plan(params, page_size)``; its
    moments are tuples of arrays, one per :class:`Chunk` of the page.
    """

    pages: tuple[Any, ...]


def page_plan(params: Any, page_size: int | None) -> tuple[Page, ...]:
    """Split the leaves of ``params`` into pages of at most ``page_size`` elements.

    Leaves are taken in ``jax.tree.leaves`` order. A leaf larger than ``page_size`` is cut
    along axis 0 into chunks of ``max(1, page_size // row_size)`` rows (a single row larger
    than a page is a page of its own); smaller leaves and chunks are packed greedily.
    """
    leaves = jax.tree.leaves(params)
    if page_size is None:
        return tuple((Chunk(i),) for i in range(len(leaves)))
    if page_size <= 0:
        raise ValueError(f"{page_size=} must be a positive number of elements (or None)")
    items: list[tuple[Chunk, int]] = []
    for i, leaf in enumerate(leaves):
        size = math.prod(leaf.shape)
        if size <= page_size or leaf.ndim == 0:
            items.append((Chunk(i), size))
            continue
        rows = leaf.shape[0]
        row_size = size // rows
        step = max(1, page_size // row_size)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            items.append((Chunk(i, start, stop), (stop - start) * row_size))
    pages: list[Page] = []
    current: list[Chunk] = []
    used = 0
    for chunk, size in items:
        if current and used + size > page_size:
            pages.append(tuple(current))
            current, used = [], 0
        current.append(chunk)
        used += size
    if current:
        pages.append(tuple(current))
    return tuple(pages)


def _page_leaves(leaves: list[jax.Array], page: Page) -> tuple[jax.Array, ...]:
    return tuple(chunk.take(leaves[chunk.leaf]) for chunk in page)


def _to_host(tree: Any) -> Any:
    return jax.device_put(tree, jax.memory.Space.Host)


def _to_device(tree: Any) -> Any:
    return jax.device_put(tree, jax.memory.Space.Device)


class MasterState(NamedTuple):
    """:func:`with_fp32_master`'s state: the wrapped optimizer's state and the fp32 copy of the parameters."""

    inner: Any
    master: Any


def with_fp32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``inner`` on an fp32 master copy of (16-bit) parameters, kept in the optimizer state.

    ``update(grads, state, params)`` casts the gradients to fp32, updates the master copy with
    ``inner``, and returns fp32 updates ``new_master - params`` so that ``optax.apply_updates(params,
    updates)`` stores the new master rounded to the parameters' dtype: the parameters follow the fp32
    trajectory instead of accumulating bf16 rounding (updates of ~1e-4 x a weight vanish in bf16).
    """

    def init_fn(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return MasterState(inner=inner.init(master), master=master)

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("with_fp32_master needs the parameters: update(grads, state, params)")
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        out = jax.tree.map(lambda m, p: m - p.astype(jnp.float32), master, params)
        return out, MasterState(inner=inner_state, master=master)

    return optax.GradientTransformation(init_fn, update_fn)


def paged_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    paged: bool = True,
    page_size: int | None = None,
    pages_in_flight: int | None = 2,
    mu_dtype: Any | None = None,
    fp32_master: bool = False,
) -> optax.GradientTransformation:
    """AdamW (``optax.adamw``'s math) whose state is kept in ``pinned_host`` memory.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, weight_decay: as ``optax.adamw`` (the defaults are PyTorch's AdamW ones,
        with QLoRA's ``weight_decay=0.0``).
      paged: ``False`` returns plain ``optax.adamw`` with the state on the device.
      page_size: most elements of one moment per page (``None``: one page per leaf); a
        page's state on the device is ``2 * page_size`` elements (mu and nu).
      pages_in_flight: how many pages' states may be on the device at once: page ``i`` is
        fetched only after page ``i - pages_in_flight`` has been written back (an
        ``optimization_barrier`` on the host values, which XLA's host offloader allows on
        offload paths). ``None`` leaves the order of the copies to XLA.
      mu_dtype: dtype of the first moment, as ``optax.adamw``.
      fp32_master: keep an fp32 copy of the parameters in the state (:func:`with_fp32_master`), for
        16-bit LoRA parameters; paged with the moments, so it costs host memory, not device memory.

    Returns:
      An ``optax.GradientTransformation``. ``init`` returns a :class:`PagedState` on the
      host; ``update(grads, state, params)`` must run under ``jit`` on GPU (outside ``jit``
      it works too, page by page, eagerly) and returns updates on the device and the new
      state on the host. The state's layout depends on ``page_size``: resume with the same.
    """
    if pages_in_flight is not None and pages_in_flight < 1:
        raise ValueError(f"{pages_in_flight=} must be >= 1 (or None)")
    inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mu_dtype=mu_dtype)
    if fp32_master:
        inner = with_fp32_master(inner)
    if not paged:
        return inner

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        # Page by page, so that (eagerly) at most one page of zeros is on the device at a time.
        return PagedState(pages=tuple(_to_host(inner.init(_page_leaves(leaves, page)))
                                      for page in page_plan(params, page_size)))

    def update_fn(updates, state, params=None):
        grad_leaves, treedef = jax.tree.flatten(updates)
        param_leaves = None if params is None else treedef.flatten_up_to(params)
        plan = page_plan(updates, page_size)
        if len(plan) != len(state.pages):
            raise ValueError(
                f"optimizer state has {len(state.pages)} pages but the gradients make "
                f"{len(plan)} with {page_size=}: was the state created for other parameters?")
        out_chunks: list[list[tuple[Chunk, jax.Array]]] = [[] for _ in grad_leaves]
        new_pages: list[Any] = []
        for i, (page, host_state) in enumerate(zip(plan, state.pages)):
            if pages_in_flight is not None and i >= pages_in_flight:
                # Fetch page i only once page i - pages_in_flight is back on the host.
                j = i - pages_in_flight
                host_state, new_pages[j] = jax.lax.optimization_barrier((host_state, new_pages[j]))
            page_state = _to_device(host_state)
            grads = _page_leaves(grad_leaves, page)
            page_params = None if param_leaves is None else _page_leaves(param_leaves, page)
            page_updates, page_state = inner.update(grads, page_state, page_params)
            new_pages.append(_to_host(page_state))
            for chunk, u in zip(page, page_updates):
                out_chunks[chunk.leaf].append((chunk, u))
        out = []
        for chunks in out_chunks:
            if len(chunks) == 1 and chunks[0][0].start is None:
                out.append(chunks[0][1])
            else:  # chunks are emitted in row order
                out.append(jnp.concatenate([u for _, u in chunks], axis=0))
        return jax.tree.unflatten(treedef, out), PagedState(pages=tuple(new_pages))

    return optax.GradientTransformation(init_fn, update_fn)


def state_memory_kinds(state: Any) -> set[str | None]:
    """The memory kinds of the (concrete) array leaves of an optimizer state."""
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state)
            if isinstance(leaf, jax.Array)}
