"""Child process of tests/test_mesh.py (needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set
before jax starts): first the layout of the state that train.py's and the benchmark's initialization
create on a 1x8 mesh (:func:`init_layout`), then stories260K fine-tunes on several meshes and
across-mesh resumes; prints JSON.

Usage: python tests/_mesh_child.py CONVERTED_MODEL_DIR OUTPUT_ROOT"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from qlora_jax.train_config import load_config
from qlora_jax.trainer import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def cfg(model: str, data: int, fsdp: int, save_every: int = 100, extra: Sequence[str] = ()):
    """The 4-step stories260K run on a ``data x fsdp`` mesh; ``extra``: more ``--set`` overrides, applied last."""
    return load_config(REPO / "configs" / "stories260k.py", [
        f"model.path={model}", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=100",
        f"train.save_every={save_every}", "train.sample_prompts=0", "data.eval_dataset_size=0",
        f"mesh.data={data}", f"mesh.fsdp={fsdp}", *extra])


def frozen_layout(model: str) -> dict[str, int]:
    """How many NF4 ``packed`` / ``absmax`` leaves the 1x8 rules shard (the rest are replicated)."""
    from flax import nnx

    from qlora_jax.nf4 import QuantizedTensor
    from qlora_jax.sharding import frozen_shardings, make_mesh
    from qlora_jax.trainer import build_model

    from qlora_jax.memory import PlanInputs, plan, resolve_architecture

    _, _, rest = nnx.split(build_model(cfg(model, 1, 8), Path(model)), nnx.LoRAParam, ...)
    tree = frozen_shardings(rest, make_mesh(1, 8))
    shardings = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    quantized = [s for s in shardings if isinstance(s, QuantizedTensor)]
    # The NF4 bytes device 0 holds once sharded, against the memory planner's per-device figure.
    placed = jax.device_put(rest, tree)
    device0 = sum(leaf.addressable_shards[0].data.nbytes
                  for q in jax.tree.leaves(placed, is_leaf=lambda x: isinstance(x, QuantizedTensor))
                  if isinstance(q, QuantizedTensor) for leaf in jax.tree.leaves(q))
    planned = plan(PlanInputs(cfg=resolve_architecture(model), batch=8, seq=256, lora_r=8, fsdp=8))
    return {"quantized": len(quantized),
            "packed_sharded": sum("fsdp" in str(q.packed.spec) for q in quantized),
            "absmax_sharded": sum("fsdp" in str(q.absmax.spec) for q in quantized),
            "device0_nf4_bytes": device0, "planned_nf4_bytes": planned["frozen_linear_weights"]}


def step_collectives(model: str, data: int, fsdp: int, layers: int = 4) -> list[dict]:
    """The collectives of the compiled train step (grad_accum 2) on a ``data x fsdp`` mesh, with the loops
    around each (``qlora_jax.sharding.loop_collectives``), for a LLaMA of ``layers`` layers whose q/k/v/o/
    gate/up/down NF4 codes all split over fsdp (d=256, ffn=512), compiled from abstract inputs."""
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax import sharding as shd
    from qlora_jax.models.llama import Llama, LlamaConfig, LoRAConfig, QuantConfig
    from qlora_jax.trainer import make_optimizer, make_train_step

    from qlora_jax.train_config import apply_overrides

    tc = apply_overrides(cfg(model, data, fsdp), ["optim.paged=true"])  # what train.py resolves "auto" to on CPU
    arch = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    abstract = nnx.eval_shape(lambda: Llama(arch, lora=LoRAConfig(r=8, alpha=16.0, dropout=0.05),
                                            quant=QuantConfig(compute_dtype="float32"), remat="full",
                                            rngs=nnx.Rngs(0)))
    abstract.train()
    graphdef, lora, rest = nnx.split(abstract, nnx.LoRAParam, ...)
    tx = make_optimizer(tc)
    opt_state = jax.eval_shape(tx.init, lora)
    mesh = shd.make_mesh(data, fsdp)
    shardings = (shd.param_shardings(lora, mesh), shd.param_shardings(opt_state, mesh),
                 shd.frozen_shardings(rest, mesh), shd.batch_sharding(mesh), shd.replicated(mesh))
    step = make_train_step(graphdef, tx, tc, shardings)
    batch = {k: jax.ShapeDtypeStruct((8, 64), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
    compiled = step.lower(lora, opt_state, rest, batch, 0, jax.random.key(0)).compile()
    return shd.loop_collectives(compiled.as_text())


def step_memory_7b(data: int, fsdp: int) -> dict[str, float]:
    """XLA's per-device buffer assignment (arguments + outputs + temporaries - aliased) of the real step at
    the 7B shape, 4 x 512 rows per device, on a ``data x fsdp`` mesh of the first devices (compiled from
    abstract inputs), and the memory planner's per-device figure on the CPU's terms (one memory space:
    the paged Adam state counts as device memory, no workspace allowance)."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.train_step import train_config
    from qlora_jax import sharding as shd
    from qlora_jax.memory import PlanInputs, plan
    from qlora_jax.models.llama import Llama, LlamaConfig, LoRAConfig, QuantConfig
    from qlora_jax.trainer import make_optimizer, make_train_step

    arch = LlamaConfig.preset("7b")
    B, T = 4 * data * fsdp, 512
    tc = train_config(dict(size="7b", weights="nf4", batch=B, seq=T, steps=1, warmup=0, remat="full", lora_r=64,
                           lora_dropout=0.05, paged=True, mesh=(data, fsdp)))
    abstract = nnx.eval_shape(lambda: Llama(arch, lora=LoRAConfig(r=64, alpha=16.0, dropout=0.05),
                                            quant=QuantConfig(), remat="full", rngs=nnx.Rngs(0)))
    abstract.train()
    graphdef, lora, rest = nnx.split(abstract, nnx.LoRAParam, ...)
    tx = make_optimizer(tc)
    opt_state = jax.eval_shape(tx.init, lora)
    mesh = shd.make_mesh(data, fsdp, jax.devices()[: data * fsdp])
    shardings = (shd.param_shardings(lora, mesh), shd.param_shardings(opt_state, mesh),
                 shd.frozen_shardings(rest, mesh), shd.batch_sharding(mesh), shd.replicated(mesh))
    step = make_train_step(graphdef, tx, tc, shardings)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
    ma = step.lower(lora, opt_state, rest, batch, 0, jax.random.key(0)).compile().memory_analysis()
    p = plan(PlanInputs(cfg=arch, batch=B, seq=T, data=data, fsdp=fsdp, backend="cpu"))
    return {"xla": ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes, "xla_temp": ma.temp_size_in_bytes,
            "plan": p["total"] - p["workspace"] - p["optimizer_on_device"] + p["host_optimizer"]}


