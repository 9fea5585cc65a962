"""The Guanaco OASST1 recipe of the QLoRA paper (its scripts/finetune_guanaco_*.sh), shared by
configs/guanaco_{7b,13b,33b,65b}.py: NF4 + double quantization, bf16 compute, LoRA r=64,
alpha=16 on all linear layers, constant schedule with 3% warmup, AdamW beta2 0.999, no weight
decay, max grad norm 0.3, effective batch 16 (micro-batch 1 x 16 accumulation), 1875 steps,
source/target max length 16/512, group-by-length, train on the target only."""

from qlora_jax.data import DataConfig
from qlora_jax.train_config import LoRASection, ModelSection, OptimSection, TrainConfig, TrainSection


def guanaco(base_model: str, *, lora_dropout: float, learning_rate: float) -> TrainConfig:
    return TrainConfig(
        model=ModelSection(path=base_model, quantize=True, quant_type="nf4", blocksize=64, double_quant=True,
                           compute_dtype="bfloat16", remat="auto"),
        lora=LoRASection(r=64, alpha=16.0, dropout=lora_dropout),
        data=DataConfig(dataset="oasst1", source_max_len=16, target_max_len=512, train_on_source=False,
                        group_by_length=True, eval_dataset_size=1024, max_eval_samples=1000,
                        batch_size=16, eval_batch_size=16),
        optim=OptimSection(learning_rate=learning_rate, schedule="constant", warmup_ratio=0.03, b2=0.999,
                           weight_decay=0.0, max_grad_norm=0.3, paged="auto"),
        train=TrainSection(steps=1875, grad_accum=16, seed=0, log_every=10, eval_every=187, save_every=500),
    )
