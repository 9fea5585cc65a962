"""Guanaco-13B: QLoRA on LLaMA-13B (huggyllama/llama-13b) with the paper's OASST1 recipe (lr 2e-4, LoRA dropout 0.05)."""

from guanaco_common import guanaco  # configs/ is on sys.path while a config loads


def get_config():
    return guanaco("huggyllama/llama-13b", lora_dropout=0.05, learning_rate=2e-4)
