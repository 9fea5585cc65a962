"""One process of tests/test_multiprocess.py's 2-process run (CPU, gloo collectives).

The parent starts two of these with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES=2`` / ``JAX_PROCESS_ID``, so ``train()`` itself
initializes ``jax.distributed`` (``mesh.distributed=auto``) and trains stories260K on a mesh of the
8 devices of both processes, with greedy samples and MMLU during the run (:func:`with_evals`). It
prints ``RESULT {json}``.

Usage: python tests/_multiprocess_child.py CONVERTED_MODEL_DIR OUTPUT_ROOT DATAxFSDP MMLU_DATA_DIR"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _mesh_child import cfg, losses  # noqa: E402


def with_evals(mmlu_dir: str) -> list[str]:
    """Overrides for held-out evaluation during the run, at tiny sizes: eval loss on 8 held-out examples,
    greedy samples (8 tokens) for 2 of them before and after, MMLU (6 zero-shot questions: one batch
    of 8 rows, one per device of the 2 x 4 mesh) at steps 0, 2 and 4."""
    return ["data.eval_dataset_size=8", "train.sample_prompts=2", "train.sample_tokens=8", "eval.mmlu_every=2",
            "eval.mmlu_subjects=anatomy,virology", "eval.mmlu_limit_per_subject=3", "eval.mmlu_batch_size=8",
            "eval.mmlu_answer_style=bare", f"eval.mmlu_data_dir={mmlu_dir}"]


def held_out(run) -> list[dict]:
    """The run's held-out records: ``step`` with ``eval_loss`` and / or ``mmlu_accuracy``."""
    keys = ("step", "eval_loss", "mmlu_accuracy")
    return [{k: m[k] for k in keys if k in m} for m in run.metrics if "eval_loss" in m or "mmlu_accuracy" in m]


def main(model: str, root: Path, mesh: str, mmlu_dir: str) -> None:
    import jax

    from qlora_jax.trainer import train

    data, fsdp = (int(x) for x in mesh.split("x"))
    out: dict = {"times": {}}
    t = time.perf_counter()
    evals = with_evals(mmlu_dir)
    run = train(cfg(model, data, fsdp, save_every=2, extra=evals), root / "mp_full", progress=False)
    out["times"]["full"] = time.perf_counter() - t
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    out.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
               curve=losses(run), tokens_per_s=[m["tokens_per_s"] for m in run.metrics if "loss" in m],
               evals=held_out(run))
    from qlora_jax import sharding as shd
    from qlora_jax.sharding import batch_sharding, make_mesh

    rows = shd.process_rows(batch_sharding(make_mesh(data, fsdp)), 8)
    out["rows"] = [rows.start, rows.stop]
    # Resume, on 2 processes, a checkpoint the 1-process run wrote (the parent copied its step 2 here).
    t = time.perf_counter()
    run = train(cfg(model, data, fsdp, extra=evals), root / "from_1proc", resume=True, progress=False)
    out["times"]["resume"] = time.perf_counter() - t
    out["resumed"], out["resumed_evals"] = losses(run), held_out(run)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4])
