"""The training loop behind ``train.py``: model + data + paged AdamW + checkpoints + logging.

The step is pure and jitted (``make_train_step``); the loop (``train``) owns I/O: it logs
``metrics.jsonl`` and TensorBoard, evaluates and checkpoints on fixed schedules, stops on a
non-finite loss or gradient, and resumes bit-exactly from the last checkpoint.

Output directory layout::

    OUT/config.json          the resolved TrainConfig
    OUT/metrics.jsonl        one JSON object per logged step (step, loss, lr, grad_norm, tokens_per_s, [eval_loss],
                             [mmlu_accuracy]: every ``eval.mmlu_every`` steps and at step 0)
    OUT/tensorboard/         the same scalars for TensorBoard (and ``mmlu_accuracy/<subject>``)
    OUT/checkpoints/<step>/  orbax: LoRA params, optimizer state (host memory), data position
    OUT/checkpoints/<step>/adapter/  that step's LoRA weights as a PEFT adapter (removed with its checkpoint)
    OUT/adapter/             the final LoRA weights (PEFT: safetensors + adapter_config.json)
    OUT/loss.png             train / eval loss curves
    OUT/samples.md           greedy answers to held-out prompts before and after (train.sample_prompts)

On a mesh (``mesh`` section) the step is sharded (``qlora_jax.sharding``); with several processes
(hosts) every process runs ``train`` on the same shared ``OUT``, and only process 0 writes the files
above except the checkpoints, which all processes write together through orbax. Evaluations (eval loss,
MMLU, greedy samples) are global computations on the sharded model that every process runs with the
same inputs; every process gets the results, process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from qlora_jax.data import make_data
from qlora_jax.paged_adam import paged_adamw
from qlora_jax.peft_io import save_adapter
from qlora_jax.sharding import MeshError, check_batch, host_values, tracing_mesh
from qlora_jax.step import accumulate_gradients, causal_lm_loss, clip_by_global_norm
from qlora_jax.train_config import ConfigError, TrainConfig


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss or gradients, an unusable checkpoint)."""


# --- the pure step ---------------------------------------------------------------------------------


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup over ``warmup_ratio * steps``, then constant / linear decay / cosine."""
    o, steps = cfg.optim, cfg.train.steps
    warmup = int(math.ceil(o.warmup_ratio * steps))
    after = max(1, steps - warmup)
    tail = {
        "constant": optax.constant_schedule(o.learning_rate),
        "linear": optax.linear_schedule(o.learning_rate, 0.0, after),
        "cosine": optax.cosine_decay_schedule(o.learning_rate, after),
    }[o.schedule]
    if warmup == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), tail], [warmup])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Paged (or device-resident) AdamW with the schedule; ``optim.paged`` must be resolved
    (:func:`resolve_paging`) first."""
    o = cfg.optim
    if not isinstance(o.paged, bool):
        raise ValueError(f"optim.paged={o.paged!r} is not resolved yet: call resolve_paging(cfg, model) first")
    return paged_adamw(make_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       paged=o.paged, page_size=o.page_size or None, fp32_master=cfg.lora.param_dtype != "float32")


def init_optimizer(tx: optax.GradientTransformation, lora: Any, mesh: Any = None) -> Any:
    """``tx.init(lora)``: the optimizer state (Adam's moments: one array of each LoRA leaf's shape
    ``[L, in, r]`` / ``[L, r, out]`` per moment, plus a scalar count).

    ``mesh``: ``lora`` is already placed on this ``(data, fsdp)`` mesh; the state is born in
    :func:`~qlora_jax.sharding.param_shardings`'s layout (``jit`` with ``out_shardings``: each device
    computes only its rows, so no device ever holds a whole moment), in host memory
    (``pinned_host``) for a paged optimizer (:class:`~qlora_jax.paged_adam.PagedState`), as
    ``paged_adamw``'s own ``init`` places it. ``None``: eagerly on the default device (paged: page by page).
    """
    if mesh is None:
        return tx.init(lora)
    from qlora_jax.paged_adam import HOST_MEMORY_KIND, PagedState
    from qlora_jax.sharding import param_shardings

    abstract = jax.eval_shape(tx.init, lora)
    shardings = param_shardings(abstract, mesh)
    if isinstance(abstract, PagedState):  # every leaf of a paged state lives in host memory
        shardings = jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY_KIND), shardings)
    return jax.jit(tx.init, out_shardings=shardings)(lora)


