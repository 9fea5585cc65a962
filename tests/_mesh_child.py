"""Child process of tests/test_mesh.py (needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set
before jax starts): stories260K fine-tunes on several meshes and across-mesh resumes; prints JSON.

Usage: python tests/_mesh_child.py CONVERTED_MODEL_DIR OUTPUT_ROOT"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

from qlora_jax.train_config import load_config
from qlora_jax.trainer import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def cfg(model: str, data: int, fsdp: int, save_every: int = 100):
    return load_config(REPO / "configs" / "stories260k.py", [
        f"model.path={model}", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=100",
        f"train.save_every={save_every}", "train.sample_prompts=0", "data.eval_dataset_size=0",
        f"mesh.data={data}", f"mesh.fsdp={fsdp}"])


def frozen_layout(model: str) -> dict[str, int]:
    """How many NF4 ``packed`` / ``absmax`` leaves the 1x8 rules shard (the rest are replicated)."""
    from flax import nnx

    from qlora_jax.nf4 import QuantizedTensor
    from qlora_jax.sharding import frozen_shardings, make_mesh
    from qlora_jax.trainer import build_model

    _, _, rest = nnx.split(build_model(cfg(model, 1, 8), Path(model)), nnx.LoRAParam, ...)
    shardings = jax.tree.leaves(frozen_shardings(rest, make_mesh(1, 8)),
                                is_leaf=lambda x: isinstance(x, QuantizedTensor))
    quantized = [s for s in shardings if isinstance(s, QuantizedTensor)]
    return {"quantized": len(quantized),
            "packed_sharded": sum("fsdp" in str(q.packed.spec) for q in quantized),
            "absmax_sharded": sum("fsdp" in str(q.absmax.spec) for q in quantized)}


def losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics if "loss" in m]


def main(model: str, root: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    out: dict = {"curves": {}, "resumed": {}, "times": {}, "lora_specs": {}, "frozen": frozen_layout(model)}
    for data, fsdp in [(1, 1), (8, 1), (4, 2), (1, 8)]:
        t = time.perf_counter()
        run = train(cfg(model, data, fsdp), root / f"run_{data}x{fsdp}", progress=False)
        out["curves"][f"{data}x{fsdp}"] = losses(run)
        out["times"][f"{data}x{fsdp}"] = time.perf_counter() - t
        from flax import nnx
        leaf = jax.tree.leaves(nnx.state(run.model, nnx.LoRAParam))[0]
        out["lora_specs"][f"{data}x{fsdp}"] = [str(leaf.sharding.spec) if hasattr(leaf.sharding, "spec") else "",
                                               len(leaf.sharding.device_set)]
    # A checkpoint written on one mesh restores and continues on another.
    for first, second in [((4, 2), (1, 1)), ((1, 1), (1, 8))]:
        t = time.perf_counter()
        d = root / f"resume_{first[0]}x{first[1]}_to_{second[0]}x{second[1]}"
        train(cfg(model, *first, save_every=2), d, stop_after=2, progress=False)
        run = train(cfg(model, *second), d, resume=True, progress=False)
        out["resumed"][f"{first[0]}x{first[1]}->{second[0]}x{second[1]}"] = losses(run)
        out["times"][f"resume {first}->{second}"] = time.perf_counter() - t
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
