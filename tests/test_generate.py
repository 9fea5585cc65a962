"""Generation on the real stories260K model (full precision): greedy tokens (also with a repetition
penalty) are transformers', a left-padded batch gives each row its one-by-one output, seeded sampling
is reproducible and independent of the streaming chunk size, stop strings / EOS end rows, the
samplers keep only the allowed tokens, and the CLI and chat mode print completions."""

from __future__ import annotations

import dataclasses
import io
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
from qlora_jax.generate import Generator, SamplingConfig, chat, guanaco_prompt, load_for_generation, main, sample_logits
from qlora_jax.models.llama import QuantConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
F32 = QuantConfig(quantize=False, param_dtype="float32", compute_dtype="float32")
PROMPTS = ["Once upon a time", "Lily and her mom went to the park. They saw", "Tom"]


@pytest.fixture(scope="module")
def model_dir(stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "f32"
    convert(stories, out, quant=F32, progress=False)
    return out


@pytest.fixture(scope="module")
def gen(model_dir):
    return Generator(*load_for_generation(model_dir))


@pytest.fixture(scope="module")
def hf(stories):
    return transformers.LlamaForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()


@pytest.mark.parametrize("penalty", [1.0, 1.3], ids=["plain", "repetition-penalty"])
def test_greedy_equals_transformers(gen, hf, penalty):
    """40 greedy tokens from "Once upon a time" (BOS prepended) are transformers' generate() tokens,
    with and without transformers' repetition penalty."""
    ids = gen.encode("Once upon a time")
    assert ids[0] == 1
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          repetition_penalty=penalty)[0, len(ids):].tolist()
    (c,) = gen.generate_ids([ids], max_new_tokens=40, sampling=SamplingConfig(repetition_penalty=penalty), chunk_size=16)
    assert c.finish_reason == "length" and c.tokens == ref
    print("\n" + "Once upon a time" + c.text)


def test_batched_equals_one_by_one(gen):
    """Prompts of different lengths, left-padded into one batch, give each row the tokens it gets alone."""
    kw = dict(max_new_tokens=24, chunk_size=8)
    batch = gen.generate(PROMPTS, **kw)
    alone = [gen.generate([p], **kw)[0] for p in PROMPTS]
    assert len({len(gen.encode(p)) for p in PROMPTS}) == 3
    assert [c.tokens for c in batch] == [c.tokens for c in alone]
    assert [c.text for c in batch] == [c.text for c in alone]


def test_unrolled_layers_give_the_same_tokens(gen):
    """The default ``unroll_layers=True`` (no loop over layers) generates what the scanned layers do."""
    assert gen.unroll_layers
    scanned = Generator(gen.model, gen.tokenizer, unroll_layers=False)
    kw = dict(max_new_tokens=12, chunk_size=6)
    assert [c.tokens for c in scanned.generate(PROMPTS, **kw)] == [c.tokens for c in gen.generate(PROMPTS, **kw)]


def test_layer_buffers_give_the_same_tokens(gen, stories, tmp_path):
    """``layer_buffers=True`` (each layer's weights sliced once per decode call, not per token) generates
    the default's tokens: greedy and seeded sampling, batched prompts, float and NF4 weights."""
    s = SamplingConfig(temperature=1.0, top_k=50)
    kw = dict(max_new_tokens=10, chunk_size=5)
    nf4_dir = tmp_path / "nf4"
    convert(stories, nf4_dir, progress=False)
    for base in (gen, Generator(*load_for_generation(nf4_dir))):
        for join in (True, False):
            buffered = Generator(base.model, base.tokenizer, layer_buffers=True, join_projections=join)
            for sampling in (SamplingConfig(), s):
                want = base.generate(PROMPTS, sampling=sampling, seed=3, **kw)
                got = buffered.generate(PROMPTS, sampling=sampling, seed=3, **kw)
                assert [c.tokens for c in got] == [c.tokens for c in want]


def _random_nf4_model():
    """A random 2-layer NF4 (double quant) LLaMA with grouped-query attention, fp32 compute, and adapters
    with nonzero B on every projection but k."""
    from qlora_jax.models.llama import Llama, LlamaConfig, LoRAConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    targets = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model = Llama(cfg, lora=LoRAConfig(r=8, targets=targets), quant=QuantConfig(compute_dtype="float32"),
                  rngs=nnx.Rngs(0))
    lora = nnx.state(model, nnx.LoRAParam)
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(len(str(path))), x.shape, x.dtype) * 0.05
        if "lora_b" in str(path) else x, lora)
    nnx.update(model, lora)
    model.eval()
    return model


