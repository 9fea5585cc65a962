"""LLaMA (1/2/3 and compatible: SmolLM2, TinyLlama, Mistral without sliding window) in Flax NNX,
with every linear projection an NF4 (or 16-bit) layer carrying a LoRA adapter.

The architecture is transformers' ``LlamaForCausalLM``: RMSNorm, rotary embeddings (``rope_theta``;
linear and LLaMA-3 ``rope_scaling``), grouped-query attention, SwiGLU MLP, optional tied embeddings.
Embeddings, norms and ``lm_head`` are frozen float arrays (``param_dtype``, bf16 by default).

Decoder layers are created stacked (one leading layer axis on every leaf, ``nnx.vmap``) and run with
``jax.lax.scan``, so compile time does not grow with depth; each layer can be rematerialized with a
selectable policy (:data:`REMAT_POLICIES`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax import kernels
from qlora_jax.kernels.decode_attention import decode_attention
from qlora_jax.kernels.rms_norm import rms_norm
from qlora_jax.nf4 import MAX_BLOCKSIZE, MIN_BLOCKSIZE, QUANT_TYPES, QuantizedTensor
from qlora_jax.nf4_dense import Frozen, FusedDense, LoRADense, NF4Dense, fuse_dense, fused_dense, lora_scaling, matmul_t, shared_input_dense, torch_linear_init

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


# --- configuration -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """transformers' ``rope_scaling`` / ``rope_parameters`` for the types we support.

    ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1) divides only the low
    frequencies, interpolating between ``low_freq_factor`` and ``high_freq_factor``.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a LLaMA-family model; field names are transformers' ``config.json`` keys."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> "LlamaConfig":
        """Read a transformers ``config.json`` (a dict, the file, or the directory holding it).

        Raises ``ValueError`` for an architecture or RoPE variant this model does not implement.
        """
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text())
            except FileNotFoundError:
                raise ValueError(f"{path}: no such file (expected a transformers config.json)") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        c = dict(config)
        model_type = c.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise ValueError(f"unsupported model_type {model_type!r}: this model implements llama (and mistral-style) only")
        if c.get("sliding_window") not in (None, 0) and model_type == "mistral":
            raise ValueError(f"sliding_window={c['sliding_window']} attention is not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={c['hidden_act']!r} is not supported (LLaMA uses silu)")
        heads = int(c["num_attention_heads"])
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        scaling = None
        if rope_type != "default":
            scaling = RopeScaling(
                rope_type=rope_type,
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", c.get("max_position_embeddings", 8192))
                ),
            )
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            bos_token_id=c.get("bos_token_id", 1),
            eos_token_id=tuple(eos) if isinstance(eos := c.get("eos_token_id", 2), list) else eos,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers ``LlamaForCausalLM`` ``config.json`` dict for this architecture."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "rope_scaling"}
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **d}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """Original LLaMA sizes (Touvron et al., 2023, Table 2): ``7b``, ``13b``, ``33b``, ``65b``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _llama1(hidden: int, ffn: int, layers: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6,
    )


PRESETS: dict[str, LlamaConfig] = {
    "7b": _llama1(4096, 11008, 32, 32),
    "13b": _llama1(5120, 13824, 40, 40),
    "33b": _llama1(6656, 17920, 60, 52),
    "65b": _llama1(8192, 22016, 80, 64),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the linear projections (QLoRA: r=64, alpha=16, all seven projections).

    ``scaling`` is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (PEFT's rank-stabilized LoRA).
    ``r=0`` builds the model without adapters. ``param_dtype``: storage of ``A`` and ``B`` (``float32``, or
    ``bfloat16`` as the original QLoRA trains them, with an fp32 master copy in the optimizer).
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    use_rslora: bool = False
    param_dtype: str = "float32"

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    def __post_init__(self):
        bad = set(self.targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {LORA_TARGETS}")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"LoRA param_dtype={self.param_dtype!r} must be float32 or bfloat16")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the frozen weights are stored and computed.

    ``quantize=False`` keeps the linear weights as ``param_dtype`` arrays (16-bit LoRA baseline).
    Embeddings, norms and ``lm_head`` are always ``param_dtype``.
    """

    quantize: bool = True
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r} is not one of {QUANT_TYPES}")
        bs = self.blocksize
        if not (MIN_BLOCKSIZE <= bs <= MAX_BLOCKSIZE and bs & (bs - 1) == 0):
            raise ValueError(f"blocksize={bs} must be a power of two between {MIN_BLOCKSIZE} and {MAX_BLOCKSIZE}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in ("bfloat16", "float16", "float32"):
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of bfloat16, float16, float32")


# --- rematerialization ---------------------------------------------------------------------------


def _offload_policy():
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")


# The activations a decoder layer names (``checkpoint_name``) for ``"save_projections"``: what its
# backward pass needs so that no frozen product runs again: q/k/v and gate/up with their adapters
# added, the attention output (``o_proj``'s input) and the residual stream after attention.
# ``"save_attention"`` keeps the last two only (16 KB per token and layer at 7B).
ATTENTION_NAMES = ("attn_out", "resid_mid")
PROJECTION_NAMES = ("qkv", *ATTENTION_NAMES, "gate_up")

# What each decoder layer keeps for the backward pass: everything ("none": no remat), only its
# input ("full"), the outputs of matmuls without batch dimensions ("save_dots": the frozen products
# and every adapter's two products apart), the projections' outputs of PROJECTION_NAMES
# ("save_projections": the backward pass recomputes norms, rotary embeddings, attention, SwiGLU and
# the adapters' ``x @ A``, but no 4-bit product), of ATTENTION_NAMES ("save_attention": no attention
# forward and no ``o_proj`` product recomputed), or the matmul outputs moved to pinned host memory
# ("offload", offload-to-host). 7B at 4x512 on an H200 (benchmarks/RESULTS.md, seventh session):
# full 0.172 s / 7.35 GiB, save_attention 0.166 s / 8.28 GiB, save_projections 0.142 s / 12.3 GiB.
REMAT_POLICIES: dict[str, Callable[[], Any] | None] = {
    "none": None,
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "save_dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_projections": lambda: jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES),
    "save_attention": lambda: jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES),
    "offload": _offload_policy,
}
_REMAT_ALIASES = {"save-dots": "save_dots", "save-projections": "save_projections", "save-attention": "save_attention",
                  "offload-to-host": "offload", "offload_to_host": "offload"}


