"""A :class:`~qlora_jax.models.llama.Llama` with random frozen weights, built on the device layer by layer.

For benchmarks and memory planning at full size (up to LLaMA-65B on one card): the structure
comes from ``nnx.eval_shape`` (nothing allocated), then every frozen leaf is filled on the
default device. A stacked linear weight ``[L, out, in]`` is drawn one layer at a time in
``param_dtype``, quantized under ``jit`` and written into preallocated stacked arrays with
``.at[i].set`` (buffers donated), so at most one layer's 16-bit matrix exists at any moment and a
full bf16 copy of the model is never materialized. The result has exactly the pytree structure,
shapes and dtypes that :func:`~qlora_jax.models.checkpoint.load_model` gives for a converted model
of the same config and settings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax.models.checkpoint import QT_FIELDS, init_non_frozen
from qlora_jax.models.llama import Llama, LlamaConfig, LoRAConfig, QuantConfig
from qlora_jax.nf4 import QuantizedTensor, quantize
from qlora_jax.nf4_dense import Frozen

INIT_STD = 0.02  # transformers' LLaMA initializer_range


def _flat_items(tree: dict, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_items(v, (*prefix, str(k)))
        else:
            yield (*prefix, str(k)), v


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "quant_type", "blocksize", "double_quant",
                                             "shardings"), donate_argnums=(0,))
def _fill_quantized_layer(stacked: tuple, index: jax.Array, key: jax.Array, *, shape: tuple[int, ...], dtype: str,
                          quant_type: str, blocksize: int, double_quant: bool, shardings: tuple | None = None) -> tuple:
    w = jax.random.normal(key, shape, jnp.dtype(dtype)) * jnp.asarray(INIT_STD, dtype)
    qt = quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    values = [getattr(qt, f) for f in QT_FIELDS if getattr(qt, f) is not None]
    out = tuple(s.at[index].set(v.astype(s.dtype)) for s, v in zip(stacked, values))
    if shardings is not None:  # each device keeps only its shard of the stack
        out = tuple(jax.lax.with_sharding_constraint(o, sh) for o, sh in zip(out, shardings))
    return out


@functools.partial(jax.jit, static_argnames=("shape", "dtype"), donate_argnums=(0,))
def _fill_dense_layer(stacked: jax.Array, index: jax.Array, key: jax.Array, *, shape: tuple[int, ...],
                      dtype: str) -> jax.Array:
    w = jax.random.normal(key, shape, jnp.dtype(dtype)) * jnp.asarray(INIT_STD, dtype)
    return stacked.at[index].set(w)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _random(key: jax.Array, *, shape: tuple[int, ...], dtype: str) -> jax.Array:
    return jax.random.normal(key, shape, jnp.dtype(dtype)) * jnp.asarray(INIT_STD, dtype)


def _random_quantized_stack(abstract: QuantizedTensor, key: jax.Array,
                            target: QuantizedTensor | None = None) -> QuantizedTensor:
    """A stacked ``[L, ...]`` quantized weight filled one layer at a time (sharded as ``target``'s
    fields say, when given: a :class:`QuantizedTensor` of shardings)."""
    present = [f for f in QT_FIELDS if getattr(abstract, f) is not None]
    shardings = None if target is None else tuple(getattr(target, f) for f in present)
    stacked = tuple(jnp.zeros(getattr(abstract, f).shape, getattr(abstract, f).dtype,
                              device=None if shardings is None else shardings[k]) for k, f in enumerate(present))
    num_layers = stacked[0].shape[0]
    for i in range(num_layers):
        stacked = _fill_quantized_layer(
            stacked, jnp.asarray(i, jnp.int32), jax.random.fold_in(key, i), shape=abstract.shape,
            dtype=abstract.dtype, quant_type=abstract.quant_type, blocksize=abstract.blocksize,
            double_quant=abstract.double_quant, shardings=shardings,
        )
    return dataclasses.replace(abstract, **dict(zip(present, stacked)))


def _random_dense_stack(abstract: Any, key: jax.Array) -> jax.Array:
    stacked = jnp.zeros(abstract.shape, abstract.dtype)
    for i in range(abstract.shape[0]):
        stacked = _fill_dense_layer(stacked, jnp.asarray(i, jnp.int32), jax.random.fold_in(key, i),
                                    shape=tuple(abstract.shape[1:]), dtype=jnp.dtype(abstract.dtype).name)
    return stacked


def _fill(path: tuple[str, ...], abstract: Any, key: jax.Array, target: Any = None) -> Any:
    """The value of one frozen leaf: random linear weights and embeddings, unit norms, zero biases.

    ``target``: the leaf's sharding(s) on a mesh (NF4 stacks are built shard by shard; other leaves
    are built on the default device and then placed)."""
    if isinstance(abstract, QuantizedTensor):
        return _random_quantized_stack(abstract, key, target)
    value = _fill_dense(path, abstract, key)
    return value if target is None else jax.device_put(value, target)


def _fill_dense(path: tuple[str, ...], abstract: Any, key: jax.Array) -> jax.Array:
    name = path[-1]
    if name == "scale":  # RMSNorm
        return jnp.ones(abstract.shape, abstract.dtype)
    if name == "bias":
        return jnp.zeros(abstract.shape, abstract.dtype)
    if path[0] == "layers":  # a 16-bit linear weight [L, out, in]
        return _random_dense_stack(abstract, key)
    return _random(key, shape=tuple(abstract.shape), dtype=jnp.dtype(abstract.dtype).name)  # embeddings, lm_head


def build_random_model(
    cfg: LlamaConfig,
    *,
    lora: LoRAConfig = LoRAConfig(),
    quant: QuantConfig = QuantConfig(),
    remat: str = "none",
    seed: int = 0,
    progress: bool = False,
    mesh: Any = None,
) -> Llama:
    """A :class:`Llama` of ``cfg`` with random frozen weights (N(0, 0.02) before quantization), built on device.

    LoRA adapters are initialized as :func:`~qlora_jax.models.checkpoint.load_model` does
    (PEFT's init from ``seed``). Peak device memory while building is the model itself plus one
    layer's matrix and its quantization temporaries.

    ``mesh``: a ``(data, fsdp)`` mesh (:mod:`qlora_jax.sharding`, one process): the frozen weights
    are built directly in :func:`~qlora_jax.sharding.frozen_shardings`'s layout (each device
    holds only its shards of the NF4 stacks; no device ever holds the whole 4-bit model) and the
    LoRA adapters are born in :func:`~qlora_jax.sharding.param_shardings`'s layout
    (:func:`~qlora_jax.models.checkpoint.init_non_frozen`), so a per-device peak measured afterwards
    is the step's, not the build's.
    """

    def make() -> Llama:
        return Llama(cfg, lora=lora, quant=quant, remat=remat, rngs=nnx.Rngs(seed))

    abstract = nnx.eval_shape(make)
    frozen = nnx.split(abstract, Frozen, ...)[1]
    pure_abstract = nnx.to_pure_dict(frozen)
    items = [(p, v) for p, v in _flat_items(pure_abstract) if v is not None]
    base_key = jax.random.key(seed)
    pure: dict = {}
    for n, (path, leaf) in enumerate(items):
        if progress:
            print(f"  random weights: {'/'.join(path)} ({n + 1}/{len(items)})", flush=True)
        target = None
        if mesh is not None:
            from qlora_jax.sharding import frozen_shardings

            target = frozen_shardings(leaf, mesh)
        _set(pure, path, _fill(path, leaf, jax.random.fold_in(base_key, n), target))
    nnx.replace_by_pure_dict(frozen, pure)
    return init_non_frozen(make, abstract, frozen, mesh)
