"""Device meshes, sharding rules and several processes for multi-device / multi-host training (issue #8).

A 2-D mesh ``("data", "fsdp")``:

* batch arrays: axis 0 sharded over ``("data", "fsdp")``;
* LoRA parameters and optimizer moments: sharded over ``"fsdp"`` along the largest axis
  divisible by the fsdp size, else replicated (memory kinds such as ``pinned_host`` kept);
* frozen NF4 :class:`~qlora_jax.nf4.QuantizedTensor` leaves: ``packed`` / ``absmax`` sharded
  over ``"fsdp"`` along their last (flat) axis only when each shard holds whole quantization
  blocks (``packed``: a multiple of ``blocksize / 2`` bytes; ``absmax``: a multiple of 256
  codes with double quantization, so no nested 256-block is split), else replicated;
* everything else: replicated.

FSDP inside the step: :func:`gather_for_compute` (called by the 4-bit matmul,
``qlora_jax.nf4_dense.frozen_matmul``, in its forward and backward pass) constrains one
layer's NF4 fields to be replicated where they are used, so the partitioner all-gathers the
packed weight of *that* layer inside the scanned layer loop (forward and rematerialized
backward) and the matmul runs on the whole weight and the local batch shard. Without it XLA
keeps the dequantized weight split over its output rows and moves activations instead
(all-gathers of ``[B, T, D]`` and all-to-alls every projection). The backward pass keeps
only the sharded weight as the residual. :func:`loop_collectives` reads compiled HLO to
check where the all-gathers are (``tests/test_mesh.py``).

The gather needs the mesh at trace time: the train step runs under
``jax.sharding.use_abstract_mesh`` (``qlora_jax.trainer.make_train_step``); with no mesh,
or a mesh without an ``fsdp`` axis > 1, it does nothing. LoRA ``A`` / ``B`` are gathered the
same way (small); their gradients are all-reduced per layer inside the backward loop.

Several processes (hosts): :func:`initialize_distributed` (``mesh.distributed``) joins them with
``jax.distributed`` before any other JAX use (gloo collectives on CPU); the mesh then spans every
process's devices (``jax.devices()`` order: process by process, so ``fsdp`` is the inner, within-host
axis when ``fsdp`` <= devices per host). :func:`process_rows` says which rows of each batch this
process builds and :func:`global_batch` assembles the global batch from them;
:func:`put_global` places identical per-process values (the loaded model) as global arrays.
Evaluation (greedy samples, MMLU) runs as global computations every process takes part in: the
inputs, built identically on every process, are placed with :func:`put_global` (MMLU batches split
like training batches; sample prompts whole on every device, :func:`put_replicated`), and
:func:`host_values` brings the results back whole to every process, so host-side decisions (stop
strings, the decode loop's end) are the same on all of them.
"""

from __future__ import annotations

import contextlib
import os
import re
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


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
    """The rows of a ``batch_size``-row global batch that this process's devices hold under ``sharding``.

    Each process builds only these rows of every batch; :func:`global_batch` assembles the global
    array from them. Raises :class:`MeshError` if they are not one contiguous range (a device
    order that interleaves processes along the batch axis).
    """
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    ranges = sorted({(idx[0].start or 0, batch_size if idx[0].stop is None else idx[0].stop)
                     for idx in index_map.values()})
    start, stop = ranges[0]
    for a, b in ranges[1:]:
        if a > stop:
            raise MeshError(f"process {jax.process_index()} holds batch rows {ranges}: not one contiguous range; "
                            "order the mesh's devices by process")
        stop = max(stop, b)
    return slice(start, stop)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """The global ``[batch_size, T]`` arrays from this process's rows (:func:`process_rows`)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for k, v in local.items()}


def put_global(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works with several processes.

    Every process holds the same whole values (built from the same files and seeds); each leaf
    becomes a global array of which this process fills its own devices' shards
    (``jax.make_array_from_callback``: no cross-host transfer). Typed PRNG keys go through their
    ``key_data``. One process: plain ``jax.device_put``.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x: Any, sharding: NamedSharding) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=impl)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def put_replicated(tree: Any, mesh: Mesh | None) -> Any:
    """``tree`` (the same values on every process) whole on every device of ``mesh``, as global arrays
    (:func:`put_global`); ``mesh=None``: on the default device, as ``jax.device_put`` places it."""
    if mesh is None:
        return jax.device_put(tree)
    return put_global(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def host_values(tree: Any) -> Any:
    """``tree``'s arrays whole, as numpy, on every process. With several processes this is an all-gather
    (``multihost_utils.process_allgather``): a collective, so every process must call it at the same point."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def tracing_mesh(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """Enter it inside a jitted function (``mesh=None``: no mesh): while that traces, the 4-bit matmuls
    gather each layer's weight where they use it (:func:`gather_for_compute`, FSDP inside the layer loop)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


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


# --- FSDP inside the step ---------------------------------------------------------------------------


def fsdp_size(mesh: Mesh | jax.sharding.AbstractMesh | None) -> int:
    """The size of ``mesh``'s ``"fsdp"`` axis: 1 without a mesh, for an empty one, or without that axis."""
    if mesh is None or mesh.empty:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get("fsdp", 1)