# --- building blocks -----------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` computed in fp32 (as transformers does), returned in ``x.dtype``."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any):
        self.eps = eps
        self.scale = Frozen(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # one row (batch-1 decoding) on a GPU: one Pallas kernel instead of XLA's two (qlora_jax/kernels/rms_norm.py)
        return rms_norm(x, self.scale[...], self.eps)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """fp32 ``[head_dim / 2]`` rotary frequencies, with ``rope_scaling`` applied as transformers does."""
    dim = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    s = cfg.rope_scaling
    if s is None or s.rope_type == "default":
        return inv
    if s.rope_type == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    # llama3 (Llama 3.1): keep high frequencies, divide low ones by `factor`, interpolate between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``positions [B, T]`` -> fp32 ``cos, sin [B, T, head_dim]`` (halves repeated, transformers' layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]  # (B, T, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by ``cos, sin [B, T, D]`` (rotate-half convention), in fp32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for incremental decoding.

    k, v:  ``[L, B, S, K, D]`` in the compute dtype (``S`` = cache length, ``K`` = KV heads).
    valid: bool ``[B, S]``, slots that hold a real (non-padding) token.
    index: int32 ``[]``, the next slot to write; every batch row writes the same slot.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, length: int, dtype: Any = jnp.bfloat16) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32)
        )


