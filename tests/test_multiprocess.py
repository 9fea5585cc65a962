"""Training on several processes (hosts) for real, on CPU: two processes of 4 fake devices each,
joined by ``jax.distributed`` (gloo collectives), fine-tune stories260K on a 2 x 4 mesh of all 8
devices. Their loss curve equals one process's on one device, and so do the held-out evaluations
during the run (eval loss, MMLU accuracy, greedy samples: global computations every process takes
part in); each process builds only its half of every batch, only process 0 writes the run's files,
and checkpoints move both ways between the 2-process and the 1-process run. Plus the pieces: the
environment detection behind ``mesh.distributed=auto``, the mesh-size error, per-process batch rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qlora_jax.models.llama import QuantConfig
from qlora_jax.train_config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
MESH = "2x4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(stories, shared, tmp_path_factory) -> dict:
    from _mesh_child import cfg, copy_step, losses
    from _multiprocess_child import held_out, with_evals

    from qlora_jax.convert import convert
    from qlora_jax.trainer import train

    root = tmp_path_factory.mktemp("multiprocess")
    mmlu_dir = shared / "data" / "mmlu"
    if not (mmlu_dir / "zero_shot_mmlu_val.jsonl").is_file():
        pytest.skip(f"{mmlu_dir} has no zero_shot_mmlu_val.jsonl")
    evals = with_evals(str(mmlu_dir))
    model = root / "nf4"
    convert(stories, model, quant=QuantConfig(), progress=False)
    # One process, one device: the reference curve, and a step-2 checkpoint for the 2-process run to resume.
    ref = train(cfg(str(model), 1, 1, save_every=2, extra=evals), root / "ref", progress=False)
    copy_step(root / "ref", 2, root / "from_1proc")

    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_multiprocess_child.py"), str(model), str(root), MESH, str(mmlu_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stdout[-3000:] + stderr[-6000:]
        line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))

    # One process again, resuming a checkpoint the 2-process run wrote.
    copy_step(root / "mp_full", 2, root / "from_2proc")
    back = train(cfg(str(model), 1, 1, extra=evals), root / "from_2proc", resume=True, progress=False)
    return {"root": root, "ref": losses(ref), "procs": results, "back": losses(back),
            "ref_evals": held_out(ref), "back_evals": held_out(back),
            "ref_tokens": [m["tokens_per_s"] for m in ref.metrics if "loss" in m]}


def _assert_same_evals(got: list[dict], want: list[dict]) -> None:
    """The same held-out records: steps and MMLU accuracy exactly, eval loss to float tolerance."""
    assert [(r["step"], r.get("mmlu_accuracy")) for r in got] == [(r["step"], r.get("mmlu_accuracy")) for r in want]
    assert [("eval_loss" in r) for r in got] == [("eval_loss" in r) for r in want]
    np.testing.assert_allclose([r["eval_loss"] for r in got if "eval_loss" in r],
                               [r["eval_loss"] for r in want if "eval_loss" in r], rtol=1e-5)


def test_two_processes_give_the_one_process_loss_curve(runs):
    ref = np.array(runs["ref"])
    assert len(ref) == 4
    p0, p1 = runs["procs"]
    assert (p0["process"], p1["process"]) == (0, 1) and p0["processes"] == 2 and p0["devices"] == 8
    np.testing.assert_allclose(p0["curve"], ref, rtol=1e-5)
    assert p0["curve"] == p1["curve"]  # the loss is one global value, the same on both processes
    # Each process built its own half of every batch of 8 rows (mesh 2 x 4: data row i on process i).
    assert p0["rows"] == [0, 4] and p1["rows"] == [4, 8]


def test_checkpoints_move_between_two_processes_and_one(runs):
    ref = np.array(runs["ref"])
    p0, p1 = runs["procs"]
    np.testing.assert_allclose(p0["resumed"], ref[2:], rtol=1e-5)  # 1-process checkpoint -> 2 processes
    assert p1["resumed"] == p0["resumed"]
    np.testing.assert_allclose(runs["back"], ref[2:], rtol=1e-5)  # 2-process checkpoint -> 1 process


def test_two_processes_evaluate_like_one(runs):
    """MMLU and greedy samples during a 2-process run (sharded model, every process in every
    computation) give the 1-process run's numbers and text."""
    ref = runs["ref_evals"]
    assert [r["step"] for r in ref if "mmlu_accuracy" in r] == [0, 2, 4]
    assert [r["step"] for r in ref if "eval_loss" in r] == [0, 4]
    p0, p1 = runs["procs"]
    _assert_same_evals(p0["evals"], ref)
    assert p1["evals"] == p0["evals"]  # every process got the same results
    # Resumed at step 2, either way: the step-4 evaluations of the uninterrupted run.
    _assert_same_evals(p0["resumed_evals"], ref[-1:])
    assert p1["resumed_evals"] == p0["resumed_evals"]
    _assert_same_evals(runs["back_evals"], ref[-1:])
    samples = (runs["root"] / "mp_full" / "samples.md").read_text()
    assert samples == (runs["root"] / "ref" / "samples.md").read_text()  # same greedy tokens, one writer
    assert samples.count("## Before fine-tuning") == 1 and samples.count("## After 4 steps") == 1
    assert samples.count("**Prompt:**") == 4
    after = samples.split("## After 4 steps")[1]
    assert after == (runs["root"] / "from_1proc" / "samples.md").read_text().split("## After 4 steps")[1]


