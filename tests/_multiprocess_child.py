"""One process of tests/test_multiprocess.py's 2-process run (CPU, gloo collectives).

The parent starts two of these with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES=2`` / ``JAX_PROCESS_ID``, so ``train()`` itself
initializes ``jax.distributed`` (``mesh.distributed=auto``) and trains stories260K on a mesh of the
8 devices of both processes. It prints ``RESULT {json}``.

Usage: python tests/_multiprocess_child.py CONVERTED_MODEL_DIR OUTPUT_ROOT DATAxFSDP"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _mesh_child import cfg, losses  # noqa: E402


def main(model: str, root: Path, mesh: str) -> None:
    import jax

    from qlora_jax.trainer import train

    data, fsdp = (int(x) for x in mesh.split("x"))
    out: dict = {"times": {}}
    t = time.perf_counter()
    run = train(cfg(model, data, fsdp, save_every=2), root / "mp_full", progress=False)
    out["times"]["full"] = time.perf_counter() - t
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    out.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
               curve=losses(run), tokens_per_s=[m["tokens_per_s"] for m in run.metrics if "loss" in m])
    from qlora_jax import sharding as shd
    from qlora_jax.sharding import batch_sharding, make_mesh

    rows = shd.process_rows(batch_sharding(make_mesh(data, fsdp)), 8)
    out["rows"] = [rows.start, rows.stop]
    # Resume, on 2 processes, a checkpoint the 1-process run wrote (the parent copied its step 2 here).
    t = time.perf_counter()
    run = train(cfg(model, data, fsdp), root / "from_1proc", resume=True, progress=False)
    out["times"]["resume"] = time.perf_counter() - t
    out["resumed"] = losses(run)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
