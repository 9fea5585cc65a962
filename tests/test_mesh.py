"""Multi-device training on a (data, fsdp) mesh (``qlora_jax.sharding``): the sharding rules on
their own, config validation, and (in a subprocess with 8 fake CPU devices) stories260K losses on
meshes 8x1, 4x2, 1x8 equal to one device's, and checkpoints restoring across mesh shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qlora_jax.models.llama import QuantConfig
from qlora_jax.sharding import MeshError, make_mesh, param_spec, shard_spec_for
from qlora_jax.train_config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shard_spec_for_respects_quantization_blocks():
    # packed: n/2 bytes; a shard must hold whole 64-weight blocks (32 bytes).
    assert shard_spec_for("packed", (4096,), 8, blocksize=64, double_quant=True) == P("fsdp")  # 512 B / shard
    assert shard_spec_for("packed", (5, 4096), 8, blocksize=64, double_quant=True) == P(None, "fsdp")  # stacked
    assert shard_spec_for("packed", (128,), 8, blocksize=64, double_quant=True) == P()  # 16 B: half a block
    assert shard_spec_for("packed", (100,), 8, blocksize=64, double_quant=False) == P()  # not divisible
    # absmax with double quant: whole 256-blocks of codes per shard.
    assert shard_spec_for("absmax", (2048,), 8, blocksize=64, double_quant=True) == P("fsdp")  # 256 / shard
    assert shard_spec_for("absmax", (5, 1024), 8, blocksize=64, double_quant=True) == P()  # 128 / shard
    assert shard_spec_for("absmax", (5, 1024), 8, blocksize=64, double_quant=False) == P(None, "fsdp")
    # double-quant constants and anything else: replicated; fsdp=1: replicated.
    for field in ("nested_absmax", "nested_offset", "nested_code"):
        assert shard_spec_for(field, (2048,), 8, blocksize=64, double_quant=True) == P()
    assert shard_spec_for("packed", (4096,), 1, blocksize=64, double_quant=True) == P()


def test_param_spec_shards_a_divisible_axis_or_replicates():
    assert param_spec((5, 64, 8), 8) == P(None, "fsdp")  # the largest divisible axis
    assert param_spec((5, 8, 172), 2) == P(None, None, "fsdp")
    assert param_spec((5, 3, 7), 2) == P()
    assert param_spec((), 4) == P()
    assert param_spec((64, 8), 1) == P()


def test_mesh_config_is_validated():
    with pytest.raises(ConfigError, match="mesh.fsdp=0"):
        load_config(REPO / "configs" / "stories260k.py", ["mesh.fsdp=0"])
    with pytest.raises(ConfigError, match="divisible by mesh.data"):
        load_config(REPO / "configs" / "stories260k.py", ["mesh.data=3"])  # batch_size=8
    with pytest.raises(MeshError, match="2 \\* 1 = 2, but there are 1 devices"):
        make_mesh(2, 1)  # this process has one CPU device


@pytest.fixture(scope="module")
def nf4_model(stories, tmp_path_factory) -> Path:
    from qlora_jax.convert import convert

    out = tmp_path_factory.mktemp("mesh_base") / "nf4"
    convert(stories, out, quant=QuantConfig(), progress=False)
    return out


@pytest.fixture(scope="module")
def mesh_runs(nf4_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mesh_runs")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_mesh_child.py"), str(nf4_model), str(root)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_meshes_give_the_single_device_loss_curve(mesh_runs):
    curves = mesh_runs["curves"]
    ref = np.array(curves["1x1"])
    assert len(ref) == 4
    for mesh in ("8x1", "4x2", "1x8"):
        np.testing.assert_allclose(curves[mesh], ref, rtol=1e-5, err_msg=mesh)
    # The trained adapters come back sharded over all 8 devices (over fsdp where fsdp > 1).
    assert mesh_runs["lora_specs"]["1x1"][1] == 1
    for mesh in ("8x1", "4x2", "1x8"):
        assert mesh_runs["lora_specs"][mesh][1] == 8
    assert "fsdp" in mesh_runs["lora_specs"]["1x8"][0]
    # On 1x8, q/k/v/o (64x64, 64x32: 256 / 128 B per shard, whole 32-byte blocks) are split;
    # gate/up/down (64x172: 688 B per shard = 21.5 blocks) and every DQ absmax (< 256 codes
    # per shard) stay replicated.
    assert mesh_runs["frozen"] == {"quantized": 7, "packed_sharded": 4, "absmax_sharded": 0}, mesh_runs["frozen"]


def test_checkpoints_restore_across_mesh_shapes(mesh_runs):
    ref = np.array(mesh_runs["curves"]["1x1"])
    for key, resumed in mesh_runs["resumed"].items():  # steps 3-4 after resuming from the step-2 checkpoint
        np.testing.assert_allclose(resumed[-2:], ref[-2:], rtol=1e-5, err_msg=key)
