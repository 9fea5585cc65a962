"""The one entry point for 4-bit matmuls; it picks an implementation by platform and shape.

``"auto"`` (the default) runs the XLA path of ``nf4_matmul.py`` everywhere today:
dequantize to the compute dtype, then one dot. Measured on an H200
(``benchmarks/RESULTS.md``, 2026-11-28) it is the fastest we have at every shape:
~2.5x a bf16 dot's time at M <= 64 and ~1.35x at M = 2048. The fused small-M Pallas
kernels (``nf4_matmul_small_m.py``: correct, streaming the 4-bit weight once) reach
only 100-200 GB/s there, 2-3x slower than the XLA path, so ``auto`` does not pick
them; ``use_implementation("small_m")`` runs them where they apply (GPU, bf16/fp16,
M <= 64, ``K % blocksize == 0``), for benchmarks and their tests. A kernel becomes
the default for a shape when the benchmark shows it beating the XLA path there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

from qlora_jax.kernels import nf4_matmul_small_m as small_m
from qlora_jax.kernels.nf4_matmul import (
    nf4_matmul_reference, nf4_matmul_split, nf4_matmul_t_reference, nf4_matmul_t_split,
)
from qlora_jax.nf4 import QuantizedTensor

__all__ = [
    "nf4_matmul",
    "nf4_matmul_t",
    "nf4_matmul_reference",
    "nf4_matmul_t_reference",
    "select_implementation",
    "use_implementation",
]

_IMPLEMENTATIONS = ("auto", "xla", "small_m")
_forced = "auto"


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Force an implementation (``"auto"``, ``"xla"`` or ``"small_m"``) for calls traced inside the block."""
    global _forced
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation {name!r} is not one of {_IMPLEMENTATIONS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def select_implementation(x: jax.Array, w: QuantizedTensor) -> str:
    """``"small_m"`` or ``"xla"``: what :func:`nf4_matmul` / :func:`nf4_matmul_t` run for these operands."""
    if _forced != "small_m" or jax.default_backend() != "gpu":
        return "xla"  # the fastest path measured (see the module docstring)
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    if np.dtype(x.dtype).itemsize != 2 or small_m.supports(w, m) is not None:
        return "xla"
    return "small_m"


def nf4_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w [out, in]).T -> [..., out]``, in ``x.dtype``."""
    if select_implementation(x, w) == "small_m":
        return small_m.nf4_matmul_small_m(x, w)
    return nf4_matmul_split(x, w)


def nf4_matmul_t(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w [out, in]) -> [..., in]``, in ``dy.dtype`` (the input gradient)."""
    if select_implementation(dy, w) == "small_m":
        return small_m.nf4_matmul_t_small_m(dy, w)
    return nf4_matmul_t_split(dy, w)
