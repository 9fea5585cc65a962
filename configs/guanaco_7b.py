"""Guanaco-7B: QLoRA on LLaMA-7B (huggyllama/llama-7b) with the paper's OASST1 recipe (lr 2e-4, LoRA dropout 0.1)."""

from guanaco_common import guanaco  # configs/ is on sys.path while a config loads


def get_config():
    return guanaco("huggyllama/llama-7b", lora_dropout=0.1, learning_rate=2e-4)
