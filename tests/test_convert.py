"""The converter: HF safetensors, bnb-4bit and GGUF sources -> NF4 model directory. Imported
bitsandbytes codes are kept bit for bit, converted models round-trip through orbax, peak host
memory stays bounded by the largest tensor, and bad input fails with a message naming the file and
tensor without leaving a half-written output behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from qlora_jax.convert import ConversionError, convert, gguf_to_hf_name, hf_name_table, main, unpermute_rope
from qlora_jax.models.checkpoint import WEIGHTS_DIR, load_model, save_model
from qlora_jax.models.llama import LlamaConfig, LoRAConfig, QuantConfig
from qlora_jax.nf4 import quantize
from qlora_jax.nf4_dense import Frozen

REPO = Path(__file__).resolve().parents[1]
F32 = QuantConfig(quantize=False, param_dtype="float32", compute_dtype="float32")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load_tree(model_dir: Path) -> dict:
    from orbax.checkpoint.experimental import v1 as ocp1

    return ocp1.load(model_dir / WEIGHTS_DIR)


def _copy_model(src: Path, dst: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    """A copy of an HF model directory, optionally with other tensors or config."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            shutil.copyfile(f, dst / f.name)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors if tensors is not None else load_file(src / "model.safetensors"), dst / "model.safetensors")
    return dst


# --- HF safetensors -------------------------------------------------------------------------------


def test_name_table_covers_transformers_parameters(stories):
    """The table's names are exactly the parameters transformers keeps in stories260K's file, and
    each GGUF name maps into it."""
    cfg = LlamaConfig.from_hf_config(stories)
    table = hf_name_table(cfg)
    assert set(table) == set(load_file(stories / "model.safetensors"))
    assert sum(t.linear for t in table.values()) == 7 * cfg.num_hidden_layers
    assert gguf_to_hf_name("blk.4.attn_output.weight") == "model.layers.4.self_attn.o_proj.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"


def test_unpermute_rope_inverts_llama_cpp_permute():
    """llama.cpp interleaves the two rotary halves of each head; unpermute_rope restores them."""
    n_heads, head_dim, d_in = 3, 8, 5
    w = np.arange(n_heads * head_dim * d_in, dtype=np.float32).reshape(n_heads * head_dim, d_in)
    permuted = w.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's permute
    np.testing.assert_array_equal(unpermute_rope(permuted, n_heads), w)


