"""Generation speed: qlora_jax (NF4 + LoRA unmerged, NF4 merged, bf16) against transformers +
bitsandbytes 4-bit (``load_in_4bit``, NF4 + double quant; plain and with a PEFT LoRA) and bf16
transformers, same card, same run.

    python benchmarks/generate.py [--size 7b|tiny] [--batch 1,8] [--prompt-len 128] [--new-tokens 256]
        [--runs 3] [--variants nf4_lora,nf4,bf16] [--baselines bnb4,bnb4_lora,hf_bf16] [--json out.json]

All models have random weights of the chosen shape (LLaMA-7B: 32 layers, 4096 / 11008, vocab 32000);
speed does not depend on the values. The JAX weights are drawn and quantized on the device one layer
at a time (no bf16 7B model ever exists in host memory); the transformers models are initialized on
the GPU in bf16 (for bitsandbytes: saved to a temporary directory, then loaded with
``load_in_4bit``). Every row generates exactly ``--new-tokens`` tokens (no EOS) after a
``--prompt-len`` random prompt, greedy.

Timing: ``prefill`` = prompt forward + first token; ``total`` = a full generate call;
decode ms/token = (total - prefill) / (new_tokens - 1) (per step, whole batch); tokens/s =
batch * new_tokens / total. The floor is the time to read, at the card's peak memory bandwidth,
every weight byte once per decode step plus the average KV cache (``--bandwidth-gbs`` overrides the
table; no floor on CPU). Each backend runs in its own subprocess (JAX preallocates GPU memory).
``--size tiny`` runs on CPU in seconds (a smoke test); baselines needing CUDA are then marked skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Peak HBM bandwidth, GB/s, by device name (substring match, first hit).
BANDWIDTH_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}
JAX_VARIANTS = ("nf4_lora", "nf4", "bf16")
BASELINES = ("bnb4", "bnb4_lora", "hf_bf16")
LORA_R, LORA_ALPHA = 64, 16.0


def model_shape(size: str) -> dict:
    """transformers config keys of the benchmarked architecture."""
    if size == "7b":
        from qlora_jax.models.llama import LlamaConfig

        return LlamaConfig.preset("7b").to_hf_config()
    if size == "tiny":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 256,
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    raise ValueError(f"--size {size!r}: choose 7b or tiny")


def floor_ms(weight_bytes: int, cfg: dict, batch: int, prompt_len: int, new_tokens: int, device: str,
             bandwidth_gbs: float | None) -> float | None:
    """Per-step time to stream the weights once and the average KV cache at peak bandwidth."""
    if bandwidth_gbs is None:
        bandwidth_gbs = next((bw for name, bw in BANDWIDTH_GBS.items() if name in device), None)
    if bandwidth_gbs is None:
        return None
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2  # k and v, bf16
    kv = batch * kv_per_token * (prompt_len + new_tokens / 2)
    return (weight_bytes + kv) / (bandwidth_gbs * 1e9) * 1e3


# --- JAX ------------------------------------------------------------------------------------------------


def build_random_model(cfg_dict: dict, variant: str, seed: int = 0):
    """A :class:`Llama` of this shape with random weights made on the device, one layer at a time."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.models.llama import Llama, LlamaConfig, LoRAConfig, QuantConfig
    from qlora_jax.nf4 import QuantizedTensor, quantize
    from qlora_jax.nf4_dense import Frozen

    cfg = LlamaConfig.from_hf_config(cfg_dict)
    lora = LoRAConfig(r=LORA_R if variant == "nf4_lora" else 0, alpha=LORA_ALPHA)
    quant = QuantConfig(quantize=variant != "bf16")

    def make() -> Llama:
        return Llama(cfg, lora=lora, quant=quant, rngs=nnx.Rngs(seed))

    graphdef, frozen, _ = nnx.split(nnx.eval_shape(make), Frozen, ...)
    rest = jax.jit(lambda: nnx.split(make(), Frozen, ...)[2])()  # adapters; XLA drops the base weights
    if lora.r:  # nonzero B, as after training
        rest = jax.tree.map(lambda x: x + 1e-3 if x.dtype == jnp.float32 else x, rest)
    flat = nnx.to_flat_state(frozen)
    key = jax.random.key(seed)
    values = []
    for n, (path, var) in enumerate(flat):
        abstract = var.get_value()
        k = jax.random.fold_in(key, n)
        if isinstance(abstract, QuantizedTensor):
            L = abstract.packed.shape[0]

            @jax.jit
            def per_layer(keys, qt=abstract):
                return jax.lax.map(lambda kk: quantize(0.02 * jax.random.normal(kk, qt.shape, jnp.bfloat16),
                                                       quant_type=qt.quant_type, blocksize=qt.blocksize,
                                                       double_quant=qt.double_quant), keys)

            value = per_layer(jax.random.split(k, L))
        elif path[-1] == "scale":
            value = jnp.ones(abstract.shape, abstract.dtype)
        else:
            value = jax.jit(lambda kk, a=abstract: (0.02 * jax.random.normal(kk, a.shape, jnp.float32)).astype(a.dtype))(k)
        jax.block_until_ready(value)
        values.append((path, value))
    for path, value in values:
        node = frozen
        for p in path[:-1]:
            node = node[p]
        node[path[-1]].set_value(value)
    model = nnx.merge(graphdef, frozen, rest)
    model.eval()
    return model