def check_layout(trees: dict[str, tuple], mesh) -> dict:
    """How the initialized ``trees`` (name -> (lora, opt_state, rest)) sit on ``mesh``, and what else is alive.

    ``split``: how many LoRA / optimizer leaves the step's shardings (``trainer.step_shardings``) split
    over ``fsdp``; ``bad``: those of them that are not sharded over all devices with ``1 / fsdp`` of
    the split axis per device; ``memory_kinds``: the optimizer leaves' memory kinds; ``whole``: every
    array in ``jax.live_arrays()`` on a single device with the shape and dtype of a split leaf (LoRA,
    optimizer or frozen NF4 field): an unsharded whole copy.
    """
    import gc

    from qlora_jax.trainer import step_shardings

    gc.collect()
    fsdp, out, split_kinds = mesh.shape["fsdp"], {}, set()
    for name, (lora, opt_state, rest) in trees.items():
        shardings = step_shardings(lora, opt_state, rest, mesh)
        r = out[name] = {"split": 0, "bad": [], "memory_kinds": sorted({str(x.sharding.memory_kind)
                                                                         for x in jax.tree.leaves(opt_state)})}
        for k, (tree, sh) in enumerate(zip((lora, opt_state, rest), shardings[:3])):
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh)):
                if "fsdp" not in s.spec:
                    continue
                split_kinds.add((x.shape, str(x.dtype)))
                if k == 2:  # frozen: counted for the live-array check only
                    continue
                r["split"] += 1
                axis = list(s.spec).index("fsdp")
                rows = {sh_.data.shape[axis] for sh_ in x.addressable_shards}
                if len(x.sharding.device_set) != mesh.devices.size or rows != {x.shape[axis] // fsdp}:
                    r["bad"].append([list(x.shape), str(x.sharding), sorted(rows)])
    whole = [[list(a.shape), str(a.dtype), str(next(iter(a.devices())))] for a in jax.live_arrays()
             if len(a.devices()) == 1 and (a.shape, str(a.dtype)) in split_kinds]
    return {"trees": out, "whole": whole}


def init_layout(model: str) -> dict:
    """train.py's initialization on 1x8 (``build_model`` with the mesh, ``init_optimizer``; paged and
    on-device Adam; the model object kept alive, as ``trainer.train`` keeps it) and the benchmark's
    (``build_random_model`` with the mesh, ``init_optimizer``; the tiny LLaMA with 16-bit LoRA, fp32 master
    copy in the optimizer), each checked by :func:`check_layout` on its own."""
    from flax import nnx

    from benchmarks.train_step import model_config, train_config
    from qlora_jax import sharding as shd
    from qlora_jax.models.random_init import build_random_model
    from qlora_jax.train_config import apply_overrides
    from qlora_jax.trainer import build_model, init_optimizer, lora_config, make_optimizer

    mesh = shd.make_mesh(1, 8)
    out = {}
    for paged in (True, False):
        tc = apply_overrides(cfg(model, 1, 8), [f"optim.paged={str(paged).lower()}"])
        m = build_model(tc, Path(model), mesh)
        m.train()
        _, lora, rest = nnx.split(m, nnx.LoRAParam, ...)
        opt_state = init_optimizer(make_optimizer(tc), lora, mesh)
        out[f"train paged={paged}"] = check_layout({"train": (lora, opt_state, rest)}, mesh)
        del m, lora, rest, opt_state
    tc = train_config(dict(size="tiny", weights="nf4", batch=8, seq=64, steps=1, warmup=0, remat="full", lora_r=8,
                           lora_dropout=0.05, lora_dtype="bfloat16", paged=False, mesh=(1, 8)))
    m = build_random_model(model_config("tiny"), lora=lora_config(tc), quant=tc.model.quant_config(), remat="full",
                           mesh=mesh)
    _, lora, rest = nnx.split(m, nnx.LoRAParam, ...)
    del m
    opt_state = init_optimizer(make_optimizer(tc), lora, mesh)
    out["benchmark"] = check_layout({"benchmark": (lora, opt_state, rest)}, mesh)
    return out


def losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics if "loss" in m]