def gather_for_compute(w: Any) -> Any:
    """``w`` (a :class:`QuantizedTensor` or any pytree of arrays) replicated over the current mesh.

    A no-op outside a mesh context (``jax.sharding.get_abstract_mesh()`` empty) or when the mesh
    has no ``fsdp`` axis larger than 1. Inside the scanned layer loop this is FSDP's per-layer
    all-gather: only this layer's 4-bit codes and scales are whole on every device at once.
    """
    fsdp = fsdp_size(jax.sharding.get_abstract_mesh())
    if fsdp <= 1:
        return w
    if isinstance(w, QuantizedTensor):
        def field(name: str) -> Any:
            x = getattr(w, name)
            if x is None:
                return None
            spec = shard_spec_for(name, x.shape, fsdp, blocksize=w.blocksize, double_quant=w.double_quant)
            return _gather_flat(x, fsdp) if "fsdp" in spec else jax.lax.with_sharding_constraint(x, P())
        names = ("packed", "absmax", "nested_absmax", "nested_offset", "nested_code")
        return w.__class__(**{n: field(n) for n in names}, shape=w.shape, dtype=w.dtype, blocksize=w.blocksize,
                           quant_type=w.quant_type)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), w)


def _gather_flat(x: jax.Array, fsdp: int) -> jax.Array:
    """All-gather ``x`` (split over ``"fsdp"`` along its last axis) as ``[..., fsdp, n / fsdp]`` along the
    ``fsdp`` axis. Gathering a ``[1, n]`` layer slice along its last axis directly would make XLA lay the
    whole stacked ``[L, n]`` weight out column-major for the loop (all-gather wants the gathered dimension
    major): a transposed copy of every sharded NF4 stack on each device during the step."""
    *lead, n = x.shape
    y = x.reshape(*lead, fsdp, n // fsdp)
    y = jax.lax.with_sharding_constraint(y, P(*([None] * len(lead)), "fsdp", None))
    return jax.lax.with_sharding_constraint(y, P()).reshape(x.shape)


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'known_trip_count[^0-9]*([0-9]+)')
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def loop_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """The collectives of a compiled module's HLO text (``compiled.as_text()``) and the loops around them.

    One dict per collective instruction: ``op`` (``all-gather``, ``all-reduce``, ``reduce-scatter``,
    ``all-to-all``, ``collective-permute``), ``shape`` (its result, e.g. ``u8[1,4096]{0,1}``),
    ``dtype`` (``u8``; the first element's for a tuple), ``computation`` and ``loops``: the known trip
    counts of the ``while`` loops it runs in, outermost first (``[]``: once per step; ``[4]``: once
    per iteration of a 4-trip loop, e.g. the scan over 4 decoder layers; ``None`` for a loop of
    unknown trip count). A computation reached from several places gets the deepest nesting.
    """
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
    loops: dict[str, tuple] = {}
    stack: list[tuple[str, tuple]] = [(entry, ())]
    while stack:
        name, enclosing = stack.pop()
        if name not in comps or (name in loops and len(loops[name]) >= len(enclosing)):
            continue
        loops[name] = enclosing
        for line in comps[name]:
            w = _WHILE.search(line)
            if w:
                trip = _TRIP_COUNT.search(line)
                stack.append((w.group(1), enclosing + (int(trip.group(1)) if trip else None,)))
            stack.extend((callee, enclosing) for callee in _CALLEE.findall(line))
            for group in _BRANCHES.findall(line):
                stack.extend((x.strip().lstrip("%"), enclosing) for x in group.split(","))
    out = []
    for name, lines in comps.items():
        for line in lines:
            m = _COLLECTIVE.match(line)
            if m:
                shape = m.group(1)
                out.append({"op": m.group(2), "shape": shape, "dtype": shape.lstrip("(").split("[", 1)[0],
                            "computation": name, "loops": list(loops.get(name, ()))})
    return out


# --- several processes ----------------------------------------------------------------------------


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise MeshError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_env() -> dict[str, Any] | None:
    """What the environment says about a multi-process job, or None for a single process.

    ``{"launcher": ..., "kwargs": {...}}``: ``kwargs`` for ``jax.distributed.initialize`` (empty
    where JAX detects the cluster itself: SLURM, Open MPI).
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    num = _env_int("JAX_NUM_PROCESSES")
    if address and num is not None and num > 1:
        pid = _env_int("JAX_PROCESS_ID")
        if pid is None or not 0 <= pid < num:
            raise MeshError(f"JAX_COORDINATOR_ADDRESS={address} and JAX_NUM_PROCESSES={num} are set, but "
                            f"JAX_PROCESS_ID={os.environ.get('JAX_PROCESS_ID')!r} is not in [0, {num})")
        return {"launcher": "env", "kwargs": {"coordinator_address": address, "num_processes": num,
                                              "process_id": pid}}
    if "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or 1) > 1:
        return {"launcher": "slurm", "kwargs": {}}
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return {"launcher": "openmpi", "kwargs": {}}
    return None


def initialize_distributed(mode: str = "auto") -> bool:
    """``jax.distributed.initialize()`` per ``mesh.distributed`` (``auto`` / ``on`` / ``off``); True if initialized.

    Call it before any other JAX use (device lists, arrays). Idempotent. On CPU, cross-process
    collectives use gloo. ``on`` passes what :func:`distributed_env` finds (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) and lets JAX detect the rest of the cluster.
    """
    if mode not in ("auto", "on", "off"):
        raise MeshError(f"mesh.distributed={mode!r} is not one of ('auto', 'on', 'off')")
    from jax._src import distributed as _dist, xla_bridge  # private: backends_are_initialized has no public twin

    if _dist.global_state.client is not None:
        return True
    if mode == "off":
        return False
    env = distributed_env()
    if env is None and mode == "auto":
        return False
    if xla_bridge.backends_are_initialized():
        raise MeshError("jax.distributed.initialize() must run before any JAX computation or device query, "
                        "but this process has already started a JAX backend")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(env or {"kwargs": {}})["kwargs"])
    return True
