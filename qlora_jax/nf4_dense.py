"""The QLoRA linear layer: a frozen 4-bit base weight plus a trainable low-rank adapter.

    y = x @ dequant(W).T + bias + scaling * (dropout(x) @ A @ B)

``W`` is a :class:`~qlora_jax.nf4.QuantizedTensor` of shape ``[out, in]`` (PyTorch /
bitsandbytes layout), ``A`` is ``[in, r]`` and ``B`` is ``[r, out]`` (PEFT's
``lora_A.weight`` / ``lora_B.weight`` transposed), ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rank-stabilized LoRA, PEFT's ``use_rslora``).

``W`` may also be a plain float array ``[out, in]`` (the 16-bit LoRA baseline the
paper compares against); the layer, its parameters and their paths are the same,
so adapters move freely between the two.

The 4-bit base matmul carries a ``custom_vjp``: its only residual is the packed weight
itself, its backward pass computes ``dx = dy @ dequant(W)`` through
:mod:`qlora_jax.kernels`, and ``W`` gets a zero cotangent. No dequantized copy
of ``W`` is ever saved for the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax import kernels
from qlora_jax.nf4 import QuantizedTensor, concat_rows, concat_rows_problem, expand_scales, quantize
from qlora_jax.sharding import gather_for_compute


def _zero_cotangent(tree: Any) -> Any:
    def zero(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros_like(leaf)
        return np.zeros(leaf.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _whole(w: QuantizedTensor | tuple[QuantizedTensor, ...]) -> QuantizedTensor:
    """``w`` gathered for compute; a tuple of weights gathered and joined along ``out`` (``concat_rows``)."""
    if isinstance(w, QuantizedTensor):
        return gather_for_compute(w)
    return concat_rows([gather_for_compute(t) for t in w])


@jax.custom_vjp
def frozen_matmul(x: jax.Array, w: QuantizedTensor | tuple[QuantizedTensor, ...]) -> jax.Array:
    """``x [..., in] @ dequant(w).T -> [..., out]`` whose backward pass saves only ``w``.

    ``w`` may be a tuple of weights with the same ``in`` that :func:`qlora_jax.nf4.concat_rows` joins
    exactly: their products side by side, ``[..., sum(out)]``, from one joined 4-bit weight (one
    dequantize and one GEMM each way).

    On a mesh with an ``fsdp`` axis, ``w`` is gathered whole right here (FSDP,
    :func:`qlora_jax.sharding.gather_for_compute`) in the forward pass and again in the backward
    pass; the residual is the sharded ``w``, so no gathered copy outlives its matmul.
    """
    return kernels.nf4_matmul(x, _whole(w))


def _frozen_matmul_fwd(x, w):
    return kernels.nf4_matmul(x, _whole(w)), w


def _frozen_matmul_bwd(w, dy):
    return kernels.nf4_matmul_t(dy, _whole(w)), _zero_cotangent(w)


frozen_matmul.defvjp(_frozen_matmul_fwd, _frozen_matmul_bwd)


def nf4_dense(
    x: jax.Array,
    qweight: QuantizedTensor | jax.Array,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    *,
    scaling: float = 1.0,
    bias: jax.Array | None = None,
    compute_dtype: Any = jnp.bfloat16,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """QLoRA linear: ``x [..., in] -> [..., out]`` in ``compute_dtype``.

    Args:
      x: input activations ``[..., in]``, any float dtype.
      qweight: frozen base weight ``[out, in]``: a ``QuantizedTensor``, or a float array
        (unquantized baseline; it is cast to ``compute_dtype`` and gets no gradient).
      lora_a, lora_b: adapter ``[in, r]`` and ``[r, out]``, or both ``None``.
      scaling: LoRA scale (``alpha / r``).
      bias: optional ``[out]``.
      compute_dtype: dtype of the matmuls' operands and of the output.
      dropout_rate: dropout on the adapter's input (PEFT's ``lora_dropout``);
        applied only when ``dropout_rng`` is given.
    """
    out_features, in_features = qweight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"nf4_dense: x.shape[-1]={x.shape[-1]} but the weight is [out={out_features}, in={in_features}]")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("nf4_dense: pass both lora_a and lora_b, or neither")
    if lora_a is not None and (lora_a.shape[0] != in_features or lora_b.shape[1] != out_features or lora_a.shape[1] != lora_b.shape[0]):
        raise ValueError(
            f"nf4_dense: lora_a {lora_a.shape} and lora_b {lora_b.shape} do not fit [in={in_features}, r] and [r, out={out_features}]"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"nf4_dense: dropout_rate={dropout_rate} must be in [0, 1)")

    xc = x.astype(compute_dtype)
    return add_adapter(_base_product(xc, qweight), xc, lora_a, lora_b, scaling=scaling, bias=bias,
                       dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def add_adapter(
    y: jax.Array,
    xc: jax.Array,
    lora_a: jax.Array | None,
    lora_b: jax.Array | None,
    *,
    scaling: float,
    bias: jax.Array | None,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """``y [..., out]`` (the base product of ``xc [..., in]``, both in the compute dtype) plus the adapter's
    ``scaling * dropout(xc) @ A @ B`` and ``bias`` (either may be ``None``): the rest of :func:`nf4_dense`."""
    if lora_a is not None:
        lora_a, lora_b = gather_for_compute((lora_a, lora_b))  # FSDP: whole adapters where they are used
        xa = xc
        if dropout_rng is not None and dropout_rate > 0.0:
            keep, kept_share = dropout_keep_mask(dropout_rng, dropout_rate, xc.shape)
            xa = jnp.where(keep, xc / jnp.asarray(kept_share, xc.dtype), jnp.zeros((), xc.dtype))
        y = lora_update(y, xa, lora_a, lora_b, scaling)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def _base_product(xc: jax.Array, weight: QuantizedTensor | jax.Array) -> jax.Array:
    """``xc [..., in] @ weight [out, in].T`` in ``xc.dtype``: the frozen base weight, 4-bit
    (:func:`frozen_matmul`) or float (cast to ``xc.dtype``, fp32 accumulation, no gradient)."""
    if isinstance(weight, QuantizedTensor):
        return frozen_matmul(xc, weight)
    return matmul_t(xc, jax.lax.stop_gradient(weight), xc.dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
    """``a`` contracted with ``b`` on axes ``contract``, fp32 accumulation, result in ``dtype`` (asked of
    the dot itself: a 16-bit result is written as such, not as fp32 plus a conversion)."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_t(x: jax.Array, w: jax.Array, out_dtype: Any = jnp.float32) -> jax.Array:
    """``x [..., in] @ w [out, in].T -> [..., out]`` in ``out_dtype`` (asked of the dot itself), ``w`` cast to
    ``x.dtype`` (16-bit operands, fp32 accumulation). The backward products round the cotangent to
    ``x.dtype`` once and take ``x.dtype`` operands too, as PyTorch's autocast does (plain autodiff would
    run them in fp32 for an fp32 result: an fp32 ``[tokens, vocab]`` cotangent against an fp32 copy of a
    bf16 ``lm_head``)."""
    return _dot(x, w.astype(x.dtype), (x.ndim - 1, 1), out_dtype)