def model_bytes(model, *, skip_embeddings: bool) -> int:
    """Bytes a decode step reads: every frozen and LoRA leaf (untied input embeddings only gather rows)."""
    import jax
    from flax import nnx

    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if skip_embeddings and str(path[0]) == "embed_tokens":
            continue
        total += sum(x.nbytes for x in jax.tree.leaves(var.get_value()) if hasattr(x, "nbytes"))
    return total


def run_jax(args) -> list[dict]:
    import jax

    from qlora_jax import kernels
    from qlora_jax.kernels.rms_norm import use_rms_norm

    cfg = model_shape(args.size)
    device = jax.devices()[0].device_kind
    rows = []
    for variant in args.variants:
        t0 = time.perf_counter()
        model = build_random_model(cfg, variant)
        build_s = time.perf_counter() - t0
        nbytes = model_bytes(model, skip_embeddings=not cfg["tie_word_embeddings"])
        grid = [(i, n, a, u, lb, j, d, f, b) for i in args.implementation for n in args.rms_norm
                for a in args.attention for u in args.unroll_layers for lb in args.layer_buffers
                for j in args.join_projections for d in args.dequantize_layers for f in args.fp32_scales
                for b in args.batch]
        for impl, norm, attention, unroll, buffers, join, deq, f32s, batch in grid:
            jax.clear_caches()  # the kernel choice is made while tracing: no trace may be reused across impls
            with kernels.use_implementation(impl), use_rms_norm(norm):
                rows.append(_jax_row(model, variant, impl, attention, unroll, buffers, join, deq, f32s, batch, args,
                                     cfg, device, build_s, nbytes))
                rows[-1]["rms_norm"] = norm
            print(table([rows[-1]]).splitlines()[-1], file=sys.stderr, flush=True)  # progress, if later rows time out
        del model
    return rows


def _jax_row(model, variant: str, impl: str, attention: str, unroll: bool, buffers: bool | None, join: bool,
             deq: bool | None, f32s: bool | None, batch: int, args, cfg: dict, device: str, build_s: float,
             nbytes: int) -> dict:
    """One JAX row: compile, then time prefill and whole generate calls (and profile one, if asked)."""
    import jax
    import numpy as np

    from qlora_jax.generate import Generator, _prefill_jit, SamplingConfig

    gen = Generator(model, eos_token_ids=(), unroll_layers=unroll, layer_buffers=buffers, join_projections=join,
                    dequantize_layers=deq, fp32_scales=f32s, attention=attention)
    prompts = np.random.default_rng(batch).integers(3, cfg["vocab_size"], (batch, args.prompt_len)).tolist()
    kw = dict(max_new_tokens=args.new_tokens, sampling=SamplingConfig(), chunk_size=None)
    t0 = time.perf_counter()
    gen.generate_ids(prompts, **kw)  # compiles prefill and the decode loop
    compile_s = time.perf_counter() - t0
    ids = jax.numpy.asarray(np.asarray(prompts, np.int32))
    mask = jax.numpy.ones_like(ids)

    def prefill():
        return _prefill_jit(gen.graphdef, gen.state, ids, mask, jax.random.key(0), sampling=SamplingConfig(),
                            eos=(), cache_len=args.prompt_len + args.new_tokens, max_new=args.new_tokens,
                            unroll_layers=unroll)

    jax.block_until_ready(prefill())
    prefill_s, total_s = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(prefill())
        prefill_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = gen.generate_ids(prompts, **kw)
        total_s.append(time.perf_counter() - t0)
        assert all(len(c.tokens) == args.new_tokens for c in out)
    plan = gen.decode_plan(batch)
    extra = {"build_s": build_s, "compile_s": compile_s, "unroll_layers": unroll, "layer_buffers": plan["layer_buffers"],
             "join_projections": join and plan["layer_buffers"],
             "dequantized_layers": plan["dequantize_layers"] and model.quant.quantize,
             "fp32_scales": plan["fp32_scales"] and model.quant.quantize,
             "implementation": impl, "attention": attention}
    if args.profile:
        trace = Path(args.profile) / (f"{variant}_{impl}_att-{attention}_b{batch}_unroll{int(unroll)}"
                                      f"_buffers{int(extra['layer_buffers'])}"
                                      f"_join{int(extra['join_projections'])}_deq{int(extra['dequantized_layers'])}"
                                      f"_f32s{int(extra['fp32_scales'])}")
        with jax.profiler.trace(str(trace)):
            gen.generate_ids(prompts, **kw)
        from benchmarks.profile_summary import summarize

        extra["profile"] = summarize(trace, steps=args.new_tokens, top=40)
    return _row("qlora_jax", variant, batch, args, device, statistics.median(prefill_s),
                statistics.median(total_s), nbytes, cfg, extra=extra)


