"""Models: LLaMA with NF4 / 16-bit LoRA layers, and the converted-model directory format."""

from qlora_jax.models.checkpoint import load_model, save_model
from qlora_jax.models.llama import KVCache, Llama, LlamaConfig, LoRAConfig, QuantConfig, RopeScaling

__all__ = ["KVCache", "Llama", "LlamaConfig", "LoRAConfig", "QuantConfig", "RopeScaling", "load_model", "save_model"]
