"""qlora-jax: QLoRA (4-bit NormalFloat + double quantization + LoRA) in JAX/Flax."""

from qlora_jax.nf4 import (
    QUANT_TYPES,
    QuantizedTensor,
    codebook,
    dequantize,
    from_bnb_state_dict,
    quantize,
    to_bnb_state_dict,
)
from qlora_jax.nf4_dense import Frozen, LoRADense, NF4Dense, nf4_dense, shared_input_dense

__all__ = [
    "QUANT_TYPES",
    "QuantizedTensor",
    "codebook",
    "dequantize",
    "from_bnb_state_dict",
    "quantize",
    "to_bnb_state_dict",
    "Frozen",
    "LoRADense",
    "NF4Dense",
    "nf4_dense",
    "shared_input_dense",
]
__version__ = "0.1.0"
