"""The 4-bit storage format: NF4 / FP4 / int4 codebooks, block-wise absmax
quantization, two codes per byte, and double quantization of the block scales.

The layout is bitsandbytes' (Dettmers et al., 2023, QLoRA §3), bit for bit with
its CPU backend:

* the tensor is flattened row-major and cut into blocks of ``blocksize``
  values; the last block may be shorter (e.g. stories260K's FFN width 172);
* each block is scaled by its absmax into [-1, 1] and every value is mapped
  to the nearest codebook entry (ties go to the lower value);
* codes are packed two per ``uint8``, the first element in the high nibble;
* double quantization (§3, "Double Quantization") stores the fp32 absmax
  values as 8-bit codes of bitsandbytes' signed dynamic map: their mean is
  subtracted (``nested_offset``) and blocks of 256 are scaled by their own
  fp32 absmax (``nested_absmax``).

Everything here is pure ``jnp`` and runs under ``jit``; ``quantize`` and
``dequantize`` are the public entry points.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

QuantType = Literal["nf4", "fp4", "int4"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "int4")
NESTED_BLOCKSIZE = 256
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096

# The 16 NormalFloat values exactly as bitsandbytes stores them
# (create_normal_map(offset=0.9677083, use_extra_value=True)).
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
# bitsandbytes' FP4 (E2M1, exponent bias 2) in bit-pattern order, normalised by
# its largest value 12; index 8 is "-0", stored as +0 as bitsandbytes does.
FP4_CODE = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
    / np.float32(12.0)
).astype(np.float32)
# Symmetric int4 (absmax-scaled integers -7..7), bitsandbytes' "int4" table.
INT4_CODE = (
    np.array([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7], np.float32) / np.float32(7.0)
).astype(np.float32)

CODEBOOKS: dict[str, np.ndarray] = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def codebook(quant_type: str) -> np.ndarray:
    """The 16 fp32 values a 4-bit code of ``quant_type`` stands for."""
    if quant_type not in CODEBOOKS:
        raise ValueError(f"quant_type={quant_type!r} is not one of {QUANT_TYPES}")
    return CODEBOOKS[quant_type]


@functools.cache
def _bucket_bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between sorted code values, and sorted position -> code index."""
    code = codebook(quant_type)
    order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    midpoints = ((sorted_code[:-1] + sorted_code[1:]) / np.float32(2)).astype(np.float32)
    return midpoints, order.astype(np.uint8)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace computed the way torch.linspace does (both ends exact)."""
    step = (np.float32(end) - np.float32(start)) / np.float32(steps - 1)
    i = np.arange(steps)
    half = steps // 2
    lo = np.float32(start) + step * i[:half].astype(np.float32)
    hi = np.float32(end) - step * (steps - 1 - i[half:]).astype(np.float32)
    return np.concatenate([lo, hi]).astype(np.float32)


@functools.cache
def dynamic_map_signed() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), 256 sorted fp32 values.

    bitsandbytes builds it with ``torch.linspace``, whose vectorised CPU kernel
    rounds some entries differently by SIMD width; this is the scalar formula
    (within two fp32 ulp of them). Checkpoints carry their own map, so
    imported codes always decode with the map they were made with.

    Entry 0 is set to -1.0, as bitsandbytes' CPU quantizer does before it
    searches the map, so that a block's most negative value is represented
    exactly (the raw map starts at -0.99297).
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = _torch_linspace_f32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        data += (-scale * means).astype(np.float32).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    out = np.array(sorted(data), dtype=np.float32)
    out[0] = -1.0
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A tensor stored in 4 bits, laid out as bitsandbytes lays it out.

    Array leaves (``n`` = number of elements, ``nb = ceil(n / blocksize)``):
      packed:        uint8 ``[ceil(n / 2)]``, two codes per byte, first in the high nibble.
      absmax:        fp32 ``[nb]`` block scales, or uint8 ``[nb]`` codes with double quantization.
      nested_absmax: fp32 ``[ceil(nb / 256)]`` scales of the absmax codes (double quant only).
      nested_offset: fp32 ``[]`` mean subtracted from absmax before quantizing it (double quant only);
                     ``[ceil(nb / 256)]``, one per block of 256 scales, in tensors joined by :func:`concat_rows`.
      nested_code:   fp32 ``[256]`` the 8-bit map the absmax codes index (double quant only).
    Static: ``shape`` and ``dtype`` of the original tensor, ``blocksize``, ``quant_type``.

    Leaves may carry extra leading axes (e.g. layers stacked for ``scan``);
    ``shape`` always describes one tensor.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    nested_offset: jax.Array | None
    nested_code: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    blocksize: int = dataclasses.field(metadata=dict(static=True))
    quant_type: str = dataclasses.field(metadata=dict(static=True))

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array (codes, scales, offset, map)."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    @property
    def bits_per_param(self) -> float:
        leaves = jax.tree.leaves(self)
        stacked = int(np.prod(leaves[0].shape[:-1])) if leaves and leaves[0].ndim > 1 else 1
        return 8.0 * self.nbytes / (self.size * stacked)

    @property
    def code(self) -> np.ndarray:
        """The 16-entry codebook the 4-bit codes index."""
        return codebook(self.quant_type)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, dtype={self.dtype}, quant_type={self.quant_type!r}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant})"
        )


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _validate_args(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not one of {QUANT_TYPES}")
    if not isinstance(blocksize, (int, np.integer)) or not (
        MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE and blocksize & (blocksize - 1) == 0
    ):
        raise ValueError(
            f"blocksize={blocksize!r} must be a power of two between {MIN_BLOCKSIZE} and {MAX_BLOCKSIZE}"
        )


def _blockwise_scale(flat: jax.Array, blocksize: int, reciprocal: bool) -> tuple[jax.Array, jax.Array]:
    """Per-block absmax and values scaled into [-1, 1], exactly as bitsandbytes computes them.

    Full blocks are multiplied by ``1 / absmax`` (the 4-bit path) or divided by
    ``absmax`` (the 8-bit path, ``reciprocal=False``); bitsandbytes' 4-bit path
    divides the short last block.
    """
    n = flat.shape[0]
    nb = num_blocks(n, blocksize)
    rem = n % blocksize
    padded = jnp.pad(flat, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = jnp.max(jnp.abs(padded), axis=1)
    # All-zero blocks scale to 0 (bitsandbytes divides by a denormal 1e-38 there,
    # which XLA flushes to zero).
    nonzero = (absmax > 0)[:, None]
    safe = jnp.where(nonzero, absmax[:, None], np.float32(1.0))
    if reciprocal:
        scaled = padded * (np.float32(1.0) / safe)
        if rem:
            scaled = scaled.at[-1].set(padded[-1] / safe[-1])
    else:
        scaled = padded / safe
    scaled = jnp.where(nonzero, scaled, np.float32(0.0))
    return absmax, jnp.clip(scaled, -1.0, 1.0).reshape(-1)[:n]


def _nearest_code_4bit(scaled: jax.Array, quant_type: str) -> jax.Array:
    """Index of the nearest codebook entry; values on a midpoint go to the lower entry."""
    bounds, order = _bucket_bounds(quant_type)
    sorted_pos = jnp.sum(scaled[:, None] > jnp.asarray(bounds)[None, :], axis=1)
    return jnp.asarray(order)[sorted_pos]


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """uint8 codes ``[n]`` (values < 16) -> ``[ceil(n/2)]`` bytes, first code in the high nibble."""
    codes = codes.astype(jnp.uint8)
    if codes.shape[0] % 2:
        codes = jnp.pad(codes, (0, 1))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: ``[..., ceil(n/2)]`` bytes -> ``[..., n]`` uint8 codes."""
    pairs = jnp.stack([packed >> 4, packed & 0x0F], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :n]


