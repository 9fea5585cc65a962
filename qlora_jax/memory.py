"""Memory planner: the peak device memory of a training run, predicted from its configuration.

    python -m qlora_jax.memory --config configs/guanaco_65b.py [--set data.batch_size=16 ...]
                               [--preset 65b] [--seq 2048] [--gpu-mem 48GB] [--json plan.json]

The architecture comes from the model directory's ``config.json`` or, for a hub id or path
without one (``huggyllama/llama-65b``), from the LLaMA preset named by its trailing size token
(``--preset`` forces one). Every term is arithmetic on the shapes the training step allocates:

* frozen weights: NF4 / FP4 codes (n/2 bytes), block scales (uint8 codes n/64 with double
  quantization, else fp32), nested fp32 scales (one per 256 blocks), the offset and the 256-entry
  map per tensor; or 16-bit weights; plus the 16-bit embeddings, ``lm_head`` and norms;
* LoRA: fp32 parameters and gradients (on the CPU backend also the update tree; on the GPU XLA fuses
  the AdamW update into the parameter write); Adam's two fp32 moments on the device, or (paged) on
  the host with ``pages_in_flight`` pages of both moments on the device;
* activations: the per-layer scan inputs ``[B, T, D]`` saved for the backward pass (remat
  ``full``), or every layer's activations (``none``) / matmul outputs, the adapters' two products
  included (``save_dots``) / the projections' outputs (``save_projections``) / the attention output
  and the residual after it (``save_attention``); plus one layer's
  recomputed activations during the backward pass (their gradients reuse buffers);
* attention: nothing with cuDNN's fused attention (a GPU, 16-bit compute: the training step passes
  no padding mask); XLA attention materializes ``[B, H, T, T]`` probabilities in fp32 and 16 bits,
  and the ``[B, T, T]`` mask;
* logits ``[B, T, V]`` in fp32 and their gradient (16-bit on the GPU, fp32 on the CPU backend), as far as
  they exceed the layers' backward phase (the two are not live at the same time);
* the dequantized 16-bit copy of the largest weight (dequantize + dot, forward and backward);
* on the GPU a 64 MiB allowance for allocator rounding.

On a ``data x fsdp`` mesh (``mesh`` section, :mod:`qlora_jax.sharding`) the plan is per device:
the NF4 codes and scales that the sharding rules split (whole quantization blocks per shard) count
``1 / fsdp``, plus one layer's whole 4-bit weights gathered for its matmuls (FSDP gathers a layer at
a time, inside the layer loop); LoRA parameters, updates and Adam moments (device pages and the
host copy) count ``1 / fsdp``, their gradients whole (each layer's gradient is all-reduced in the
backward loop before the update shards it); embeddings, ``lm_head`` and norms are replicated; every
activation term uses the per-device micro-batch, ``batch / (data * fsdp)`` rows. Calibration: XLA's
per-device buffer assignment of the real step at the 7B shape (4 x 512 rows per device) on meshes
1x2, 1x4 and 2x4 of fake CPU devices agrees with the per-device plan within 2%
(``tests/test_mesh.py``).

The per-token activation counts are written out in :func:`layer_activation_bytes_per_token`.
Calibration (``backend``): ``"gpu"`` (the default, what a training run needs) against the measured
``peak_bytes_in_use`` of the H200 benchmark runs of 2026-11-28 (``benchmarks/RESULTS.md``): 7B 4x512 and
1x2048 with Adam on the device (sixth session: measured 7.35 GiB, planned 7.37), 65B 1x512 in a 48 GiB
pool (46.38 / 45.69), 65B 1x2048 with bf16 adapters and 8-layer pages (40.11 / 39.87) and 7B on a 1x2
FSDP mesh (second session: 4.90 / 5.26 per GPU); ``tests/test_memory.py`` checks every committed result. ``"cpu"``: XLA's
CPU buffer assignment of the real jitted step compiled from abstract inputs (``tests/test_memory.py``,
``tests/test_mesh.py``), within 10% at the 7B shape, counting the paged optimizer state as device
memory (the CPU has one memory space).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from qlora_jax.models.llama import LlamaConfig, PRESETS
from qlora_jax.nf4 import NESTED_BLOCKSIZE

GiB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
BACKENDS = ("gpu", "cpu")
GPU_SLACK = 64 * 2**20  # allocator rounding and small buffers (the GPU runs' XLA estimate equals their peak)
PAGES_IN_FLIGHT = 2  # qlora_jax.paged_adam.paged_adamw's default


# --- sizes of the stored weights ----------------------------------------------------------------


def quantized_tensor_bytes(n: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one 4-bit tensor of ``n`` values as :class:`~qlora_jax.nf4.QuantizedTensor` stores it."""
    nb = -(-n // blocksize)
    packed = -(-n // 2)
    if not double_quant:
        return packed + 4 * nb
    return packed + nb + 4 * (-(-nb // NESTED_BLOCKSIZE)) + 4 + 4 * 256


def linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``name -> (in, out)`` of the seven projections of one decoder layer."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def linear_params(cfg: LlamaConfig) -> int:
    """Parameters of all linear projections of all layers (what NF4 stores)."""
    return cfg.num_hidden_layers * sum(i * o for i, o in linear_shapes(cfg).values())


def lora_params(cfg: LlamaConfig, r: int, targets: tuple[str, ...]) -> int:
    return cfg.num_hidden_layers * sum(r * (i + o) for name, (i, o) in linear_shapes(cfg).items() if name in targets)


def largest_lora_leaf(cfg: LlamaConfig, r: int, targets: tuple[str, ...]) -> int:
    """Elements of the largest stacked LoRA leaf ``[L, in, r]`` / ``[L, r, out]`` (one optimizer page)."""
    sizes = [r * max(i, o) for name, (i, o) in linear_shapes(cfg).items() if name in targets]
    return cfg.num_hidden_layers * max(sizes, default=0)


# --- the plan -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """Everything the planner reads: architecture, batch shape and the run's settings."""

    cfg: LlamaConfig
    batch: int  # micro-batch rows
    seq: int
    quantize: bool = True
    blocksize: int = 64
    double_quant: bool = True
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    lora_r: int = 64
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_dropout: float = 0.05
    remat: str = "full"
    paged: bool = True
    page_size: int = 0
    data: int = 1  # mesh.data
    fsdp: int = 1  # mesh.fsdp
    backend: str = "gpu"  # "gpu": calibrated on H200 measurements; "cpu": XLA's CPU buffer assignment
    lora_param_dtype: str = "float32"  # bfloat16: 16-bit A/B and gradients, fp32 master copy in the optimizer

    def __post_init__(self):
        if self.data < 1 or self.fsdp < 1:
            raise ValueError(f"mesh data={self.data} and fsdp={self.fsdp} must be >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")

    @property
    def flash_attention(self) -> bool:
        """Whether the step's attention is cuDNN's fused kernel (no ``[B, H, T, T]`` buffers): a GPU,
        16-bit compute and a head size cuDNN takes (``qlora_jax.models.llama._attention``)."""
        hd = self.cfg.head_dim
        return self.backend == "gpu" and DTYPE_BYTES[self.compute_dtype] == 2 and hd % 8 == 0 and hd <= 128

    @property
    def devices(self) -> int:
        return self.data * self.fsdp

    @property
    def device_batch(self) -> int:
        """Micro-batch rows on one device (the most any device holds)."""
        return -(-self.batch // self.devices)


def layer_activation_bytes_per_token(p: PlanInputs) -> dict[str, int]:
    """Bytes per token of one decoder layer's forward activations that its backward pass reads.

    ``c`` = compute dtype bytes. RMSNorm inputs/outputs (and an fp32 copy), q/k/v before and after
    rotary embeddings (rotated in fp32), the attention output, the MLP's gate/up outputs, silu and
    product, each LoRA projection's ``x @ A`` and, with dropout, its mask and dropped input.
    Returns the parts (``dots`` = the frozen products' outputs).
    """
    cfg, c = p.cfg, DTYPE_BYTES[p.compute_dtype]
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    norms = 2 * d * (c + 4)  # two RMSNorms: output + fp32 normalized copy
    dots = (q + 2 * kv + d + 2 * f + d) * c  # q, k, v, o, gate, up, down outputs
    rope = (q + kv) * (4 + c)  # fp32 rotation + rotated result
    attn_out = q * c
    mlp = 2 * f * c  # silu(g), silu(g) * u
    shapes = linear_shapes(cfg)
    lora = sum(p.lora_r * c for name in p.lora_targets)
    if p.lora_dropout > 0:
        lora += sum(shapes[name][0] * (1 + c) for name in p.lora_targets)  # keep mask + dropped input
    return {"norms": norms, "dots": dots, "rope": rope, "attn_out": attn_out, "mlp": mlp, "lora": lora}


def projection_bytes_per_token(p: PlanInputs, attention_only: bool = False) -> int:
    """Bytes per token of one decoder layer that ``remat="save_projections"`` keeps
    (``models.llama.PROJECTION_NAMES``): q, k, v, the attention output, the residual after attention,
    gate and up, in the compute dtype; ``attention_only``: what ``"save_attention"`` keeps
    (``ATTENTION_NAMES``: the attention output and the residual after attention)."""
    cfg, c = p.cfg, DTYPE_BYTES[p.compute_dtype]
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = q + cfg.hidden_size
    return (attention if attention_only else q + 2 * kv + attention + 2 * cfg.intermediate_size) * c


def sharded_quantized_bytes(n: int, layers: int, blocksize: int, double_quant: bool, fsdp: int) -> int:
    """Bytes on one device of a stacked ``[layers]`` 4-bit tensor of ``n`` values per layer, split over
    ``fsdp`` by :func:`qlora_jax.sharding.shard_spec_for` (codes / scales only where each shard holds
    whole blocks; the double-quantization constants replicated)."""
    from qlora_jax.sharding import shard_spec_for

    nb = -(-n // blocksize)
    # field -> (elements along its flat axis, bytes): uint8 codes; uint8 (double quant) or fp32 scales
    fields = {"packed": (-(-n // 2), -(-n // 2)), "absmax": (nb, nb * (1 if double_quant else 4))}
    total = 0
    for field, (count, nbytes) in fields.items():
        spec = shard_spec_for(field, (layers, count), fsdp, blocksize=blocksize, double_quant=double_quant)
        total += layers * (nbytes // fsdp if "fsdp" in spec else nbytes)
    if double_quant:
        total += layers * (4 * (-(-nb // NESTED_BLOCKSIZE)) + 4 + 4 * 256)
    return total


def plan(p: PlanInputs) -> dict[str, int]:
    """Predicted bytes on one device by component (and ``host_optimizer``, not counted in ``total``).

    One device of the ``p.data x p.fsdp`` mesh (see the module docstring); 1 x 1 is the whole run.
    """
    cfg, L = p.cfg, p.cfg.num_hidden_layers
    tokens = p.device_batch * p.seq
    c = DTYPE_BYTES[p.compute_dtype]
    pbytes = DTYPE_BYTES[p.param_dtype]
    shapes = linear_shapes(cfg)
    out: dict[str, int] = {}

    if p.quantize:
        out["frozen_linear_weights"] = sum(
            sharded_quantized_bytes(i * o, L, p.blocksize, p.double_quant, p.fsdp) for i, o in shapes.values())
    else:
        out["frozen_linear_weights"] = linear_params(cfg) * pbytes
    # FSDP: one layer's 4-bit weights whole while its matmuls run (gathered inside the layer loop).
    out["fsdp_gathered_layer"] = sum(quantized_tensor_bytes(i * o, p.blocksize, p.double_quant)
                                     for i, o in shapes.values()) if p.quantize and p.fsdp > 1 else 0
    heads = 1 if cfg.tie_word_embeddings else 2
    out["embeddings_head_norms"] = (heads * cfg.vocab_size * cfg.hidden_size + (2 * L + 1) * cfg.hidden_size) * pbytes

    n_lora = lora_params(cfg, p.lora_r, p.lora_targets)
    shard = -(-n_lora // p.fsdp)  # the LoRA leaves split over fsdp along their in/out axis
    lb = DTYPE_BYTES[p.lora_param_dtype]
    if p.backend == "gpu":  # params and gradients sharded (XLA reduce-scatters the gradients: its
        # compile-time estimate on 1x2 / 1x4 H200 meshes, benchmarks/RESULTS.md); the AdamW update is
        # fused into the param write
        out["lora_params_grads_updates"] = 2 * lb * shard
    else:  # XLA CPU keeps the (fp32) update tree as well
        out["lora_params_grads_updates"] = lb * n_lora + lb * shard + 4 * shard
    state_words = 2 if lb == 4 else 3  # Adam's two moments, plus the fp32 master copy of 16-bit LoRA weights
    if p.paged:
        leaf = largest_lora_leaf(cfg, p.lora_r, p.lora_targets)
        # page_size 0: one page per leaf. Else paged_adam packs leaves up to page_size elements and cuts
        # bigger leaves into whole layers (rows of the stacked leaf); a row never splits.
        page = leaf if p.page_size <= 0 else min(n_lora, max(p.page_size, leaf // L))
        out["optimizer_on_device"] = PAGES_IN_FLIGHT * state_words * 4 * (-(-page // p.fsdp))
        host = state_words * 4 * shard
    else:
        out["optimizer_on_device"] = state_words * 4 * shard
        host = 0

    per_tok = layer_activation_bytes_per_token(p)
    layer_bytes = tokens * sum(per_tok.values())
    residual = tokens * cfg.hidden_size * c
    if p.remat == "full":
        saved = L * residual
    elif p.remat == "save_dots":  # the frozen products, and each adapter's x @ A and (x @ A) @ B apart
        lora_dots = sum((p.lora_r + shapes[name][1]) * c for name in p.lora_targets)
        saved = L * (residual + tokens * (per_tok["dots"] + lora_dots))
    elif p.remat in ("save_projections", "save_attention"):
        saved = L * (residual + tokens * projection_bytes_per_token(p, attention_only=p.remat == "save_attention"))
    elif p.remat == "offload":  # matmul outputs go to pinned host memory
        saved = L * residual
    else:  # none: every layer keeps everything
        saved = L * (residual + layer_bytes)
    out["saved_activations"] = saved
    # Backward of one layer: its recomputed activations (their gradients reuse freed buffers).
    out["layer_recompute_and_grads"] = layer_bytes
    scores = p.device_batch * cfg.num_attention_heads * p.seq * p.seq
    if p.flash_attention:
        out["attention_scores"] = 0
    else:  # XLA attention: fp32 and 16-bit probabilities, and the causal mask
        out["attention_scores"] = scores * (4 + c) * (1 if p.remat != "none" else L) + p.device_batch * p.seq * p.seq
    # fp32 logits and their gradient (rounded to the compute dtype for the lm_head product on the GPU, where
    # XLA fuses that rounding; fp32 on the CPU). The logits' backward is over before the layers' backward
    # starts, so the two never live at once: the plan counts the logits only as far as they exceed the
    # layer phase (recompute, attention scores, dequantized weight).
    largest = max(i * o for i, o in shapes.values())
    out["dequantized_weight"] = 2 * largest * c if p.quantize else 0
    layer_phase = out["layer_recompute_and_grads"] + out["attention_scores"] + out["dequantized_weight"]
    logits = (4 + (c if p.backend == "gpu" else 4)) * tokens * cfg.vocab_size
    out["logits_and_loss"] = max(0, logits - layer_phase)
    out["workspace"] = GPU_SLACK if p.backend == "gpu" else 0
    out["total"] = sum(out.values())
    out["host_optimizer"] = host
    return out


# --- inputs from a TrainConfig ------------------------------------------------------------------


AUTO_REMAT_FRACTION = 0.9  # model.remat="auto" takes the fastest policy whose plan fits in this share of the device
# Fastest first (7B 4x512 on an H200, benchmarks/RESULTS.md, seventh session: 0.142 / 0.166 / 0.172 s per step,
# 12.3 / 8.28 / 7.35 GiB).
AUTO_REMAT_ORDER = ("save_projections", "save_attention", "full")


def choose_remat(p: PlanInputs, device_bytes: int | None) -> tuple[str, str]:
    """What ``model.remat="auto"`` runs, and why: the first of ``AUTO_REMAT_ORDER`` (``"save_projections"``:
    no 4-bit product recomputed in the backward pass; ``"save_attention"``: no attention or ``o_proj``
    forward recomputed) whose plan fits in ``AUTO_REMAT_FRACTION`` of ``device_bytes`` (per device), else
    ``"full"`` (least memory); ``"full"`` where no device figure is known."""
    if device_bytes is None:
        return "full", "no device memory figure"
    budget = AUTO_REMAT_FRACTION * device_bytes
    needs = []
    for remat in AUTO_REMAT_ORDER[:-1]:
        need = plan(dataclasses.replace(p, remat=remat))["total"]
        needs.append(f"{remat} {need / GiB:.2f} GiB")
        if need <= budget:
            break
    else:
        remat = AUTO_REMAT_ORDER[-1]
    return remat, f"plans: {', '.join(needs)} vs {AUTO_REMAT_FRACTION:.0%} of {device_bytes / GiB:.2f} GiB"


def preset_from_name(name: str) -> str | None:
    """``huggyllama/llama-65b`` -> ``"65b"``: the trailing size token, if it names a preset."""
    m = re.search(r"(\d+)\s*b$", name.strip().rstrip("/").lower())
    if m and f"{m.group(1)}b" in PRESETS:
        return f"{m.group(1)}b"
    return None


def resolve_architecture(path: str, preset: str | None = None) -> LlamaConfig:
    """The model's :class:`LlamaConfig`: ``preset`` if given, else ``path/config.json``, else the
    preset named by the path's trailing size token."""
    if preset:
        return LlamaConfig.preset(preset)
    p = Path(path) if path else None
    if p is not None and (p / "config.json").is_file():
        return LlamaConfig.from_hf_config(p)
    guess = preset_from_name(path or "")
    if guess is None:
        raise ValueError(
            f"cannot tell the architecture of model.path={path!r}: no config.json there and no size token "
            f"(one of {sorted(PRESETS)}) at its end; pass --preset")
    return LlamaConfig.preset(guess)


def inputs_from_train_config(tc: Any, cfg: LlamaConfig, seq: int | None = None) -> PlanInputs:
    """Plan inputs of a :class:`~qlora_jax.train_config.TrainConfig` for architecture ``cfg``.

    The micro-batch is ``data.batch_size / train.grad_accum`` rows of the longest bucket,
    ``source_max_len + target_max_len`` tokens (or ``seq``), split over the ``mesh`` section's devices.
    ``model.remat="auto"`` is planned as ``"full"`` (what it starts from; :func:`choose_remat` decides).
    """
    m = tc.model
    return PlanInputs(
        cfg=cfg,
        batch=tc.data.batch_size // tc.train.grad_accum,
        seq=seq or (tc.data.source_max_len + tc.data.target_max_len),
        quantize=m.quantize, blocksize=m.blocksize, double_quant=m.double_quant,
        param_dtype="bfloat16", compute_dtype=m.compute_dtype,
        lora_r=tc.lora.r, lora_targets=tuple(tc.lora.targets), lora_dropout=tc.lora.dropout,
        remat=m.build_remat,
        paged=tc.optim.paged, page_size=tc.optim.page_size, lora_param_dtype=tc.lora.param_dtype,
        data=tc.mesh.data, fsdp=tc.mesh.fsdp,
    )


# --- report -------------------------------------------------------------------------------------

LABELS = {
    "frozen_linear_weights": "frozen linear weights (NF4 codes, scales, DQ constants)",
    "fsdp_gathered_layer": "one layer's 4-bit weights gathered (FSDP)",
    "embeddings_head_norms": "embeddings, lm_head, norms (16-bit)",
    "lora_params_grads_updates": "LoRA params + grads (+ fp32 updates on CPU)",
    "optimizer_on_device": "Adam moments on device",
    "saved_activations": "saved activations (layer inputs, remat)",
    "layer_recompute_and_grads": "one layer's recomputed activations",
    "attention_scores": "attention scores/probs (XLA attention; 0 with cuDNN)",
    "logits_and_loss": "logits fp32 + their gradient, beyond the layer phase",
    "dequantized_weight": "dequantized largest weight (fwd + bwd)",
    "workspace": "allocator allowance (GPU)",
}


def parse_size(text: str) -> int:
    """``"48GB"``, ``"48 GiB"``, ``"80g"``, ``"51539607552"`` -> bytes (GB and GiB both mean 2**30 here,
    as GPU memory is sold)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 48GB)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def format_plan(p: PlanInputs, result: dict[str, int], gpu_mem: int | None = None, measured: int | None = None) -> str:
    """The plan as a table, with fit / no-fit against ``gpu_mem`` and the measured peak if known."""
    lines = [
        f"memory plan: {p.cfg.num_hidden_layers} layers, d={p.cfg.hidden_size}, ffn={p.cfg.intermediate_size}, "
        f"vocab={p.cfg.vocab_size}; micro-batch {p.batch} x {p.seq}; "
        f"{'NF4' if p.quantize else p.param_dtype} weights, LoRA r={p.lora_r} on {len(p.lora_targets)} projections, "
        f"remat={p.remat}, {'paged' if p.paged else 'unpaged'} AdamW",
    ]
    if p.devices > 1:
        lines.append(f"mesh data={p.data} x fsdp={p.fsdp}: per device, micro-batch {p.device_batch} x {p.seq} "
                     f"of {p.batch} x {p.seq}")
    lines.append(f"  {'component':<58} {'GiB':>9}")
    for key, label in LABELS.items():
        lines.append(f"  {label:<58} {result[key] / GiB:>9.3f}")
    lines.append(f"  {'predicted peak (per device)' if p.devices > 1 else 'predicted peak (device)':<58} "
                 f"{result['total'] / GiB:>9.3f}")
    if result["host_optimizer"]:
        lines.append(f"  {'(host: paged Adam moments' + (', per device)' if p.devices > 1 else ')'):<58} "
                     f"{result['host_optimizer'] / GiB:>9.3f}")
    if measured is not None:
        lines.append(f"  {'measured peak':<58} {measured / GiB:>9.3f}  "
                     f"(prediction {100 * (result['total'] / measured - 1):+.1f}%)")
    if gpu_mem is not None:
        verdict = "fits" if result["total"] <= gpu_mem else "does NOT fit"
        each = f" on each of the {p.devices} GPUs" if p.devices > 1 else ""
        lines.append(f"  {verdict} in {gpu_mem / GiB:.1f} GiB{each} (headroom {(gpu_mem - result['total']) / GiB:+.2f} GiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qlora_jax.train_config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m qlora_jax.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a config file with get_config() (configs/*.py)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config field")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="architecture preset (default: from model.path)")
    ap.add_argument("--seq", type=int, help="sequence length (default: data.source_max_len + data.target_max_len)")
    ap.add_argument("--gpu-mem", help="device memory to check the plan against, e.g. 48GB")
    ap.add_argument("--backend", choices=BACKENDS, default="gpu",
                    help="plan for a GPU run (default) or XLA's CPU buffer assignment")
    ap.add_argument("--json", help="write the plan (bytes per component) here")
    args = ap.parse_args(argv)
    try:
        tc = load_config(args.config, args.set)
        cfg = resolve_architecture(tc.model.path, args.preset)
        gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = dataclasses.replace(inputs_from_train_config(tc, cfg, args.seq), backend=args.backend)
    if tc.model.remat == "auto":
        remat, why = choose_remat(p, gpu_mem) if gpu_mem is not None else ("full", "no --gpu-mem given")
        print(f"model.remat=auto -> {remat} ({why})")
        p = dataclasses.replace(p, remat=remat)
    result = plan(p)
    print(format_plan(p, result, gpu_mem))
    if args.json:
        Path(args.json).write_text(json.dumps({"inputs": {**dataclasses.asdict(p), "cfg": dataclasses.asdict(cfg)},
                                               "bytes": result}, indent=2, default=str))
    return 0 if gpu_mem is None or result["total"] <= gpu_mem else 1


if __name__ == "__main__":
    sys.exit(main())