def test_joined_projections_decode_like_the_modules():
    """With layer buffers, q/k/v and gate/up are joined into one layer each (NF4 with double quant,
    grouped-query attention, adapters with nonzero B on all projections but k): the logits are the
    plain modules' and so are the greedy tokens, joined or not, with the 4-bit weights dequantized
    into the buffers, and with their block scales decoded to fp32 there (``fp32_scales``: no nested
    fields left, joined or not)."""
    from qlora_jax.models.llama import fuse_projections
    from qlora_jax.nf4 import QuantizedTensor

    model = _random_nf4_model()
    cfg = model.cfg
    layer_graphdef, stacked = nnx.split(model.layers)
    states = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_hidden_layers)]
    projections = [fuse_projections(nnx.merge(layer_graphdef, st)) for st in states]
    assert [len(projections[0][k]) for k in ("qkv", "o", "gate_up", "down")] == [1, 1, 1, 1]
    assert projections[0]["qkv"][0].splits == (256, 128, 128)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)), jnp.int32)
    want = model(ids)
    got = model(ids, layer_states=states, layer_projections=projections)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)

    prompts = [[1, 5, 9, 17], [1, 3]]
    kw = dict(max_new_tokens=8, chunk_size=4)
    plain = Generator(model, eos_token_ids=(), layer_buffers=False).generate_ids(prompts, **kw)
    for join, dequantize, fp32 in ((True, False, False), (False, False, False), (True, True, False),
                                   (True, False, True), (False, False, True)):
        got = Generator(model, eos_token_ids=(), layer_buffers=True, join_projections=join,
                        dequantize_layers=dequantize, fp32_scales=fp32).generate_ids(prompts, **kw)
        assert [c.tokens for c in got] == [c.tokens for c in plain], (join, dequantize, fp32)
    dequantized = [fuse_projections(nnx.merge(layer_graphdef, st), dequantize=True) for st in states]
    assert dequantized[0]["qkv"][0].weight.shape == (512, 256) and dequantized[0]["qkv"][0].weight.dtype == jnp.float32
    got = model(ids, layer_states=states, layer_projections=dequantized)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    expanded = [fuse_projections(nnx.merge(layer_graphdef, st), fp32_scales=True) for st in states]
    weights = [f.weight for p in expanded for g in p.values() for f in g]
    assert len(weights) == 8 and all(isinstance(w, QuantizedTensor) and not w.double_quant
                                     and w.absmax.dtype == jnp.float32 for w in weights)
    got = model(ids, layer_states=states, layer_projections=expanded)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_fp32_scales_default_follows_memory():
    """``fp32_scales=None`` expands the scales when every device has room for the buffers with 4 bytes per
    block scale (codes + fp32 scales + the other layer arrays); a model without double quantization has no
    scales to expand."""
    from qlora_jax.generate import LAYER_BUFFER_SLACK, layer_buffers_fit
    from qlora_jax.nf4 import QuantizedTensor

    model = _random_nf4_model()
    nodes = jax.tree.leaves(nnx.state(model.layers), is_leaf=lambda x: isinstance(x, QuantizedTensor))
    qts = [n for n in nodes if isinstance(n, QuantizedTensor)]
    other = sum(a.nbytes for n in nodes if not isinstance(n, QuantizedTensor) for a in jax.tree.leaves(n))
    need = (sum(q.packed.size + 4 * q.absmax.size for q in qts) + other) * 1.1 + LAYER_BUFFER_SLACK
    plain_need = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model.layers))) * 1.1 + LAYER_BUFFER_SLACK
    assert plain_need < need
    stats = lambda free: (lambda d: {"bytes_limit": 10 * need, "bytes_in_use": 10 * need - free})  # noqa: E731
    assert layer_buffers_fit(model, stats(need + 1), fp32_scales=True)
    assert not layer_buffers_fit(model, stats(need - 1), fp32_scales=True)
    assert layer_buffers_fit(model, stats(need - 1))  # the buffers with 8-bit scale codes still fit
    assert Generator(model).uses_fp32_scales() == layer_buffers_fit(model, fp32_scales=True)  # CPU: no statistics
    assert Generator(model, fp32_scales=True).uses_fp32_scales()
    import qlora_jax.generate as generate_module

    original, generate_module.layer_buffers_fit = generate_module.layer_buffers_fit, lambda *a, **k: True
    try:
        assert Generator(model).uses_fp32_scales()
        model.quant = dataclasses.replace(model.quant, double_quant=False)  # no scales to expand
        assert not Generator(model).uses_fp32_scales()
    finally:
        generate_module.layer_buffers_fit = original