def _double_quantize(absmax: jax.Array, offset: jax.Array, code: jax.Array) -> tuple[jax.Array, jax.Array]:
    """8-bit codes (indices into the sorted map ``code`` [256]) of ``absmax - offset`` in
    blocks of 256, and the fp32 scale of each block."""
    centred = absmax - offset
    nested_absmax, scaled = _blockwise_scale(centred, NESTED_BLOCKSIZE, reciprocal=False)
    # Nearest entry of the sorted map, ties to the lower entry (argmin keeps the first).
    codes = jnp.argmin(jnp.abs(scaled[:, None] - code[None, :]), axis=1).astype(jnp.uint8)
    return codes, nested_absmax


def _accurate_mean(x: jax.Array) -> jax.Array:
    """fp32 mean with a correction pass, within an ulp of the exact mean."""
    m0 = jnp.mean(x)
    return m0 + jnp.mean(x - m0)


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "double_quant"))
def _quantize_jit(w: jax.Array, *, quant_type: str, blocksize: int, double_quant: bool):
    flat = w.reshape(-1).astype(jnp.float32)
    absmax, scaled = _blockwise_scale(flat, blocksize, reciprocal=True)
    if scaled.shape[0] % 2:  # an odd tail is padded with the code of 0.0, as bitsandbytes does
        scaled = jnp.pad(scaled, (0, 1))
    packed = pack_nibbles(_nearest_code_4bit(scaled, quant_type))
    if not double_quant:
        return packed, absmax, None, None, None
    offset = _accurate_mean(absmax)
    code = jnp.asarray(dynamic_map_signed())
    codes, nested_absmax = _double_quantize(absmax, offset, code)
    return packed, codes, nested_absmax, offset, code


