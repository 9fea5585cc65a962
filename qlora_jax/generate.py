"""Text generation with a KV cache, the whole decode loop on the device.

    python -m qlora_jax.generate --model DIR [--adapter DIR] [--merge] --prompt TEXT [--prompt TEXT ...]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]
        [--stop STR ...] [--seed S] [--chunk-size N] [--no-stream]
    python -m qlora_jax.generate --model DIR [--adapter DIR] --chat [--template auto|guanaco|tokenizer]

``--temperature 0`` is greedy decoding. The completion goes to stdout; everything else to stderr.

How it runs (:class:`Generator`):

* Prompts of different lengths are left-padded into one batch; every row gets its own rotary
  positions (``0..len-1`` for its real tokens) and an attention mask, so a row's tokens are those
  it would get alone.
* Prefill is one jitted forward pass over the padded prompts (the training-shaped matmuls),
  writing the :class:`~qlora_jax.models.llama.KVCache` and sampling the first token.
* Decoding is one jitted ``jax.lax.while_loop``: each iteration runs the model on one token per
  row (M = batch, the shapes :mod:`qlora_jax.kernels` dispatches to its small-M path when that is
  the fastest), updates the cache in the loop carry (donated, so XLA updates it in place) and
  samples the next token on the device. Rows stop at EOS; the loop ends when all rows are done.
* Streaming and stop strings: the loop runs in chunks of ``chunk_size`` tokens per device call
  and the host prints / checks the text between chunks. Larger chunks cost fewer host round trips
  (a chunk of ``max_new_tokens`` is a single call: fastest, no streaming); smaller ones stream more
  smoothly, and a row that hits a stop string wastes at most ``chunk_size - 1`` tokens of compute.
  The output never depends on the chunk size: each step's random key is ``fold_in(seed, step)``.
* On a mesh (``Generator(..., mesh=)``, the model's arrays sharded over it, several processes
  allowed): prompts and the loop's host-side inputs go in whole on every device, each layer's 4-bit
  weight is gathered where it is used, and every process reads back all rows' tokens, so every
  process takes the same stop-string and end-of-loop decisions (every process must call
  :meth:`Generator.generate_ids` with the same arguments).
* Sampling: repetition penalty (transformers' definition: divide positive / multiply negative
  logits of tokens already in the prompt or output), then temperature, top-k, top-p; greedy at
  temperature 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.kernels import nf4_matmul_small_m as small_m
from qlora_jax.kernels.decode_attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from qlora_jax.kernels.decode_attention import use_attention
from qlora_jax.models.llama import KVCache, Llama, fuse_projections
from qlora_jax.nf4 import QuantizedTensor
from qlora_jax.sharding import fsdp_size, host_values, put_replicated, tracing_mesh

GUANACO_STOP = "### Human:"
PROMPT_BUCKET = 16  # padded prompt lengths are multiples of this, so chat turns reuse compilations


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits.

    temperature: 0 for greedy (argmax), else the softmax temperature.
    top_k: keep only the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1: all).
    repetition_penalty: transformers' ``repetition_penalty`` (1: off).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")


def sample_logits(logits: jax.Array, key: jax.Array, cfg: SamplingConfig, seen: jax.Array | None = None) -> jax.Array:
    """Next tokens, int32 ``[B]``, from fp32 ``logits [B, V]``; ``seen`` bool ``[B, V]`` marks tokens
    the repetition penalty applies to."""
    logits = logits.astype(jnp.float32)
    if cfg.repetition_penalty != 1.0 and seen is not None:
        p = cfg.repetition_penalty
        logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        keep = before < cfg.top_p  # always keeps the first
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The decode loop's carry.

    cache: the KV cache, ``[L, B, S, K, D]`` per key/value.
    tokens: int32 ``[B, N]`` generated tokens, ``-1`` where none (not reached, or after EOS).
    last: int32 ``[B]`` the latest token of every row (the next step's input).
    positions: int32 ``[B]`` the rotary position of ``last``.
    done: bool ``[B]`` rows that have finished (EOS, or a stop string found by the host).
    seen: bool ``[B, V]`` tokens in prompt or output (repetition penalty), ``[B, 0]`` when unused.
    step: int32 ``[]`` tokens generated so far (``tokens[:, step - 1]`` is ``last``).
    key: the sampling key; step ``t`` samples with ``fold_in(key, t)``.
    """

    cache: KVCache
    tokens: jax.Array
    last: jax.Array
    positions: jax.Array
    done: jax.Array
    seen: jax.Array
    step: jax.Array
    key: jax.Array


