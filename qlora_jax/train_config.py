"""The run configuration of ``train.py``: typed sections, config files, ``--set`` overrides.

A config file is a Python file with ``get_config() -> TrainConfig`` (see ``configs/``).
``--set section.key=value`` overrides one field; the value is parsed for the field's
type. Unknown sections or keys, and values of the wrong type, raise ``ConfigError``
naming them. The model architecture is not here: it comes from the model directory's
``config.json`` (``qlora_jax.models.llama.LlamaConfig``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from qlora_jax.data import DataConfig
from qlora_jax.models.llama import REMAT_POLICIES, QuantConfig

REMAT_CHOICES = (*REMAT_POLICIES, "auto")  # "auto": the trainer picks one by the memory plan (resolve_remat)
SCHEDULES = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """A bad config file, key or value."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The frozen base model and how its weights are stored.

    ``path``: a directory written by ``python -m qlora_jax.convert`` (loaded directly), or a
    Hugging Face model directory / hub id / GGUF file, converted on the fly into
    ``converted_dir`` (default ``<output_dir>/base_model``) the first time.
    """

    path: str = ""
    converted_dir: str = ""
    quantize: bool = True
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    remat: str = "full"

    def __post_init__(self):
        if self.remat not in REMAT_CHOICES:
            raise ConfigError(f"model.remat={self.remat!r} is not one of {REMAT_CHOICES}")
        try:
            self.quant_config()
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None

    @property
    def build_remat(self) -> str:
        """The policy the model is built (and planned) with: ``"full"`` for ``"auto"``, which
        ``trainer.resolve_remat`` then decides on the built model."""
        return "full" if self.remat == "auto" else self.remat

    def quant_config(self) -> QuantConfig:
        """The storage settings for converting ``path`` (the model's own ``QuantConfig``)."""
        return QuantConfig(quantize=self.quantize, quant_type=self.quant_type, blocksize=self.blocksize,
                           double_quant=self.double_quant, compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """LoRA adapters (QLoRA: r=64, alpha=16 on all seven linear projections)."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Storage of A and B on the device: float32, or bfloat16 (the original QLoRA's bf16 LoRA weights; half
    # the device bytes of parameters and gradients) with an fp32 master copy kept by the optimizer.
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.r <= 0:
            raise ConfigError(f"lora.r={self.r} must be > 0")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"lora.param_dtype={self.param_dtype!r} must be float32 or bfloat16")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """Paged AdamW with a warmup + schedule, clipping by global norm."""

    learning_rate: float = 2e-4
    schedule: str = "constant"
    warmup_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    # Adam's moments: True = paged from host memory, False = on the device, "auto" = on the device
    # when the memory plan fits the device (as bitsandbytes' paged optimizers stay in GPU memory
    # until memory runs short), else paged. Resolved once at start-up (trainer.resolve_paging).
    paged: bool | str = "auto"
    page_size: int = 0  # elements per page of one moment; 0: one page per parameter leaf

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.paged not in (True, False, "auto"):
            raise ConfigError(f"optim.paged={self.paged!r} must be true, false or 'auto'")
        if self.page_size < 0:
            raise ConfigError(f"optim.page_size={self.page_size} must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The loop: steps, batch split, schedules for logging / eval / checkpoints."""

    steps: int = 1875
    grad_accum: int = 16  # micro-batches per step; data.batch_size is the whole step's batch
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 0  # 0: the whole eval split
    save_every: int = 250
    keep_checkpoints: int = 3
    sample_prompts: int = 0  # held-out prompts answered greedily before and after training (samples.md)
    sample_tokens: int = 64

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "eval_every", "save_every", "keep_checkpoints",
                     "sample_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be > 0")
        for name in ("eval_batches", "sample_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """MMLU during training (the original's ``--do_mmlu_eval``): accuracy every ``mmlu_every`` steps.

    ``mmlu_every=0`` turns it off. ``mmlu_shots`` 0 reads the zero-shot validation file, 5 the
    Hendrycks CSVs (see ``qlora_jax.eval.mmlu``); ``mmlu_data_dir`` "" is ``../shared/data/mmlu``
    (or ``$QLORA_SHARED``); ``mmlu_split`` "" is the default split for the shots; ``mmlu_max_length``
    0 is the model's context.
    """

    mmlu_every: int = 0
    mmlu_shots: int = 0
    mmlu_data_dir: str = ""
    mmlu_split: str = ""
    mmlu_subjects: tuple[str, ...] = ()
    mmlu_limit_per_subject: int = 0
    mmlu_batch_size: int = 8
    mmlu_max_length: int = 0
    mmlu_answer_style: str = "space"

    def __post_init__(self):
        for name in ("mmlu_every", "mmlu_limit_per_subject", "mmlu_max_length"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 0")
        if self.mmlu_shots not in (0, 5):
            raise ConfigError(f"eval.mmlu_shots={self.mmlu_shots} must be 0 or 5")
        if self.mmlu_batch_size <= 0:
            raise ConfigError(f"eval.mmlu_batch_size={self.mmlu_batch_size} must be > 0")
        if self.mmlu_answer_style not in ("space", "bare"):
            raise ConfigError(f"eval.mmlu_answer_style={self.mmlu_answer_style!r} is not 'space' or 'bare'")


DISTRIBUTED_CHOICES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """The device mesh (``qlora_jax.sharding``): ``data * fsdp`` must equal the global device count.

    ``1 x 1`` is the single-device path (single process only). The batch is split over all
    ``data * fsdp`` devices; LoRA parameters, optimizer state and NF4 weights are split over
    ``fsdp``.

    ``distributed``: ``jax.distributed.initialize()`` for several processes (hosts), before any
    other JAX use (:func:`qlora_jax.sharding.initialize_distributed`). ``"auto"``: when the
    environment describes a multi-process job (``JAX_COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES`` > 1 and ``JAX_PROCESS_ID``; SLURM with ``SLURM_NTASKS`` > 1; Open MPI
    with ``OMPI_COMM_WORLD_SIZE`` > 1); ``"on"``: always (JAX's cluster auto-detection fills
    what the environment does not say); ``"off"``: never.
    """

    data: int = 1
    fsdp: int = 1
    distributed: str = "auto"

    def __post_init__(self):
        for name in ("data", "fsdp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mesh.{name}={getattr(self, name)} must be >= 1")
        if self.distributed not in DISTRIBUTED_CHOICES:
            raise ConfigError(f"mesh.distributed={self.distributed!r} is not one of {DISTRIBUTED_CHOICES}")

    @property
    def size(self) -> int:
        return self.data * self.fsdp


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the model's architecture."""

    model: ModelSection = ModelSection()
    lora: LoRASection = LoRASection()
    data: DataConfig = DataConfig()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    mesh: MeshSection = MeshSection()

    def __post_init__(self):
        if self.data.batch_size % self.train.grad_accum:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} must be a multiple of train.grad_accum={self.train.grad_accum}"
            )
        if self.data.batch_size % self.mesh.size:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} must be divisible by mesh.data * mesh.fsdp = {self.mesh.size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Run ``get_config()`` of a config file, then apply ``section.key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"qlora_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # config files may import their siblings
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the file is user code: report which file failed
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        config = module.get_config()
    except (ConfigError, ValueError, OSError) as e:  # e.g. a model file the config points at is missing
        raise ConfigError(f"get_config() in {path}: {e}") from e
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"get_config() in {path} returned {type(config).__name__}, not TrainConfig")
    return apply_overrides(config, overrides)


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in sorted(args, key=lambda a: a is not int):  # "1024" is an int before it is a float
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={text!r}: " + "; ".join(errors))
    if annotation is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean (true/false)")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a{'n int' if annotation is int else ' float'}") from None
    if annotation is str:
        return text
    if origin is tuple:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"{key}={text!r} cannot be parsed for type {annotation}") from None


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``["lora.r=16", "data.dataset=/path.jsonl", ...]`` -> a new validated config."""
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        if dotted.count(".") != 1:
            raise ConfigError(f"override key {dotted!r} must be section.key (sections: {sorted(sections)})")
        section, key = dotted.split(".")
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r} in {item!r}; sections: {sorted(sections)}")
        section_obj = getattr(config, section)
        fields = {f.name: f for f in dataclasses.fields(section_obj)}
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}; {section} has {sorted(fields)}")
        hints = typing.get_type_hints(type(section_obj))
        changes.setdefault(section, {})[key] = _parse_value(text, hints[key], dotted)
    try:
        new_sections = {name: dataclasses.replace(getattr(config, name), **kv) for name, kv in changes.items()}
        return dataclasses.replace(config, **new_sections)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
