"""LoRA adapters in Hugging Face PEFT's format.

``save_adapter`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's
key names and shapes, so ``peft.PeftModel.from_pretrained(LlamaForCausalLM, dir)`` loads
what this project trains:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]   (our lora_a[i].T)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]  (our lora_b[i].T)

and likewise for k/v/o_proj and mlp.gate/up/down_proj.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

PEFT_PREFIX = "base_model.model.model.layers"


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """PEFT-named fp32 arrays of every LoRA weight of a :class:`~qlora_jax.models.llama.Llama`."""
    out: dict[str, np.ndarray] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        names = [str(p) for p in path]
        if names[0] != "layers" or names[-1] not in ("lora_a", "lora_b"):
            raise ValueError(f"unexpected LoRA parameter path {'/'.join(names)}")
        stacked = np.asarray(value.get_value() if hasattr(value, "get_value") else value, np.float32)  # [L, in, r] / [L, r, out]
        module = ".".join(names[1:-1])
        which = "lora_A" if names[-1] == "lora_a" else "lora_B"
        for i in range(stacked.shape[0]):
            out[f"{PEFT_PREFIX}.{i}.{module}.{which}.weight"] = np.ascontiguousarray(stacked[i].T)
    return out


def save_adapter(model: nnx.Module, directory: str | Path, *, lora_config: Any, base_model: str = "") -> Path:
    """Write the model's adapters as a PEFT LoRA directory (atomically: temp dir, then rename)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    tensors = adapter_tensors(model)
    targets = sorted({k.split(".")[-3] for k in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(lora_config.r),
        "lora_alpha": float(lora_config.alpha),
        "lora_dropout": float(lora_config.dropout),
        "target_modules": targets,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
