"""QLoRA on the real tiny LLaMA stories260K (../shared/models/stories260K) with the English
OASST1 conversation trees in ../shared: trains in about a minute on a CPU; the tests use it.

``QLORA_SHARED`` points elsewhere if ../shared is not beside the checkout."""

import os
from pathlib import Path

from qlora_jax.data import DataConfig
from qlora_jax.train_config import LoRASection, ModelSection, OptimSection, TrainConfig, TrainSection

SHARED = Path(os.environ.get("QLORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def get_config():
    return TrainConfig(
        model=ModelSection(path=str(SHARED / "models" / "stories260K"), quantize=True, quant_type="nf4",
                           blocksize=64, double_quant=True, compute_dtype="float32", remat="full"),
        lora=LoRASection(r=8, alpha=16.0, dropout=0.05),
        data=DataConfig(dataset=str(SHARED / "data" / "oasst" / "openassistant_en_100_tree.jsonl"),
                        dataset_format="oasst1", source_max_len=64, target_max_len=192,
                        eval_dataset_size=16, batch_size=8, eval_batch_size=8),
        optim=OptimSection(learning_rate=3e-3, schedule="constant", warmup_ratio=0.03, max_grad_norm=1.0,
                           paged="auto"),
        train=TrainSection(steps=30, grad_accum=2, log_every=5, eval_every=10, save_every=10,
                           keep_checkpoints=2, sample_prompts=1, sample_tokens=16),
    )