def test_converted_codes_are_quantize_of_the_source_and_round_trip_through_orbax(stories, tmp_path, monkeypatch):
    """Every converted linear weight holds exactly quantize(source tensor); loading and saving the
    model again gives identical frozen state and logits."""
    out = convert(stories, tmp_path / "nf4", quant=QuantConfig(quant_type="nf4", blocksize=64), progress=False)
    src = load_file(stories / "model.safetensors")
    tree = _load_tree(out)
    for i in (0, 4):
        for attn_or_mlp, name in [("self_attn", "q_proj"), ("mlp", "down_proj")]:
            want = quantize(src[f"model.layers.{i}.{attn_or_mlp}.{name}.weight"])
            got = tree["layers"][str(i)][attn_or_mlp][name]["weight"]
            for f in ("packed", "absmax", "nested_absmax", "nested_offset", "nested_code"):
                np.testing.assert_array_equal(got[f], np.asarray(getattr(want, f)), err_msg=f)
    assert tree["embed_tokens"].dtype.name == "bfloat16"
    assert {p.name for p in out.iterdir()} >= {"config.json", "qlora_jax.json", "weights", "tokenizer.json"}

    monkeypatch.chdir(tmp_path)
    model = load_model("nf4")  # relative paths work too
    again = load_model(save_model(model, "again"))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, Frozen), nnx.state(model, Frozen))
    ids = jnp.asarray([[1, 5, 9, 33, 200]])
    np.testing.assert_array_equal(again(ids), model(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_sharded_bf16_checkpoint_converts_like_the_single_file(stories, tmp_path):
    """A bf16 checkpoint split over shards with an index converts to the same weights as one file."""
    tensors = {k: v.astype(jnp.bfloat16) for k, v in load_file(stories / "model.safetensors").items()}
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    single = _copy_model(stories, tmp_path / "single", tensors)
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.array(names), 3)):
        fname = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in chunk}, sharded / fname)
        weight_map.update({k: fname for k in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = _load_tree(convert(single, tmp_path / "a", progress=False))
    b = _load_tree(convert(sharded, tmp_path / "b", progress=False))
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --- bitsandbytes 4-bit ---------------------------------------------------------------------------


def _bnb_checkpoint(stories: Path, dst: Path, quant_type: str, double_quant: bool):
    """stories260K quantized by bitsandbytes on CPU, saved as transformers saves a bnb-4bit model."""
    torch = pytest.importorskip("torch")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import save_file as save_torch

    states = {}
    out = {}
    for k, v in load_file(stories / "model.safetensors").items():
        t = torch.from_numpy(v)
        if k.endswith("_proj.weight"):
            q, state = bnbf.quantize_4bit(t, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
            out[k] = q
            for sk, sv in state.as_dict(packed=True).items():
                out[f"{k}.{sk}"] = sv
            states[k] = (q, state)
        else:
            out[k] = t
    config = json.loads((stories / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
    }
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config))
    shutil.copyfile(stories / "tokenizer.json", dst / "tokenizer.json")
    save_torch({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors")
    return states


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bnb_4bit_import_keeps_bitsandbytes_codes(stories, tmp_path, quant_type, double_quant):
    """Converting a bnb-4bit checkpoint stores bitsandbytes' own codes and scales, bit for bit, and
    the loaded model computes the logits of a float model holding bitsandbytes' dequantized weights."""
    import torch
    import bitsandbytes.functional as bnbf
    import transformers

    states = _bnb_checkpoint(stories, tmp_path / "bnb", quant_type, double_quant)
    # The CLI's quant settings are overridden by the checkpoint's own.
    out = convert(tmp_path / "bnb", tmp_path / "out", quant=QuantConfig(quant_type="int4", blocksize=128, param_dtype="float32"), progress=False)
    meta = json.loads((out / "qlora_jax.json").read_text())
    assert meta["source_format"] == "bnb-4bit"
    assert (meta["quant"]["quant_type"], meta["quant"]["blocksize"], meta["quant"]["double_quant"]) == (quant_type, 64, double_quant)
    tree = _load_tree(out)
    for k, (q, state) in states.items():
        i, group, name = k.split(".")[2], k.split(".")[3], k.split(".")[4]
        got = tree["layers"][i][group][name]["weight"]
        np.testing.assert_array_equal(got["packed"], q.numpy().reshape(-1))
        np.testing.assert_array_equal(got["absmax"], state.absmax.numpy())
        if double_quant:
            np.testing.assert_array_equal(got["nested_absmax"], state.state2.absmax.numpy())
            np.testing.assert_array_equal(got["nested_code"], state.state2.code.numpy())
            np.testing.assert_array_equal(got["nested_offset"], np.float32(state.offset.item()))
        else:
            assert "nested_absmax" not in got

    hf = transformers.LlamaForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    with torch.no_grad():
        for k, (q, state) in states.items():
            hf.get_parameter(k).copy_(bnbf.dequantize_4bit(q, state))
        ids = [[1, 403, 407, 261, 378, 429, 260, 5, 17]]
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(out, compute_dtype="float32")(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


# --- GGUF -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_smollm2_logits_close_to_transformers(smollm2_gguf, smollm2_f32, smollm2_hf, tmp_path):
    """SmolLM2-135M-Instruct's GGUF (Q4_1 / Q8_0 blocks): converted with float weights, logits equal
    transformers loading the same GGUF (so names, layout and the rotary un-permutation are right);
    converted to NF4, next-token distributions stay close (KL reported). The fp32 conversion and the
    transformers model are session fixtures (conftest.py), shared with test_mmlu's SmolLM2 test."""
    torch = pytest.importorskip("torch")
    import transformers

    nf4 = convert(smollm2_gguf, tmp_path / "nf4", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(nf4)  # the tokenizer written beside the weights
    ids = np.array([tok("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")["input_ids"]])
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(smollm2_f32)(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3)

    q = np.asarray(load_model(nf4, compute_dtype="float32")(jnp.asarray(ids)))
    lp, lq = jax.nn.log_softmax(ref), jax.nn.log_softmax(q)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))
    agree = float(np.mean(ref.argmax(-1) == q.argmax(-1)))
    print(f"\nSmolLM2-135M GGUF -> NF4 vs transformers(GGUF): KL = {kl:.4f} nats/token, top-1 agreement {agree:.2f}, "
          f"next token {tok.decode(int(q[0, -1].argmax()))!r} (reference {tok.decode(int(ref[0, -1].argmax()))!r})")
    assert kl < 0.5 and agree >= 0.7


# --- streaming: peak host memory ------------------------------------------------------------------

# Peak RSS from /proc (VmHWM belongs to this process image; getrusage's ru_maxrss would carry the
# parent's peak across fork + exec). Writing 5 to clear_refs resets the peak after the warm-up.
_PEAK_DRIVER = textwrap.dedent(
    """
    import json, sys
    from qlora_jax.convert import main

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    assert main([sys.argv[1], sys.argv[2], "--quiet"]) == 0  # warm-up: imports, jit, orbax
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    assert status("VmHWM") <= base + 1024, "peak RSS was not reset"
    assert main([sys.argv[3], sys.argv[4], "--quiet"]) == 0
    print(json.dumps({"base_kib": base, "peak_kib": status("VmHWM")}))
    """
)


def _synthetic_checkpoint(dst: Path, cfg: dict, n_shards: int, seed: int = 0) -> tuple[int, int]:
    """A random fp32 LLaMA checkpoint in shards; returns (total bytes, largest tensor bytes)."""
    rng = np.random.default_rng(seed)
    table = hf_name_table(LlamaConfig.from_hf_config(cfg))
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg))
    names = list(table)
    weight_map, total, largest = {}, 0, 0
    for s, chunk in enumerate(np.array_split(np.array(names), n_shards)):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = {str(k): (rng.standard_normal(table[k].shape, np.float32) * 0.02) for k in chunk}
        save_file(shard, dst / fname)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.nbytes
            largest = max(largest, v.nbytes)
        del shard
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total, largest


def test_peak_host_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Converting a sharded checkpoint 10x larger than its largest tensor raises the converter's
    peak RSS (over a warmed-up process) by at most 3x the largest tensor: tensors stream through."""
    base_cfg = dict(model_type="llama", vocab_size=16384, hidden_size=1024, intermediate_size=2816,
                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    _synthetic_checkpoint(tmp_path / "warm", {**base_cfg, "vocab_size": 256, "hidden_size": 128,
                                              "intermediate_size": 352, "num_hidden_layers": 2}, 2)
    total, largest = _synthetic_checkpoint(tmp_path / "big", {**base_cfg, "num_hidden_layers": 12}, 5)
    assert total > 9 * largest
    r = subprocess.run(
        [sys.executable, "-c", _PEAK_DRIVER, str(tmp_path / "warm"), str(tmp_path / "warm_out"),
         str(tmp_path / "big"), str(tmp_path / "big_out")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = (m["peak_kib"] - m["base_kib"]) * 1024
    print(f"\nsource {total / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB, warm RSS {m['base_kib'] / 1e3:.0f} MB, "
          f"peak RSS growth {growth / 1e6:.0f} MB = {growth / largest:.2f} x largest tensor")
    assert growth <= 3 * largest
    assert load_model(tmp_path / "big_out", lora=LoRAConfig(r=0)).cfg.num_hidden_layers == 12


# --- bad input ------------------------------------------------------------------------------------


def test_missing_and_malformed_sources_raise_clear_errors(stories, tmp_path):
    """Missing paths, config or shards; unsupported architectures; wrong shapes; stray tensors;
    non-GGUF files: each raises ConversionError naming the file and the tensor."""
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "out", progress=False)

    config = json.loads((stories / "config.json").read_text())
    src = _copy_model(stories, tmp_path / "gpt2", config={**config, "model_type": "gpt2"})
    with pytest.raises(ConversionError, match="unsupported model_type 'gpt2'"):
        convert(src, tmp_path / "out", progress=False)

    src = _copy_model(stories, tmp_path / "wide", config={**config, "intermediate_size": 128})
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), the config needs"):
        convert(src, tmp_path / "out", progress=False)

    tensors = load_file(stories / "model.safetensors")
    src = _copy_model(stories, tmp_path / "extra", {**tensors, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="'model.layers.0.mlp.extra.weight' has no place in the model"):
        convert(src, tmp_path / "out", progress=False)

    src = _copy_model(stories, tmp_path / "gone", {k: v for k, v in tensors.items() if k != "model.norm.weight"})
    with pytest.raises(ConversionError, match="'model.norm.weight' is missing"):
        convert(src, tmp_path / "out", progress=False)

    src = _copy_model(stories, tmp_path / "shards")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConversionError, match="shard 'model-00002-of-00002.safetensors' \\(holding 'model.norm.weight'"):
        convert(src, tmp_path / "out", progress=False)

    with pytest.raises(ConversionError, match="no-such-org/no-such-model: could not fetch from the Hugging Face Hub"):
        convert("no-such-org/no-such-model", tmp_path / "out", progress=False)  # offline in tests (conftest)

    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConversionError, match="fake.gguf: not a readable GGUF file"):
        convert(tmp_path / "fake.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_file_names_the_tensor_and_leaves_the_existing_output_intact(stories, tmp_path, capsys):
    """A truncated safetensors file fails at the tensor that runs past its end; the CLI prints the
    message and exits 1; a complete OUT from an earlier run still loads; no temporary files remain."""
    out = tmp_path / "out"
    assert main([str(stories), str(out), "--quiet"]) == 0
    before = _load_tree(out)

    src = _copy_model(stories, tmp_path / "trunc")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 5000])
    with pytest.raises(ConversionError, match=r"trunc/model\.safetensors: truncated safetensors file: tensor '[\w.]+' ends at byte"):
        convert(src, out, progress=False)
    assert main([str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated safetensors file" in err
    assert main([str(stories), str(out), "--quiet", "--blocksize", "100"]) == 1
    assert "blocksize=100 must be a power of two" in capsys.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, _load_tree(out), before)
    assert load_model(out).cfg.num_hidden_layers == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "trunc"]
