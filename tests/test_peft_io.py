"""PEFT adapters: what we export loads in ``peft`` with transformers' logits, what PEFT writes loads
here (any rank, a subset of targets, rsLoRA), import(export(x)) == x, unsupported fields fail
clearly, and merged models (transformers bf16/fp32 directory, re-quantized NF4) keep the function."""

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

from qlora_jax.convert import convert
from qlora_jax.models.checkpoint import load_model
from qlora_jax.models.llama import LoRAConfig, QuantConfig
from qlora_jax.peft_io import adapter_tensors, load_adapter, merge_adapter, save_adapter, save_merged, save_merged_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
F32 = QuantConfig(quantize=False, param_dtype="float32", compute_dtype="float32")
IDS = np.array([[1, 403, 407, 261, 378, 429, 260, 5, 17, 300, 2, 99], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])


@pytest.fixture(scope="module")
def converted(stories, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    convert(stories, root / "f32", quant=F32, progress=False)
    convert(stories, root / "nf4", quant=QuantConfig(compute_dtype="float32"), progress=False)
    return root


def _randomize_lora(model, seed: int = 0, scale: float = 0.3):
    """Nonzero A and B (a fresh adapter has B = 0 and would hide any mistake)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [scale * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    model.eval()
    return model


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


def _peft_model(stories, adapter_dir):
    base = transformers.LlamaForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def f32_model(converted):
    """fp32 stories260K with a random nonzero r=4 adapter on all seven projections (shared, read-only)."""
    return _randomize_lora(load_model(converted / "f32", lora=LoRAConfig(r=4, alpha=16)))


def test_exported_adapter_in_peft_gives_our_logits(f32_model, stories, tmp_path):
    """An adapter exported from the fp32 JAX model, loaded by peft.PeftModel onto transformers'
    LlamaForCausalLM, gives the JAX model's logits (and differs from the base model's)."""
    save_adapter(f32_model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == sorted(f32_model.lora.targets)
    ours = np.asarray(f32_model(jnp.asarray(IDS)))
    pm = _peft_model(stories, tmp_path / "adapter")
    ref = _hf_logits(pm, IDS)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    with pm.disable_adapter():
        assert np.abs(_hf_logits(pm, IDS) - ref).max() > 0.1


def test_peft_written_adapter_loads_with_its_rank(converted, stories, tmp_path):
    """An adapter created and saved by PEFT itself (r=6, rsLoRA, three targets, random B) loads into a
    model built with another rank (r=0: no adapters) and gives PEFT's logits."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    pcfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True,
                           lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base, pcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _hf_logits(pm.eval(), IDS)
    model = load_adapter(load_model(converted / "f32", lora=LoRAConfig(r=0)), tmp_path / "peft")
    assert model.lora.r == 6 and model.lora.use_rslora and set(model.lora.targets) == {"k_proj", "o_proj", "up_proj"}
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), ref, atol=2e-4, rtol=1e-4)


def test_import_of_export_is_identity(converted, tmp_path):
    """import(export(x)) == x: the same LoRA arrays, rank, alpha, targets, scaling; the base model
    passed in keeps its own adapters."""
    src = _randomize_lora(load_model(converted / "nf4", lora=LoRAConfig(r=5, alpha=7, targets=("q_proj", "gate_proj"))))
    save_adapter(src, tmp_path / "a")
    other = load_model(converted / "nf4", lora=LoRAConfig(r=2))
    before = jax.tree.map(np.asarray, nnx.state(other, nnx.LoRAParam))
    back = load_adapter(other, tmp_path / "a")
    assert back.lora == src.lora
    got, want = adapter_tensors(back), adapter_tensors(src)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(other, nnx.LoRAParam)), before)
    np.testing.assert_array_equal(np.asarray(back(jnp.asarray(IDS))), np.asarray(src(jnp.asarray(IDS))))


def test_legacy_bin_adapter_loads(f32_model, tmp_path):
    """An adapter as the published Guanaco ones are stored: adapter_model.bin (torch pickle, fp16) and
    an old PEFT config (enable_lora, merge_weights, no use_rslora/use_dora keys) loads, the weights equal
    the fp16 rounding of the originals."""
    want = adapter_tensors(f32_model)
    (tmp_path / "g").mkdir()
    torch.save({k: torch.from_numpy(v).half() for k, v in want.items()}, tmp_path / "g" / "adapter_model.bin")
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "huggyllama/llama-7b", "bias": "none", "enable_lora": None, "fan_in_fan_out": False,
        "inference_mode": True, "lora_alpha": 16.0, "lora_dropout": 0.05, "merge_weights": False,
        "modules_to_save": None, "peft_type": "LORA", "r": 4,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM"}))
    got = adapter_tensors(load_adapter(f32_model, tmp_path / "g"))
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.astype(np.float16).astype(np.float32))