def _linear(cfg: LlamaConfig, lora: LoRAConfig, quant: QuantConfig, name: str, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> LoRADense:
    r = lora.r if name in lora.targets else 0
    common = dict(
        r=r, alpha=lora.alpha, rslora=lora.use_rslora, dropout=lora.dropout, use_bias=bias,
        param_dtype=jnp.dtype(quant.param_dtype), compute_dtype=jnp.dtype(quant.compute_dtype),
        lora_dtype=jnp.dtype(lora.param_dtype), rngs=rngs,
    )
    # Random init (torch's nn.Linear); loading replaces it. Drawn in param_dtype so that a quantized
    # weight records the dtype the checkpoint's weights have.
    weight = torch_linear_init(rngs.params(), (n_out, n_in), n_in).astype(quant.param_dtype)
    if quant.quantize:
        return NF4Dense(n_in, n_out, quant_type=quant.quant_type, blocksize=quant.blocksize,
                        double_quant=quant.double_quant, weight=weight, **common)
    return LoRADense(n_in, n_out, weight=weight, **common)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings through ``jax.nn.dot_product_attention``; a decode
    step (one new token over the KV cache) through :func:`~qlora_jax.kernels.decode_attention.decode_attention`."""

    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig, quant: QuantConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd, b = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = _linear(cfg, lora, quant, "q_proj", d, self.num_heads * hd, b, rngs)
        self.k_proj = _linear(cfg, lora, quant, "k_proj", d, self.num_kv_heads * hd, b, rngs)
        self.v_proj = _linear(cfg, lora, quant, "v_proj", d, self.num_kv_heads * hd, b, rngs)
        self.o_proj = _linear(cfg, lora, quant, "o_proj", self.num_heads * hd, d, b, rngs)

    def __call__(self, x, cos, sin, mask, kv, cache_index, deterministic, fused=None, kv_layer=None):
        """``kv``: this layer's cache ``(k, v)``, each ``[B, S, K, D]``, or with ``kv_layer = i`` the whole
        stacked cache ``[L, B, S, K, D]`` of which this layer is ``i`` (the step's keys and values are then
        written into the stacked arrays in place: one small update, no copy of the layer's slice)."""
        B, T, _ = x.shape
        if fused is None:
            q, k, v = shared_input_dense(x, (self.q_proj, self.k_proj, self.v_proj), deterministic=deterministic)
        else:
            q, k, v = fused_dense(x, fused["qkv"])
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write this step's keys/values into the cache, attend over all of it
            ck, cv = kv
            if kv_layer is None:
                k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
                v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
                new_kv = (k, v)
            else:
                at = (kv_layer, 0, cache_index, 0, 0)
                new_kv = (jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], at),
                          jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], at))
                k, v = new_kv
            if T == 1:  # decoding: one kernel over the cache in place (the mask says which slots it sees)
                out = decode_attention(q[:, 0], k, v, mask[:, 0, 0], cache_index + 1, layer=kv_layer)[:, None]
            else:
                if kv_layer is not None:
                    k, v = k[kv_layer], v[kv_layer]
                out = _attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        else:
            new_kv = None
            out = _attention(q, k, v, mask)
        out = out.reshape(B, T, -1)  # (B, T, H * D)
        out = checkpoint_name(out, "attn_out")
        if fused is None:
            return self.o_proj(out, deterministic=deterministic), new_kv
        return fused_dense(out, fused["o"])[0], new_kv


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``q [B, T, H, D]``, ``k, v [B, S, K, D]``; ``mask`` bool ``[B, 1, T, S]`` or ``None`` for causal.

    cuDNN's fused (flash) attention on GPU for the plain causal case in 16-bit with a head size
    it supports; XLA otherwise.
    """
    if mask is None:
        head_dim = q.shape[-1]
        cudnn = (
            jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0
            and head_dim <= 128
        )
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if cudnn else "xla")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig, quant: QuantConfig, *, rngs: nnx.Rngs):
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(cfg, lora, quant, "gate_proj", d, f, b, rngs)
        self.up_proj = _linear(cfg, lora, quant, "up_proj", d, f, b, rngs)
        self.down_proj = _linear(cfg, lora, quant, "down_proj", f, d, b, rngs)

    def __call__(self, x, deterministic, fused=None):
        if fused is None:
            g, u = shared_input_dense(x, (self.gate_proj, self.up_proj), deterministic=deterministic)
            g, u = checkpoint_name(g, "gate_up"), checkpoint_name(u, "gate_up")
            return self.down_proj(jax.nn.silu(g) * u, deterministic=deterministic)
        g, u = fused_dense(x, fused["gate_up"])
        return fused_dense(jax.nn.silu(g) * u, fused["down"])[0]


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + mlp(norm(h))``."""

    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig, quant: QuantConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(quant.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, lora, quant, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg, lora, quant, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv, cache_index, deterministic, fused=None, kv_layer=None):
        """``fused``: :func:`fuse_projections` of this layer, used instead of its projection modules;
        ``kv``, ``kv_layer``: as :class:`Attention`'s."""
        a, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_index, deterministic, fused,
                                   kv_layer)
        h = checkpoint_name(x + a, "resid_mid")
        return h + self.mlp(self.post_attention_layernorm(h), deterministic, fused), new_kv