def _record(ds: DecodeState, tok: jax.Array, eos: tuple[int, ...], uses_seen: bool) -> DecodeState:
    """Write ``tok`` (``[B]``) as token ``ds.step`` of the rows still running."""
    tok = jnp.where(ds.done, -1, tok)
    tokens = jax.lax.dynamic_update_slice(ds.tokens, tok[:, None], (0, ds.step))
    is_eos = jnp.isin(tok, jnp.asarray(eos, jnp.int32)) if eos else jnp.zeros_like(ds.done)
    seen = ds.seen
    if uses_seen:
        seen = seen | (jax.nn.one_hot(jnp.maximum(tok, 0), seen.shape[-1], dtype=bool) & (tok >= 0)[:, None])
    return dataclasses.replace(ds, tokens=tokens, last=jnp.maximum(tok, 0), done=ds.done | is_eos, seen=seen,
                               step=ds.step + 1)


def _prefill(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array, key: jax.Array, *,
             sampling: SamplingConfig, eos: tuple[int, ...], cache_len: int, max_new: int,
             unroll_layers: bool = False, mesh: jax.sharding.Mesh | None = None) -> DecodeState:
    """Run the left-padded prompts ``ids, mask [B, P]`` through the model; sample token 0."""
    model = nnx.merge(graphdef, state, copy=True)
    B, P = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = KVCache.init(model.cfg, B, cache_len, jnp.dtype(model.quant.compute_dtype))
    with tracing_mesh(mesh):
        logits, cache = model(ids, attention_mask=mask, positions=positions, cache=cache, deterministic=True,
                              unroll_layers=unroll_layers)
    uses_seen = sampling.repetition_penalty != 1.0
    V = logits.shape[-1]
    if uses_seen:
        seen = jnp.any(jax.nn.one_hot(ids, V, dtype=bool) & mask.astype(bool)[..., None], axis=1)
    else:
        seen = jnp.zeros((B, 0), bool)
    ds = DecodeState(cache=cache, tokens=jnp.full((B, max_new), -1, jnp.int32), last=jnp.zeros((B,), jnp.int32),
                     positions=positions[:, -1], done=jnp.zeros((B,), bool), seen=seen,
                     step=jnp.zeros((), jnp.int32), key=key)
    tok = sample_logits(logits[:, -1], jax.random.fold_in(key, 0), sampling, seen if uses_seen else None)
    return _record(ds, tok, eos, uses_seen)


def _decode(graphdef: nnx.GraphDef, state: nnx.State, ds: DecodeState, stop_at: jax.Array, *,
            sampling: SamplingConfig, eos: tuple[int, ...], unroll_layers: bool = False,
            layer_buffers: bool = False, join_projections: bool = True, dequantize_layers: bool = False,
            fp32_scales: bool = False, attention: str = "auto", mesh: jax.sharding.Mesh | None = None) -> DecodeState:
    """Generate tokens ``ds.step .. stop_at - 1`` (fewer if every row finishes) in one ``while_loop``.

    ``layer_buffers``: slice every layer's weights out of the stacked layer state once, before the
    loop (their own buffers for the loop's duration: the layer weights' bytes once more), instead of
    in every iteration, as :func:`~qlora_jax.models.llama.fuse_projections` (q/k/v and gate/up joined
    with ``join_projections``, 4-bit weights dequantized with ``dequantize_layers``, or their block scales
    decoded to fp32 with ``fp32_scales``; see :class:`Generator`).
    ``attention``: the decode attention's implementation (:func:`~qlora_jax.kernels.decode_attention.use_attention`).
    """
    uses_seen = sampling.repetition_penalty != 1.0
    layer_states = layer_projections = None
    if layer_buffers:
        model = nnx.merge(graphdef, state, copy=True)
        layer_graphdef, stacked = nnx.split(model.layers)  # every leaf [L, ...]
        layer_states = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(model.cfg.num_hidden_layers)]
        layer_projections = [fuse_projections(nnx.merge(layer_graphdef, st), join=join_projections,
                                              dequantize=dequantize_layers, fp32_scales=fp32_scales)
                             for st in layer_states]

    def cond(ds: DecodeState) -> jax.Array:
        return (ds.step < stop_at) & ~jnp.all(ds.done)

    def body(ds: DecodeState) -> DecodeState:
        # A fresh copy inside the body: the call writes module state (the RNG counters of LoRA
        # dropout, an adapter trained with lora_dropout > 0), which must stay in this trace.
        model = nnx.merge(graphdef, state, copy=True)
        pos = ds.positions + 1
        with tracing_mesh(mesh), use_attention(attention):
            logits, cache = model(ds.last[:, None], positions=pos[:, None],
                                  attention_mask=jnp.ones_like(ds.last)[:, None], cache=ds.cache, deterministic=True,
                                  unroll_layers=unroll_layers, layer_states=layer_states,
                                  layer_projections=layer_projections)
        tok = sample_logits(logits[:, 0], jax.random.fold_in(ds.key, ds.step), sampling, ds.seen if uses_seen else None)
        return _record(dataclasses.replace(ds, cache=cache, positions=pos), tok, eos, uses_seen)

    return jax.lax.while_loop(cond, body, ds)


