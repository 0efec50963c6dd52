"""Test-wide setup: no timing thresholds, tests marked ``gpu`` run only where CUDA is present, and the
fixtures more than one test file uses."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launcher_variables_leak() -> Iterator[None]:
    """A test that builds a policy in this process joins a group of one, and ``init_distributed`` sets the
    launcher's variables for it; the group's store keeps listening on ``MASTER_PORT``. Undone after each
    test, so that a later test's subprocess (a README example training with TRL) does not inherit them and
    fail to bind that port."""
    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