def step_shardings(lora: Any, opt_state: Any, rest: Any, mesh: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(lora, opt_state, rest, batch, replicated)`` shardings of :func:`make_train_step` on ``mesh``
    (:mod:`qlora_jax.sharding`'s rules; the leaves' memory kinds kept); the batch is ``[B, T]`` split
    over all devices along ``B``."""
    from qlora_jax import sharding as shd

    return (shd.param_shardings(lora, mesh), shd.param_shardings(opt_state, mesh), shd.frozen_shardings(rest, mesh),
            shd.batch_sharding(mesh), shd.replicated(mesh))


def _lm_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    # Batches are right-padded (qlora_jax.data.pad_batch), so under the causal mask every real token
    # already sees exactly the real tokens before it: the padding mask changes only the outputs at
    # padded positions, which carry no loss (label IGNORE_INDEX) and hence no gradient. Leaving it out
    # lets the GPU run cuDNN's fused causal attention instead of XLA attention over a [B, 1, T, T] mask.
    logits = model(batch["input_ids"])
    return causal_lm_loss(logits, batch["labels"])


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainConfig,
                    shardings: tuple[Any, Any, Any, Any, Any] | None = None) -> Callable:
    """``step(lora, opt_state, rest, batch, step, key) -> (lora, opt_state, metrics)``, jitted.

    ``shardings``: ``(lora, opt_state, rest, batch, replicated)`` shardings for a multi-device
    mesh (``qlora_jax.sharding``); the step is jitted with them as in/out shardings. ``None``:
    the single-device step.

    ``lora`` holds the ``nnx.LoRAParam`` state (the only trained leaves), ``rest`` everything
    else (frozen weights, RNG state). The batch's leading axis is split into
    ``cfg.train.grad_accum`` micro-batches inside the step (a ``scan``); gradients are
    clipped by global norm, then the (paged) optimizer updates the adapters.
    """
    schedule = make_schedule(cfg)

    def loss_fn(lora, micro, rng, rest):
        model = nnx.merge(graphdef, lora, rest, copy=True)  # fresh Variables owned by this trace
        nnx.reseed(model, dropout=rng, policy="match_shape")
        return _lm_loss(model, micro)

    def step_fn(lora, opt_state, rest, batch, step, key):
        rng = jax.random.fold_in(key, step)
        loss, grads = accumulate_gradients(lambda p, m, r: loss_fn(p, m, r, rest), lora, batch,
                                           cfg.train.grad_accum, rng=rng)
        grads, grad_norm = clip_by_global_norm(grads, cfg.optim.max_grad_norm)
        updates, opt_state = tx.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        return lora, opt_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step)}

    if shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1))
    lora_sh, opt_sh, rest_sh, batch_sh, rep = shardings

    def meshed_step_fn(*args):
        with tracing_mesh(rep.mesh):
            return step_fn(*args)

    return jax.jit(meshed_step_fn, donate_argnums=(0, 1),
                   in_shardings=(lora_sh, opt_sh, rest_sh, batch_sh, rep, rep), out_shardings=(lora_sh, opt_sh, rep))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Any = None) -> Callable:
    """``eval_step(lora, rest, batch) -> (loss_sum, num_tokens)`` with dropout off, jitted.

    ``mesh``: trace under it (each layer's 4-bit weight is gathered where it is used, as in the
    train step); the batch is placed by the caller."""

    def eval_fn(lora, rest, batch):
        with tracing_mesh(mesh):
            return _lm_loss(nnx.merge(graphdef, lora, rest, copy=True), batch)

    return jax.jit(eval_fn)


# --- the model -------------------------------------------------------------------------------------


def resolve_base_model(cfg: TrainConfig, output_dir: Path) -> Path:
    """A converted model directory for ``cfg.model.path``, converting it once if needed."""
    from qlora_jax.convert import convert
    from qlora_jax.models.checkpoint import META_FILE

    src = Path(cfg.model.path)
    if not cfg.model.path:
        raise TrainingError("model.path is empty: set it in the config or with --set model.path=...")
    if (src / META_FILE).is_file():
        return src
    target = Path(cfg.model.converted_dir) if cfg.model.converted_dir else output_dir / "base_model"
    if (target / META_FILE).is_file():
        return target
    print(f"converting {cfg.model.path} -> {target}", flush=True)
    quant = cfg.model.quant_config()
    convert(cfg.model.path, target, quant=quant)
    return target


def lora_config(cfg: TrainConfig) -> Any:
    """The model's :class:`~qlora_jax.models.llama.LoRAConfig` for the run's ``lora`` section."""
    from qlora_jax.models.llama import LoRAConfig

    return LoRAConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=tuple(cfg.lora.targets),
                      param_dtype=cfg.lora.param_dtype)


def build_model(cfg: TrainConfig, model_dir: Path, mesh: Any = None) -> nnx.Module:
    """The run's model from a converted directory; ``mesh``: every array placed directly in the train
    step's layout (:func:`~qlora_jax.models.checkpoint.load_model`)."""
    from qlora_jax.models.checkpoint import load_model

    return load_model(model_dir, lora=lora_config(cfg), remat=cfg.model.build_remat,
                      compute_dtype=cfg.model.compute_dtype, seed=cfg.train.seed, mesh=mesh)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{model_dir}: no usable tokenizer files beside the model ({e})") from None


# --- checkpoints -----------------------------------------------------------------------------------


class Checkpoints:
    """orbax checkpoints of (LoRA params, optimizer state, step, data position), atomic, keep-last-K."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def step_dir(self, step: int) -> Path:
        """The directory orbax wrote step ``step`` to."""
        return Path(self.manager.directory) / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, lora: Any, opt_state: Any, data_state: dict[str, int]) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"lora": lora, "opt_state": opt_state}),
            meta=ocp.args.JsonSave({"step": step, "data": data_state}),
        ))
        self.manager.wait_until_finished()

    def restore(self, step: int, lora: Any, opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Step ``step``'s (lora, opt_state, meta), laid out as the given ``lora`` / ``opt_state``: arrays,
        or (to hold no second copy while restoring) their ``jax.ShapeDtypeStruct`` s with shardings."""
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"lora": lora, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state["lora"], out.state["opt_state"], out.meta

    def close(self) -> None:
        self.manager.close()


# --- the loop --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    metrics: list[dict[str, Any]]
    model: nnx.Module  # the base model with the trained adapters


def _evaluate(eval_step, lora, rest, batches: Iterator[dict[str, np.ndarray]], limit: int) -> float:
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        s, n = eval_step(lora, rest, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def make_mmlu_eval(cfg: TrainConfig, tokenizer: Any, eval_graphdef: nnx.GraphDef, max_length: int,
                   mesh: Any = None) -> Callable[[Any, Any], dict[str, Any]] | None:
    """``mmlu(lora, rest) -> result`` of ``qlora_jax.eval.mmlu`` (questions loaded once), or None when off.

    ``mesh``: the run's mesh (each batch split over its devices, so ``eval.mmlu_batch_size`` must be a
    multiple of their count); with several processes every process must call ``mmlu`` (one global
    computation per batch) and gets the same result."""
    e = cfg.eval
    if not e.mmlu_every:
        return None
    if mesh is not None:
        try:
            check_batch(e.mmlu_batch_size, mesh, "eval.mmlu_batch_size")
        except MeshError as err:
            raise ConfigError(str(err)) from None
    from qlora_jax.eval.mmlu import MMLUEvaluator, load_questions

    questions = load_questions(e.mmlu_shots, data_dir=e.mmlu_data_dir or None, split=e.mmlu_split or None,
                               subjects=e.mmlu_subjects, limit_per_subject=e.mmlu_limit_per_subject)
    evaluator = MMLUEvaluator(questions, tokenizer, max_length=e.mmlu_max_length or max_length,
                              batch_size=e.mmlu_batch_size, answer_style=e.mmlu_answer_style)
    return lambda lora, rest: evaluator(nnx.merge(eval_graphdef, lora, rest), mesh=mesh)


def _write_samples(path: Path, title: str, prompts: list[str], answers: list[str]) -> None:
    """Append greedy answers to held-out prompts to ``samples.md`` and print them."""
    text = f"## {title}\n\n" + "".join(f"**Prompt:** {p}\n\n**Answer:**{a}\n\n" for p, a in zip(prompts, answers))
    with path.open("a") as f:
        f.write(text)
    print(text, flush=True)


def _sample_prompt(example: dict[str, str]) -> str:
    """A held-out example's prompt; for formats whose input is empty (oasst1), the conversation up
    to its first assistant turn."""
    if example["input"].strip():
        return example["input"]
    head, sep, _ = example["output"].partition("### Assistant:")
    return head + sep if sep else example["output"][:64]


def _greedy_answers(graphdef: nnx.GraphDef, lora: Any, rest: Any, tokenizer: Any, prompts: list[str],
                    max_new_tokens: int, mesh: Any = None) -> list[str]:
    """Greedy completions of ``prompts``; with several processes every process calls it and gets them all."""
    from qlora_jax.generate import Generator

    gen = Generator(nnx.merge(graphdef, lora, rest, copy=True), tokenizer, unroll_layers=False,  # few tokens: compile time wins
                    mesh=mesh)
    return [c.text for c in gen.generate(prompts, max_new_tokens=max_new_tokens)]


def _device_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


AUTO_PAGING_FRACTION = 0.9  # "auto" keeps the optimizer on the device if the plan fits in this share
# Between that share and AUTO_COMPILE_ZONE x the device, "auto" compiles the step with Adam on the device and
# asks XLA's own memory analysis (on the H200 it equals the measured peak to the byte, RESULTS.md), keeping
# AUTO_COMPILE_HEADROOM of the device free: 65B at 1x512 in a 48 GiB pool plans 45.75 GiB, XLA says 46.47,
# so it runs on the device at 0.52 s/step instead of 0.73 paged (RESULTS.md, fourth session).
AUTO_COMPILE_ZONE = 1.05
AUTO_COMPILE_HEADROOM = 0.02


def _device_bytes_limit() -> int | None:
    """The first local device's memory pool in bytes (``None`` where the backend reports none, e.g. CPU)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def _plan_inputs(cfg: TrainConfig, model: nnx.Module):
    from qlora_jax.memory import inputs_from_train_config

    q = model.quant
    return dataclasses.replace(inputs_from_train_config(cfg, model.cfg), quantize=q.quantize, blocksize=q.blocksize,
                               double_quant=q.double_quant, param_dtype=q.param_dtype, compute_dtype=q.compute_dtype,
                               backend="cpu" if jax.default_backend() == "cpu" else "gpu")


def compiled_step_bytes(cfg: TrainConfig, model: nnx.Module) -> int | None:
    """XLA's memory analysis of ``cfg``'s one-device training step at its longest batch (``optim.paged``
    resolved): arguments + outputs + temporaries - aliases, in bytes; compiled, not run (the optimizer
    state is only traced). ``None`` where the backend reports no analysis. Leaves ``model`` in train mode."""
    import jax.numpy as jnp

    model.train()
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    tx = make_optimizer(cfg)
    opt_state = jax.eval_shape(tx.init, lora)
    seq = _plan_inputs(cfg, model).seq
    batch = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, seq), jnp.int32)
             for k in ("input_ids", "labels", "attention_mask")}
    compiled = make_train_step(graphdef, tx, cfg).lower(lora, opt_state, rest, batch, 0, jax.random.key(0)).compile()
    try:
        ma = compiled.memory_analysis()
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without the analysis
        return None


def resolve_paging(cfg: TrainConfig, model: nnx.Module, device_bytes: int | None = None,
                   previous: bool | None = None,
                   step_bytes: Callable[[TrainConfig, nnx.Module], int | None] = compiled_step_bytes) -> TrainConfig:
    """``cfg`` with ``optim.paged="auto"`` decided: the optimizer state stays on the device when the
    memory plan with it there fits in ``AUTO_PAGING_FRACTION`` of ``device_bytes`` (default: the
    first device's ``bytes_limit``), or, on one device with the plan up to ``AUTO_COMPILE_ZONE`` of it,
    when ``step_bytes`` (XLA's analysis of the compiled step) leaves ``AUTO_COMPILE_HEADROOM`` of it free;
    with no device figure (CPU) it is paged. ``previous`` (the value a resumed run was started with)
    wins, so a checkpoint's optimizer state keeps its structure."""
    if cfg.optim.paged != "auto":
        return cfg
    from qlora_jax.memory import plan

    if previous is not None:
        paged, why = bool(previous), "as the run being resumed"
    else:
        if device_bytes is None:
            device_bytes = _device_bytes_limit()
        if device_bytes is None:
            paged, why = True, "no device memory figure on this backend"
        else:
            on_device = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, paged=False))
            need = plan(dataclasses.replace(_plan_inputs(cfg, model), paged=False))["total"]
            paged = need > AUTO_PAGING_FRACTION * device_bytes
            why = (f"plan with Adam on the device {need / 2**30:.2f} GiB vs {AUTO_PAGING_FRACTION:.0%} of "
                   f"{device_bytes / 2**30:.2f} GiB")
            one_device = cfg.mesh.data * cfg.mesh.fsdp == 1 and jax.process_count() == 1
            if paged and one_device and need <= AUTO_COMPILE_ZONE * device_bytes:
                est = step_bytes(on_device, model)
                if est is not None:
                    paged = est > (1 - AUTO_COMPILE_HEADROOM) * device_bytes
                    why += (f"; XLA's analysis of that step {est / 2**30:.2f} GiB vs {1 - AUTO_COMPILE_HEADROOM:.0%} "
                            f"of {device_bytes / 2**30:.2f} GiB")
    if jax.process_index() == 0:
        print(f"optim.paged=auto -> {'paged from host memory' if paged else 'on the device'} ({why})", flush=True)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, paged=paged))