def _matmul_t_fwd(x, w, out_dtype):
    return matmul_t(x, w, out_dtype), (x, w)


def _matmul_t_bwd(out_dtype, res, ct):
    x, w = res
    g = ct.astype(x.dtype)
    dx = _dot(g, w.astype(x.dtype), (g.ndim - 1, 0), x.dtype)
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    dw = _dot(g2, x2, (0, 0)).astype(w.dtype)  # [out, in]; dropped by XLA when w is frozen
    return dx, dw


matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_update(y: jax.Array, xa: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scaling: float) -> jax.Array:
    """``y + scaling * (xa @ A) @ B`` in ``y.dtype``: ``y``, ``xa`` ``[..., out]`` / ``[..., in]`` in the compute
    dtype, ``A [in, r]`` and ``B [r, out]`` in any float dtype (cast to the compute dtype for the products).

    What PyTorch's autocast does for PEFT: every product, forward and backward, takes compute-dtype
    operands and accumulates in fp32, and the products the size of the activations (``(xa @ A) @ B``,
    the input gradient) come out in the compute dtype; the adapters' gradients are fp32 sums. Plain
    autodiff would run the four backward products in fp32 instead (the cotangent of an fp32-accumulated
    product is fp32, so ``xa``, ``h`` and both adapters get converted up), and XLA would write the fp32
    ``[tokens, out]`` products to memory.
    """
    return _lora_update_fwd(y, xa, lora_a, lora_b, scaling)[0]


