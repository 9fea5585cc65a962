"""Guanaco-33B: QLoRA on LLaMA-33B (huggyllama/llama-30b) with the paper's OASST1 recipe (lr 1e-4, LoRA dropout 0.05)."""

from guanaco_common import guanaco  # configs/ is on sys.path while a config loads


def get_config():
    return guanaco("huggyllama/llama-30b", lora_dropout=0.05, learning_rate=1e-4)
