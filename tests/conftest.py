"""Shared test fixtures: where ../shared lives, and quiet, deterministic CPU JAX."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


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
