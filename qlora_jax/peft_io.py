"""LoRA adapters in Hugging Face PEFT's format, and merging them into the base weights.

``save_adapter`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's
key names and shapes, so ``peft.PeftModel.from_pretrained(LlamaForCausalLM, dir)`` loads
what this project trains:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]   (our lora_a[i].T)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]  (our lora_b[i].T)

and likewise for k/v/o_proj and mlp.gate/up/down_proj. ``load_adapter`` reads such a directory
(any rank, any subset of the seven projections, rsLoRA scaling; ``adapter_model.safetensors`` or
the older ``adapter_model.bin``) into a model. ``merge_adapter`` folds ``W + scaling * (A @ B).T``
into the base weights (dequantized, then re-quantized or kept in 16/32 bits); ``save_merged_hf``
writes the merged model as a bf16 transformers directory, ``save_merged`` as a (re-quantized NF4)
model directory of this project.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.models.llama import LORA_TARGETS, Llama, LoRAConfig
from qlora_jax.nf4 import QuantizedTensor, dequantize, quantize
from qlora_jax.nf4_dense import Frozen

PEFT_PREFIX = "base_model.model.model.layers"
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Our module path inside a decoder layer, per PEFT target name.
MODULE_PATHS: dict[str, tuple[str, str]] = {
    t: ("self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp", t) for t in LORA_TARGETS
}
# PEFT key of one LoRA matrix; older PEFT versions saved the adapter name (".default") in it.
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


# --- export -----------------------------------------------------------------------------------------


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """PEFT-named fp32 arrays of every LoRA weight of a :class:`~qlora_jax.models.llama.Llama`."""
    out: dict[str, np.ndarray] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        names = [str(p) for p in path]
        if names[0] != "layers" or names[-1] not in ("lora_a", "lora_b"):
            raise ValueError(f"unexpected LoRA parameter path {'/'.join(names)}")
        stacked = np.asarray(value.get_value() if hasattr(value, "get_value") else value, np.float32)  # [L, in, r] / [L, r, out]
        module = ".".join(names[1:-1])
        which = "lora_A" if names[-1] == "lora_a" else "lora_B"
        for i in range(stacked.shape[0]):
            out[f"{PEFT_PREFIX}.{i}.{module}.{which}.weight"] = np.ascontiguousarray(stacked[i].T)
    return out


def save_adapter(model: nnx.Module, directory: str | Path, *, lora_config: Any = None, base_model: str = "") -> Path:
    """Write the model's adapters as a PEFT LoRA directory (atomically: temp dir, then rename).

    ``lora_config`` supplies ``r``, ``alpha``, ``dropout`` (and ``use_rslora`` if it has one);
    default: the model's own :class:`~qlora_jax.models.llama.LoRAConfig`.
    """
    from safetensors.numpy import save_file

    lora_config = model.lora if lora_config is None else lora_config
    directory = Path(directory)
    tensors = adapter_tensors(model)
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA parameters (built with r=0 or no targets)")
    targets = sorted({k.split(".")[-3] for k in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(lora_config.r),
        "lora_alpha": float(lora_config.alpha),
        "lora_dropout": float(lora_config.dropout),
        "target_modules": targets,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": bool(getattr(lora_config, "use_rslora", False)),
        "use_dora": False,
        "modules_to_save": None,
    }
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


# --- import -----------------------------------------------------------------------------------------


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT adapter, checked for what :func:`load_adapter` supports.

    Raises ``ValueError`` naming the file and field for: a non-LoRA ``peft_type``, DoRA,
    ``modules_to_save``, trained biases, ``fan_in_fan_out``, per-module rank/alpha patterns,
    LoRA on modules other than the seven linear projections.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: no {CONFIG_FILE} (expected a PEFT adapter directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{path}: {field}={cfg.get(field)!r}: {why}")

    if cfg.get("peft_type", "LORA") != "LORA":
        raise bad("peft_type", "only LORA adapters are supported")
    if cfg.get("use_dora"):
        raise bad("use_dora", "DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise bad("modules_to_save", "fully trained extra modules are not supported (LoRA weights only)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise bad("bias" if cfg.get("bias", "none") != "none" else "lora_bias", "trained biases are not supported")
    if cfg.get("fan_in_fan_out"):
        raise bad("fan_in_fan_out", "transposed (Conv1D) weights are not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise bad(field, "per-module ranks / alphas are not supported")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise bad("r", "must be a positive integer")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"{path}: target_modules {unknown} are not LoRA targets of this model {LORA_TARGETS}")
    return cfg


def read_adapter_tensors(directory: str | Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The LoRA tensors of a PEFT adapter directory as fp32 numpy arrays, and the file they came from."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            break
    else:
        raise ValueError(f"{directory}: no {' or '.join(WEIGHT_FILES)}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        return path, {k: np.asarray(v, np.float32) for k, v in raw.items()}
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: reading a pickled .bin adapter needs torch (or convert it to safetensors)") from None
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    return path, {k: v.float().numpy() for k, v in raw.items()}


def with_lora(model: Llama, lora: LoRAConfig) -> Llama:
    """A model with ``model``'s frozen weights (shared, not copied) and fresh ``lora`` adapters
    (PEFT's init: ``B = 0``, so it computes the base model's function)."""

    def make() -> Llama:
        return Llama(model.cfg, lora=lora, quant=model.quant, remat=model.remat, rngs=nnx.Rngs(0))

    graphdef, _, _ = nnx.split(nnx.eval_shape(make), Frozen, ...)
    # Adapters and RNG state initialized for real; XLA drops the unused random base weights.
    rest = jax.jit(lambda: nnx.split(make(), Frozen, ...)[2])()
    return nnx.merge(graphdef, nnx.state(model, Frozen), rest)


def load_adapter(model: Llama, directory: str | Path) -> Llama:
    """``model``'s base weights with the PEFT LoRA adapter in ``directory``, in eval mode.

    The adapter replaces the model's own LoRA parameters: the returned model is rebuilt with the
    adapter's rank, alpha, dropout, targets and scaling (``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``); ``model`` is left unchanged. The targets are the
    projections that have weights in the file (``target_modules`` may be a list, checked against
    them, or PEFT's regex string). Tensors in fp16/bf16 are read as fp32. Layers absent from
    the file are allowed only when ``layers_to_transform`` lists the ones present; they get a zero
    adapter. Raises ``ValueError`` naming the file, key and shape for anything that does not fit.
    """
    cfg = read_adapter_config(directory)
    path, tensors = read_adapter_tensors(directory)
    mc = model.cfg
    d, f, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
    in_out = {
        "q_proj": (d, mc.num_attention_heads * hd), "k_proj": (d, mc.num_key_value_heads * hd),
        "v_proj": (d, mc.num_key_value_heads * hd), "o_proj": (mc.num_attention_heads * hd, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    r, L = int(cfg["r"]), mc.num_hidden_layers
    found: dict[tuple[str, int, str], np.ndarray] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: key {key!r} is not a LoRA weight of a decoder-layer projection")
        layer, group, module, which = int(m[1]), m[2], m[3], m[4]
        if module not in MODULE_PATHS or MODULE_PATHS[module][0] != group:
            raise ValueError(f"{path}: key {key!r}: {group}.{module} is not one of this model's projections")
        if layer >= L:
            raise ValueError(f"{path}: key {key!r}: layer {layer}, the model has {L} layers")
        n_in, n_out = in_out[module]
        want = (r, n_in) if which == "A" else (n_out, r)
        if value.shape != want:
            raise ValueError(f"{path}: key {key!r} has shape {tuple(value.shape)}, expected {want} "
                             f"(r={r}, {module} is [out={n_out}, in={n_in}])")
        found[(module, layer, which)] = value
    if not found:
        raise ValueError(f"{path}: no LoRA weights in the file")
    targets = tuple(t for t in LORA_TARGETS if any(k[0] == t for k in found))
    listed = cfg.get("target_modules")
    if isinstance(listed, list) and set(targets) - set(listed):
        raise ValueError(f"{path}: weights for {sorted(set(targets) - set(listed))} but target_modules={listed}")
    allowed_missing = cfg.get("layers_to_transform") is not None
    lora = LoRAConfig(r=r, alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout") or 0.0),
                      targets=targets, use_rslora=bool(cfg.get("use_rslora", False)))
    new = with_lora(model, lora)
    state = nnx.state(new, nnx.LoRAParam)
    for module in targets:
        n_in, n_out = in_out[module]
        a = np.zeros((L, n_in, r), np.float32)
        b = np.zeros((L, r, n_out), np.float32)
        for i in range(L):
            pair = [found.get((module, i, w)) for w in "AB"]
            if any(p is None for p in pair):
                if allowed_missing and all(p is None for p in pair):
                    continue
                which = "lora_A" if pair[0] is None else "lora_B"
                raise ValueError(f"{path}: missing key {PEFT_PREFIX}.{i}.{'.'.join(MODULE_PATHS[module])}.{which}.weight")
            a[i], b[i] = pair[0].T, pair[1].T
        node = state["layers"][MODULE_PATHS[module][0]][module]
        node["lora_a"].set_value(jnp.asarray(a))
        node["lora_b"].set_value(jnp.asarray(b))
    nnx.update(new, state)
    new.eval()
    return new


# --- merge ------------------------------------------------------------------------------------------


@jax.jit
def _fold(weight: Any, lora_a: jax.Array | None, lora_b: jax.Array | None, scaling: jax.Array) -> jax.Array:
    """fp32 ``[out, in]``: ``dequant(weight) + scaling * (lora_a @ lora_b).T`` for one layer."""
    w = dequantize(weight, jnp.float32) if isinstance(weight, QuantizedTensor) else weight.astype(jnp.float32)
    if lora_a is None:
        return w
    delta = jnp.matmul(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), precision="highest")
    return w + scaling * delta.T


def merged_layer(model: Llama, i: int) -> dict[tuple[str, ...], jax.Array]:
    """Decoder layer ``i``'s frozen leaves with the LoRA deltas folded in.

    Keys are paths inside the layer (``("self_attn", "q_proj", "weight")``); linear weights are
    fp32 ``[out, in]``, other leaves (norm scales, biases) as stored.
    """
    layers = model.layers
    out: dict[tuple[str, ...], jax.Array] = {}
    for path, var in nnx.to_flat_state(nnx.state(layers, Frozen)):
        value = jax.tree.map(lambda x: x[i], var.get_value())
        path = tuple(str(p) for p in path)
        if path[-1] == "weight":
            dense = getattr(getattr(layers, path[0]), path[1])
            a = b = None
            if dense.lora_a is not None:
                a, b = dense.lora_a[...][i], dense.lora_b[...][i]
            value = _fold(value, a, b, jnp.float32(dense.scaling))
        out[path] = value
    return out


def merge_adapter(model: Llama, *, quantize_weights: bool | None = None, param_dtype: str | None = None) -> Llama:
    """A model without adapters whose linear weights are ``W + scaling * (A @ B).T``.

    Each weight is dequantized to fp32, the delta added, and the sum stored as
    ``quantize_weights`` says: re-quantized with the model's quant settings (default for an
    NF4 model; re-quantization rounds the merged weight, so the merged model is close to, not
    equal to, base + adapter), or kept as ``param_dtype`` floats (default for a 16/32-bit model).
    Works one layer at a time; at most one layer's fp32 weights are materialized at once.
    """
    quant = model.quant
    if quantize_weights is None:
        quantize_weights = quant.quantize
    quant = dataclasses.replace(quant, quantize=quantize_weights, param_dtype=param_dtype or quant.param_dtype)
    pd = jnp.dtype(quant.param_dtype)

    def make() -> Llama:
        return Llama(model.cfg, lora=LoRAConfig(r=0), quant=quant, remat=model.remat, rngs=nnx.Rngs(0))

    graphdef, frozen, rest = nnx.split(nnx.eval_shape(make), Frozen, ...)
    rest = jax.jit(lambda: nnx.split(make(), Frozen, ...)[2])()
    pure = nnx.to_pure_dict(nnx.state(model, Frozen))
    per_layer: list[dict[tuple[str, ...], Any]] = []
    for i in range(model.cfg.num_hidden_layers):
        layer = {}
        for path, value in merged_layer(model, i).items():
            if path[-1] == "weight":
                value = (quantize(value.astype(pd), quant_type=quant.quant_type, blocksize=quant.blocksize,
                                  double_quant=quant.double_quant) if quantize_weights else value.astype(pd))
            layer[path] = value
        per_layer.append(layer)
    layers: dict = {}
    for path in per_layer[0]:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[lay[path] for lay in per_layer])
        node = layers
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = stacked
    pure["layers"] = layers
    for key in ("embed_tokens", "lm_head"):
        if pure.get(key) is not None:
            pure[key] = jnp.asarray(pure[key], pd)
    pure["norm"] = jax.tree.map(lambda x: jnp.asarray(x, pd), pure["norm"])
    nnx.replace_by_pure_dict(frozen, pure)
    merged = nnx.merge(graphdef, frozen, rest)
    merged.eval()
    return merged


def save_merged(model: Llama, out: str | Path, *, quantize_weights: bool | None = None,
                tokenizer_dir: str | Path | None = None) -> Path:
    """:func:`merge_adapter`, then write the result as a model directory of this project
    (re-quantized NF4 by default for an NF4 model; :func:`~qlora_jax.models.checkpoint.load_model` reads it)."""
    from qlora_jax.models.checkpoint import save_model

    return save_model(merge_adapter(model, quantize_weights=quantize_weights), out,
                      source="merged adapter", tokenizer_dir=tokenizer_dir)


def save_merged_hf(model: Llama, directory: str | Path, *, dtype: str = "bfloat16",
                   tokenizer_dir: str | Path | None = None) -> Path:
    """Write base + adapter, merged, as a transformers ``LlamaForCausalLM`` directory.

    ``config.json``, ``model.safetensors.index.json`` and one safetensors shard per decoder layer
    (plus one for embeddings, final norm and head) in ``dtype`` (``bfloat16``, ``float16`` or
    ``float32``), so memory stays at one layer; tokenizer files are copied from ``tokenizer_dir``.
    Written atomically (temp directory, then rename).
    """
    from safetensors.numpy import save_file

    from qlora_jax.convert import hf_name_table
    from qlora_jax.models.checkpoint import copy_tokenizer_files

    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={dtype!r} is not one of bfloat16, float16, float32")
    np_dtype = jnp.dtype(dtype)
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfg = model.cfg
        table = hf_name_table(cfg)
        L = cfg.num_hidden_layers
        shard = lambda k: f"model-{k + 1:05d}-of-{L + 1:05d}.safetensors"  # noqa: E731
        weight_map: dict[str, str] = {}
        total = 0

        def write(k: int, tensors: dict[str, Any]) -> None:
            nonlocal total
            arrays = {n: np.ascontiguousarray(np.asarray(jnp.asarray(v).astype(np_dtype))) for n, v in tensors.items()}
            save_file(arrays, str(tmp / shard(k)), metadata={"format": "pt"})
            for n, a in arrays.items():
                weight_map[n] = shard(k)
                total += a.nbytes

        for i in range(L):
            layer = merged_layer(model, i)
            write(i, {name: layer[t.path[2:]] for name, t in table.items() if t.layer == i})
        top = nnx.to_pure_dict(nnx.state(model, Frozen))
        rest = {}
        for name, t in table.items():
            if t.layer is None:
                node = top
                for k in t.path:
                    node = node[k]
                rest[name] = node
        write(L, rest)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = cfg.to_hf_config()
        hf["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


# --- CLI --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m qlora_jax.peft_io merge --model DIR --adapter DIR --out DIR [--format hf|model]``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m qlora_jax.peft_io",
                                 description="Fold a PEFT LoRA adapter into a converted model's weights.")
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="write base + adapter as one model")
    m.add_argument("--model", required=True, type=Path, help="a converted model directory (python -m qlora_jax.convert)")
    m.add_argument("--adapter", required=True, type=Path, help="a PEFT LoRA adapter directory")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--format", default="hf", choices=("hf", "model"),
                   help="hf: a transformers directory (safetensors in --dtype); model: a model directory of this "
                        "project, re-quantized with the base model's settings")
    m.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="for --format hf")
    args = ap.parse_args(argv)

    from qlora_jax.models.checkpoint import load_model

    try:
        model = load_adapter(load_model(args.model, lora=LoRAConfig(r=0), compute_dtype="float32"), args.adapter)
        if args.format == "hf":
            out = save_merged_hf(model, args.out, dtype=args.dtype, tokenizer_dir=args.model)
        else:
            out = save_merged(model, args.out, tokenizer_dir=args.model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
