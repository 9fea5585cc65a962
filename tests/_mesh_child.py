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


def cfg(model: str, data: int, fsdp: int):
    return load_config(REPO / "configs" / "stories260k.py", [
        f"model.path={model}", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=100",
        "train.save_every=2", "train.sample_prompts=0", f"mesh.data={data}", f"mesh.fsdp={fsdp}"])


def losses(run) -> list[float]:
    return [m["loss"] for m in run.metrics if "loss" in m]


def main(model: str, root: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    out: dict = {"curves": {}, "resumed": {}, "times": {}, "lora_specs": {}}
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
        train(cfg(model, *first), d, stop_after=2, progress=False)
        run = train(cfg(model, *second), d, resume=True, progress=False)
        out["resumed"][f"{first[0]}x{first[1]}->{second[0]}x{second[1]}"] = losses(run)
        out["times"][f"resume {first}->{second}"] = time.perf_counter() - t
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