def test_only_process_zero_writes_the_run_files(runs):
    out = runs["root"] / "mp_full"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [0, 1, 2, 3, 4]  # one writer: no duplicated records
    assert (out / "config.json").is_file() and (out / "loss.png").is_file()
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file
    from qlora_jax.peft_io import read_adapter_config

    assert read_adapter_config(out / "adapter")["r"] == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (out / "checkpoints" / "4" / "adapter" / "adapter_model.safetensors").is_file()
    # tokens/s counts the whole global batch on every process, not its half.
    assert all(t > 0 for t in runs["procs"][0]["tokens_per_s"])


def test_distributed_env_detection(monkeypatch):
    from qlora_jax.sharding import MeshError, distributed_env, initialize_distributed

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed_env() is None
    assert initialize_distributed("auto") is False and initialize_distributed("off") is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed_env() is None  # no process count: a single process
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed_env() == {"launcher": "env", "kwargs": {"coordinator_address": "10.0.0.1:1234",
                                                                "num_processes": 4, "process_id": 3}}
    monkeypatch.setenv("JAX_PROCESS_ID", "4")
    with pytest.raises(MeshError, match="JAX_PROCESS_ID='4' is not in \\[0, 4\\)"):
        distributed_env()
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(MeshError, match="JAX_PROCESS_ID='x' is not an integer"):
        distributed_env()
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed_env() is None
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed_env() == {"launcher": "slurm", "kwargs": {}}
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed_env() == {"launcher": "openmpi", "kwargs": {}}
    # Once this process has started JAX, initializing is refused, naming why.
    import jax

    jax.devices()
    with pytest.raises(MeshError, match="before any JAX computation"):
        initialize_distributed("auto")
    with pytest.raises(ConfigError, match="mesh.distributed='maybe'"):
        load_config(REPO / "configs" / "stories260k.py", ["mesh.distributed=maybe"])


def test_mesh_size_must_match_the_global_device_count(stories, tmp_path):
    import jax

    from qlora_jax.trainer import train

    n = jax.device_count()
    c = load_config(REPO / "configs" / "stories260k.py", [f"model.path={stories}", "mesh.data=2", "mesh.fsdp=2"])
    with pytest.raises(ConfigError, match=f"mesh.data \\* mesh.fsdp = 2 \\* 2 = 4, but there are {n} devices in all "
                                          f"\\(1 process x {n} local cpu devices\\)"):
        train(c, tmp_path / "run", progress=False)