def test_dequantized_layer_buffers_default_follows_batch_and_memory():
    """``dequantize_layers=None`` dequantizes the 4-bit weights into the layer buffers from
    ``DEQUANTIZE_MIN_BATCH`` rows on, when every device has room for them in the compute dtype and
    they are not split over an ``fsdp`` mesh axis."""
    from qlora_jax.generate import DEQUANTIZE_MIN_BATCH, LAYER_BUFFER_SLACK, layer_buffers_fit
    from qlora_jax.nf4 import QuantizedTensor

    model = _random_nf4_model()
    nodes = jax.tree.leaves(nnx.state(model.layers), is_leaf=lambda x: isinstance(x, QuantizedTensor))
    qts = [n for n in nodes if isinstance(n, QuantizedTensor)]
    assert len(qts) == 7
    other = sum(a.nbytes for n in nodes if not isinstance(n, QuantizedTensor) for a in jax.tree.leaves(n))
    need = (sum(2 * q.packed.size * 4 for q in qts) + other) * 1.1 + LAYER_BUFFER_SLACK  # fp32 compute
    stats = lambda free: (lambda d: {"bytes_limit": 10 * need, "bytes_in_use": 10 * need - free})  # noqa: E731
    assert layer_buffers_fit(model, stats(need + 1), dequantized=True)
    assert not layer_buffers_fit(model, stats(need - 1), dequantized=True)
    assert layer_buffers_fit(model, stats(need - 1))  # the 4-bit buffers are several times smaller
    gen = Generator(model)
    assert not gen.uses_dequantized_layers(DEQUANTIZE_MIN_BATCH - 1)
    assert gen.uses_dequantized_layers(DEQUANTIZE_MIN_BATCH) == layer_buffers_fit(model, dequantized=True)
    assert Generator(model, dequantize_layers=True).uses_dequantized_layers(1)
    assert not Generator(model, dequantize_layers=False).uses_dequantized_layers(64)
    fit = lambda m, memory_stats=None, dequantized=False: True  # noqa: E731 - room everywhere
    import qlora_jax.generate as generate_module

    original, generate_module.layer_buffers_fit = generate_module.layer_buffers_fit, fit
    try:
        assert Generator(model).uses_dequantized_layers(DEQUANTIZE_MIN_BATCH)
        fsdp_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
        assert Generator(model, mesh=fsdp_mesh).uses_dequantized_layers(DEQUANTIZE_MIN_BATCH)  # fsdp axis of 1
        split = jax.sharding.AbstractMesh((1, 2), ("data", "fsdp"))  # weights split over 2 devices: no
        assert not Generator(model, mesh=split).uses_dequantized_layers(DEQUANTIZE_MIN_BATCH)
    finally:
        generate_module.layer_buffers_fit = original


def test_seeded_sampling_is_reproducible_and_chunking_free(gen):
    """Same seed -> same samples (whatever the chunk size); another seed -> other samples."""
    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    kw = dict(max_new_tokens=20, sampling=s)
    a = gen.generate(PROMPTS[:2], seed=7, chunk_size=None, **kw)
    b = gen.generate(PROMPTS[:2], seed=7, chunk_size=3, **kw)
    c = gen.generate(PROMPTS[:2], seed=8, chunk_size=None, **kw)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_stop_strings_and_eos_end_rows(gen):
    """A stop string ends a row and is cut from its text (never part of it), whichever chunk it came
    in; an EOS token ends a row and is not part of its tokens; other rows go on."""
    kw = dict(max_new_tokens=30, chunk_size=4)
    full = gen.generate(PROMPTS, **kw)
    stopped = gen.generate(PROMPTS, stop_strings=["."], **kw)
    for prompt, f, s in zip(PROMPTS, full, stopped):
        if "." in f.text:
            assert s.finish_reason == "stop" and s.text == f.text[: f.text.index(".")]
            # its tokens run up to the one that completed the stop string
            assert f.tokens[: len(s.tokens)] == s.tokens and "." in gen.completion_text(gen.encode(prompt), s.tokens)
            assert "." not in gen.completion_text(gen.encode(prompt), s.tokens[:-1])
        else:
            assert s.finish_reason == "length" and s.text == f.text
    assert any(s.finish_reason == "stop" for s in stopped)
    period = full[0].tokens[5]  # treat one generated token of row 0 as EOS
    eos_gen = Generator(gen.model, gen.tokenizer, eos_token_ids=[period])
    out = eos_gen.generate(PROMPTS, **kw)
    first = full[0].tokens.index(period)
    assert out[0].finish_reason == "eos" and out[0].tokens == full[0].tokens[:first]
    for f, o in zip(full[1:], out[1:]):
        expect = f.tokens[: f.tokens.index(period)] if period in f.tokens else f.tokens
        assert o.tokens == expect


