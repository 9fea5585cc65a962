"""The memory planner: its byte counts against hand-computed sizes for LLaMA-7B and -65B, against the
stored size of real quantized tensors, against XLA's buffer assignment of the real jitted training
step (CPU compile from abstract inputs, 7B shape), against the runtime's peak where the backend
reports one, and its CLI."""

from __future__ import annotations

from pathlib import Path

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.memory import (
    PlanInputs, format_plan, linear_params, lora_params, main, parse_size, plan, preset_from_name,
    quantized_tensor_bytes, resolve_architecture, sharded_quantized_bytes,
)
from qlora_jax.models.llama import Llama, LlamaConfig, LoRAConfig, QuantConfig
from qlora_jax.nf4 import quantize

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


@pytest.mark.parametrize("shape", [(64, 172), (256, 1024), (3, 7)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_tensor_bytes_match_quantized_storage(shape, double_quant):
    qt = quantize(jnp.ones(shape, jnp.float32), blocksize=64, double_quant=double_quant)
    assert quantized_tensor_bytes(int(np.prod(shape)), 64, double_quant) == qt.nbytes


def _nf4_dq_bytes_by_hand(n: int) -> int:
    # codes n/2 + uint8 absmax codes n/64 + fp32 nested scale per 256 blocks + fp32 offset + 256-entry fp32 map
    return n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4 + 1024


@pytest.mark.parametrize(
    "size, layers, d, f, lin_params, lora_n",
    [
        # 32 * (4 * 4096^2 + 3 * 4096 * 11008); LoRA r=64: 32 * 64 * (4 * 8192 + 3 * 15104)
        ("7b", 32, 4096, 11008, 6_476_005_376, 159_907_840),
        # 80 * (4 * 8192^2 + 3 * 8192 * 22016); LoRA r=64: 80 * 64 * (4 * 16384 + 3 * 30208)
        ("65b", 80, 8192, 22016, 64_760_053_760, 799_539_200),
    ],
)
def test_plan_arithmetic_by_hand(size, layers, d, f, lin_params, lora_n):
    cfg = LlamaConfig.preset(size)
    assert linear_params(cfg) == lin_params
    assert lora_params(cfg, 64, LoRAConfig().targets) == lora_n
    p = plan(PlanInputs(cfg=cfg, batch=1, seq=512))
    by_hand = layers * (4 * _nf4_dq_bytes_by_hand(d * d) + 3 * _nf4_dq_bytes_by_hand(d * f))
    assert p["frozen_linear_weights"] == by_hand
    assert 8 * by_hand / lin_params == pytest.approx(4.127, abs=5e-4)  # QLoRA's 4.127 bits per parameter
    assert p["embeddings_head_norms"] == 2 * (2 * 32000 * d + (2 * layers + 1) * d)
    assert p["lora_params_grads_updates"] == 2 * 4 * lora_n  # GPU: params + grads (update fused into the write)
    assert p["host_optimizer"] == 2 * 4 * lora_n  # paged: both Adam moments on the host
    largest_leaf = layers * 64 * f  # [L, F, r] / [L, r, F]
    assert p["optimizer_on_device"] == 2 * 2 * 4 * largest_leaf  # two pages of both moments
    assert p["saved_activations"] == layers * 512 * d * 2  # remat full: bf16 layer inputs
    layer_phase = p["layer_recompute_and_grads"] + p["attention_scores"] + p["dequantized_weight"]
    assert p["logits_and_loss"] == max(0, 512 * 32000 * (4 + 2) - layer_phase) == 0  # logits < the layer phase
    assert p["attention_scores"] == 0  # cuDNN's fused attention
    assert p["workspace"] == 64 * 2**20
    assert p["total"] == sum(v for k, v in p.items() if k not in ("total", "host_optimizer"))
    cpu = plan(PlanInputs(cfg=cfg, batch=1, seq=512, backend="cpu"))  # XLA CPU: update tree, XLA attention
    assert cpu["lora_params_grads_updates"] == 3 * 4 * lora_n
    cpu_layer_phase = cpu["layer_recompute_and_grads"] + cpu["attention_scores"] + cpu["dequantized_weight"]
    assert cpu["logits_and_loss"] == max(0, 2 * 512 * 32000 * 4 - cpu_layer_phase)  # fp32 logits and gradient
    assert cpu["attention_scores"] == cfg.num_attention_heads * 512 * 512 * 6 + 512 * 512 and cpu["workspace"] == 0
    b16 = plan(PlanInputs(cfg=cfg, batch=1, seq=512, lora_param_dtype="bfloat16"))  # 16-bit A/B, fp32 master
    assert b16["lora_params_grads_updates"] == 2 * 2 * lora_n
    assert b16["host_optimizer"] == 3 * 4 * lora_n  # both moments and the master copy, paged
    assert b16["optimizer_on_device"] == 2 * 3 * 4 * largest_leaf
    fp32 = plan(PlanInputs(cfg=cfg, batch=1, seq=512, compute_dtype="float32"))  # no cuDNN: XLA attention
    assert fp32["attention_scores"] == cfg.num_attention_heads * 512 * 512 * 8 + 512 * 512
    one_layer = plan(PlanInputs(cfg=cfg, batch=1, seq=512, page_size=1000))  # pages of one layer's rows
    assert one_layer["optimizer_on_device"] == 2 * 2 * 4 * 64 * f
    unpaged = plan(PlanInputs(cfg=cfg, batch=1, seq=512, paged=False))
    assert unpaged["optimizer_on_device"] == 2 * 4 * lora_n and unpaged["host_optimizer"] == 0
    bf16 = plan(PlanInputs(cfg=cfg, batch=1, seq=512, quantize=False))
    assert bf16["frozen_linear_weights"] == 2 * lin_params and bf16["dequantized_weight"] == 0


def test_plan_grows_with_tokens_and_remat_none():
    cfg = LlamaConfig.preset("7b")
    small, big = plan(PlanInputs(cfg=cfg, batch=1, seq=512)), plan(PlanInputs(cfg=cfg, batch=4, seq=512))
    assert big["saved_activations"] == 4 * small["saved_activations"]
    assert plan(PlanInputs(cfg=cfg, batch=1, seq=512, remat="none"))["saved_activations"] > 10 * small["saved_activations"]


def _xla_step_bytes(cfg: LlamaConfig, batch: int, seq: int) -> int:
    """XLA's buffer assignment (arguments + outputs + temporaries - aliased) of train.py's step."""
    from benchmarks.train_step import train_config
    from qlora_jax.trainer import make_optimizer, make_train_step

    c = dict(size="7b", weights="nf4", batch=batch, seq=seq, steps=1, warmup=0, remat="full", lora_r=64,
             lora_dropout=0.05, paged=True)
    tc = train_config(c)
    lora = LoRAConfig(r=64, alpha=16.0, dropout=0.05)
    abstract = nnx.eval_shape(lambda: Llama(cfg, lora=lora, quant=QuantConfig(), remat="full", rngs=nnx.Rngs(0)))
    abstract.train()
    graphdef, lora_state, rest = nnx.split(abstract, nnx.LoRAParam, ...)
    tx = make_optimizer(tc)
    opt_state = jax.eval_shape(tx.init, lora_state)
    step = make_train_step(graphdef, tx, tc)
    b = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
    ma = step.lower(lora_state, opt_state, rest, b, 0, jax.random.key(0)).compile().memory_analysis()
    return ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes


def test_plan_matches_xla_buffer_assignment_at_7b():
    """The real step at the 7B benchmark shape (4 x 512), compiled for CPU from abstract inputs (nothing
    allocated). The CPU has one memory space, so the paged Adam state counts as device memory there."""
    if jax.default_backend() != "cpu":
        pytest.skip("calibration test for the CPU backend")
    cfg = LlamaConfig.preset("7b")
    xla = _xla_step_bytes(cfg, 4, 512)
    p = plan(PlanInputs(cfg=cfg, batch=4, seq=512, backend="cpu"))
    cpu_equivalent = p["total"] - p["workspace"] - p["optimizer_on_device"] + p["host_optimizer"]
    assert cpu_equivalent == pytest.approx(xla, rel=0.10), (cpu_equivalent / GiB, xla / GiB)


def test_plan_matches_xla_when_the_logits_dominate():
    """A small model with a large vocabulary (the logits' phase, not the layers', sets the peak): the plan
    counts the logits beyond the layer phase, and agrees with XLA's CPU buffer assignment within 10%."""
    if jax.default_backend() != "cpu":
        pytest.skip("calibration test for the CPU backend")
    cfg = LlamaConfig(vocab_size=64000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    xla = _xla_step_bytes(cfg, 4, 512)
    p = plan(PlanInputs(cfg=cfg, batch=4, seq=512, backend="cpu"))
    layer_phase = p["layer_recompute_and_grads"] + p["attention_scores"] + p["dequantized_weight"]
    assert p["logits_and_loss"] == 2 * 2048 * 64000 * 4 - layer_phase > 0
    cpu_equivalent = p["total"] - p["workspace"] - p["optimizer_on_device"] + p["host_optimizer"]
    assert cpu_equivalent == pytest.approx(xla, rel=0.10), (cpu_equivalent / GiB, xla / GiB)


def test_plan_vs_runtime_peak():
    """Planner vs the runtime's own peak, where the backend reports one (GPU); the CPU reports none."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        pytest.skip(f"{jax.default_backend()} backend reports no peak_bytes_in_use (memory_stats() = {stats}); "
                    "the GPU benchmark (benchmarks/train_step.py) compares the plan with the measured peak")
    from benchmarks.train_step import run_one

    r = run_one(dict(name="t", size="tiny", weights="nf4", batch=2, seq=64, steps=1, warmup=0, remat="full",
                     lora_r=8, lora_dropout=0.05, paged=True))
    assert r["peak_bytes"] <= r["planned_bytes"]  # tiny: the workspace allowance dominates


def test_preset_from_name_and_architecture(tmp_path):
    assert preset_from_name("huggyllama/llama-65b") == "65b"
    assert preset_from_name("huggyllama/llama-7b/") == "7b"
    assert preset_from_name("meta/llama-70b") is None
    assert preset_from_name("stories260K") is None
    assert resolve_architecture("whatever", "13b").hidden_size == 5120
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, '
        '"num_hidden_layers": 2, "num_attention_heads": 4}')
    assert resolve_architecture(str(tmp_path)).hidden_size == 32
    with pytest.raises(ValueError, match="--preset"):
        resolve_architecture("some/model")
    assert parse_size("48GB") == 48 * GiB and parse_size("80 GiB") == 80 * GiB and parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")


def test_cli_fit_and_no_fit(capsys):
    cfg = str(REPO / "configs" / "guanaco_65b.py")
    assert main(["--config", cfg, "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "80 layers" in out and "frozen linear weights" in out and "fits in 80.0 GiB" in out
    assert "micro-batch 1 x 528" in out  # batch 16 / grad_accum 16, source 16 + target 512
    assert main(["--config", cfg, "--gpu-mem", "24GB"]) == 1
    assert "does NOT fit in 24.0 GiB" in capsys.readouterr().out
    assert main(["--config", cfg, "--set", "model.path=nowhere/model"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["--config", cfg, "--set", "model.path=nowhere/model", "--preset", "7b", "--seq", "2048"]) == 0
    assert "micro-batch 1 x 2048" in capsys.readouterr().out


def test_cli_says_what_remat_auto_chooses(capsys):
    """``model.remat: auto`` (the Guanaco configs): the CLI names the policy that fits ``--gpu-mem`` and plans
    it; without ``--gpu-mem`` it plans full rematerialization and says so."""
    cfg = str(REPO / "configs" / "guanaco_7b.py")
    assert main(["--config", cfg, "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "model.remat=auto -> save_projections" in out and "remat=save_projections," in out
    # micro-batch 1 x 528, paged Adam: full 5.66 GiB, save_attention 5.91, save_projections 6.99
    assert main(["--config", cfg, "--gpu-mem", "6.8GB"]) == 0
    out = capsys.readouterr().out
    assert "model.remat=auto -> save_attention" in out and "remat=save_attention," in out
    assert main(["--config", cfg, "--gpu-mem", "6.3GB"]) == 0
    out = capsys.readouterr().out
    assert "model.remat=auto -> full" in out and "remat=full," in out
    assert main(["--config", cfg]) == 0
    assert "model.remat=auto -> full (no --gpu-mem given)" in capsys.readouterr().out
    assert main(["--config", cfg, "--gpu-mem", "80GB", "--set", "model.remat=save_attention"]) == 0
    out = capsys.readouterr().out
    assert "model.remat=auto" not in out and "remat=save_attention," in out


@pytest.mark.parametrize("page_size", [0, 1000, 10**9])
def test_optimizer_pages_match_paged_adam_layout(page_size):
    """The planner's on-device page size is the largest page paged_adam's own layout makes."""
    from qlora_jax.paged_adam import page_plan

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    lora = LoRAConfig(r=8)
    abstract = nnx.eval_shape(lambda: Llama(cfg, lora=lora, quant=QuantConfig(), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.LoRAParam)
    leaves = jax.tree.leaves(params)
    pages = page_plan(params, page_size or None)

    def elements(chunk) -> int:
        shape = leaves[chunk.leaf].shape
        rows = shape[0] if chunk.start is None else chunk.stop - chunk.start
        return rows * int(np.prod(shape[1:]))

    sizes = [sum(elements(c) for c in page) for page in pages]
    p = plan(PlanInputs(cfg=cfg, batch=1, seq=16, lora_r=8, page_size=page_size))
    assert p["optimizer_on_device"] == 2 * 2 * 4 * max(sizes)


def test_plan_per_device_on_a_mesh_by_hand():
    """7B, global micro-batch 8 x 512 on a 2 x 4 mesh (8 GPUs): one device's bytes, by hand."""
    cfg = LlamaConfig.preset("7b")
    L, d, f, V = 32, 4096, 11008, 32000
    lora_n = 159_907_840
    p = PlanInputs(cfg=cfg, batch=8, seq=512, data=2, fsdp=4)
    assert p.devices == 8 and p.device_batch == 1
    r = plan(p)
    # Every NF4 field of 7B splits over fsdp=4 in whole blocks: q/k/v/o codes 2 MiB per shard (whole 32-byte
    # blocks), their 262144 absmax codes 65536 per shard (whole 256-blocks); the MLP's 5636096 B / 176128 codes
    # likewise. Codes and scales count 1/4, the nested scales, offset and 256-entry map stay whole.
    def shard(n):
        return (n // 2 + n // 64) // 4 + 4 * -(-(n // 64) // 256) + 4 + 1024
    assert r["frozen_linear_weights"] == L * (4 * shard(d * d) + 3 * shard(d * f))
    assert r["fsdp_gathered_layer"] == 4 * _nf4_dq_bytes_by_hand(d * d) + 3 * _nf4_dq_bytes_by_hand(d * f)
    assert r["embeddings_head_norms"] == 2 * (2 * V * d + (2 * L + 1) * d)  # replicated
    assert r["lora_params_grads_updates"] == 2 * 4 * (lora_n // 4)  # params and grads / 4
    assert r["optimizer_on_device"] == 2 * 2 * 4 * (L * 64 * f // 4)  # two pages of both moments, sharded
    assert r["host_optimizer"] == 2 * 4 * lora_n // 4
    assert r["saved_activations"] == L * 1 * 512 * d * 2  # one row per device
    assert r["logits_and_loss"] == max(0, 512 * V * (4 + 2) - r["layer_recompute_and_grads"] - r["dequantized_weight"])
    one = plan(PlanInputs(cfg=cfg, batch=1, seq=512))  # one GPU with that device's micro-batch
    assert r["saved_activations"] == one["saved_activations"] and r["attention_scores"] == one["attention_scores"]
    assert r["frozen_linear_weights"] < one["frozen_linear_weights"] / 3.9
    # Pure data parallelism: everything whole, only the batch split.
    dp = plan(PlanInputs(cfg=cfg, batch=8, seq=512, data=8))
    assert {k: dp[k] for k in dp if k != "workspace" and k != "total"} == \
        {k: one[k] for k in one if k != "workspace" and k != "total"}
    text = format_plan(p, r, gpu_mem=8 * GiB)
    assert "mesh data=2 x fsdp=4: per device, micro-batch 1 x 512 of 8 x 512" in text
    assert "fits in 8.0 GiB on each of the 8 GPUs" in text
    assert "does NOT fit in 8.0 GiB on each of the 8 GPUs" in format_plan(p, one | {"total": 9 * GiB}, gpu_mem=8 * GiB)


def test_sharded_weights_follow_the_block_rule():
    # stories260K-like 64 x 172 MLP on fsdp=8: 5504 code bytes = 688 per shard (21.5 blocks): whole.
    n = 64 * 172
    assert sharded_quantized_bytes(n, 5, 64, True, 8) == 5 * quantized_tensor_bytes(n, 64, True)
    # 64 x 64 on fsdp=8: 2048 B -> 256 B per shard (8 blocks) split; 64 absmax codes < 256 per shard: whole.
    n = 64 * 64
    assert sharded_quantized_bytes(n, 5, 64, True, 8) == 5 * (n // 2 // 8 + n // 64 + 4 + 4 + 1024)
    assert sharded_quantized_bytes(n, 5, 64, False, 8) == 5 * (n // 2 + 4 * (n // 64)) // 8  # fp32 scales split
    assert sharded_quantized_bytes(n, 5, 64, True, 1) == 5 * quantized_tensor_bytes(n, 64, True)


def test_cli_reads_the_mesh(capsys):
    cfg = str(REPO / "configs" / "guanaco_65b.py")
    # 65B does not fit one 24 GiB card, but does on each of 4 with FSDP.
    assert main(["--config", cfg, "--gpu-mem", "24GB"]) == 1
    capsys.readouterr()
    assert main(["--config", cfg, "--gpu-mem", "24GB", "--set", "mesh.fsdp=4"]) == 0
    assert "fits in 24.0 GiB on each of the 4 GPUs" in capsys.readouterr().out


MEASURED = [  # H200 runs of benchmarks/train_step.py, 2026-11-28 (benchmarks/RESULTS.md)
    "2026-11-28-s2-h200-train-7b-final.json",
    "2026-11-28-s2-h200-train-65b-1x2048-final.json",
    "2026-11-28-s2-h200x2-train-7b-mesh.json",
    "2026-11-28-s3-h200x4-mesh/mesh_7b.json",  # 1x1, 2x1, 1x2, 4x1, 1x4, 2x2 meshes of 4 H200s
    "2026-11-28-s3-h200-train-7b-same-run/jax_nf4_7b.json",
    "2026-11-28-s3-h200x4-final/mesh_65b_fsdp.json",  # 65B 1x1 (Adam on device) and 1x4 FSDP
    "2026-11-28-s6-h200/call7/jax_nf4_7b.json",  # sixth session's step (bf16 products, joined, hash dropout)
    "2026-11-28-s6-h200/call6/jax_nf4_65b_48gib_auto.json",  # 65B 1x512 in a 48 GiB pool, Adam on the device
    "2026-11-28-s6-h200/call6/jax_nf4_lora_bf16_65b_48gib_page8l.json",  # bf16 adapters, 8-layer pages
    "2026-11-29-s7-h200/call1/jax_7b_save_dots.json",  # remat=save_dots (the adapters' products kept too)
    "2026-11-29-s7-h200/call4/jax_nf4_7b_save_projections.json",  # remat=save_projections
    "2026-11-29-s7-h200/call5/jax_nf4_7b_remat_auto.json",  # remat=auto on an H200: save_projections
    "2026-11-29-s7-h200/call6/jax_7b_save_attention.json",  # remat=save_attention
]


@pytest.mark.parametrize("name", MEASURED)
def test_gpu_plan_is_within_10_percent_of_the_measured_h200_peaks(name):
    """The GPU plan (default backend) of every configuration the benchmark measured on an H200 —
    7B 4x512 / 1x2048 with Adam on the device (remat full, save_dots, save_projections, save_attention), 65B 1x512 / 1x2048 in a 48 GiB pool (Adam on the device; paged,
    also with bf16 adapters and 8-layer pages), 7B and 65B on meshes — is within 10% of the runtime's measured peak (``peak_bytes_in_use``, max over GPUs)."""
    from pathlib import Path

    rows = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / name).read_text())["results"]
    assert rows
    for r in rows:
        data, fsdp = r.get("mesh", (1, 1))
        p = PlanInputs(cfg=LlamaConfig.preset(r["size"]), batch=r["batch"], seq=r["seq"], remat=r["remat"],
                       lora_r=r["lora_r"], lora_dropout=r["lora_dropout"], paged=r["paged"], data=data, fsdp=fsdp,
                       lora_param_dtype=r.get("lora_dtype", "float32"), page_size=r.get("page_size", 0))
        planned = plan(p)["total"]
        assert planned == pytest.approx(r["peak_bytes"], rel=0.10), (r["name"], planned / GiB, r["peak_bytes"] / GiB)


@pytest.mark.parametrize("remat", ["full", "save_projections", "save_attention"])
def test_planned_saved_activations_are_what_jax_saves(remat):
    """The planner's saved activations equal, byte for byte, the residuals that JAX keeps from the layer
    loop for the backward pass of a bf16 NF4 model with dropout (``saved_residuals`` of the LoRA
    gradient): each layer's input (``full``), plus q, k, v, the attention output, the residual after
    attention, gate and up (``save_projections``) or the attention output and the residual after it
    (``save_attention``); nothing else per layer."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Llama(cfg, lora=LoRAConfig(r=4, dropout=0.1), quant=QuantConfig(quantize=True, compute_dtype="bfloat16"),
                  remat=remat, rngs=nnx.Rngs(0))
    model.train()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora):
        logits = nnx.merge(graphdef, lora, rest, copy=True)(ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    per_layer = [a for a, where in saved_residuals(loss, lora)
                 if "output of scan" in where and a.shape[:3] == (3, 2, 11)]  # [L, B, T, ...] stacked by the loop
    saved = sum(a.size * a.dtype.itemsize for a in per_layer)
    p = plan(PlanInputs(cfg=cfg, batch=2, seq=11, remat=remat, lora_r=4, lora_dropout=0.1, compute_dtype="bfloat16"))
    assert saved == p["saved_activations"]
    assert len(per_layer) == {"full": 1, "save_projections": 8, "save_attention": 3}[remat]
