"""Test-wide setup: no timing thresholds, tests marked ``gpu`` run only where CUDA is present, and the
fixtures more than one test file uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import settings

from shared.tiny_model import build_tiny_model

# Hypothesis' per-example deadline is a timing threshold, and CI machines are slow and shared.
settings.register_profile("cppo", deadline=None)
settings.load_profile("cppo")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL model folder (the default profile, seed 0), built offline in under a second."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny Qwen2.5-VL folders vLLM can serve (profile vllm, seeds 0 and 1): a model, and new weights
    for it."""
    root = tmp_path_factory.mktemp("vllm-models")
    return (
        build_tiny_model(root / "seed0", profile="vllm", seed=0),
        build_tiny_model(root / "seed1", profile="vllm", seed=1),
    )