def _edit_config(directory, **fields):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"use_dora": True}, "use_dora=True: DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"target_modules \['embed_tokens'\]"),
        ({"r": 8}, r"lora_A.weight' has shape \(4, \d+\), expected \(8, \d+\)"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ],
    ids=["dora", "modules_to_save", "ia3", "bias", "target", "rank-mismatch", "rank_pattern"],
)
def test_unsupported_or_inconsistent_adapters_fail_clearly(f32_model, tmp_path, fields, match):
    """DoRA, modules_to_save, other PEFT types, biases, foreign targets and wrong shapes raise a
    ValueError naming the file and the field / key / shape."""
    model = f32_model
    save_adapter(model, tmp_path / "a")
    _edit_config(tmp_path / "a", **fields)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path / "a")


def test_missing_and_foreign_keys_fail_clearly(f32_model, tmp_path):
    """A missing lora_B of one layer, or a key outside the decoder projections, is named in the error."""
    from safetensors.numpy import load_file, save_file

    model = f32_model
    save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(str(f))
    key = "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in t.items() if k != key}, str(f))
    with pytest.raises(ValueError, match="missing key .*layers.3.mlp.up_proj.lora_B.weight"):
        load_adapter(model, tmp_path / "a")
    save_file({**t, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}, str(f))
    with pytest.raises(ValueError, match="lm_head.lora_A.weight' is not a LoRA weight"):
        load_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)


def test_merged_model_exported_to_hf_loads_in_transformers_with_equal_logits(f32_model, converted, stories, tmp_path):
    """fp32 base + adapter merged and written as a transformers directory: LlamaForCausalLM loads it
    and its logits equal the unmerged JAX model's; the in-memory merged model agrees too; the bf16
    export (through ``python -m qlora_jax.peft_io merge``) holds exactly torch's bf16 rounding of the
    fp32 merged weights."""
    model = f32_model
    ours = np.asarray(model(jnp.asarray(IDS)))
    merged = merge_adapter(model)
    assert merged.lora.r == 0 and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(IDS))), ours, atol=5e-4, rtol=1e-4)
    save_merged_hf(model, tmp_path / "hf32", dtype="float32", tokenizer_dir=stories)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf32", dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(hf, IDS), ours, atol=5e-4, rtol=1e-4)
    assert (tmp_path / "hf32" / "tokenizer.json").is_file()
    # bf16 through the CLI: base model directory + adapter directory -> transformers directory
    save_adapter(model, tmp_path / "adapter")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "qlora_jax.peft_io", "merge", "--model", str(converted / "f32"),
                           "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "hf16")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    hf16 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf16")
    assert next(hf16.parameters()).dtype == torch.bfloat16
    sd16, sd32 = hf16.state_dict(), hf.state_dict()
    assert sd16.keys() == sd32.keys()
    for k in sd32:
        assert torch.equal(sd16[k], sd32[k].to(torch.bfloat16)), k


def test_nf4_merge_requantizes_and_saves_a_loadable_model_dir(converted, stories, tmp_path):
    """NF4 base + adapter merged into fp32 weights (dequantize + add) computes exactly base + adapter;
    merged and re-quantized to NF4, the saved model directory loads and stays close to it
    (re-quantization rounds the merged weights: a KL of the order of NF4's own, far closer than
    the base model without the adapter)."""
    model = _randomize_lora(load_model(converted / "nf4", lora=LoRAConfig(r=4, alpha=8)), scale=0.1)
    ours = np.asarray(model(jnp.asarray(IDS)))
    exact = merge_adapter(model, quantize_weights=False, param_dtype="float32")
    np.testing.assert_allclose(np.asarray(exact(jnp.asarray(IDS))), ours, atol=5e-4, rtol=1e-4)
    save_merged(model, tmp_path / "merged", tokenizer_dir=stories)
    back = load_model(tmp_path / "merged", lora=LoRAConfig(r=0), compute_dtype="float32")
    assert back.quant.quantize and (tmp_path / "merged" / "tokenizer.json").is_file()
    got = np.asarray(back(jnp.asarray(IDS)))
    lp, lq = jax.nn.log_softmax(ours), jax.nn.log_softmax(got)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))
    print(f"\nNF4 merge+requantize KL = {kl:.4f}")
    assert kl < 0.5
    base = np.asarray(load_model(converted / "nf4", lora=LoRAConfig(r=0), compute_dtype="float32")(jnp.asarray(IDS)))
    assert np.abs(got - base).mean() > 5 * np.abs(got - ours).mean()  # the adapter's effect survives