def _lora_update_fwd(y, xa, lora_a, lora_b, scaling):
    cdt = y.dtype
    a, b = lora_a.astype(cdt), lora_b.astype(cdt)
    h = _dot(xa, a, (xa.ndim - 1, 0)).astype(cdt)  # [..., r]
    delta = _dot(h, b, (h.ndim - 1, 0), cdt)  # [..., out]
    return y + (scaling * delta.astype(jnp.float32)).astype(cdt), (xa, h, lora_a, lora_b)  # PEFT's order


def _lora_update_bwd(scaling, res, dy):
    xa, h, lora_a, lora_b = res
    cdt = dy.dtype
    a, b = lora_a.astype(cdt), lora_b.astype(cdt)
    lead = dy.shape[:-1]
    dy2, h2, xa2 = dy.reshape(-1, dy.shape[-1]), h.reshape(-1, h.shape[-1]), xa.reshape(-1, xa.shape[-1])
    d_b = (scaling * _dot(h2, dy2, (0, 0))).astype(lora_b.dtype)  # [r, out]
    dh = (scaling * _dot(dy2, b, (1, 1))).astype(cdt)  # [T, r]
    d_a = _dot(xa2, dh, (0, 0)).astype(lora_a.dtype)  # [in, r]
    dxa = _dot(dh, a, (1, 1), cdt).reshape(*lead, xa.shape[-1])  # [..., in]
    return dy, dxa, d_a, d_b


lora_update.defvjp(_lora_update_fwd, _lora_update_bwd)


def _mix32(h: jax.Array) -> jax.Array:
    """A bijective 32-bit integer finalizer (Wellons' "lowbias32": xorshift-multiply, 7 operations)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def dropout_bits(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 ``shape`` pseudo-random bits for dropout: element ``i`` (row-major) gets
    ``mix32(mix32(i ^ s0) + s1)``, ``(s0, s1)`` two words drawn from ``rng``.

    A counter-based hash like JAX's threefry, but ~16 integer operations per element instead of
    threefry's ~120: on a GPU the masks are recomputed inside the fusions that use them (forward,
    rematerialized forward, backward), and in a 7B LoRA step's HLO those fusions were bound by
    threefry's arithmetic. Each element's bits depend on its index and the key only, so a mask is the
    same wherever and however often it is computed (and on any sharding of ``shape``).

    Arrays of 2**32 elements or more (a 32-bit index would wrap) hash the row (all leading axes
    together) and the column (last axis) in turn instead: ``mix32(mix32(mix32(row ^ s0) + col) + s1)``.
    """
    seed = jax.random.bits(rng, (2,), jnp.uint32)
    if (n := math.prod(shape)) < 2**32:
        idx = jax.lax.iota(jnp.uint32, n).reshape(shape)
        return _mix32(_mix32(idx ^ seed[0]) + seed[1])
    return _dropout_bits_by_row(seed, shape)