LAYER_BUFFER_SLACK = 512 << 20  # bytes left free beside the layer buffers (KV cache growth, workspace)
_STATIC = ("graphdef", "sampling", "eos", "unroll_layers", "mesh")
_prefill_jit = jax.jit(_prefill, static_argnames=(*_STATIC, "cache_len", "max_new"))
_decode_jit = jax.jit(_decode, static_argnames=(*_STATIC, "layer_buffers", "join_projections", "dequantize_layers",
                                                "fp32_scales", "attention"),
                      donate_argnames=("ds",))
# From this batch size on, dequantized layer buffers (a bf16 dot per token) beat the 4-bit kernels: up to
# 64 rows the tensor-core small-M kernel decodes as fast as a bf16 dot without the buffers' 4x bytes (7B on
# an H200, eighth session: 5.23 / 6.22 ms per step at batch 4 / 8 against 5.41 / 6.43 with the buffers;
# benchmarks/RESULTS.md); beyond that the 4-bit path dequantizes every layer on every token.
DEQUANTIZE_MIN_BATCH = small_m.MAX_M + 1


@dataclasses.dataclass
class Completion:
    """One row's output: the new tokens (without EOS), their text (``None`` without a tokenizer),
    and why it ended: ``"eos"``, ``"stop"`` (a stop string; the text ends before it) or ``"length"``."""

    tokens: list[int]
    text: str | None
    finish_reason: str


def layer_buffers_fit(model: Llama, memory_stats: Callable[[Any], dict | None] = lambda d: d.memory_stats(), *,
                      dequantized: bool = False, fp32_scales: bool = False) -> bool:
    """True when every device holding part of ``model``'s layer weights has their bytes (its shards'),
    plus 10% and ``LAYER_BUFFER_SLACK``, free (``bytes_limit - bytes_in_use`` of ``memory_stats``);
    False where a device reports no statistics, and with several processes (each would judge only its
    own devices, and processes that decided differently would run different programs). ``dequantized``:
    the 4-bit weights count as their compute-dtype size (two values per packed byte); ``fp32_scales``: their
    codes plus 4 bytes per block scale (double-quantized scales decoded, :func:`qlora_jax.nf4.expand_scales`)."""
    if jax.process_count() > 1:
        return False
    itemsize = jnp.dtype(model.quant.compute_dtype).itemsize
    need: dict[Any, int] = {}
    for node in jax.tree.leaves(nnx.state(model.layers), is_leaf=lambda x: isinstance(x, QuantizedTensor)):
        if dequantized and isinstance(node, QuantizedTensor):
            sized = [(s.device, 2 * s.data.size * itemsize) for s in getattr(node.packed, "addressable_shards", ())]
        elif fp32_scales and isinstance(node, QuantizedTensor):
            sized = [(s.device, s.data.size * size) for leaf, size in ((node.packed, 1), (node.absmax, 4))
                     for s in getattr(leaf, "addressable_shards", ())]
        else:
            sized = [(s.device, s.data.nbytes) for leaf in jax.tree.leaves(node)
                     for s in getattr(leaf, "addressable_shards", ())]
        for device, nbytes in sized:
            need[device] = need.get(device, 0) + nbytes
    for device, nbytes in need.items():
        stats = memory_stats(device)
        if not stats or "bytes_limit" not in stats:
            return False
        if stats["bytes_limit"] - stats.get("bytes_in_use", 0) < nbytes * 1.1 + LAYER_BUFFER_SLACK:
            return False
    return bool(need)


