"""The train-step benchmark's pieces on CPU: the random model builder gives exactly the structures the
converter gives (NF4 + double quant and 16-bit), its layers are independent draws, and the benchmark
scripts (ours, the PyTorch baseline, the ratio table) run end to end at ``--size tiny`` and write
their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.models.llama import LlamaConfig, LoRAConfig, QuantConfig
from qlora_jax.models.random_init import build_random_model
from qlora_jax.nf4 import dequantize

REPO = Path(__file__).resolve().parents[1]
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
LORA = LoRAConfig(r=8, alpha=16.0)


def _signature(model) -> tuple:
    state = nnx.state(model)
    return (jax.tree.structure(state), jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), state),
            nnx.graphdef(model))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """A tiny transformers LlamaForCausalLM checkpoint, converted to NF4 + DQ and to bf16."""
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    from qlora_jax.convert import convert

    root = tmp_path_factory.mktemp("conv")
    hf = HFConfig(**{k: v for k, v in TINY.to_hf_config().items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    LlamaForCausalLM(hf).to(torch.bfloat16).save_pretrained(root / "hf")
    convert(root / "hf", root / "nf4", quant=QuantConfig(), progress=False)
    convert(root / "hf", root / "bf16", quant=QuantConfig(quantize=False), progress=False)
    return {"nf4": root / "nf4", "bf16": root / "bf16"}


@pytest.mark.parametrize("weights", ["nf4", "bf16"])
def test_builder_matches_converted_model(converted, weights):
    from qlora_jax.models.checkpoint import load_model

    loaded = load_model(converted[weights], lora=LORA, remat="full")
    built = build_random_model(TINY, lora=LORA, quant=QuantConfig(quantize=weights == "nf4"), remat="full")
    s_loaded, s_built = _signature(loaded), _signature(built)
    assert s_built[0] == s_loaded[0]
    assert s_built[1] == s_loaded[1]
    assert s_built[2] == s_loaded[2]
    x = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    assert bool(jnp.isfinite(built(x, deterministic=True)).all())


def test_builder_draws_independent_layers():
    model = build_random_model(TINY, lora=LORA, quant=QuantConfig(), seed=3)
    w = dequantize(model.layers.mlp.down_proj.weight.get_value(), jnp.float32)  # [L, out, in]
    assert w.shape == (3, 64, 160)
    std = np.asarray(jnp.std(w, axis=(1, 2)))
    assert np.allclose(std, 0.02, rtol=0.1), std
    assert not np.allclose(w[0], w[1])
    assert model.layers.input_layernorm.scale[...].shape == (3, 64)
    assert bool((model.layers.input_layernorm.scale[...] == 1).all())
    lora_b = model.layers.self_attn.q_proj.lora_b[...]
    assert lora_b.dtype == jnp.float32 and bool((lora_b == 0).all())  # PEFT init


def _run(script: str, *args: str, timeout: float = 240, devices: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "ours.json"
    proc = _run("benchmarks/train_step.py", "--size", "tiny", "--batch", "2x32", "--weights", "nf4",
                "--steps", "2", "--warmup", "0", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| config | status | Adam state | remat | s/step |" in proc.stdout
    return out


def test_train_step_benchmark_end_to_end(bench_json):
    data = json.loads(bench_json.read_text())
    (r,) = data["results"]
    assert r["status"] == "ok" and r["impl"] == "jax" and (r["batch"], r["seq"]) == (2, 32)
    assert len(r["step_times"]) == 2 and r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(64 / r["step_s"])
    assert r["compile_s"] > 0 and r["planned_bytes"] > 0 and r["xla_estimate_bytes"] > 0
    assert np.isfinite(r["loss_first"]) and "peak_bytes" in r  # None on CPU
    assert data["meta"]["argv"][:2] == ["--size", "tiny"]


def test_failed_configuration_is_a_row_not_a_crash(tmp_path):
    """A configuration that fails (here: LoRA rank 0 is rejected) is reported in the table, exit code 1;
    a failed paged configuration is retried once with the optimizer state on the device."""
    out = tmp_path / "bad.json"
    proc = _run("benchmarks/train_step.py", "--size", "tiny", "--batch", "1x16", "--lora-r", "0",
                "--steps", "1", "--warmup", "0", "--json", str(out))
    assert proc.returncode == 1
    first, retry = json.loads(out.read_text())["results"]
    assert first["status"] == "error" and "lora.r=0" in first["error"] and first["paged"]
    assert retry["name"] == first["name"] + "-unpaged" and not retry["paged"] and retry["status"] == "error"
    proc = _run("benchmarks/train_step.py", "--size", "tiny", "--batch", "1x16", "--lora-r", "0",
                "--no-fallback-unpaged", "--steps", "1", "--warmup", "0", "--json", str(out))
    assert len(json.loads(out.read_text())["results"]) == 1


def test_torch_baseline_and_comparison(bench_json, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    torch_json = tmp_path / "torch.json"
    proc = _run("benchmarks/baselines/bnb_peft.py", "--size", "tiny", "--batch", "2x32", "--weights", "nf4",
                "--device", "cpu", "--steps", "1", "--warmup", "0", "--json", str(torch_json))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads(torch_json.read_text())["results"]
    assert r["status"] == "ok" and r["impl"] == "bnb-peft" and r["bitsandbytes"]
    from benchmarks.train_step import model_config
    from qlora_jax.memory import lora_params

    assert r["lora_params"] == lora_params(model_config("tiny"), 64, LORA.targets)  # PEFT's count = ours

    cmp_json = tmp_path / "cmp.json"
    proc = _run("benchmarks/compare_train_step.py", str(bench_json), str(torch_json), "--json", str(cmp_json))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(cmp_json.read_text())["rows"]
    assert row["x_vs_bnb"] == pytest.approx(row["ours_nf4_tok_s"] / row["bnb_tok_s"])
    assert "x vs bnb" in proc.stdout


def test_train_step_benchmark_on_a_mesh(tmp_path):
    """``--mesh 1x2`` on 8 fake CPU devices: the 1x1 reference row and the 2-device FSDP row, the global batch
    twice the per-device one, tokens/s of the global batch, scaling against the 1x1 row, per-device memory."""
    out = tmp_path / "mesh.json"
    proc = _run("benchmarks/train_step.py", "--size", "tiny", "--batch", "2x32", "--weights", "nf4", "--mesh", "1x2",
                "--steps", "2", "--warmup", "0", "--json", str(out), devices=8, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| config | status | Adam state | remat | mesh | global batch | s/step | tok/s | scaling | efficiency |" in proc.stdout
    ref, fsdp = json.loads(out.read_text())["results"]
    assert ref["mesh"] == [1, 1] and ref["name"] == "jax-nf4-tiny-2x32" and ref["batch"] == 2
    assert fsdp["mesh"] == [1, 2] and fsdp["name"] == "jax-nf4-tiny-2x32-mesh1x2"
    assert fsdp["status"] == "ok" and fsdp["devices"] == 2 and (fsdp["batch"], fsdp["device_batch"]) == (4, 2)
    assert fsdp["tokens_per_s"] == pytest.approx(4 * 32 / fsdp["step_s"])
    assert fsdp["scaling"] == pytest.approx(fsdp["tokens_per_s"] / ref["tokens_per_s"])
    assert fsdp["efficiency"] == pytest.approx(fsdp["scaling"] / 2) and ref["scaling"] == 1.0
    assert len(fsdp["peak_bytes_per_device"]) == 2  # None on CPU; max over the 2 devices on GPU
    assert fsdp["plan"]["fsdp_gathered_layer"] > 0 and ref["plan"]["fsdp_gathered_layer"] == 0
    assert fsdp["plan"]["frozen_linear_weights"] < ref["plan"]["frozen_linear_weights"]
    assert np.isfinite(fsdp["loss_first"])


def test_train_step_benchmark_mesh_arguments():
    from benchmarks.train_step import parse_meshes, run_one

    assert parse_meshes("2x1,1x2,2x1") == [(1, 1), (2, 1), (1, 2)]  # the 1x1 reference first, once
    assert parse_meshes("1x1") == [(1, 1)]
    with pytest.raises(SystemExit, match="DATAxFSDP"):
        parse_meshes("2")
    n = len(jax.devices())
    with pytest.raises(RuntimeError, match=f"mesh 4x4 needs 16 devices; this host has {n}"):
        run_one(dict(name="x", size="tiny", weights="nf4", batch=16, device_batch=1, seq=16, mesh=[4, 4], steps=1,
                     warmup=0, remat="full", lora_r=8, lora_dropout=0.0, paged=True))


def test_comparison_keeps_every_baseline_run(tmp_path, capsys):
    """A baseline measured twice (``run_train_step_gpu.sh`` runs each again after ours): each run gives its
    own ratio, the table shows their range and "k/n ok" where the runs disagree on a target, ours counts with
    its median; one run of each gives the plain ratio and ok / MISS as before."""
    from benchmarks.compare_train_step import main

    def write(name, impl, weights, tok_s, **extra):
        rows = [{"impl": impl, "size": "7b", "batch": 4, "seq": 512, "weights": weights, "status": "ok",
                 "tokens_per_s": tok_s, **extra}]
        (tmp_path / name).write_text(json.dumps({"results": rows}))
        return str(tmp_path / name)

    files = [write("ours.json", "jax", "nf4", 12000.0, peak_bytes=7 * 2**30, planned_bytes=7 * 2**30),
             write("ours2.json", "jax", "nf4", 11000.0, peak_bytes=7 * 2**30, planned_bytes=7 * 2**30),
             write("bnb.json", "bnb-peft", "nf4", 3000.0, device_used_bytes=8 * 2**30),
             write("bnb2.json", "bnb-peft", "nf4", 4000.0, device_used_bytes=8 * 2**30),
             write("torch.json", "torch-bf16-peft", "bf16", 5000.0)]
    out = tmp_path / "cmp.json"
    assert main([*files, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ours_nf4_tok_s"] == 11500.0  # median of our two runs
    assert row["bnb_tok_s_runs"] == [3000.0, 4000.0]
    assert row["x_vs_bnb_runs"] == pytest.approx([11500 / 3000, 11500 / 4000])
    assert row["x_vs_bnb"] == pytest.approx(11500 / 3500)
    table = capsys.readouterr().out
    assert "2.88-3.83 1/2 ok (>= 3.5x)" in table and "3,000 / 4,000" in table
    assert "| 2.30 ok |" in table  # one PyTorch run: 11500 / 5000 against 2.3x
    assert "7.00 ok" in table  # peak under bitsandbytes' device-wide use