def _check_input(w: Any) -> None:
    dtype = getattr(w, "dtype", None)
    if dtype is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"quantize expects a float32, bfloat16 or float16 array, got dtype {dtype}")
    if int(np.prod(w.shape)) == 0:
        raise ValueError(f"quantize got an empty array of shape {tuple(w.shape)}")
    if not isinstance(w, jax.core.Tracer):
        finite = np.isfinite(np.asarray(jnp.asarray(w).astype(jnp.float32)))
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise ValueError(
                f"quantize got {int((~finite).sum())} non-finite value(s); the first at index {tuple(int(i) for i in bad)}"
            )


def quantize(
    w: jax.Array | np.ndarray,
    *,
    quant_type: QuantType = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> QuantizedTensor:
    """Quantize ``w`` (any shape; fp32, bf16 or fp16) block-wise to 4 bits.

    Matches ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    quant_type=quant_type, compress_statistics=double_quant)`` on bitsandbytes'
    CPU backend: identical codes and absmax; the double-quant offset is the fp32
    mean of the absmax values (bitsandbytes' own sum order is CPU-dependent).
    Under ``jit`` the finiteness check is skipped.
    """
    _validate_args(quant_type, blocksize)
    _check_input(w)
    w = jnp.asarray(w)
    packed, absmax, nested_absmax, offset, nested_code = _quantize_jit(
        w, quant_type=quant_type, blocksize=int(blocksize), double_quant=bool(double_quant)
    )
    return QuantizedTensor(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        nested_offset=offset,
        nested_code=nested_code,
        shape=tuple(int(d) for d in w.shape),
        dtype=jnp.dtype(w.dtype).name,
        blocksize=int(blocksize),
        quant_type=quant_type,
    )


def block_absmax(qt: QuantizedTensor) -> jax.Array:
    """fp32 ``[..., nb]`` absmax of every block (undoing double quantization)."""
    if not qt.double_quant:
        return qt.absmax
    nb = qt.absmax.shape[-1]
    lead = qt.absmax.shape[:-1]
    code = jnp.broadcast_to(qt.nested_code, (*lead, qt.nested_code.shape[-1]))
    values = jnp.take_along_axis(code, qt.absmax.astype(jnp.int32), axis=-1)
    scale = jnp.repeat(qt.nested_absmax, NESTED_BLOCKSIZE, axis=-1)[..., :nb]
    if per_nested_offset(qt):
        return values * scale + jnp.repeat(qt.nested_offset, NESTED_BLOCKSIZE, axis=-1)[..., :nb]
    return values * scale + qt.nested_offset[..., None]


def expand_scales(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` with its double-quantized block scales decoded into fp32 ``absmax`` (:func:`block_absmax`; no
    nested fields): the same weights, 3 more bytes per block, and no two-level scale decode left for the
    kernels to do. ``qt`` itself when it is not double-quantized."""
    if not qt.double_quant:
        return qt
    return dataclasses.replace(qt, absmax=block_absmax(qt).astype(jnp.float32), nested_absmax=None,
                               nested_offset=None, nested_code=None)


def per_nested_offset(qt: QuantizedTensor) -> bool:
    """Whether ``qt`` has one double-quantization offset per block of 256 scales (:func:`concat_rows`)
    rather than one for the tensor (leading stacked axes aside)."""
    return qt.double_quant and qt.nested_offset.ndim == qt.nested_absmax.ndim


def concat_rows_problem(tensors: "list[QuantizedTensor] | tuple[QuantizedTensor, ...]") -> str | None:
    """Why :func:`concat_rows` cannot join ``tensors`` exactly, or ``None`` if it can."""
    if not tensors:
        return "no tensors"
    first = tensors[0]
    k = first.shape[-1]
    for i, t in enumerate(tensors):
        what = f"tensor {i} {t!r}"
        if len(t.shape) != 2 or t.packed.ndim != 1:
            return f"{what} is not one 2-D tensor"
        if (t.shape[1], t.blocksize, t.quant_type, t.double_quant, t.dtype) != (k, first.blocksize, first.quant_type, first.double_quant, first.dtype):
            return f"{what} does not match tensor 0 {first!r} in K, blocksize, quant_type, double_quant or dtype"
        n = t.shape[0] * k
        whole = t.blocksize * (NESTED_BLOCKSIZE if t.double_quant else 1)
        if i < len(tensors) - 1 and n % whole:
            return (f"{what}: {n} elements are not a whole number of {whole}-element "
                    f"{'groups of 256 blocks' if t.double_quant else 'blocks'}")
    return None


def concat_rows(tensors: "list[QuantizedTensor] | tuple[QuantizedTensor, ...]") -> QuantizedTensor:
    """Join 2-D tensors ``[N_i, K]`` along their rows into one ``[sum N_i, K]`` tensor, exactly: every
    element dequantizes to the value it had (e.g. q/k/v projections as one weight, read by one kernel).

    The codes and block scales are concatenated; with double quantization each tensor's offset is
    repeated over its blocks of 256 scales (``nested_offset [ceil(nb / 256)]``), so every tensor but
    the last needs a whole number of those (``N_i * K`` a multiple of ``256 * blocksize``), and all share
    the 8-bit map of the first (the signed dynamic map :func:`quantize` and bitsandbytes use). Raises
    ``ValueError`` naming the first tensor that does not fit (:func:`concat_rows_problem`).
    """
    if (problem := concat_rows_problem(tensors)) is not None:
        raise ValueError(f"concat_rows: {problem}")
    first = tensors[0]
    k = first.shape[-1]
    cat = lambda name: jnp.concatenate([getattr(t, name) for t in tensors])  # noqa: E731
    offset = None
    if first.double_quant:
        offset = jnp.concatenate([
            jnp.broadcast_to(t.nested_offset, t.nested_absmax.shape) if not per_nested_offset(t) else t.nested_offset
            for t in tensors
        ])
    return QuantizedTensor(
        packed=cat("packed"),
        absmax=cat("absmax"),
        nested_absmax=cat("nested_absmax") if first.double_quant else None,
        nested_offset=offset,
        nested_code=first.nested_code,
        shape=(sum(t.shape[0] for t in tensors), k),
        dtype=first.dtype,
        blocksize=first.blocksize,
        quant_type=first.quant_type,
    )


def dequantize(qt: QuantizedTensor, dtype: Any = jnp.bfloat16) -> jax.Array:
    """The tensor a :class:`QuantizedTensor` stands for, as ``dtype``, in its original shape.

    Computed in fp32 (code value x block absmax), then cast, as bitsandbytes does.
    Leading axes of stacked leaves are kept in front of ``qt.shape``.
    """
    n, bs = qt.size, qt.blocksize
    lead = qt.packed.shape[:-1]
    if n % bs == 0:  # whole blocks (always, for K % blocksize == 0): block-shaped decode, no pad/slice
        high, low = _nibble_values(qt)
        return jnp.stack([high, low], axis=-1).reshape(*lead, *qt.shape).astype(dtype)
    codes = unpack_nibbles(qt.packed, n).astype(jnp.int32)
    values = jnp.asarray(qt.code)[codes]
    absmax = block_absmax(qt)
    nb = absmax.shape[-1]
    values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, nb * bs - n)])
    out = (values.reshape(*lead, nb, bs) * absmax[..., None]).reshape(*lead, nb * bs)[..., :n]
    return out.reshape(*lead, *qt.shape).astype(dtype)


def _nibble_values(qt: QuantizedTensor) -> tuple[jax.Array, jax.Array]:
    """fp32 values of the high and low nibbles, ``[..., nblocks, blocksize/2]`` each (the even and odd
    positions of every block), for a tensor of whole blocks."""
    pairs = qt.packed.reshape(*qt.packed.shape[:-1], -1, qt.blocksize // 2)
    scale = block_absmax(qt)[..., None]
    code = jnp.asarray(qt.code)
    return code[(pairs >> 4).astype(jnp.int32)] * scale, code[(pairs & 0x0F).astype(jnp.int32)] * scale


def dequantize_halves(qt: QuantizedTensor, dtype: Any = jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """The even and odd columns of a 2-D ``[N, K]`` tensor, ``W[:, 0::2]`` and ``W[:, 1::2]``
    (each ``[..., N, K/2]`` in ``dtype``), decoded straight from the high and low nibbles.

    Needs ``K % blocksize == 0`` (every row holds whole blocks). No interleave is built: XLA decodes
    both halves in one pass over the packed bytes, and a matmul splits its contraction to match
    (``x @ W.T = x[:, 0::2] @ even.T + x[:, 1::2] @ odd.T``). Values equal :func:`dequantize`'s.
    """
    if len(qt.shape) != 2 or qt.shape[1] % qt.blocksize:
        raise ValueError(f"dequantize_halves needs a 2-D weight with K % blocksize == 0, got shape {qt.shape} "
                         f"and blocksize {qt.blocksize}")
    n, k = qt.shape
    lead = qt.packed.shape[:-1]
    high, low = _nibble_values(qt)
    return high.reshape(*lead, n, k // 2).astype(dtype), low.reshape(*lead, n, k // 2).astype(dtype)


# --- bitsandbytes' serialized form (Params4bit state-dict keys) -------------------------

_BNB_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _key_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def to_bnb_state_dict(qt: QuantizedTensor, prefix: str = "") -> dict[str, np.ndarray]:
    """Serialize as bitsandbytes' ``Linear4bit`` state dict does (``weight``, ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and the packed
    JSON ``weight.quant_state.bitsandbytes__<type>``), keys under ``prefix`` (e.g.
    ``"model.layers.0.mlp.down_proj."``). A "bnb-4bit" safetensors checkpoint holds exactly these.
    """
    if qt.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes serializes only nf4 and fp4, not quant_type={qt.quant_type!r}")
    if qt.packed.ndim != 1:
        raise ValueError(f"to_bnb_state_dict takes one tensor; got stacked leaves of shape {qt.packed.shape}")
    p = _key_prefix(prefix) + "weight"
    out = {
        p: np.asarray(qt.packed).reshape(-1, 1),
        f"{p}.absmax": np.asarray(qt.absmax),
        f"{p}.quant_map": np.asarray(qt.code, np.float32).copy(),
    }
    meta: dict[str, Any] = {
        "quant_type": qt.quant_type,
        "blocksize": qt.blocksize,
        "dtype": qt.dtype,
        "shape": list(qt.shape),
    }
    if per_nested_offset(qt):
        raise ValueError(f"{p}: a tensor joined by concat_rows (one offset per block of 256 scales) has no bitsandbytes form")
    if qt.double_quant:
        out[f"{p}.nested_absmax"] = np.asarray(qt.nested_absmax)
        out[f"{p}.nested_quant_map"] = np.asarray(qt.nested_code)
        meta.update(
            nested_blocksize=NESTED_BLOCKSIZE,
            nested_dtype="float32",
            nested_offset=float(np.asarray(qt.nested_offset)),
        )
    out[f"{p}.quant_state.bitsandbytes__{qt.quant_type}"] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), dtype=np.uint8
    ).copy()
    return out


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of an array or torch tensor; torch bf16 (a packed quant_storage) as raw bytes."""
    if hasattr(x, "detach"):
        import torch  # only reached when torch tensors are passed in

        x = x.detach().cpu().contiguous()
        if x.dtype == torch.bfloat16:
            x = x.view(torch.uint8)
        return x.numpy()
    return np.asarray(x)


def from_bnb_state_dict(sd: dict[str, Any], prefix: str = "") -> QuantizedTensor:
    """Read the codes of a bitsandbytes-quantized tensor as they are (no re-quantization).

    ``sd`` maps keys (see :func:`to_bnb_state_dict`) to numpy arrays or torch tensors.
    Raises ``ValueError`` naming the key for anything missing, mis-shaped or unsupported.
    """
    p = _key_prefix(prefix) + "weight"

    def get(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"bitsandbytes state dict has no key {key!r}")
        return _as_numpy(sd[key])

    qs_keys = [k for k in sd if k.startswith(f"{p}.quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(
            f"expected exactly one key '{p}.quant_state.bitsandbytes__<nf4|fp4>', found {qs_keys or 'none'}"
        )
    try:
        meta = json.loads(bytes(get(qs_keys[0]).astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{qs_keys[0]!r} does not hold bitsandbytes' packed JSON quant state: {e}") from None
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{qs_keys[0]!r} lacks the field {field!r}")
    quant_type, blocksize = meta["quant_type"], meta["blocksize"]
    if quant_type not in ("nf4", "fp4") or not qs_keys[0].endswith(quant_type):
        raise ValueError(f"{qs_keys[0]!r}: unsupported quant_type {quant_type!r}")
    _validate_args(quant_type, blocksize)
    if meta["dtype"] not in _BNB_TORCH_DTYPES:
        raise ValueError(f"{qs_keys[0]!r}: unsupported dtype {meta['dtype']!r}")
    shape = tuple(int(d) for d in meta["shape"])
    n = int(np.prod(shape, dtype=np.int64))
    nb = num_blocks(n, blocksize)

    packed = get(p)
    if packed.dtype != np.uint8:  # quant_storage other than uint8 (e.g. bf16 for FSDP)
        packed = packed.view(np.uint8)
    packed = packed.reshape(-1)
    if packed.shape[0] != -(-n // 2):
        raise ValueError(f"{p!r} holds {packed.shape[0]} bytes; shape {shape} needs {-(-n // 2)}")
    quant_map = get(f"{p}.quant_map").reshape(-1)
    if quant_map.shape != (16,) or not np.allclose(quant_map, codebook(quant_type), atol=1e-6, rtol=0):
        raise ValueError(f"{p}.quant_map is not bitsandbytes' {quant_type} codebook: {quant_map.tolist()}")
    absmax = get(f"{p}.absmax").reshape(-1)
    if absmax.shape[0] != nb:
        raise ValueError(f"{p}.absmax has {absmax.shape[0]} entries; {n} values in blocks of {blocksize} need {nb}")

    nested = f"{p}.nested_absmax" in sd
    if not nested:
        if absmax.dtype != np.float32:
            raise ValueError(f"{p}.absmax must be float32 without double quantization, got {absmax.dtype}")
        return QuantizedTensor(
            jnp.asarray(packed), jnp.asarray(absmax), None, None, None, shape, meta["dtype"], blocksize, quant_type
        )
    for field in ("nested_blocksize", "nested_offset"):
        if field not in meta:
            raise ValueError(f"{qs_keys[0]!r} lacks the field {field!r} needed with double quantization")
    if meta["nested_blocksize"] != NESTED_BLOCKSIZE:
        raise ValueError(f"{qs_keys[0]!r}: nested_blocksize {meta['nested_blocksize']} is not {NESTED_BLOCKSIZE}")
    if absmax.dtype != np.uint8:
        raise ValueError(f"{p}.absmax must hold uint8 codes with double quantization, got {absmax.dtype}")
    nested_absmax = get(f"{p}.nested_absmax").reshape(-1).astype(np.float32)
    if nested_absmax.shape[0] != num_blocks(nb, NESTED_BLOCKSIZE):
        raise ValueError(
            f"{p}.nested_absmax has {nested_absmax.shape[0]} entries; {nb} blocks need {num_blocks(nb, NESTED_BLOCKSIZE)}"
        )
    nested_code = get(f"{p}.nested_quant_map").reshape(-1).astype(np.float32)
    if nested_code.shape != (256,):
        raise ValueError(f"{p}.nested_quant_map must have 256 entries, got {nested_code.shape[0]}")
    return QuantizedTensor(
        jnp.asarray(packed),
        jnp.asarray(absmax),
        jnp.asarray(nested_absmax),
        jnp.asarray(np.float32(meta["nested_offset"])),
        jnp.asarray(nested_code),
        shape,
        meta["dtype"],
        blocksize,
        quant_type,
    )
