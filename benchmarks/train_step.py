"""Train-step benchmark: QLoRA's full training step at LLaMA sizes on one device or a mesh of several.

    PYTHONPATH=. python3 benchmarks/train_step.py --size 7b --batch 4x512,1x2048 [--weights nf4,bf16]
        [--mesh 1x1,2x1,1x2] [--global-batch]
        [--steps 10] [--warmup 2] [--remat full] [--paged auto|on|off | --unpaged] [--page-size N] [--mem-limit-gb 48 [--card-mem-gb 141]]
        [--profile DIR] [--timeout 300] [--budget-s 480] [--no-fallback-unpaged] [--json out.json]

``--mesh DATAxFSDP[,...]`` runs the same step on ``DATA * FSDP`` devices of this host (the first
ones), with ``train.py``'s sharding (:mod:`qlora_jax.sharding`: batch over all devices; NF4 codes,
LoRA and optimizer state over ``fsdp``, each layer's weights gathered inside the layer loop); the
frozen weights, the LoRA adapters and the optimizer state are all created directly sharded
(``build_random_model(mesh=)``, ``qlora_jax.trainer.init_optimizer``), so no device ever holds a whole
copy of a sharded leaf and the measured peak is the step's. ``--batch`` is per device (the global batch is
``B * DATA * FSDP`` rows: weak scaling) unless ``--global-batch``. A 1x1 row is always run as the
reference: each mesh row reports tokens/s of the whole step (global), the speed-up over the 1x1
row of the same weights and per-device batch (``scaling``, and ``/ devices`` as efficiency), and
the per-device peak memory (the max over the mesh's devices of ``peak_bytes_in_use``) next to the
planner's per-device prediction.

The model is a LLaMA of the named shape (``tiny`` for CPU tests, ``7b``, ``13b``, ``33b``, ``65b``:
the original LLaMA dimensions, vocab 32000) with random frozen weights built on the device layer
by layer (:func:`qlora_jax.models.random_init.build_random_model`: NF4 + double quantization,
or bf16 weights for ``--weights bf16``), LoRA r=64 / alpha 16 / dropout 0.05 on all seven
projections, and the training step of ``train.py`` itself: ``make_train_step`` +
``make_optimizer`` (paged AdamW) of :mod:`qlora_jax.trainer` on a ``TrainConfig``, grad_accum 1,
gradient checkpointing (``--remat``, default ``full``). Batches are random token ids, labels =
ids, a full attention mask (what ``train.py`` feeds, minus padding).

Each configuration (weights x batch) runs in its own process, so its peak device memory
(``peak_bytes_in_use`` of the runtime's allocator) is its own and an OOM costs one row. Reported:
median step time over ``--steps`` timed steps after ``--warmup`` (each step waited on), tokens/s,
compile time (lower + compile of the step), peak device memory, XLA's compile-time estimate
(arguments + outputs + temporaries - aliased), and the memory planner's prediction
(:mod:`qlora_jax.memory`). ``--mem-limit-gb`` caps the process's device pool (GiB) by setting
``XLA_PYTHON_CLIENT_MEM_FRACTION`` = limit / card memory with preallocation on, before JAX starts.
A paged configuration that fails other than by OOM is retried once with the optimizer state on the
device (row ``...-unpaged``), since paged AdamW's host offload is the least-tested piece on GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    GiB, add_runner_args, child_main, fmt, gib, gpu_total_bytes, meta, parse_batches, print_table, run_configs,
    write_json,
)

SIZES = ("tiny", "7b", "13b", "33b", "65b")
WEIGHTS = ("nf4", "bf16")


def model_config(size: str):
    """The :class:`LlamaConfig` of a size name (``tiny``: 2 layers, d=64, vocab 512)."""
    from qlora_jax.models.llama import LlamaConfig

    if size == "tiny":
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    return LlamaConfig.preset(size)


def parse_meshes(text: str) -> list[tuple[int, int]]:
    """``"2x1,1x2"`` -> ``[(1, 1), (2, 1), (1, 2)]``: the meshes, with the 1x1 reference first."""
    out: list[tuple[int, int]] = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            d, f = (int(x) for x in item.split("x"))
        except ValueError:
            raise SystemExit(f"error: --mesh {item!r} is not of the form DATAxFSDP (e.g. 2x1, 1x4)") from None
        if d < 1 or f < 1:
            raise SystemExit(f"error: --mesh {item!r} needs DATA >= 1 and FSDP >= 1")
        if (d, f) not in out:
            out.append((d, f))
    return [(1, 1)] + [m for m in out if m != (1, 1)]


def train_config(c: dict[str, Any]):
    """The ``TrainConfig`` of one benchmark configuration (what ``train.py`` would run); ``c["batch"]``
    is the global batch."""
    from qlora_jax.data import DataConfig
    from qlora_jax.train_config import (
        LoRASection, MeshSection, ModelSection, OptimSection, TrainConfig, TrainSection,
    )

    return TrainConfig(
        model=ModelSection(path=f"random:{c['size']}", quantize=c["weights"] == "nf4", quant_type="nf4",
                           blocksize=64, double_quant=True, compute_dtype="bfloat16", remat=c["remat"]),
        lora=LoRASection(r=c["lora_r"], alpha=16.0, dropout=c["lora_dropout"],
                         param_dtype=c.get("lora_dtype", "float32")),
        data=DataConfig(dataset="random", source_max_len=1, target_max_len=c["seq"] - 1, batch_size=c["batch"],
                        eval_batch_size=c["batch"]),
        optim=OptimSection(learning_rate=2e-4, schedule="constant", warmup_ratio=0.0, max_grad_norm=0.3,
                           paged=c["paged"], page_size=c.get("page_size", 0)),
        train=TrainSection(steps=max(1, c["warmup"] + c["steps"]), grad_accum=1, seed=0),
        mesh=MeshSection(data=c.get("mesh", (1, 1))[0], fsdp=c.get("mesh", (1, 1))[1], distributed="off"),
    )


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_one(c: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (child) process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qlora_jax.memory import format_plan, inputs_from_train_config, plan
    from qlora_jax.models.random_init import build_random_model
    from qlora_jax.trainer import (
        init_optimizer, lora_config, make_optimizer, make_train_step, resolve_paging, resolve_remat, step_shardings,
    )

    dev = jax.devices()[0]
    data, fsdp = c.get("mesh", (1, 1))
    n_dev = data * fsdp
    if n_dev > len(jax.devices()):
        raise RuntimeError(f"mesh {data}x{fsdp} needs {n_dev} devices; this host has {len(jax.devices())} "
                           f"({dev.platform})")
    devices = jax.devices()[:n_dev]
    _log(f"[{c['name']}] device {dev.device_kind} ({jax.default_backend()}) x {n_dev}, jax {jax.__version__}, "
         f"XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '-')}")
    cfg = model_config(c["size"])
    tc = train_config(c)
    quant = tc.model.quant_config()
    B, T = c["batch"], c["seq"]  # the global batch
    lora = lora_config(tc)
    result: dict[str, Any] = {**c, "status": "error", "devices": n_dev, "device": dev.device_kind,
                              "backend": jax.default_backend(), "jax": jax.__version__}

    mesh = None
    if n_dev > 1:
        from qlora_jax import sharding as shd

        mesh = shd.make_mesh(data, fsdp, devices)
    t0 = time.perf_counter()
    model = build_random_model(cfg, lora=lora, quant=quant, remat=tc.model.build_remat, seed=0, mesh=mesh)
    jax.block_until_ready(nnx.state(model))
    result["build_s"] = time.perf_counter() - t0
    _log(f"[{c['name']}] built random {c['weights']} model in {result['build_s']:.1f}s")
    # what train.py decides for this model on this device (per device on a mesh)
    tc = resolve_remat(resolve_paging(tc, model), model)
    c = {**c, "paged": tc.optim.paged, "remat": tc.model.remat}
    p = inputs_from_train_config(tc, cfg, seq=T)
    planned = plan(p)  # per device
    result.update(paged=c["paged"], remat=c["remat"], planned_bytes=planned["total"], plan=planned)
    model.train()  # LoRA dropout on, as in train.py
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    del model
    tx = make_optimizer(tc)
    opt_state = init_optimizer(tx, lora_state, mesh)  # train.py's: born sharded on a mesh
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones((B, T), np.int32)}  # host: placed below
    if mesh is None:
        batch = jax.tree.map(jnp.asarray, batch)
        step_fn = make_train_step(graphdef, tx, tc)
    else:  # train.py's multi-device step (qlora_jax.trainer.train)
        shd.check_batch(B, mesh)
        shardings = step_shardings(lora_state, opt_state, rest, mesh)  # the layouts the state was born in
        batch = jax.device_put(batch, shardings[3])
        step_fn = make_train_step(graphdef, tx, tc, shardings)
    key = jax.random.key(tc.train.seed)

    t0 = time.perf_counter()
    lowered = step_fn.lower(lora_state, opt_state, rest, batch, 0, key)
    result["lower_s"] = time.perf_counter() - t0
    compiled = lowered.compile()
    result["compile_s"] = time.perf_counter() - t0
    _log(f"[{c['name']}] compiled in {result['compile_s']:.1f}s (lowering {result['lower_s']:.1f}s)")
    try:
        ma = compiled.memory_analysis()
        est = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
        result["xla_estimate_bytes"] = int(est)
        result["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
    except Exception as e:  # not every backend reports it
        _log(f"[{c['name']}] no compile-time memory analysis: {e}")

    times, losses = [], []
    total = c["warmup"] + c["steps"]
    for i in range(total):
        t0 = time.perf_counter()
        lora_state, opt_state, m = compiled(lora_state, opt_state, rest, batch, i, key)
        jax.block_until_ready((lora_state, opt_state, m))  # the whole step, optimizer update included
        loss = float(m["loss"])
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= c["warmup"]:
            times.append(dt)
        _log(f"[{c['name']}] step {i + 1}/{total}{' (warm-up)' if i < c['warmup'] else ''}: {dt:.4f}s loss {loss:.4f}")
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")

    if c.get("profile"):
        out = Path(c["profile"]) / c["name"]
        out.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(out)):
            for i in range(3):
                lora_state, opt_state, m = compiled(lora_state, opt_state, rest, batch, total + i, key)
                jax.block_until_ready(m["loss"])
        result["profile_dir"] = str(out)
        _log(f"[{c['name']}] profiler trace in {out}")

    stats = [d.memory_stats() or {} for d in devices]
    peaks = [st.get("peak_bytes_in_use") for st in stats]
    med = statistics.median(times)
    result.update(
        status="ok", step_s=med, mean_step_s=statistics.fmean(times), min_step_s=min(times), step_times=times,
        tokens_per_s=B * T / med, loss_first=losses[0], loss_last=losses[-1],
        # per device: the max over the mesh's devices (one device: its own)
        peak_bytes=max(peaks) if all(x is not None for x in peaks) else None, peak_bytes_per_device=peaks,
        bytes_limit=stats[0].get("bytes_limit"), bytes_in_use=stats[0].get("bytes_in_use"),
    )
    _log(format_plan(p, planned, measured=result["peak_bytes"]))
    _log(f"[{c['name']}] median {med:.4f}s/step, {result['tokens_per_s']:.0f} tok/s (global, {n_dev} device"
         f"{'s' if n_dev > 1 else ''}), peak {gib(result['peak_bytes'])} GiB per device "
         f"(limit {gib(result['bytes_limit'])} GiB)")
    return result


def _ratio(a: Any, b: Any) -> str:
    return "-" if a is None or b is None or b == 0 else f"{100 * (a / b - 1):+.0f}%"


def add_scaling(results: list[dict[str, Any]]) -> None:
    """``scaling`` (tokens/s over the 1x1 row of the same weights, per-device batch, sequence and
    requested paging) and ``efficiency`` (scaling / devices) on every ok row that has such a reference."""
    def key(r: dict[str, Any]) -> tuple:
        return r["weights"], r["device_batch"], r["seq"], r.get("paged_setting", r["paged"])

    refs = {key(r): r for r in results if r["status"] == "ok" and tuple(r.get("mesh", (1, 1))) == (1, 1)}
    for r in results:
        ref = refs.get(key(r))
        if r["status"] == "ok" and ref is not None:
            n = r["mesh"][0] * r["mesh"][1]
            r["scaling"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["efficiency"] = r["scaling"] / n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from qlora_jax.train_config import REMAT_CHOICES  # train.py's model.remat values (imports jax; no device use)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="7b")
    ap.add_argument("--batch", default="4x512", help="comma-separated BxT, e.g. 4x512,1x2048")
    ap.add_argument("--weights", default="nf4", help="comma-separated: nf4 (QLoRA) and/or bf16 (16-bit LoRA)")
    ap.add_argument("--mesh", default="1x1", help="comma-separated DATAxFSDP meshes of this host's devices, e.g. "
                    "2x1,1x2 (a 1x1 reference row is always added)")
    ap.add_argument("--global-batch", action="store_true",
                    help="--batch is the global batch of every mesh (strong scaling); default: per device")
    ap.add_argument("--bf16", action="store_true", help="shorthand for --weights bf16")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--remat", default="full", choices=REMAT_CHOICES,
                    help="remat policy (auto: train.py's choice, the fastest whose plan fits the device)")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="LoRA A/B storage (bfloat16: fp32 master copy in the optimizer)")
    ap.add_argument("--paged", choices=("auto", "on", "off"), default="auto",
                    help="Adam state: paged from host memory (on), on the device (off), or train.py's choice (auto)")
    ap.add_argument("--unpaged", action="store_true", help="same as --paged off")
    ap.add_argument("--page-size", type=int, default=0,
                    help="optim.page_size: elements of one moment per page (0: one page per LoRA leaf, train.py's default)")
    ap.add_argument("--no-fallback-unpaged", dest="fallback_unpaged", action="store_false",
                    help="do not retry a failed (non-OOM) paged configuration with the state on the device")
    ap.add_argument("--mem-limit-gb", type=float, help="cap the device pool at this many GiB (preallocated)")
    ap.add_argument("--card-mem-gb", type=float, help="card memory in GiB (default: nvidia-smi)")
    ap.add_argument("--profile", help="write a jax profiler trace of 3 extra steps per configuration here")
    add_runner_args(ap)
    args = ap.parse_args(argv)
    if args._child:
        return child_main(run_one, args._child, args._out)

    weights = ["bf16"] if args.bf16 else [w.strip() for w in args.weights.split(",") if w.strip()]
    bad = set(weights) - set(WEIGHTS)
    if bad or not weights:
        raise SystemExit(f"error: --weights {args.weights!r}: choose from {WEIGHTS}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps must be >= 1 and --warmup >= 0")
    env: dict[str, str] = {}
    if args.mem_limit_gb:
        total = args.card_mem_gb * GiB if args.card_mem_gb else gpu_total_bytes()
        if not total:
            raise SystemExit("error: --mem-limit-gb needs the card's memory: nvidia-smi failed, pass --card-mem-gb")
        frac = args.mem_limit_gb * GiB / total
        if not 0 < frac <= 1:
            raise SystemExit(f"error: --mem-limit-gb {args.mem_limit_gb} is more than the card's {total / GiB:.1f} GiB")
        env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{frac:.4f}", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
        print(f"device pool capped at {args.mem_limit_gb} GiB: XLA_PYTHON_CLIENT_MEM_FRACTION={frac:.4f} "
              f"of {total / GiB:.1f} GiB", flush=True)

    meshes = parse_meshes(args.mesh)
    configs = []
    for w in weights:
        for b, t in parse_batches(args.batch):
            for d, f in meshes:
                n = d * f
                if args.global_batch and b % n:
                    raise SystemExit(f"error: --global-batch: batch {b} does not split over mesh {d}x{f} ({n} devices)")
                batch = b if args.global_batch else b * n
                paged = False if args.unpaged else {"auto": "auto", "on": True, "off": False}[args.paged]
                configs.append(dict(
                    name=f"jax-{w}-{args.size}-{b}x{t}" + (f"-mesh{d}x{f}" if n > 1 else "")
                    + ("-lora-bf16" if args.lora_dtype == "bfloat16" else ""), impl="jax",
                    size=args.size, weights=w, batch=batch, device_batch=batch // n, seq=t, mesh=[d, f],
                    steps=args.steps, warmup=args.warmup, remat=args.remat, lora_r=args.lora_r,
                    lora_dropout=args.lora_dropout, lora_dtype=args.lora_dtype, paged=paged, paged_setting=paged,
                    page_size=args.page_size,
                    mem_limit_gb=args.mem_limit_gb,
                    profile=args.profile,
                ))
    def unpaged_retry(c: dict[str, Any], r: dict[str, Any]) -> dict[str, Any] | None:
        # Host offload is the newest part of the stack: one failure there must not cost the run's
        # numbers. Same configuration with the optimizer state on the device, reported as its own row.
        if r["status"] in ("error", "crashed") and r.get("paged", c["paged"]) and args.fallback_unpaged:
            return {**c, "name": c["name"] + "-unpaged", "paged": False, "paged_setting": False}
        return None

    results = run_configs(Path(__file__).resolve(), configs, timeout=args.timeout, budget_s=args.budget_s,
                          env=env, retry=unpaged_retry)
    add_scaling(results)

    columns = [("config", lambda r: r["name"]), ("status", lambda r: r["status"]),
               ("Adam state", lambda r: {True: "paged", False: "device"}.get(r.get("paged"), str(r.get("paged")))),
               ("remat", lambda r: r.get("remat", "-"))]
    if len(meshes) > 1:
        columns += [("mesh", lambda r: "x".join(map(str, r["mesh"]))), ("global batch", lambda r: f"{r['batch']}x{r['seq']}")]
    columns += [("s/step", lambda r: fmt(r.get("step_s"), ".4f")), ("tok/s", lambda r: fmt(r.get("tokens_per_s"), ",.0f"))]
    if len(meshes) > 1:
        columns += [("scaling", lambda r: fmt(r.get("scaling"), ".2f") + ("x" if r.get("scaling") else "")),
                    ("efficiency", lambda r: fmt(100 * r["efficiency"], ".0f") + "%" if r.get("efficiency") else "-")]
    columns += [("compile s", lambda r: fmt(r.get("compile_s"), ".1f")),
                ("peak GiB" + (" /GPU" if len(meshes) > 1 else ""), lambda r: gib(r.get("peak_bytes"))),
                ("XLA est. GiB", lambda r: gib(r.get("xla_estimate_bytes"))),
                ("plan GiB", lambda r: gib(r.get("planned_bytes"))),
                ("plan vs peak", lambda r: _ratio(r.get("planned_bytes"), r.get("peak_bytes")))]
    table = print_table(
        f"train step, {args.size}, remat={args.remat}"
        + (f", device pool {args.mem_limit_gb} GiB" if args.mem_limit_gb else "")
        + (f", meshes {','.join(f'{d}x{f}' for d, f in meshes)} ({'global' if args.global_batch else 'per-device'} "
           "batch; tok/s global, peak and plan per device)" if len(meshes) > 1 else ""),
        results, columns,
    )
    write_json(args.json, {"meta": meta(argv), "benchmark": "train_step", "results": results, "table": table})
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