def fuse_projections(layer: DecoderLayer, *, join: bool = True, dequantize: bool = False,
                     fp32_scales: bool = False) -> dict[str, tuple[FusedDense, ...]]:
    """A decoder layer's projections prepared for inference (:func:`qlora_jax.nf4_dense.fuse_dense`):
    adapters cast to the compute dtype once, and with ``join`` q/k/v and gate/up each joined into one
    layer (one 4-bit GEMV and two adapter matmuls instead of three of each per projection). With
    ``dequantize`` the 4-bit weights are dequantized to the compute dtype here, once (the numbers of
    the dequantize + dot path that prefill and training run), for a plain dot on every token. With
    ``fp32_scales`` (and not ``dequantize``) the 4-bit weights' double-quantized block scales are decoded to
    fp32 here, once (:func:`qlora_jax.nf4.expand_scales`), instead of by the kernels on every token.
    Keys ``qkv``, ``o``, ``gate_up``, ``down``. For one layer's arrays (not the stacked ``[L, ...]``
    state); made inside ``jit`` before a decode loop, it holds a copy of the layer's weights."""
    a, m = layer.self_attn, layer.mlp

    def group(*layers):
        expand = fp32_scales and not dequantize
        fused = (fuse_dense(layers, fp32_scales=expand) if join
                 else tuple(f for l in layers for f in fuse_dense([l], fp32_scales=expand)))
        if dequantize:
            fused = tuple(dataclasses.replace(f, weight=kernels.dequantize(f.weight, jnp.dtype(f.compute_dtype)))
                          if isinstance(f.weight, QuantizedTensor) else f for f in fused)
        return fused

    return {"qkv": group(a.q_proj, a.k_proj, a.v_proj), "o": group(a.o_proj),
            "gate_up": group(m.gate_proj, m.up_proj), "down": group(m.down_proj)}


