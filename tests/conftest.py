"""Test-wide setup: no timing thresholds, and tests marked ``gpu`` run only where CUDA is present."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

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