def copy_step(src_out: Path, step: int, dst_out: Path) -> None:
    """An output directory whose only checkpoint is ``src_out``'s step ``step`` (as if killed there)."""
    (dst_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_out / "checkpoints" / str(step), dst_out / "checkpoints" / str(step))


def main(model: str, root: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    t = time.perf_counter()
    init = init_layout(model)  # first, while nothing else is alive in this process (it checks jax.live_arrays())
    out: dict = {"init": init, "curves": {}, "resumed": {}, "times": {"init": time.perf_counter() - t},
                 "lora_specs": {}, "frozen": frozen_layout(model), "collectives": {}}
    for data, fsdp in [(2, 4)]:
        t = time.perf_counter()
        out["collectives"][f"{data}x{fsdp}"] = step_collectives(model, data, fsdp)
        out["times"][f"hlo {data}x{fsdp}"] = time.perf_counter() - t
    out["memory_7b"] = {}
    for data, fsdp in [(1, 2), (1, 4), (2, 4)]:
        t = time.perf_counter()
        out["memory_7b"][f"{data}x{fsdp}"] = step_memory_7b(data, fsdp)
        out["times"][f"memory 7b {data}x{fsdp}"] = time.perf_counter() - t
    # A checkpoint written on one mesh restores and continues on another: the runs on the first mesh of
    # each pair also save a checkpoint at step 2, which a run on the second mesh resumes.
    resumes = [((4, 2), (1, 1)), ((1, 1), (1, 8))]
    firsts = {first for first, _ in resumes}
    for data, fsdp in [(1, 1), (8, 1), (4, 2), (1, 8)]:
        t = time.perf_counter()
        run = train(cfg(model, data, fsdp, save_every=2 if (data, fsdp) in firsts else 100),
                    root / f"run_{data}x{fsdp}", progress=False)
        out["curves"][f"{data}x{fsdp}"] = losses(run)
        out["times"][f"{data}x{fsdp}"] = time.perf_counter() - t
        from flax import nnx
        leaf = jax.tree.leaves(nnx.state(run.model, nnx.LoRAParam))[0]
        out["lora_specs"][f"{data}x{fsdp}"] = [str(leaf.sharding.spec) if hasattr(leaf.sharding, "spec") else "",
                                               len(leaf.sharding.device_set)]
    for first, second in resumes:
        t = time.perf_counter()
        d = root / f"resume_{first[0]}x{first[1]}_to_{second[0]}x{second[1]}"
        copy_step(root / f"run_{first[0]}x{first[1]}", 2, d)
        run = train(cfg(model, *second), d, resume=True, progress=False)
        out["resumed"][f"{first[0]}x{first[1]}->{second[0]}x{second[1]}"] = losses(run)
        out["times"][f"resume {first}->{second}"] = time.perf_counter() - t
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