def _dropout_bits_by_row(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """:func:`dropout_bits` for arrays too large for one 32-bit index: rows and columns hashed in turn."""
    if not shape or math.prod(shape[:-1]) >= 2**32 or shape[-1] >= 2**32:
        raise ValueError(f"dropout_bits: {shape} has 2**32 or more rows or columns")
    rows = jax.lax.iota(jnp.uint32, math.prod(shape[:-1])).reshape(*shape[:-1], 1)
    cols = jax.lax.iota(jnp.uint32, shape[-1])
    return _mix32(_mix32(_mix32(rows ^ seed[0]) + cols) + seed[1])


def dropout_keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """Bool keep-mask of ``shape`` dropping each element with probability ``rate`` (to within 2**-16),
    and the exact share it keeps (the rescale factor's denominator).

    Compares the top 16 of :func:`dropout_bits`' 32 bits with ``round(rate * 2**16)``.
    """
    threshold = int(round(rate * 65536))
    keep = (dropout_bits(rng, shape) >> 16) >= jnp.uint32(threshold)
    return keep, 1.0 - threshold / 65536


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilized LoRA; 0 without
    an adapter (``r = 0``)."""
    if not r:
        return 0.0
    return alpha / (math.sqrt(r) if rslora else r)


class Frozen(nnx.Variable):
    """Base-model state that is never trained (quantized weights, biases): not a ``Param``."""


def torch_linear_init(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: torch's ``nn.Linear`` weight init and PEFT's
    ``kaiming_uniform_(a=sqrt(5))`` for ``lora_A``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoRADense(nnx.Module):
    """A frozen float linear layer plus a LoRA adapter (see :func:`nf4_dense`).

    The base weight is a :class:`Frozen` ``[out, in]`` array in ``param_dtype``;
    ``lora_a`` / ``lora_b`` are ``nnx.LoRAParam`` and are the only trainable
    leaves (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``). Initialisation is
    PEFT's: ``A`` uniform in ``±1/sqrt(in)``, ``B`` zeros, so a fresh adapter
    leaves the layer's output unchanged. :class:`NF4Dense` is the same layer
    with the weight stored in 4 bits; parameter names and paths are identical.

    Args:
      in_features, out_features: layer sizes.
      r: LoRA rank; 0 builds the layer without an adapter.
      alpha: LoRA alpha; ``scaling = alpha / r``.
      rslora: rank-stabilized LoRA (Kalajdzievski, 2023; PEFT's ``use_rslora``):
        ``scaling = alpha / sqrt(r)``.
      dropout: dropout rate on the adapter input (active in ``train()`` mode).
      use_bias: add a frozen bias ``[out]`` (zeros unless ``bias`` is given).
      weight: ``[out, in]`` float array; ``None`` draws torch's default ``nn.Linear`` init.
      param_dtype: storage dtype of the frozen float weight.
      compute_dtype: dtype of the matmuls and output.
      lora_dtype: storage dtype of ``lora_a`` / ``lora_b`` (fp32, or bf16 as the original QLoRA
        trains them; the optimizer then keeps an fp32 master copy, ``paged_adamw(fp32_master=True)``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int = 64,
        alpha: float = 16.0,
        rslora: bool = False,
        dropout: float = 0.0,
        use_bias: bool = False,
        weight: Any = None,
        bias: jax.Array | np.ndarray | None = None,
        param_dtype: Any = jnp.bfloat16,
        compute_dtype: Any = jnp.bfloat16,
        lora_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if r < 0:
            raise ValueError(f"{type(self).__name__}: r={r} must be >= 0")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.rslora, self.dropout_rate = r, alpha, rslora, dropout
        self.param_dtype = param_dtype
        self.compute_dtype = compute_dtype
        if weight is None:
            weight = torch_linear_init(rngs.params(), (out_features, in_features), in_features)
        self.weight = Frozen(self._frozen_weight(weight))
        if use_bias or bias is not None:
            b = jnp.zeros((out_features,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
            self.bias = Frozen(b)
        else:
            self.bias = None
        if r > 0:
            self.lora_a = nnx.LoRAParam(torch_linear_init(rngs.params(), (in_features, r), in_features).astype(lora_dtype))
            self.lora_b = nnx.LoRAParam(jnp.zeros((r, out_features), lora_dtype))
        else:
            self.lora_a = self.lora_b = None
        self.deterministic = False
        self.rngs = rngs["dropout"].fork() if dropout > 0 and r > 0 else None

    def _check_shape(self, shape: tuple[int, ...], what: str) -> None:
        if tuple(shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{type(self).__name__}: {what} shape {tuple(shape)} is not [out={self.out_features}, in={self.in_features}]"
            )

    def _frozen_weight(self, weight: Any) -> Any:
        """The value stored in ``self.weight``: here the float array in ``param_dtype``."""
        if isinstance(weight, QuantizedTensor):
            raise ValueError(f"{type(self).__name__} holds a float weight; use NF4Dense for a QuantizedTensor")
        self._check_shape(weight.shape, "weight")
        return jnp.asarray(weight, self.param_dtype)

    @property
    def scaling(self) -> float:
        """The factor on ``x @ A @ B`` (:func:`lora_scaling`)."""
        return lora_scaling(self.alpha, self.r, self.rslora)

    def _adapter_args(self, deterministic: bool | None) -> dict[str, Any]:
        """Keyword arguments of :func:`nf4_dense` / :func:`add_adapter` besides ``x`` and the weight (draws
        this call's dropout key)."""
        deterministic = self.deterministic if deterministic is None else deterministic
        rng = None
        if self.rngs is not None and not deterministic:
            rng = self.rngs()
        return dict(
            lora_a=None if self.lora_a is None else self.lora_a[...],
            lora_b=None if self.lora_b is None else self.lora_b[...],
            scaling=self.scaling,
            bias=None if self.bias is None else self.bias[...],
            dropout_rate=self.dropout_rate,
            dropout_rng=rng,
        )

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        """``x [..., in] -> [..., out]`` in ``compute_dtype``."""
        return nf4_dense(x, self.weight.get_value(), compute_dtype=self.compute_dtype, **self._adapter_args(deterministic))


class NF4Dense(LoRADense):
    """The QLoRA linear layer: :class:`LoRADense` with its frozen weight stored in 4 bits.

    ``weight`` may be an ``[out, in]`` float array (quantized here with ``quant_type``,
    ``blocksize``, ``double_quant``; see :func:`qlora_jax.quantize`) or an existing
    ``QuantizedTensor``; ``None`` draws torch's default ``nn.Linear`` init and quantizes it.
    Other arguments as for :class:`LoRADense`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        **kwargs: Any,
    ):
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        super().__init__(in_features, out_features, **kwargs)

    def _frozen_weight(self, weight: Any) -> QuantizedTensor:
        if isinstance(weight, QuantizedTensor):
            self._check_shape(weight.shape, "quantized weight")
            return weight
        self._check_shape(weight.shape, "weight")
        return quantize(weight, quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant)


# --- training: layers that read the same input, one base product ----------------------------------


def shared_input_dense(x: jax.Array, layers: Sequence[LoRADense], *, deterministic: bool | None = None) -> list[jax.Array]:
    """``[layer(x) for layer in layers]`` for layers that read the same ``x [..., in]`` (q/k/v; gate/up).

    Where their 4-bit weights join exactly (:func:`qlora_jax.nf4.concat_rows`: same format, whole
    double-quantization groups) and their compute dtypes agree, one frozen product computes all base
    outputs: one dequantize and one GEMM forward and backward instead of one per layer (on a GPU XLA
    otherwise merges two of the dots itself by copying their dequantized weights side by side: a 64 MiB
    copy per 7B attention layer and pass). The joined weight exists only inside the product. Each
    adapter keeps its own dropout mask and key, exactly as its own ``__call__`` would draw it.
    """
    weights = [layer.weight.get_value() for layer in layers]
    dtypes = {layer.compute_dtype for layer in layers}
    if (len(layers) < 2 or len(dtypes) != 1 or not isinstance(weights[0], QuantizedTensor)
            or not _joinable(weights) or x.shape[-1] != weights[0].shape[1]):
        return [layer(x, deterministic=deterministic) for layer in layers]
    xc = x.astype(dtypes.pop())
    y = frozen_matmul(xc, tuple(weights))
    cuts = np.cumsum([w.shape[0] for w in weights])[:-1]
    return [add_adapter(part, xc, **layer._adapter_args(deterministic))
            for layer, part in zip(layers, jnp.split(y, cuts, axis=-1))]


# --- inference: layers that read the same input, as one ------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FusedDense:
    """Linear layers that read the same input (q/k/v; gate/up), prepared for inference as one layer.

    weight:     their base weights joined along ``out``: ``[sum(out), in]`` (:func:`qlora_jax.nf4.concat_rows`,
                or a float array), in the layers' storage.
    lora_a:     ``[sum(r), in]`` their adapters' ``A`` stacked, transposed (PEFT's ``lora_A.weight``), in
                ``compute_dtype``, or ``None``: for a few rows of ``x`` the product is then a reduction along
                contiguous rows (with ``[in, r]`` XLA reduced across rows: 6.4 us, ~80 GB/s, per product at
                M = 1 on an H200; ``benchmarks/RESULTS.md``, fifth session).
    lora_b:     ``[sum(r), sum(out)]`` block-diagonal: each layer's ``B`` in its own rows and columns.
    lora_scale: fp32 ``[sum(out)]`` each output column's layer's LoRA scaling (0 without an adapter).
    bias:       ``[sum(out)]`` or ``None``.
    splits:     each layer's ``out`` (static).

    :func:`fused_dense` then makes one base matmul, one ``A`` and one ``B`` matmul for the group,
    instead of three per layer: decoding one token is bound by kernel launches, not FLOPs.
    """

    weight: Any
    lora_a: jax.Array | None
    lora_b: jax.Array | None
    lora_scale: jax.Array | None
    bias: jax.Array | None
    splits: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    compute_dtype: str = dataclasses.field(metadata=dict(static=True))


def _joinable(weights: Sequence[Any]) -> bool:
    """Whether :func:`qlora_jax.nf4.concat_rows` (or a float concatenation) joins these weights."""
    if all(not isinstance(w, QuantizedTensor) for w in weights):
        return len({(w.shape[1], w.dtype) for w in weights}) == 1
    return all(isinstance(w, QuantizedTensor) for w in weights) and concat_rows_problem(weights) is None


def fuse_dense(layers: Sequence[LoRADense], *, fp32_scales: bool = False) -> tuple[FusedDense, ...]:
    """``layers`` (one 2-D weight each, same input) as one :class:`FusedDense`, or one per layer where their
    weights cannot be joined exactly (different formats, or double-quantized scales that do not fill whole
    groups of 256); adapters in the layers' ``compute_dtype``. Inference only: no dropout, no gradients.
    Runs inside ``jit`` (e.g. once before a decode loop); the result holds a copy of the weights.
    ``fp32_scales``: 4-bit weights keep their block scales decoded to fp32 (:func:`qlora_jax.nf4.expand_scales`:
    3 more bytes per block; the GEMV and small-M kernels then read a scale instead of decoding one)."""
    layers = list(layers)
    cdt = jnp.dtype(layers[0].compute_dtype)
    weights = [l.weight.get_value() for l in layers]
    if fp32_scales:
        weights = [expand_scales(w) if isinstance(w, QuantizedTensor) else w for w in weights]
    if len(layers) > 1 and (
        any(jnp.dtype(l.compute_dtype) != cdt or l.in_features != layers[0].in_features for l in layers)
        or not _joinable(weights)
    ):
        return tuple(f for l in layers for f in fuse_dense([l], fp32_scales=fp32_scales))
    if len(weights) == 1:
        weight = weights[0]
    elif isinstance(weights[0], QuantizedTensor):
        weight = concat_rows(weights)
    else:
        weight = jnp.concatenate(weights)
    splits = tuple(l.out_features for l in layers)
    lora_a = lora_b = lora_scale = None
    adapted = [l for l in layers if l.lora_a is not None]
    if adapted:
        rs = [0 if l.lora_a is None else l.r for l in layers]
        lora_a = jnp.concatenate([l.lora_a[...].astype(cdt).T for l in adapted], axis=0)
        lora_b = jnp.zeros((sum(rs), sum(splits)), cdt)
        row = col = 0
        for l, r, n in zip(layers, rs, splits):
            if r:
                lora_b = jax.lax.dynamic_update_slice(lora_b, l.lora_b[...].astype(cdt), (row, col))
            row, col = row + r, col + n
        lora_scale = jnp.concatenate([jnp.full((n,), l.scaling if l.lora_a is not None else 0.0, jnp.float32)
                                      for l, n in zip(layers, splits)])
    bias = None
    if any(l.bias is not None for l in layers):
        bias = jnp.concatenate([jnp.zeros((n,), jnp.float32) if l.bias is None else l.bias[...].astype(jnp.float32)
                                for l, n in zip(layers, splits)])
    return (FusedDense(weight, lora_a, lora_b, lora_scale, bias, splits, cdt.name),)


def fused_dense(x: jax.Array, group: Sequence[FusedDense]) -> list[jax.Array]:
    """``x [..., in]`` through every layer of ``group`` (:func:`fuse_dense`'s output): one ``[..., out_i]``
    array per original layer, in ``compute_dtype``, equal to each layer's :func:`nf4_dense` in eval mode."""
    outs = []
    for f in group:
        cdt = jnp.dtype(f.compute_dtype)
        xc = x.astype(cdt)
        y = _base_product(xc, f.weight)
        if f.lora_a is not None:
            a, b = gather_for_compute((f.lora_a, f.lora_b))
            h = jax.lax.dot_general(xc, a, (((xc.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            h = h.astype(cdt)
            delta = jnp.matmul(h, b, preferred_element_type=jnp.float32)
            y = (y.astype(jnp.float32) + f.lora_scale * delta).astype(cdt)
        if f.bias is not None:
            y = y + f.bias.astype(cdt)
        outs += jnp.split(y, np.cumsum(f.splits)[:-1].tolist(), axis=-1) if len(f.splits) > 1 else [y]
    return outs