def test_samplers_keep_only_allowed_tokens():
    """top-k samples only among the k largest logits, top-p only within the smallest set reaching p;
    greedy is argmax; the repetition penalty divides positive / multiplies negative seen logits."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    k2 = np.asarray(sample_logits(logits, keys, SamplingConfig(temperature=1.0, top_k=2)))
    assert set(k2) == {0, 1}
    p = np.asarray(sample_logits(logits, keys, SamplingConfig(temperature=1.0, top_p=0.7)))
    assert set(p) == {0, 1}  # 0.5 < 0.7 <= 0.8
    every = np.asarray(sample_logits(logits, keys, SamplingConfig(temperature=1.0)))
    assert set(every) == {0, 1, 2, 3}
    z = jnp.asarray([[2.0, 1.9, -1.0]])
    seen = jnp.asarray([[True, False, False]])
    assert int(sample_logits(z, keys, SamplingConfig(), seen)[0]) == 0
    assert int(sample_logits(z, keys, SamplingConfig(repetition_penalty=1.1), seen)[0]) == 1
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "qlora_jax.generate", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_prints_the_greedy_completion(model_dir, gen):
    """python -m qlora_jax.generate --temperature 0 prints the same completion as the API, on stdout."""
    proc = _cli("--model", str(model_dir), "--prompt", "Once upon a time", "--max-new-tokens", "20", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    (want,) = gen.generate(["Once upon a time"], max_new_tokens=20)
    assert proc.stdout == want.text + "\n"
    assert want.text.startswith(", there was")


def test_cli_with_adapter_matches_the_api_and_reports_bad_input(model_dir, tmp_path, capsys):
    """--adapter loads a PEFT adapter (unmerged, trained with lora_dropout: off when generating); a batch
    of prompts prints one completion per prompt equal to the API's; a missing adapter is a one-line
    error with exit code 2."""
    from flax import nnx

    from qlora_jax.models.checkpoint import load_model
    from qlora_jax.models.llama import LoRAConfig
    from qlora_jax.peft_io import load_adapter, merge_adapter, save_adapter

    m = load_model(model_dir, lora=LoRAConfig(r=2, alpha=4, dropout=0.1, targets=("q_proj", "down_proj")))
    nnx.update(m, jax.tree.map(lambda x: x + 0.2, nnx.state(m, nnx.LoRAParam)))
    save_adapter(m, tmp_path / "adapter")
    proc = _cli("--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", PROMPTS[0],
                "--prompt", PROMPTS[2], "--max-new-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    model, tok = load_for_generation(model_dir)
    want = Generator(load_adapter(model, tmp_path / "adapter"), tok).generate([PROMPTS[0], PROMPTS[2]], max_new_tokens=12)
    assert proc.stdout == "".join(f"--- {i} ---\n{c.text}\n" for i, c in enumerate(want))
    plain = Generator(model, tok).generate([PROMPTS[0]], max_new_tokens=12)[0]
    assert plain.tokens != want[0].tokens  # the adapter changes the output
    merged = Generator(merge_adapter(load_adapter(model, tmp_path / "adapter")), tok).generate([PROMPTS[0]], max_new_tokens=12)[0]
    assert merged.tokens == want[0].tokens  # merged (fp32) generates what base + adapter generates
    assert main(["--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no adapter_config.json" in err and "Traceback" not in err


def test_chat_mode_streams_guanaco_turns(gen):
    """Chat mode builds Guanaco's "### Human: ... ### Assistant:" prompt with the history, streams each
    reply to the output and never prints the stop string."""
    assert guanaco_prompt([("Hi", "Hello.")], "Tell me a story") == \
        "### Human: Hi ### Assistant: Hello. ### Human: Tell me a story ### Assistant:"
    out, err = io.StringIO(), io.StringIO()
    chat(gen, template="guanaco", max_new_tokens=12, chunk_size=4, inp=io.StringIO("Hello\nOnce upon a time\n/exit\n"),
         out=out, err=err)
    replies = out.getvalue().splitlines()
    assert len(replies) == 2 and all(r.strip() for r in replies)
    assert "### Human:" not in out.getvalue() and err.getvalue().count("> ") == 3


@pytest.mark.slow
def test_generation_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/generate.py --size tiny runs end to end on CPU: a JAX row with timings and the
    CUDA-only transformers baselines reported as skipped, in the table and the JSON."""
    out = tmp_path / "gen.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "generate.py"), "--size", "tiny", "--batch", "2", "--prompt-len", "8",
         "--new-tokens", "4", "--runs", "1", "--variants", "nf4_lora", "--baselines", "bnb4,hf_bf16", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["impl"], r["variant"], r["batch"]) for r in ok] == [("qlora_jax", "nf4_lora", 2)]
    assert ok[0]["tokens_per_s"] > 0 and ok[0]["weight_bytes"] > 0
    assert {r["variant"] for r in rows if r["status"] == "skipped"} == {"bnb4", "hf_bf16"}
    assert "skipped" in proc.stdout and "qlora_jax" in proc.stdout


