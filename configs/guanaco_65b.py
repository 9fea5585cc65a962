"""Guanaco-65B: QLoRA on LLaMA-65B (huggyllama/llama-65b) with the paper's OASST1 recipe (lr 1e-4, LoRA dropout 0.05)."""

from guanaco_common import guanaco  # configs/ is on sys.path while a config loads


def get_config():
    return guanaco("huggyllama/llama-65b", lora_dropout=0.05, learning_rate=1e-4)
