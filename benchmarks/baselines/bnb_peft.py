"""The reference train step: PyTorch + bitsandbytes (NF4, double quant) + PEFT LoRA, as the QLoRA
paper's code trains, at the same shapes and batches as ``benchmarks/train_step.py``.

    PYTHONPATH=. python3 benchmarks/baselines/bnb_peft.py --size 7b --batch 4x512,1x2048 [--weights nf4,bf16]
        [--steps 10] [--warmup 2] [--device cuda] [--timeout 300] [--budget-s 300] [--json out.json]

The model is transformers' ``LlamaForCausalLM`` of the same dimensions, built on the meta device and
materialized on the target device one module at a time with random weights (N(0, 0.02), bf16): each
linear projection of each layer is drawn on the device and quantized there by ``bnb.nn.Linear4bit``
(NF4, ``compress_statistics=True`` = double quantization, blocksize 64, bf16 compute), so no full
16-bit copy of the model ever exists. Then PEFT ``LoraConfig(r=64, lora_alpha=16,
lora_dropout=0.05)`` on all seven projections (fp32 adapters, as PEFT makes them),
``gradient_checkpointing_enable`` (non-reentrant), bf16 autocast (what HF ``Trainer(bf16=True)``
does), gradient clipping at 0.3 and ``bnb.optim.PagedAdamW32bit``. ``--weights bf16`` is the 16-bit
LoRA baseline: bf16 base weights, the same PEFT adapters, ``torch.optim.AdamW`` (fused on CUDA).

Reported per configuration, each in its own process: median s/step over ``--steps`` after
``--warmup``, tokens/s, peak ``torch.cuda.max_memory_allocated``, ``max_memory_reserved`` and the
device-wide used memory (``torch.cuda.mem_get_info``: total - free, CUDA context, cached blocks and
resident paged-optimizer pages included) after the last step.

bitsandbytes is imported only for ``nf4`` rows; without it they report a clear error and the
bf16 rows still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks._common import (  # noqa: E402
    add_runner_args, child_main, fmt, gib, meta, parse_batches, print_table, run_configs, write_json,
)

SIZES = ("tiny", "7b", "13b", "33b", "65b")
WEIGHTS = ("nf4", "bf16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT_STD = 0.02
MISSING_BNB = ("bitsandbytes is not installed in this Python ({python}); install the carried wheel with "
               "`pip install --no-deps .wheels/bitsandbytes-0.50.2-*.whl` (NF4 rows need it)")


def hf_config(size: str, seq: int):
    """transformers' ``LlamaConfig`` with the dimensions of ``benchmarks/train_step.py``'s sizes."""
    from transformers import LlamaConfig

    from benchmarks.train_step import model_config

    c = model_config(size)
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=max(c.max_position_embeddings, seq), rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=False, use_cache=False, pad_token_id=0,
        attn_implementation="sdpa",
    )


def build_model(size: str, seq: int, weights: str, device: str):
    """``LlamaForCausalLM`` on ``device`` with random weights; linear layers NF4 (bnb) or bf16."""
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    cfg = hf_config(size, seq)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    dev = torch.device(device)
    bf16 = torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=bf16) * INIT_STD

    def linear(in_f: int, out_f: int) -> nn.Module:
        if weights == "bf16":
            lin = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=bf16)
            lin.weight = nn.Parameter(randn(out_f, in_f), requires_grad=False)
            return lin
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=bf16, compress_statistics=True,
                                quant_type="nf4", device="meta")
        lin.weight = bnb.nn.Params4bit(randn(out_f, in_f), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", blocksize=64, module=lin).to(dev)
        return lin

    def norm() -> nn.Module:
        return modeling_llama.LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(device=dev, dtype=bf16)

    with torch.no_grad():
        emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta", dtype=bf16)
        emb.weight = nn.Parameter(randn(cfg.vocab_size, cfg.hidden_size))
        model.model.embed_tokens = emb
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in TARGETS:
                    old = getattr(parent, name, None)
                    if old is not None:
                        setattr(parent, name, linear(old.in_features, old.out_features))
                        torch.cuda.empty_cache() if dev.type == "cuda" else None
            layer.input_layernorm = norm()
            layer.post_attention_layernorm = norm()
        model.model.norm = norm()
        head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta", dtype=bf16)
        head.weight = nn.Parameter(randn(cfg.vocab_size, cfg.hidden_size))
        model.lm_head = head
        with dev:  # its inv_freq buffer is computed at construction (the meta copy holds no values)
            model.model.rotary_emb = modeling_llama.LlamaRotaryEmbedding(config=cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors left on the meta device after materializing: {left[:10]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_one(c: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (child) process."""
    import torch

    device = c["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    if c["weights"] == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(MISSING_BNB.format(python=sys.executable))
    import peft
    import transformers

    result: dict[str, Any] = {**c, "status": "error", "torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft.__version__}
    if c["weights"] == "nf4":
        import bitsandbytes as bnb

        result["bitsandbytes"] = bnb.__version__
    cuda = device == "cuda"
    if cuda:
        result["device"] = torch.cuda.get_device_name(0)
    print(f"[{c['name']}] torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
          f"{', bitsandbytes ' + result['bitsandbytes'] if 'bitsandbytes' in result else ''} on {result.get('device', device)}",
          flush=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(c["size"], c["seq"], c["weights"], device)
    result["build_s"] = time.perf_counter() - t0
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    print(f"[{c['name']}] built random {c['weights']} model in {result['build_s']:.1f}s "
          f"(attention: {result['attn_implementation']})", flush=True)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lcfg = peft.LoraConfig(r=c["lora_r"], lora_alpha=16, lora_dropout=c["lora_dropout"], target_modules=TARGETS,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["lora_params"] = sum(p.numel() for p in params)
    result["lora_dtype"] = str(params[0].dtype)
    if c["weights"] == "nf4":
        import bitsandbytes as bnb

        try:
            opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            result["optimizer"] = "bnb.optim.PagedAdamW32bit"
        except Exception as e:  # paged optimizers need CUDA; the CPU smoke mode falls back
            if cuda:
                raise
            print(f"[{c['name']}] PagedAdamW32bit unavailable on {device} ({e}); using torch AdamW", flush=True)
            opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
            result["optimizer"] = "torch.optim.AdamW (CPU fallback)"
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)
        result["optimizer"] = "torch.optim.AdamW" + (" (fused)" if cuda else "")

    B, T = c["batch"], c["seq"]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    total = c["warmup"] + c["steps"]
    for i in range(total):
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        sync()
        dt = time.perf_counter() - t0
        losses.append(value)
        if i >= c["warmup"]:
            times.append(dt)
        print(f"[{c['name']}] step {i + 1}/{total}{' (warm-up)' if i < c['warmup'] else ''}: {dt:.4f}s loss {value:.4f}",
              flush=True)
    if not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    med = statistics.median(times)
    result.update(status="ok", step_s=med, mean_step_s=statistics.fmean(times), min_step_s=min(times), step_times=times,
                  tokens_per_s=B * T / med, loss_first=losses[0], loss_last=losses[-1])
    if cuda:
        free, total_mem = torch.cuda.mem_get_info()
        result.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                      device_used_bytes=total_mem - free, card_bytes=total_mem)
    print(f"[{c['name']}] median {med:.4f}s/step, {result['tokens_per_s']:.0f} tok/s, peak allocated "
          f"{gib(result.get('peak_bytes'))} GiB, device-wide used {gib(result.get('device_used_bytes'))} GiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="7b")
    ap.add_argument("--batch", default="4x512", help="comma-separated BxT, e.g. 4x512,1x2048")
    ap.add_argument("--weights", default="nf4", help="comma-separated: nf4 (bitsandbytes QLoRA) and/or bf16 (16-bit LoRA)")
    ap.add_argument("--bf16", action="store_true", help="shorthand for --weights bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    add_runner_args(ap)
    args = ap.parse_args(argv)
    if args._child:
        return child_main(run_one, args._child, args._out)

    weights = ["bf16"] if args.bf16 else [w.strip() for w in args.weights.split(",") if w.strip()]
    if not weights or set(weights) - set(WEIGHTS):
        raise SystemExit(f"error: --weights {args.weights!r}: choose from {WEIGHTS}")
    if "nf4" in weights and importlib.util.find_spec("bitsandbytes") is None:
        print("WARNING: " + MISSING_BNB.format(python=sys.executable), flush=True)
    configs = []
    for w in weights:
        impl = "bnb-peft" if w == "nf4" else "torch-bf16-peft"
        for b, t in parse_batches(args.batch):
            configs.append(dict(name=f"{impl}-{args.size}-{b}x{t}", impl=impl, size=args.size, weights=w, batch=b,
                                seq=t, steps=args.steps, warmup=args.warmup, lora_r=args.lora_r,
                                lora_dropout=args.lora_dropout, device=args.device))
    results = run_configs(Path(__file__).resolve(), configs, timeout=args.timeout, budget_s=args.budget_s)
    table = print_table(
        f"PyTorch train step (bitsandbytes + PEFT / bf16 + PEFT), {args.size}, gradient checkpointing",
        results,
        [("config", lambda r: r["name"]), ("status", lambda r: r["status"]),
         ("s/step", lambda r: fmt(r.get("step_s"), ".4f")), ("tok/s", lambda r: fmt(r.get("tokens_per_s"), ",.0f")),
         ("peak alloc GiB", lambda r: gib(r.get("peak_bytes"))),
         ("reserved GiB", lambda r: gib(r.get("peak_reserved_bytes"))),
         ("device used GiB", lambda r: gib(r.get("device_used_bytes")))],
    )
    write_json(args.json, {"meta": meta(argv), "benchmark": "train_step_torch", "results": results, "table": table})
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
