"""Device meshes and sharding rules for multi-device training (issue #8, first increment).

A 2-D mesh ``("data", "fsdp")``:

* batch arrays: axis 0 sharded over ``("data", "fsdp")``;
* LoRA parameters and optimizer moments: sharded over ``"fsdp"`` along the largest axis
  divisible by the fsdp size, else replicated (memory kinds such as ``pinned_host`` kept);
* frozen NF4 :class:`~qlora_jax.nf4.QuantizedTensor` leaves: ``packed`` / ``absmax`` sharded
  over ``"fsdp"`` along their last (flat) axis only when each shard holds whole quantization
  blocks (``packed``: a multiple of ``blocksize / 2`` bytes; ``absmax``: a multiple of 256
  codes with double quantization, so no nested 256-block is split), else replicated;
* everything else: replicated.

With the XLA dequantization path, sharded packed weights are all-gathered inside the step
before they are dequantized (correct; memory is saved only between steps).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qlora_jax.nf4 import QuantizedTensor

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
NESTED_BLOCK = 256  # absmax codes per double-quantization block


class MeshError(ValueError):
    """A mesh that does not fit the devices or the batch."""


def make_mesh(data: int = 1, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all); ``data * fsdp`` must equal their count."""
    devices = list(jax.devices()) if devices is None else list(devices)
    if data < 1 or fsdp < 1:
        raise MeshError(f"mesh.data={data} and mesh.fsdp={fsdp} must be >= 1")
    if data * fsdp != len(devices):
        raise MeshError(f"mesh.data * mesh.fsdp = {data} * {fsdp} = {data * fsdp}, but there are {len(devices)} "
                        f"devices ({devices[0].platform}); set mesh.data/mesh.fsdp so the product is {len(devices)}")
    return Mesh(np.array(devices).reshape(data, fsdp), AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest axis divisible by ``fsdp`` over ``"fsdp"`` (first such on ties); else replicate."""
    if fsdp <= 1:
        return P()
    candidates = [(-d, i) for i, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp]
    if not candidates:
        return P()
    axis = min(candidates)[1]
    return P(*([None] * axis + ["fsdp"]))


def shard_spec_for(field: str, shape: tuple[int, ...], fsdp: int, *, blocksize: int,
                   double_quant: bool) -> P:
    """The spec of one array field of a :class:`QuantizedTensor` (leading stacked axes allowed).

    ``packed`` and ``absmax`` are split over ``"fsdp"`` along the last axis only when every
    shard holds whole quantization blocks (and whole 256-blocks of absmax codes with double
    quantization); any other field, or a split that would cut a block, is replicated.
    """
    if fsdp <= 1 or not shape or field not in ("packed", "absmax"):
        return P()
    n = shape[-1]
    if n % fsdp:
        return P()
    per_shard = n // fsdp
    unit = blocksize // 2 if field == "packed" else (NESTED_BLOCK if double_quant else 1)
    if unit < 1 or per_shard % unit:
        return P()
    return P(*([None] * (len(shape) - 1) + ["fsdp"]))


def _memory_kind(leaf: Any) -> str | None:
    sharding = getattr(leaf, "sharding", None)
    return getattr(sharding, "memory_kind", None)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for LoRA parameters or optimizer state (memory kinds of the leaves kept)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp), memory_kind=_memory_kind(x)),
                        tree)


def frozen_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for the frozen state: NF4 fields by :func:`shard_spec_for`, the rest replicated."""
    fsdp = mesh.shape["fsdp"]

    def one(x: Any) -> Any:
        if isinstance(x, QuantizedTensor):
            def field(name: str) -> NamedSharding | None:
                leaf = getattr(x, name)
                if leaf is None:
                    return None
                spec = shard_spec_for(name, np.shape(leaf), fsdp, blocksize=x.blocksize,
                                      double_quant=x.double_quant)
                return NamedSharding(mesh, spec, memory_kind=_memory_kind(leaf))
            names = ("packed", "absmax", "nested_absmax", "nested_offset", "nested_code")
            return x.__class__(**{n: field(n) for n in names}, shape=x.shape, dtype=x.dtype,
                               blocksize=x.blocksize, quant_type=x.quant_type)
        return NamedSharding(mesh, P(), memory_kind=_memory_kind(x))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 over ``("data", "fsdp")``."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, name: str = "data.batch_size") -> None:
    """Raise :class:`MeshError` unless ``batch_size`` splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise MeshError(f"{name}={batch_size} must be divisible by mesh.data * mesh.fsdp = {n}")