def resolve_remat(cfg: TrainConfig, model: nnx.Module, device_bytes: int | None = None) -> TrainConfig:
    """``cfg`` with ``model.remat="auto"`` decided (:func:`qlora_jax.memory.choose_remat`: the fastest policy
    whose plan fits in 90% of ``device_bytes``, default the first device's ``bytes_limit``; full
    rematerialization where none does), and ``model`` set to run it. Call after :func:`resolve_paging`
    (the optimizer's place is decided on the smaller plan first)."""
    if cfg.model.remat != "auto":
        return cfg
    from qlora_jax.memory import choose_remat

    if device_bytes is None:
        device_bytes = _device_bytes_limit()
    remat, why = choose_remat(_plan_inputs(cfg, model), device_bytes)
    if jax.process_index() == 0:
        print(f"model.remat=auto -> {remat} ({why})", flush=True)
    model.remat = remat
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))


def _previous_paged(out: Path) -> bool | None:
    """``optim.paged`` as resolved by the run that wrote ``out/config.json`` (``None`` if unknown)."""
    try:
        value = json.loads((out / "config.json").read_text())["optim"]["paged"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, bool) else None


def print_memory_plan(cfg: TrainConfig, model: nnx.Module) -> None:
    """Print :mod:`qlora_jax.memory`'s predicted peak device memory of this run (never raises)."""
    try:
        from qlora_jax.memory import format_plan, plan

        p = _plan_inputs(cfg, model)
        limit = _device_bytes_limit()
        print(format_plan(p, plan(p), gpu_mem=limit), flush=True)
    except Exception as e:  # a planning problem must not stop training
        print(f"memory plan unavailable: {type(e).__name__}: {e}", flush=True)