def test_chat_mode_uses_the_tokenizers_template(gen):
    """With a tokenizer chat template (auto picks it), each turn's prompt is the template applied to the
    whole conversation; the reply printed is the completion of that prompt."""
    import copy

    tok = copy.deepcopy(gen.tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    g = Generator(gen.model, tok)
    out = io.StringIO()
    chat(g, max_new_tokens=10, chunk_size=5, inp=io.StringIO("Once upon a time\n"), out=out, err=io.StringIO())
    (want,) = g.generate(["user: Once upon a time\nassistant:"], max_new_tokens=10, seed=0)
    assert out.getvalue() == want.text + "\n"


def test_streamer_never_prints_a_stop_string(gen):
    """The streamer holds back a tail that may begin a stop string and cuts at a completed one: what it
    prints is always a prefix of the final (truncated) text, whatever the chunking."""
    from qlora_jax.generate import TextStreamer

    prompt = gen.encode("Once upon a time")
    (full,) = gen.generate_ids([prompt], max_new_tokens=30)
    stop = full.text[full.text.index("Lily"):][:7]  # a stop string spanning several tokens
    for chunk in (1, 2, 5):
        out = io.StringIO()
        streamer = TextStreamer(gen, prompt, [stop], out)
        for k in range(chunk, len(full.tokens) + chunk, chunk):
            streamer([full.tokens[:k]])
            assert stop[:2] not in out.getvalue()
        final = full.text[: full.text.index(stop)]
        assert final.startswith(out.getvalue())
        streamer.finish(final)
        assert out.getvalue() == final + "\n"


def test_layer_buffers_default_follows_free_device_memory(gen):
    """``layer_buffers=None`` slices the layer weights once per decode call only when every device
    has one more copy of them free (plus slack); no memory statistics (CPU) -> off."""
    from qlora_jax.generate import LAYER_BUFFER_SLACK, layer_buffers_fit

    nbytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(gen.model.layers)))
    need = nbytes * 1.1 + LAYER_BUFFER_SLACK
    stats = lambda free: (lambda d: {"bytes_limit": 10 * need, "bytes_in_use": 10 * need - free})  # noqa: E731
    assert layer_buffers_fit(gen.model, stats(need + 1))
    assert not layer_buffers_fit(gen.model, stats(need - 1))
    assert not layer_buffers_fit(gen.model, lambda d: None)
    assert Generator(gen.model).uses_layer_buffers() == layer_buffers_fit(gen.model)
    assert Generator(gen.model, layer_buffers=True).uses_layer_buffers()
    assert not Generator(gen.model, layer_buffers=False).uses_layer_buffers()
