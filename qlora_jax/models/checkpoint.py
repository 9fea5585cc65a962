"""The on-disk form of a converted model, and loading it into :class:`~qlora_jax.models.llama.Llama`.

A model directory holds::

    config.json        transformers' config (the architecture; read by LlamaConfig.from_hf_config)
    qlora_jax.json     how the weights are stored (QuantConfig fields) and where they came from;
                       written last, so a directory without it is not a complete model
    weights/           orbax checkpoint of the frozen weights
    tokenizer files    as the source had them

The orbax tree is the model's frozen state (``nnx.state(model, Frozen)`` as a pure dict) with the
layer axis unstacked: ``layers/<i>/self_attn/q_proj/weight`` instead of one ``[L, ...]`` leaf, so a
converter can write it one layer at a time. A quantized weight is a dict of its arrays
(``packed``, ``absmax`` and, with double quantization, ``nested_absmax``, ``nested_offset``,
``nested_code``); its static fields come from the config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.models.llama import LlamaConfig, Llama, LoRAConfig, QuantConfig
from qlora_jax.nf4 import QuantizedTensor
from qlora_jax.nf4_dense import Frozen

META_FILE = "qlora_jax.json"
WEIGHTS_DIR = "weights"
FORMAT_VERSION = 1
QT_FIELDS = ("packed", "absmax", "nested_absmax", "nested_offset", "nested_code")


def _is_qt(x: Any) -> bool:
    return isinstance(x, QuantizedTensor)


def qt_to_tree(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """The stored arrays of a quantized tensor (``None`` fields omitted)."""
    return {f: np.array(getattr(qt, f)) for f in QT_FIELDS if getattr(qt, f) is not None}


def to_host(value: Any) -> Any:
    """A frozen value as it is written: numpy arrays, quantized tensors as dicts."""
    return qt_to_tree(value) if _is_qt(value) else np.asarray(value)


def _flat(tree: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` pairs of a nested dict; ``QuantizedTensor`` and ``None`` count as leaves."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            for p, leaf in _flat(v):
                yield (str(k), *p), leaf
    else:
        yield (), tree


def _get(tree: dict, path: tuple[str, ...], where: str) -> Any:
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"{where}: checkpoint has no entry {'/'.join(path[: i + 1])!r}")
        node = node[k]
    return node


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _check_shape(got: tuple[int, ...], want: tuple[int, ...], name: str, where: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{where}: {name} has shape {tuple(got)}, the config needs {tuple(want)}")


def _restore_leaf(abstract: Any, stored: Any, name: str, where: str, asarray: Callable = jnp.asarray) -> Any:
    """Rebuild one frozen value from its stored form, checking it against the abstract model
    (``asarray``: ``jnp.asarray`` puts it on the default device, ``np.asarray`` keeps it on the host)."""
    if _is_qt(abstract):
        if not isinstance(stored, dict):
            raise ValueError(f"{where}: {name} should be a quantized tensor, the checkpoint holds an array")
        fields = {}
        for f in QT_FIELDS:
            want = getattr(abstract, f)
            if want is None:
                fields[f] = None
                continue
            if f not in stored:
                raise ValueError(f"{where}: {name} lacks {f!r} (quantization settings do not match the checkpoint)")
            _check_shape(stored[f].shape, want.shape, f"{name}/{f}", where)
            fields[f] = asarray(stored[f], want.dtype)
        return dataclasses.replace(abstract, **fields)
    if isinstance(stored, dict):
        raise ValueError(f"{where}: {name} should be an array, the checkpoint holds a quantized tensor")
    _check_shape(stored.shape, abstract.shape, name, where)
    return asarray(stored, abstract.dtype)


def _stack(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return {k: np.stack([v[k] for v in values]) for k in values[0]}
    return np.stack(values)


def state_from_checkpoint_tree(abstract_frozen: dict, tree: dict, num_layers: int, where: str,
                               asarray: Callable = jnp.asarray) -> dict:
    """Fill the abstract frozen pure dict of a model from a checkpoint tree (layers unstacked; ``[L, ...]``
    stacks out). ``asarray(value, dtype)`` makes each array (default: on the default device)."""
    out: dict = {}
    for path, leaf in _flat(abstract_frozen):
        if leaf is None:
            continue
        name = "/".join(path)
        if path[0] == "layers":
            per_layer = [_get(tree, ("layers", str(i), *path[1:]), where) for i in range(num_layers)]
            extra = set(_get(tree, ("layers",), where)) - {str(i) for i in range(num_layers)}
            if extra:
                raise ValueError(f"{where}: checkpoint has layers {sorted(extra)} beyond num_hidden_layers={num_layers}")
            stored = _stack(per_layer)
        else:
            stored = _get(tree, path, where)
        _set(out, path, _restore_leaf(leaf, stored, name, where, asarray))
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """``qlora_jax.json`` of a converted model; raises ``ValueError`` if the directory is incomplete."""
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{model_dir}: not a complete converted model (no {META_FILE}); convert it with python -m qlora_jax.convert")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this code reads format {FORMAT_VERSION}")
    return meta


def init_non_frozen(make: Callable[[], Llama], abstract: Llama, frozen: nnx.State, mesh: Any = None) -> Llama:
    """The model ``make()`` builds, with its frozen state replaced by ``frozen`` (already filled and placed).

    Only the adapters and the RNG state are computed, under ``jit``: XLA drops ``make()``'s unused
    random base weights. The LoRA ``A`` (``[L, in, r]``) / ``B`` (``[L, r, out]``) are PEFT's init from
    ``make``'s seed. ``mesh``: a ``(data, fsdp)`` mesh (:mod:`qlora_jax.sharding`); the adapters are born
    in :func:`~qlora_jax.sharding.param_shardings`'s layout (each device computes only its rows, so no
    device ever holds a whole adapter) and the RNG state replicated, as the train step takes them.
    ``abstract``: ``nnx.eval_shape(make)``.
    """
    graphdef, _, lora, other = nnx.split(abstract, Frozen, nnx.LoRAParam, ...)
    placement = {}
    if mesh is not None:
        from qlora_jax.sharding import param_shardings, replicated

        placement["out_shardings"] = (param_shardings(lora, mesh), jax.tree.map(lambda _: replicated(mesh), other))
    lora, other = jax.jit(lambda: nnx.split(make(), Frozen, nnx.LoRAParam, ...)[2:], **placement)()
    return nnx.merge(graphdef, frozen, lora, other)


def load_model(
    model_dir: str | Path,
    *,
    lora: LoRAConfig = LoRAConfig(),
    remat: str = "none",
    compute_dtype: str | None = None,
    seed: int = 0,
    mesh: Any = None,
) -> Llama:
    """Build a :class:`Llama` from ``model_dir/config.json`` and restore its frozen weights.

    The weights are used as stored (no re-quantization); LoRA adapters are freshly initialized
    from ``seed`` (PEFT's init: ``B = 0``, so the model computes the converted model's function).

    ``mesh``: a ``(data, fsdp)`` mesh (:mod:`qlora_jax.sharding`, one process or several): every
    array is placed directly in the train step's layout, from host memory shard by shard (frozen
    weights: :func:`~qlora_jax.sharding.frozen_shardings`; adapters: :func:`init_non_frozen`), so no
    device ever holds a whole copy of a sharded leaf. ``None``: everything on the default device.
    """
    from orbax.checkpoint.experimental import v1 as ocp1

    model_dir = Path(model_dir).absolute()  # orbax wants absolute paths
    meta = read_meta(model_dir)
    quant = QuantConfig(**meta["quant"])
    if compute_dtype is not None:
        quant = dataclasses.replace(quant, compute_dtype=compute_dtype)
    cfg = LlamaConfig.from_hf_config(model_dir / "config.json")

    def make() -> Llama:
        return Llama(cfg, lora=lora, quant=quant, remat=remat, rngs=nnx.Rngs(seed))

    abstract = nnx.eval_shape(make)
    frozen = nnx.split(abstract, Frozen, ...)[1]
    tree = ocp1.load(model_dir / WEIGHTS_DIR)  # numpy arrays
    pure = state_from_checkpoint_tree(nnx.to_pure_dict(frozen), tree, cfg.num_hidden_layers, str(model_dir),
                                      asarray=jnp.asarray if mesh is None else np.asarray)
    if mesh is not None:
        from qlora_jax.sharding import frozen_shardings, put_global

        pure = put_global(pure, frozen_shardings(pure, mesh))
    nnx.replace_by_pure_dict(frozen, pure)
    return init_non_frozen(make, abstract, frozen, mesh)


class CheckpointWriter:
    """Writes a model directory piece by piece, atomically.

    Everything goes to a temporary directory beside ``out``; :meth:`commit` finalizes the orbax
    checkpoint, writes ``qlora_jax.json`` and renames the directory into place (an existing
    ``out`` is replaced only then). Used as a context manager, a failure removes the temporary
    directory and leaves ``out`` as it was.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out).absolute()
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._written: set[tuple[str, ...]] = set()

    @property
    def weights_path(self) -> Path:
        return self.tmp / WEIGHTS_DIR

    def add(self, tree: dict) -> None:
        """Append a sub-tree of the checkpoint (e.g. one layer); keys must be new."""
        from orbax.checkpoint.experimental import v1 as ocp1

        paths = {p for p, _ in _flat(tree)}
        dup = paths & self._written
        if dup:
            raise ValueError(f"checkpoint entries written twice: {sorted('/'.join(p) for p in dup)[:5]}")
        self._written |= paths
        ocp1.partial.save(self.weights_path, tree)

    def commit(self, meta: dict[str, Any]) -> Path:
        from orbax.checkpoint.experimental import v1 as ocp1

        ocp1.partial.finalize(self.weights_path)
        (self.tmp / META_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2))
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for p in self.tmp.parent.glob(f"{self.tmp.name}*"):  # orbax's own partial-save siblings
            shutil.rmtree(p, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / generation files that exist in ``src`` into ``dst``; returns their names."""
    from qlora_jax.convert import TOKENIZER_FILES  # convert imports this module

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_model(
    model: Llama,
    out: str | Path,
    *,
    hf_config: dict[str, Any] | None = None,
    source: str = "in-memory",
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write an in-memory model's frozen weights as a model directory (one partial save per layer).

    ``tokenizer_dir``: copy its tokenizer files (e.g. the source model directory) beside the weights.
    """
    frozen = nnx.to_pure_dict(nnx.state(model, Frozen))
    with CheckpointWriter(out) as w:
        (w.tmp / "config.json").write_text(json.dumps(hf_config or model.cfg.to_hf_config(), indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, w.tmp)
        top = {k: v for k, v in frozen.items() if k != "layers"}
        w.add(jax.tree.map(to_host, top, is_leaf=_is_qt))
        for i in range(model.cfg.num_hidden_layers):
            layer = jax.tree.map(lambda x: to_host(jax.tree.map(lambda a: a[i], x)), frozen["layers"], is_leaf=_is_qt)
            w.add({"layers": {str(i): layer}})
        return w.commit({"quant": dataclasses.asdict(model.quant), "source": source, "source_format": "model"})