def _plot(metrics: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _make_mesh(cfg: TrainConfig) -> Any:
    """The run's ``jax.sharding.Mesh``, or None for the single-device path (mesh 1 x 1, one process).

    ``mesh.data * mesh.fsdp`` must equal the global device count (all processes' devices); a
    1 x 1 mesh in one process with several devices uses the first device only.
    """
    n, procs = jax.device_count(), jax.process_count()
    if cfg.mesh.size == 1 and procs == 1:
        return None
    if cfg.mesh.size != n:
        local = jax.local_devices()
        raise ConfigError(
            f"mesh.data * mesh.fsdp = {cfg.mesh.data} * {cfg.mesh.fsdp} = {cfg.mesh.size}, but there are {n} devices "
            f"in all ({procs} process{'es' if procs > 1 else ''} x {len(local)} local {local[0].platform} devices); "
            f"set mesh.data and mesh.fsdp so that their product is {n}")
    from qlora_jax.sharding import make_mesh

    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp)


class _NoWriter:
    """The TensorBoard writer of a process other than process 0 (only process 0 writes files)."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train(cfg: TrainConfig, output_dir: str | Path, *, resume: bool = False,
          stop_after: int | None = None, progress: bool = True) -> RunResult:
    """Run (or resume) a fine-tune; see the module docstring for what lands in ``output_dir``.

    ``stop_after``: return after this many steps of this invocation (tests use it to
    simulate a killed run).

    Several processes (``mesh.distributed``, :func:`qlora_jax.sharding.initialize_distributed`,
    called here first): every process runs this same function on a shared ``output_dir``; each
    builds only its rows of every batch and the global batch is assembled from them; all take
    part in orbax checkpointing; only process 0 writes ``config.json``, metrics, TensorBoard,
    ``loss.png`` and adapters, and converts the base model.
    """
    from tqdm import tqdm

    from qlora_jax import sharding as shd

    try:
        shd.initialize_distributed(cfg.mesh.distributed)
    except shd.MeshError as e:
        raise ConfigError(str(e)) from None
    primary, multi = jax.process_index() == 0, jax.process_count() > 1
    mesh = _make_mesh(cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out / "checkpoints", cfg.train.keep_checkpoints)
    if not resume and ckpts.latest_step() is not None:
        raise TrainingError(f"{out} already has checkpoints (step {ckpts.latest_step()}): pass --resume or use a new --output-dir")
    # Every process reads how the run being resumed resolved optim.paged before process 0 rewrites
    # config.json: they must all build the same optimizer state.
    previous_paged = _previous_paged(out) if resume else None
    _barrier("qlora_jax: run directory read")
    if primary:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        model_dir = resolve_base_model(cfg, out)
    _barrier("qlora_jax: base model ready")
    if not primary:
        model_dir = resolve_base_model(cfg, out)  # converted by process 0 (a shared file system)
    tokenizer = load_tokenizer(model_dir)
    data = make_data(cfg.data, tokenizer)
    model = build_model(cfg, model_dir, mesh)  # on a mesh: already sharded (never whole on one device)
    cfg = resolve_paging(cfg, model, previous=previous_paged)
    cfg = resolve_remat(cfg, model)
    if primary:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))  # as run
        print_memory_plan(cfg, model)
    model.train()
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    model.eval()
    eval_graphdef = nnx.split(model, nnx.LoRAParam, ...)[0]

    tx = make_optimizer(cfg)
    opt_state = init_optimizer(tx, lora, mesh)
    if mesh is None:
        # The jitted steps return arrays committed to the device; commit the adapters and the optimizer state
        # there too (no copy), so the first call compiles the programs every later call runs. From uncommitted
        # arrays the train, eval and MMLU steps each compiled twice (7B on an H200: ~11 s per train-step compile).
        lora, opt_state = jax.tree.map(lambda a: jax.device_put(a, a.sharding), (lora, opt_state))
    put_batch: Callable[[dict[str, np.ndarray]], Any] = lambda b: b  # noqa: E731
    put_eval: Callable[[dict[str, np.ndarray]], Any] = lambda b: b  # noqa: E731
    shardings = None
    if mesh is not None:
        shd.check_batch(cfg.data.batch_size, mesh)
        shardings = step_shardings(lora, opt_state, rest, mesh)  # the layouts lora, opt_state, rest were born in
        if multi:
            # This process builds only its rows of each global batch; eval batches are whole on every device.
            data.train.rows = shd.process_rows(shardings[3], cfg.data.batch_size)
            put_batch = lambda b: shd.global_batch(b, shardings[3], cfg.data.batch_size)  # noqa: E731
            put_eval = lambda b: shd.global_batch(b, shardings[4], len(b["input_ids"]))  # noqa: E731
        else:
            put_batch = lambda b: jax.device_put(b, shardings[3])  # noqa: E731
        if primary:
            print(f"mesh: data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} over {mesh.devices.size} devices"
                  + (f" in {jax.process_count()} processes" if multi else ""), flush=True)
    train_step = make_train_step(graphdef, tx, cfg, shardings)
    eval_step = make_eval_step(eval_graphdef, mesh)
    mmlu = make_mmlu_eval(cfg, tokenizer, eval_graphdef, model.cfg.max_position_embeddings, mesh)
    key = jax.random.key(cfg.train.seed)

    if primary:
        from tensorboardX import SummaryWriter

        writer: Any = SummaryWriter(str(out / "tensorboard"))
    else:
        writer = _NoWriter()

    def mmlu_metrics(step: int) -> dict[str, float]:
        result = mmlu(lora, rest)
        for subject, acc in result["per_subject"].items():
            writer.add_scalar(f"mmlu_accuracy/{subject}", acc, step)
        return {"mmlu_accuracy": result["accuracy"]}

    def evaluate() -> float:
        return _evaluate(eval_step, lora, rest, map(put_eval, data.eval.epoch_batches(0)), cfg.train.eval_batches)

    def export_adapter(directory: Path) -> None:
        host = host_values(lora)  # a collective with several processes: everyone gathers, process 0 writes
        if primary:
            save_adapter(nnx.merge(graphdef, host, rest), directory, lora_config=cfg.lora, base_model=cfg.model.path)

    start = 0
    metrics_path = out / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if resume and (last := ckpts.latest_step()) is not None:
        # restore into the fresh state's shapes and layouts, releasing it first: one copy on the devices
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (lora, opt_state))
        del opt_state
        lora, opt_state, meta = ckpts.restore(last, *target)
        data.train.load_state_dict(meta["data"])
        start = int(meta["step"])
        if metrics_path.exists():  # keep what was logged up to the checkpoint, drop the rest
            history = [m for m in map(json.loads, metrics_path.read_text().splitlines()) if m["step"] <= start]
        if primary:
            print(f"resumed from {out / 'checkpoints' / str(last)} at step {start}", flush=True)
    if start == 0 and (data.eval is not None or mmlu is not None):  # held-out metrics before any training
        history = [{"step": 0}]
        if data.eval is not None:
            history[0]["eval_loss"] = evaluate()
        if mmlu is not None:
            history[0].update(mmlu_metrics(0))
    if primary:
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))
    sample_prompts = [_sample_prompt(e) for e in data.eval_examples[: cfg.train.sample_prompts]]
    samples_path = out / "samples.md"

    def record_samples(title: str) -> None:  # every process generates (global arrays), process 0 writes
        answers = _greedy_answers(eval_graphdef, lora, rest, tokenizer, sample_prompts, cfg.train.sample_tokens, mesh)
        if primary:
            _write_samples(samples_path, title, sample_prompts, answers)

    if sample_prompts and start == 0:
        if primary:
            samples_path.write_text("")
        record_samples("Before fine-tuning (held-out prompts, greedy)")
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and primary), unit="step",
               dynamic_ncols=True)
    tokens, t0 = 0, time.perf_counter()
    try:
        for step in range(start, end):
            batch = next(data.train)
            tokens += data.train.last_batch_tokens  # the global batch's, whichever rows this process built
            lora, opt_state, m = train_step(lora, opt_state, rest, put_batch(batch), step, key)
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = ckpts.latest_step()
                raise TrainingError(
                    f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                    f"(loss={loss}, grad_norm={grad_norm}); stopped. The last good checkpoint is "
                    f"{'step ' + str(last) if last is not None else 'none (no checkpoint was written yet)'}"
                )
            done = step + 1
            record: dict[str, Any] = {}
            if done % cfg.train.log_every == 0 or done == end:
                elapsed = time.perf_counter() - t0
                record = {"step": done, "loss": loss, "lr": float(m["lr"]), "grad_norm": grad_norm,
                          "tokens_per_s": tokens / max(elapsed, 1e-9)}
                tokens, t0 = 0, time.perf_counter()
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                if data.eval is not None:
                    record.setdefault("step", done)
                    record["eval_loss"] = evaluate()
            if mmlu is not None and done % cfg.eval.mmlu_every == 0:
                record.setdefault("step", done)
                record.update(mmlu_metrics(done))
            if record:
                history.append(record)
                if primary:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(k, v, done)
                mem = _device_memory_gib()
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"}
                                | ({"mem_GiB": f"{mem:.2f}"} if mem is not None else {}))
            if done % cfg.train.save_every == 0 or done == cfg.train.steps:
                ckpts.save(done, lora, opt_state, data.train.state_dict())  # every process: orbax coordinates
                # A PEFT adapter inside the step directory: orbax's keep-last-K deletes it with the step.
                export_adapter(ckpts.step_dir(done) / "adapter")
            bar.update(1)
    finally:
        bar.close()
        writer.close()
        ckpts.close()

    nnx.update(model, lora)
    if end == cfg.train.steps:
        export_adapter(out / "adapter")
        if primary:
            _plot(history, out / "loss.png")
        if sample_prompts:
            record_samples(f"After {end} steps")
    _barrier("qlora_jax: run written")
    return RunResult(out, end, history, model)