class Llama(nnx.Module):
    """``LlamaForCausalLM`` with NF4 (or 16-bit) frozen linear weights and LoRA adapters.

    Args:
      cfg: the architecture.
      lora: adapter rank/alpha/dropout and which projections get one.
      quant: weight storage (NF4/FP4 or unquantized) and dtypes.
      remat: rematerialization policy per decoder layer, one of :data:`REMAT_POLICIES`.
      rngs: ``params`` draws the (random) initial weights and LoRA ``A``; ``dropout`` the LoRA dropout.

    Parameters live at ``embed_tokens``, ``layers.<module path>`` (stacked, leading axis = layer),
    ``norm`` and, without tied embeddings, ``lm_head``.
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        lora: LoRAConfig = LoRAConfig(),
        quant: QuantConfig = QuantConfig(),
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        remat = _REMAT_ALIASES.get(remat, remat)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
        self.cfg, self.lora, self.quant, self.remat = cfg, lora, quant, remat
        pd = jnp.dtype(quant.param_dtype)
        self.embed_tokens = Frozen(
            (jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32) * 0.02).astype(pd)
        )

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, lora, quant, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Frozen(
                (jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32) * 0.02).astype(pd)
            )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool | None = None,
        unroll_layers: bool = False,
        layer_states: Sequence[nnx.State] | None = None,
        layer_projections: Sequence[dict[str, tuple[FusedDense, ...]]] | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits for every position.

        Args:
          input_ids: int ``[B, T]``.
          positions: int ``[B, T]`` rotary positions; default ``0..T-1`` (after ``cache.index`` with a cache).
          attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (keys at padded slots are ignored).
          cache: a :class:`KVCache`; the new tokens are written at ``cache.index``.
          deterministic: disable LoRA dropout (default: the modules' ``train()`` / ``eval()`` mode).
          unroll_layers: unroll the loop over layers (same numbers; one straight-line program, which
            decoding one token at a time wants: no loop bookkeeping between layers' small kernels).
          layer_states: inference only: each layer's state (``nnx.split(self.layers)``'s, indexed by
            layer) as its own arrays, used instead of slicing the stacked ``[L, ...]`` layer state
            here; the layers run as straight-line code. A decode loop that slices them once, outside
            the loop, saves a copy of every layer's weights per token (a custom call or cuBLAS operand
            is its own buffer). Module state the layers write (dropout RNG counters) is not kept.
          layer_projections: with ``layer_states``: each layer's :func:`fuse_projections`, used for its
            projections (made once outside a decode loop, like ``layer_states``).

        Returns:
          fp32 logits ``[B, T, vocab]``, and the updated cache when one was passed.
        """
        if layer_projections is not None and layer_states is None:
            raise ValueError("layer_projections needs layer_states (the layers' own arrays)")
        B, T = input_ids.shape
        cdt = jnp.dtype(self.quant.compute_dtype)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(cdt)  # (B, T, D)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg))
        tok_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)

        if cache is None:
            kv, cache_index = None, None
            mask = None if attention_mask is None else (jnp.tril(jnp.ones((T, T), bool))[None] & tok_valid[:, None, :])[:, None]
        else:
            S = cache.k.shape[2]
            valid = jax.lax.dynamic_update_slice(cache.valid, tok_valid, (0, start))
            slots = jnp.arange(S)
            causal = slots[None, :] <= (start + jnp.arange(T))[:, None]  # (T, S): a query sees earlier slots
            mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, T, S)
            kv, cache_index = (cache.k, cache.v), start

        graphdef, state = nnx.split(self.layers)

        def body(x, xs, fused=None, kv_layer=None):
            layer_state, layer_kv = xs
            layer = nnx.merge(graphdef, layer_state)
            x, new_kv = layer(x, cos, sin, mask, layer_kv, cache_index, deterministic, fused, kv_layer)
            return x, (nnx.state(layer, nnx.RngState), new_kv)

        policy = REMAT_POLICIES[self.remat]

        def remat(f):
            return f if policy is None else jax.checkpoint(f, policy=policy(), prevent_cse=False)

        if layer_states is None:
            x, (rng_state, new_kv) = jax.lax.scan(remat(body), x, (state, kv), unroll=bool(unroll_layers))
            nnx.update(self.layers, rng_state)
        else:
            if len(layer_states) != self.cfg.num_hidden_layers:
                raise ValueError(f"layer_states: {len(layer_states)} layers, the model has {self.cfg.num_hidden_layers}")
            if layer_projections is not None and len(layer_projections) != len(layer_states):
                raise ValueError(f"layer_projections: {len(layer_projections)} layers, the model has {len(layer_states)}")
            new_kv = kv
            for i, layer_state in enumerate(layer_states):
                fused = None if layer_projections is None else layer_projections[i]
                # the stacked cache goes to every layer, which writes its slot in place (slicing a
                # layer's cache out and setting it back made XLA rewrite the whole slice, twice, per token)
                layer_body = remat(functools.partial(body, kv_layer=None if kv is None else i))
                x, (_, new_kv) = layer_body(x, (layer_state, new_kv), fused)

        x = self.norm(x)
        head = self.embed_tokens[...] if self.lm_head is None else self.lm_head[...]
        logits = matmul_t(x, head)  # fp32 [B, T, V]; bf16 operands in the backward pass too
        if cache is None:
            return logits
        return logits, KVCache(new_kv[0], new_kv[1], valid, start + T)