# --- transformers baselines -----------------------------------------------------------------------------


def run_torch(args) -> list[dict]:
    cfg = model_shape(args.size)
    rows = []
    try:
        import torch
        import transformers
    except ImportError as e:
        return [_skipped(b, args, f"import failed: {e}") for b in args.baselines]
    if not torch.cuda.is_available():
        return [_skipped(b, args, "needs CUDA (no GPU visible to torch)") for b in args.baselines]
    device = torch.cuda.get_device_name(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})

    def random_bf16():
        torch.manual_seed(0)
        with torch.device("cuda"):
            return transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16).eval()

    def add_lora(model):
        import peft

        pm = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"],
                                                        task_type="CAUSAL_LM"))
        return pm.eval()

    for name in args.baselines:
        try:
            if name == "hf_bf16":
                model = random_bf16()
            else:
                import bitsandbytes  # noqa: F401

                with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
                    random_bf16().save_pretrained(tmp)
                    torch.cuda.empty_cache()
                    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
                    model = transformers.LlamaForCausalLM.from_pretrained(tmp, quantization_config=q, device_map="cuda").eval()
                if name == "bnb4_lora":
                    model = add_lora(model)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            rows.append(_skipped(name, args, f"{type(e).__name__}: {e}"))
            continue
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        nbytes -= 0 if cfg["tie_word_embeddings"] else cfg["vocab_size"] * cfg["hidden_size"] * 2
        for batch in args.batch:
            ids = torch.randint(3, cfg["vocab_size"], (batch, args.prompt_len), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(batch))

            def gen(n):
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                return out

            gen(8)  # warm up
            prefill_s, total_s = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                gen(1)
                prefill_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = gen(args.new_tokens)
                total_s.append(time.perf_counter() - t0)
                assert out.shape[1] == args.prompt_len + args.new_tokens
            rows.append(_row("transformers", name, batch, args, device, statistics.median(prefill_s),
                             statistics.median(total_s), nbytes, cfg))
        del model
        torch.cuda.empty_cache()
    return rows


# --- rows, table, driver --------------------------------------------------------------------------------


def _row(impl, variant, batch, args, device, prefill_s, total_s, nbytes, cfg, extra=None) -> dict:
    decode_ms = (total_s - prefill_s) / max(args.new_tokens - 1, 1) * 1e3
    fl = floor_ms(nbytes, cfg, batch, args.prompt_len, args.new_tokens, device, args.bandwidth_gbs)
    return {"impl": impl, "variant": variant, "status": "ok", "device": device, "batch": batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_ms": prefill_s * 1e3,
            "total_s": total_s, "decode_ms_per_step": decode_ms, "tokens_per_s": batch * args.new_tokens / total_s,
            "decode_tokens_per_s": batch / decode_ms * 1e3, "weight_bytes": nbytes, "floor_ms": fl,
            "x_floor": None if fl is None else decode_ms / fl, **(extra or {})}


def _skipped(variant: str, args, reason: str) -> dict:
    return {"impl": "transformers", "variant": variant, "status": "skipped", "reason": reason}


