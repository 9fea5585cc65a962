"""The one entry point for 4-bit matmuls; it picks an implementation by platform and shape.

``"auto"`` (the default), from the H200 measurements in ``benchmarks/RESULTS.md`` (2026-11-28/29):

* on a GPU, 16-bit activations, one 2-D weight:
  - forward with M <= ``GEMV_AUTO_MAX_M`` = 2 (decoding one or two sequences): the Pallas GEMV
    ``nf4_gemv.py`` with the register decode and packed bf16x2 FMAs on x as it is (fp16x2 on x scaled
    into fp16's range for fp16 activations) — it streams the 4-bit weight once. Device time on
    4096x11008 / 11008x4096 / 8192x22016 at M = 1 (profiler traces, RESULTS.md, tenth session, 4 K
    slices): 15.2 / 18.4 / 48.0 us, 1.5-1.8x faster than the bf16 dot; at M = 2 1.1-1.3x faster than the
    small-M kernel on the joined 7B decode shapes, slower from M = 3;
  - forward and input gradient with M <= 64 (batched decoding, small batches): the tensor-core
    small-M kernel ``nf4_matmul_small_m.py`` (the same register decode, ``jnp.dot`` on the decoded
    tiles): its time hardly depends on M. Forward at M = 8: 24.3 / 25.8 / 74.8 us (1.05-1.2x faster
    than the bf16 dot), against the GEMV's 39.8 / 47.8 / 156.8 and the Pallas dequantize + dot's
    60.1 / 62.6 / 214.1; the GEMV's time grows with every row (at M = 2: 19.4 / 29.1 / 63.9 against
    24.1 / 25.6 / 74.3, ahead on two shapes; at M = 4 behind on all three). Input gradient at M = 16:
    27.7 / 32.4 / 92.0 us against the dequantize + dot's 62.2 / 61.8 / 210.5 (the GEMV's gradient:
    2-5x slower than the small-M kernel at M = 1);
  - everything else (M > 64, or N not a multiple of 16): the Pallas dequantize ``nf4_dequant.py``
    (2.1-2.6x faster than XLA's dequantize fusion) followed by XLA's dot with a bf16 product — at M = 2048
    on 4096x11008 1.14x a bf16 dot's time (forward and input gradient; the dequantize is 30 of the 30-32 us
    over it: RESULTS.md, eleventh session);
* GPUs older than Ampere (compute capability < 8.0, no ``fma.rn.bf16x2``): bf16 activations take the
  fp16x2 GEMV and, instead of the small-M kernel, the Pallas dequantize + dot (fp16 keeps both kernels);
* otherwise (CPU, fp32, stacked leaves, weights that are not whole blocks): the XLA path of
  ``nf4_matmul.py`` (even/odd halves decoded straight from the nibbles, contraction split).

Named implementations (``use_implementation(name)``; each falls back to ``"xla"`` where it
does not apply, and :func:`select_implementation` says which one runs):

* ``"xla"``: ``nf4_matmul.py``'s split path (even/odd columns decoded from the nibbles, two dots),
  any platform and shape (the plain dequantize + dot where ``K % blocksize != 0``).
* ``"small_m"``: ``nf4_matmul_small_m.py``, the tensor-core small-M kernels (GPU, bf16/fp16, M <= 64,
  ``K % blocksize == 0``, N a multiple of 16).
* ``"gemv"``: ``nf4_gemv.py``, the bandwidth-shaped GEMV (GPU, M <= 8, ``K % blocksize == 0``).
* ``"pallas_dequant"``: ``nf4_dequant.py``'s Pallas dequantize, then an XLA dot (GPU, bf16/fp16,
  a whole number of blocks); meant for large M.
* ``"pallas"``: ``"gemv"`` where it applies, else ``"pallas_dequant"``, else ``"xla"``.
* ``"xla_reduce"``: ``nf4_matmul_reduce`` (fp32 multiply-and-reduce XLA can fuse the decode into;
  any platform, M <= 8, one 2-D weight).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels import nf4_dequant as dequant
from qlora_jax.kernels import nf4_gemv as gemv
from qlora_jax.kernels import nf4_matmul as xla_paths
from qlora_jax.kernels import nf4_matmul_small_m as small_m
from qlora_jax.kernels import prmt_decode
from qlora_jax.kernels.nf4_matmul import (
    nf4_matmul_reduce,
    nf4_matmul_reference,
    nf4_matmul_t_reduce,
    nf4_matmul_t_reference,
)
from qlora_jax.nf4 import QuantizedTensor
from qlora_jax.nf4 import dequantize as nf4_dequantize

__all__ = [
    "ForcedChoice",
    "dequantize",
    "nf4_matmul",
    "nf4_matmul_t",
    "nf4_matmul_reduce",
    "nf4_matmul_reference",
    "nf4_matmul_t_reduce",
    "nf4_matmul_t_reference",
    "select_implementation",
    "use_implementation",
]

class ForcedChoice:
    """A choice among named implementations, ``"auto"`` unless forced for what is traced inside
    :meth:`use` (a trace-time switch: a jitted function already traced keeps its choice)."""

    def __init__(self, what: str, names: tuple[str, ...]):
        self.what, self.names, self.value = what, names, "auto"

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        if name not in self.names:
            raise ValueError(f"{self.what} {name!r} is not one of {self.names}")
        previous, self.value = self.value, name
        try:
            yield
        finally:
            self.value = previous


_IMPLEMENTATIONS = ("auto", "xla", "small_m", "gemv", "pallas_dequant", "pallas", "xla_reduce")
GEMV_AUTO_MAX_M = 2  # "auto" runs the GEMV up to this many rows, the small-M kernel from there to 64 rows
_choice = ForcedChoice("implementation", _IMPLEMENTATIONS)


def use_implementation(name: str) -> contextlib.AbstractContextManager[None]:
    """Force an implementation (one of ``_IMPLEMENTATIONS``, see the module docstring) for calls traced inside the block."""
    return _choice.use(name)


def select_implementation(x: jax.Array, w: QuantizedTensor, *, transpose: bool = False) -> str:
    """What :func:`nf4_matmul` (``transpose=False``) / :func:`nf4_matmul_t` (``True``) run for these
    operands: ``"xla"``, ``"small_m"``, ``"gemv"``, ``"pallas_dequant"`` or ``"xla_reduce"`` (``x`` is
    the activation or the output gradient)."""
    forced = _choice.value
    if forced == "xla":
        return "xla"
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    if forced == "xla_reduce":
        one_2d = len(w.shape) == 2 and w.packed.ndim == 1
        return "xla_reduce" if one_2d and m <= gemv.MAX_M else "xla"
    if jax.default_backend() != "gpu":
        return "xla"
    half = np.dtype(x.dtype).itemsize == 2
    # the small-M kernels' bf16 PTX (fma.rn.bf16x2) and bf16 tl.dot need Ampere or newer
    can_small_m = (half and small_m.supports(w, m) is None
                   and (x.dtype != jnp.bfloat16 or prmt_decode.bf16x2_supported()))
    if forced == "small_m":
        return "small_m" if can_small_m else "xla"
    can_gemv = gemv.supports(w, m) is None
    can_dequant = len(w.shape) == 2 and dequant.supports(w, x.dtype) is None
    if forced == "auto":  # measured choices, see the module docstring
        if half and not transpose and can_gemv and m <= GEMV_AUTO_MAX_M:
            return "gemv"
        if can_small_m:  # M <= 64
            return "small_m"
        return "pallas_dequant" if half and can_dequant else "xla"
    if forced in ("gemv", "pallas") and can_gemv:
        return "gemv"
    if forced in ("pallas_dequant", "pallas") and can_dequant:
        return "pallas_dequant"
    return "xla"


# implementation -> (module, forward function, input-gradient function), looked up when called
_FUNCTIONS = {
    "xla": (xla_paths, "nf4_matmul_split", "nf4_matmul_t_split"),
    "xla_reduce": (xla_paths, "nf4_matmul_reduce", "nf4_matmul_t_reduce"),
    "small_m": (small_m, "nf4_matmul_small_m", "nf4_matmul_t_small_m"),
    "gemv": (gemv, "nf4_gemv", "nf4_gemv_t"),
    "pallas_dequant": (dequant, "nf4_matmul_dequant", "nf4_matmul_t_dequant"),
}


def dequantize(w: QuantizedTensor, dtype) -> jax.Array:
    """``w`` as a ``dtype`` array: the Pallas dequantize on a GPU where it applies (one 2-D weight, whole
    blocks, bf16 / fp16 output; 2.1-2.6x faster than XLA's fusion), else :func:`qlora_jax.nf4.dequantize`.
    Equal values either way (up to an FMA's rounding of double-quantized scales on a GPU)."""
    if jax.default_backend() == "gpu" and len(w.shape) == 2 and dequant.supports(w, dtype) is None:
        return dequant.dequantize_pallas(w, dtype)
    return nf4_dequantize(w, dtype)


def nf4_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``x [..., in] @ dequant(w [out, in]).T -> [..., out]``, in ``x.dtype``."""
    module, forward, _ = _FUNCTIONS[select_implementation(x, w)]
    return getattr(module, forward)(x, w)


def nf4_matmul_t(dy: jax.Array, w: QuantizedTensor) -> jax.Array:
    """``dy [..., out] @ dequant(w [out, in]) -> [..., in]``, in ``dy.dtype`` (the input gradient)."""
    module, _, transposed = _FUNCTIONS[select_implementation(dy, w, transpose=True)]
    return getattr(module, transposed)(dy, w)