class Generator:
    """Batched generation from a :class:`~qlora_jax.models.llama.Llama` (NF4 + LoRA, merged, or float).

    Args:
      model: the model; its adapters are used as they are (unmerged).
      tokenizer: a transformers tokenizer, for :meth:`generate` on text and for stop strings.
      eos_token_ids: tokens that end a row; default the model config's ``eos_token_id``.
      unroll_layers: run the layers as straight-line code in prefill and decode instead of a loop
        (same tokens; 12% faster decoding of a 7B model on an H200, 7.6 vs 8.7 ms/token, for a
        longer compile: 23 vs 7 s).
      layer_buffers: in each decode call, slice every layer's weights out of the stacked layer
        state once, before the decode loop, instead of on every token (same tokens). On an H200
        (7B, batch 1) this takes NF4 decoding from 7.24 to 4.27 ms/token and bf16 from 18.06 to
        5.79 (``benchmarks/RESULTS.md``); it costs the layer weights' bytes once more while a
        decode call runs. ``None`` (default): on when every device has that much memory free
        (checked at each :meth:`generate_ids` call, e.g. off while a 65B model trains in 48 GB),
        off where the runtime reports no memory statistics (CPU) and with several processes
        (:func:`layer_buffers_fit`).
      join_projections: with layer buffers, join q/k/v and gate/up into one layer each for decoding
        (one 4-bit GEMV and one adapter matmul pair per group instead of per projection; same tokens
        up to the last bit of a matmul's rounding; :func:`~qlora_jax.models.llama.fuse_projections`).
        Not on a mesh that splits the weights over an ``fsdp`` axis (the joined copy's layout would be
        XLA's choice, not the shards the room check counts).
        On an H200 (7B, batch 1) NF4 decoding went from 3.78 to 3.51 ms/token, with an unmerged adapter
        from 5.97 to 4.14 (with the adapters' ``A`` stored ``[r, in]``; ``benchmarks/RESULTS.md``).
      fp32_scales: with 4-bit layer buffers, decode the double-quantized block scales into them as fp32 once
        per decode call (:func:`~qlora_jax.nf4.expand_scales`: 3 more bytes per 64 weights, ~0.3 GB for 7B),
        so the GEMV and small-M kernels read each scale instead of decoding it from its 8-bit code on every
        token: on an H200 the 7B decode GEMVs ran 4-6% faster (``benchmarks/RESULTS.md``, eleventh session).
        Same tokens up to an FMA's rounding of a scale. ``None`` (default): on when every device has room
        for the buffers with the fp32 scales (:func:`layer_buffers_fit`), else the buffers keep the codes.
      dequantize_layers: with layer buffers, dequantize the 4-bit weights into them (compute dtype,
        once per decode call) and decode with a plain dot: faster than the 4-bit kernels beyond 64 rows
        (where the small-M kernel stops), at 4x the buffers' bytes. ``None`` (default): from
        ``DEQUANTIZE_MIN_BATCH`` rows on, when every device has room (:meth:`uses_dequantized_layers`).
        The tokens are those of the dequantize + dot path (prefill's), not bit for bit the 4-bit kernels'.
      attention: the decode steps' attention over the KV cache: ``"auto"`` (default) the Pallas kernel
        ``qlora_jax/kernels/decode_attention.py`` on a GPU, XLA elsewhere; ``"xla"``; ``"pallas"`` (the
        kernel, interpreted off a GPU). Same tokens up to fp32 rounding of the softmax.
      mesh: the mesh the model's arrays are sharded over (``qlora_jax.sharding``; ``None``: one
        device). With several processes, every process runs :meth:`generate_ids` with the same
        arguments and gets every row's completion.
    """

    def __init__(self, model: Llama, tokenizer: Any = None, *, eos_token_ids: Sequence[int] | None = None,
                 unroll_layers: bool = True, layer_buffers: bool | None = None, join_projections: bool = True,
                 dequantize_layers: bool | None = None, fp32_scales: bool | None = None, attention: str = "auto",
                 mesh: jax.sharding.Mesh | None = None):
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        self.model, self.tokenizer, self.mesh, self.attention = model, tokenizer, mesh, attention
        self.join_projections = bool(join_projections)
        self.dequantize_layers = None if dequantize_layers is None else bool(dequantize_layers)
        self.fp32_scales = None if fp32_scales is None else bool(fp32_scales)
        self.unroll_layers = bool(unroll_layers)
        self.layer_buffers = None if layer_buffers is None else bool(layer_buffers)
        self.graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        # The layers cast A and B to the compute dtype before every matmul; casting once here gives the
        # same numbers and halves the adapter bytes each decode step reads (fp32 -> bf16).
        cdt = jnp.dtype(model.quant.compute_dtype)
        lora = jax.tree.map(lambda x: x.astype(cdt), lora)
        self.state = nnx.merge_state(lora, rest)
        if eos_token_ids is None:
            eos = model.cfg.eos_token_id
            eos_token_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        self.eos = tuple(int(e) for e in eos_token_ids)

    # -- text <-> ids --

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's BOS in front (added if the tokenizer does not add it)."""
        ids = list(self.tokenizer(text)["input_ids"])
        bos = self.model.cfg.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def completion_text(self, prompt: Sequence[int], new: Sequence[int]) -> str:
        """The text ``new`` adds after ``prompt`` (decoded together, so word boundaries are right)."""
        tok = self.tokenizer
        head = tok.decode(list(prompt), skip_special_tokens=True)
        full = tok.decode([*prompt, *new], skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else tok.decode(list(new), skip_special_tokens=True)

    # -- generation --

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        stop_strings: Sequence[str] = (),
        chunk_size: int | None = None,
        on_chunk: Callable[[list[list[int]]], None] | None = None,
        pad_id: int = 0,
    ) -> list[Completion]:
        """Generate up to ``max_new_tokens`` after each prompt (token ids, BOS included).

        ``chunk_size`` tokens per device call (``None``: all in one call); ``on_chunk`` gets every
        row's tokens so far after each call (streaming). Stop strings need the tokenizer.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        B = len(prompts)
        P = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        ids = np.full((B, P), pad_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):], mask[i, P - len(p):] = p, 1
        ds = _prefill_jit(self.graphdef, self.state, *put_replicated((ids, mask, jax.random.key(seed)), self.mesh),
                          sampling=sampling, eos=self.eos, cache_len=P + max_new_tokens, max_new=max_new_tokens,
                          unroll_layers=self.unroll_layers, mesh=self.mesh)
        chunk = max_new_tokens if chunk_size is None else max(1, int(chunk_size))
        plan = self.decode_plan(B)
        stopped: dict[int, tuple[list[int], str]] = {}
        step = 1
        while True:
            # Every process reads every row: the stop checks and the loop's end below are the same on all.
            tokens, done = host_values((ds.tokens, ds.done))
            rows = [[int(t) for t in row[:step] if t >= 0] for row in tokens]
            newly_stopped = self._check_stops(prompts, rows, stop_strings, stopped, done)
            if newly_stopped is not None:
                done = done | newly_stopped
                ds = dataclasses.replace(ds, done=put_replicated(done, self.mesh))
            if on_chunk is not None:
                on_chunk([stopped[i][0] if i in stopped else r for i, r in enumerate(rows)])
            if step >= max_new_tokens or done.all():
                break
            step = min(step + chunk, max_new_tokens)
            ds = _decode_jit(self.graphdef, self.state, ds, put_replicated(np.int32(step), self.mesh),
                             sampling=sampling, eos=self.eos, unroll_layers=self.unroll_layers, **plan,
                             attention=self.attention, mesh=self.mesh)
            step = int(host_values(ds.step))
        out = []
        for i, row in enumerate(rows):
            if i in stopped:
                toks, text = stopped[i]
                out.append(Completion(toks, text, "stop"))
                continue
            ended = bool(done[i]) and len(row) > 0 and row[-1] in self.eos
            toks = row[:-1] if ended else row
            text = None if self.tokenizer is None else self.completion_text(prompts[i], toks)
            out.append(Completion(toks, text, "eos" if ended else "length"))
        return out

    def decode_plan(self, batch: int) -> dict[str, bool]:
        """How a decode call for ``batch`` rows prepares the layer weights (the static arguments of the decode
        loop): ``layer_buffers`` (:meth:`uses_layer_buffers`), ``join_projections`` (with them, not on a mesh
        that splits weights over ``fsdp``), ``dequantize_layers`` (:meth:`uses_dequantized_layers`) and
        ``fp32_scales`` (4-bit buffers that are not dequantized, :meth:`uses_fp32_scales`)."""
        buffers = self.uses_layer_buffers()
        dequantized = buffers and self.uses_dequantized_layers(batch)
        return {"layer_buffers": buffers, "join_projections": self.join_projections and fsdp_size(self.mesh) == 1,
                "dequantize_layers": dequantized,
                "fp32_scales": buffers and not dequantized and self.uses_fp32_scales()}

    def uses_layer_buffers(self) -> bool:
        """Whether decode calls now slice the layer weights once per call (``layer_buffers``; ``None``:
        :func:`layer_buffers_fit`)."""
        return layer_buffers_fit(self.model) if self.layer_buffers is None else self.layer_buffers

    def uses_fp32_scales(self) -> bool:
        """Whether 4-bit layer buffers get their block scales decoded to fp32 (``fp32_scales``; ``None``: when
        the model has double-quantized 4-bit weights and every device has room, :func:`layer_buffers_fit`)."""
        if self.fp32_scales is not None:
            return self.fp32_scales
        return (self.model.quant.quantize and self.model.quant.double_quant
                and layer_buffers_fit(self.model, fp32_scales=True))

    def uses_dequantized_layers(self, batch: int) -> bool:
        """Whether a decode call for ``batch`` rows would dequantize the 4-bit layer weights into its layer
        buffers (``dequantize_layers``; ``None``: from ``DEQUANTIZE_MIN_BATCH`` rows on, when the model
        has 4-bit weights, every device has room for them in the compute dtype, and they are not split
        over an ``fsdp`` mesh axis: the dequantize kernel's output is whole on every device, which the
        room check, counting each device's shards, would underestimate)."""
        if self.dequantize_layers is not None:
            return self.dequantize_layers
        return (batch >= DEQUANTIZE_MIN_BATCH and self.model.quant.quantize and fsdp_size(self.mesh) == 1
                and layer_buffers_fit(self.model, dequantized=True))

    def _check_stops(self, prompts, rows, stop_strings, stopped, done) -> np.ndarray | None:
        """Rows whose text now contains a stop string: record (tokens, text before the stop) in
        ``stopped``; returns the bool mask of newly stopped rows, or ``None``."""
        if not stop_strings:
            return None
        new = np.zeros(len(rows), bool)
        for i, row in enumerate(rows):
            if i in stopped:
                continue
            text = self.completion_text(prompts[i], row)
            hits = [text.find(s) for s in stop_strings if s and s in text]
            if not hits:
                continue
            # The shortest token prefix whose text contains the stop string.
            k = next(k for k in range(1, len(row) + 1) if any(s and s in self.completion_text(prompts[i], row[:k]) for s in stop_strings))
            stopped[i] = (row[:k], text[: min(hits)])
            new[i] = not done[i]
        return new if new.any() else None

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[Completion]:
        """:meth:`generate_ids` on text prompts (BOS added as :meth:`encode` does)."""
        if self.tokenizer is None:
            raise ValueError("Generator.generate needs a tokenizer; use generate_ids for token ids")
        return self.generate_ids([self.encode(p) for p in prompts], **kwargs)


# --- streaming and chat ---------------------------------------------------------------------------------


class TextStreamer:
    """Prints one row's completion as it grows, holding back any tail that could still turn out to be
    the start of a stop string (so a stop string is never printed)."""

    def __init__(self, gen: Generator, prompt: Sequence[int], stop_strings: Sequence[str] = (), out: TextIO = sys.stdout):
        self.gen, self.prompt, self.out = gen, list(prompt), out
        self.stops = [s for s in stop_strings if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.printed = 0

    def __call__(self, rows: list[list[int]]) -> None:
        text = self.gen.completion_text(self.prompt, rows[0])
        hits = [text.find(s) for s in self.stops if s in text]
        text = text[: min(hits)] if hits else text
        safe = len(text) if hits else len(text) - self.holdback
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            safe = min(safe, len(text) - 1)
        if safe > self.printed:
            self.out.write(text[self.printed:safe])
            self.out.flush()
            self.printed = safe

    def finish(self, final_text: str) -> None:
        if len(final_text) > self.printed:
            self.out.write(final_text[self.printed:])
        self.out.write("\n")
        self.out.flush()


def guanaco_prompt(history: Sequence[tuple[str, str]], message: str) -> str:
    """Guanaco's template: ``### Human: ... ### Assistant: ...`` turns, ending with an open assistant turn."""
    turns = [f"### Human: {q} ### Assistant: {a}" for q, a in history]
    return " ".join([*turns, f"### Human: {message} ### Assistant:"])


def chat(gen: Generator, *, template: str = "auto", max_new_tokens: int = 256, sampling: SamplingConfig = SamplingConfig(),
         seed: int = 0, chunk_size: int = 16, stop_strings: Sequence[str] = (),
         inp: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    """Interactive chat: read a message per line from ``inp`` (EOF or ``/exit`` ends, ``/reset`` clears
    the history), stream each reply to ``out``. Every turn re-reads the whole conversation."""
    tok = gen.tokenizer
    if template == "auto":
        template = "tokenizer" if getattr(tok, "chat_template", None) else "guanaco"
    if template not in ("guanaco", "tokenizer"):
        raise ValueError(f"template={template!r} is not one of auto, guanaco, tokenizer")
    stops = tuple(stop_strings) + ((GUANACO_STOP,) if template == "guanaco" else ())
    history: list[tuple[str, str]] = []
    turn = 0
    while True:
        err.write("> ")
        err.flush()
        line = inp.readline()
        if not line or line.strip() == "/exit":
            break
        message = line.strip()
        if message == "/reset":
            history.clear()
            continue
        if not message:
            continue
        if template == "guanaco":
            ids = gen.encode(guanaco_prompt(history, message))
        else:
            msgs = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            text = tok.apply_chat_template([*msgs, {"role": "user", "content": message}], add_generation_prompt=True, tokenize=False)
            ids = gen.encode(text)
        streamer = TextStreamer(gen, ids, stops, out)
        (c,) = gen.generate_ids([ids], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + turn,
                                stop_strings=stops, chunk_size=chunk_size, on_chunk=streamer)
        reply = c.text.strip()
        streamer.finish(c.text)
        history.append((message, reply))
        turn += 1


# --- CLI ------------------------------------------------------------------------------------------------


def load_for_generation(model_dir: str | Path, adapter: str | Path | None = None, *, merge: bool = False,
                        compute_dtype: str | None = None) -> tuple[Llama, Any]:
    """A converted model directory (+ optional PEFT adapter, optionally merged) and its tokenizer."""
    from transformers import AutoTokenizer

    from qlora_jax.models.checkpoint import load_model
    from qlora_jax.models.llama import LoRAConfig
    from qlora_jax.peft_io import load_adapter, merge_adapter

    model = load_model(model_dir, lora=LoRAConfig(r=0), compute_dtype=compute_dtype)
    if adapter is not None:
        model = load_adapter(model, adapter)
        if merge:
            model = merge_adapter(model)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir}: no usable tokenizer files beside the model ({e})") from None
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="a converted model directory (python -m qlora_jax.convert)")
    ap.add_argument("--adapter", type=Path, help="a PEFT LoRA adapter directory")
    ap.add_argument("--merge", action="store_true", help="fold the adapter into the weights (re-quantized) before generating")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    ap.add_argument("--chat", action="store_true", help="interactive chat on stdin")
    ap.add_argument("--template", default="auto", choices=("auto", "guanaco", "tokenizer"),
                    help="chat template: Guanaco's '### Human: / ### Assistant:', the tokenizer's, or auto "
                         "(the tokenizer's if it has one)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=16, help="tokens per device call between streamed prints")
    ap.add_argument("--no-stream", action="store_true", help="print completions only when done")
    ap.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"))
    args = ap.parse_args(argv)
    if not args.prompt and not args.chat:
        ap.error("give --prompt TEXT or --chat")
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty)
        model, tokenizer = load_for_generation(args.model, args.adapter, merge=args.merge, compute_dtype=args.compute_dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = Generator(model, tokenizer)
    if args.chat:
        chat(gen, template=args.template, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
             chunk_size=args.chunk_size, stop_strings=args.stop)
        return 0
    prompts = [gen.encode(p) for p in args.prompt]
    stream = len(prompts) == 1 and not args.no_stream
    streamer = TextStreamer(gen, prompts[0], args.stop) if stream else None
    results = gen.generate_ids(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                               stop_strings=args.stop, chunk_size=args.chunk_size if stream else None, on_chunk=streamer)
    if stream:
        streamer.finish(results[0].text)
    else:
        for i, r in enumerate(results):
            if len(results) > 1:
                print(f"--- {i} ---")
            print(r.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