def table(rows: list[dict]) -> str:
    lines = ["| impl | variant | batch | prefill ms | decode ms/step | tokens/s | floor ms | x floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | {r['variant']} | - | skipped: {r['reason'][:80]} | | | | |")
            continue
        fl = "n/a" if r["floor_ms"] is None else f"{r['floor_ms']:.2f}"
        xf = "n/a" if r["x_floor"] is None else f"{r['x_floor']:.1f}x"
        variant = r["variant"] + (" (layers unrolled)" if r.get("unroll_layers") else "") + \
            (" (layer buffers)" if r.get("layer_buffers") else "") + (" (joined q/k/v, gate/up)" if r.get("join_projections") else "") + \
            (" (dequantized)" if r.get("dequantized_layers") else "") + (" (fp32 scales)" if r.get("fp32_scales") else "")
        if r.get("implementation", "auto") != "auto":
            variant += f" [{r['implementation']}]"
        if r.get("attention", "auto") != "auto":
            variant += f" [attention: {r['attention']}]"
        if r.get("rms_norm", "auto") != "auto":
            variant += f" [rms norm: {r['rms_norm']}]"
        lines.append(f"| {r['impl']} | {variant} | {r['batch']} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | {fl} | {xf} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="7b", choices=("7b", "tiny"))
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3, help="timed repetitions (median)")
    ap.add_argument("--variants", default=",".join(JAX_VARIANTS), help=f"JAX variants: {JAX_VARIANTS}")
    ap.add_argument("--baselines", default=",".join(BASELINES), help=f"transformers baselines: {BASELINES} ('' for none)")
    ap.add_argument("--bandwidth-gbs", type=float, help="peak memory bandwidth for the floor (default: by card name)")
    ap.add_argument("--json", type=Path, default=Path("generate.json"))
    ap.add_argument("--tmp-dir", help="where the bitsandbytes baseline writes its temporary bf16 checkpoint (created)")
    ap.add_argument("--implementation", default="auto",
                    help="comma-separated qlora_jax.kernels implementations to decode with (e.g. auto,gemv,xla_reduce)")
    ap.add_argument("--attention", default="auto",
                    help="comma-separated Generator(attention=) values for the decode attention (auto,xla,pallas)")
    ap.add_argument("--rms-norm", default="auto",
                    help="comma-separated qlora_jax.kernels.rms_norm.use_rms_norm values for the norms (auto,xla,pallas)")
    ap.add_argument("--unroll-layers", default="1", help="comma-separated 0/1: decode with the layer loop unrolled")
    ap.add_argument("--layer-buffers", default="auto",
                    help="comma-separated 0/1/auto: Generator(layer_buffers=): layer weights sliced once per decode "
                         "call (auto: when the device has room)")
    ap.add_argument("--join-projections", default="1",
                    help="comma-separated 0/1: Generator(join_projections=): q/k/v and gate/up joined with layer buffers")
    ap.add_argument("--dequantize-layers", default="auto",
                    help="comma-separated 0/1/auto: Generator(dequantize_layers=): 4-bit weights dequantized into the "
                         "layer buffers (auto: from DEQUANTIZE_MIN_BATCH rows on, when the device has room)")
    ap.add_argument("--fp32-scales", default="auto",
                    help="comma-separated 0/1/auto: Generator(fp32_scales=): 4-bit layer buffers with their block "
                         "scales decoded to fp32 (auto: when the device has room)")
    ap.add_argument("--profile", help="write a profiler trace of one generate call per JAX row here; rows get a summary")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    args.baselines = [b for b in args.baselines.split(",") if b]
    args.unroll_layers = [bool(int(u)) for u in args.unroll_layers.split(",") if u]
    args.layer_buffers = [None if u == "auto" else bool(int(u)) for u in args.layer_buffers.split(",") if u]
    args.implementation = [i for i in args.implementation.split(",") if i]
    args.attention = [a for a in args.attention.split(",") if a]
    args.rms_norm = [n for n in args.rms_norm.split(",") if n]
    args.join_projections = [bool(int(j)) for j in args.join_projections.split(",") if j]
    args.dequantize_layers = [None if d == "auto" else bool(int(d)) for d in args.dequantize_layers.split(",") if d]
    args.fp32_scales = [None if f == "auto" else bool(int(f)) for f in args.fp32_scales.split(",") if f]
    if args.tmp_dir:
        Path(args.tmp_dir).mkdir(parents=True, exist_ok=True)
    bad = (set(args.variants) - set(JAX_VARIANTS)) | (set(args.baselines) - set(BASELINES))
    if bad:
        ap.error(f"unknown variants/baselines {sorted(bad)}")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")

    if args.worker:
        rows = run_jax(args) if args.worker == "jax" else run_torch(args)
        args.worker_out.write_text(json.dumps(rows))
        return 0

    rows: list[dict] = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for worker, wanted in (("jax", args.variants), ("torch", args.baselines)):
        if not wanted:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", worker, "--worker-out", str(out)]
            print(f"[{worker}] running ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, cwd=REPO)
            if proc.returncode != 0 or not out.is_file():
                names = wanted if worker == "torch" else [f"jax:{v}" for v in wanted]
                rows += [{"impl": worker, "variant": n, "status": "skipped",
                          "reason": f"worker exited with code {proc.returncode} (see its stderr above)"} for n in names]
                continue
            rows += json.loads(out.read_text())
    print(table(rows))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "argv": sys.argv if argv is None else ["benchmarks/generate.py", *argv], "size": args.size,
            "config": model_shape(args.size), "lora": {"r": LORA_R, "alpha": LORA_ALPHA}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
