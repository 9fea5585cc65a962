"""The one entry point for 4-bit matmuls; it picks an implementation by platform and shape.

Today every platform uses the XLA path (dequantize + dot, ``nf4_matmul.py``);
fused Pallas kernels plug in here without touching callers.
"""

from __future__ import annotations

import jax

from qlora_jax.kernels.nf4_matmul import nf4_matmul_reference, nf4_matmul_t_reference
from qlora_jax.nf4 import QuantizedTensor

__all__ = ["nf4_matmul", "nf4_matmul_t", "nf4_matmul_reference", "nf4_matmul_t_reference"]


def nf4_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w [out, in]).T -> [..., out]``, in ``x.dtype``."""
    return nf4_matmul_reference(x, w)


def nf4_matmul_t(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w [out, in]) -> [..., in]``, in ``dy.dtype`` (the input gradient)."""
    return nf4_matmul_t_reference(dy, w)
