"""The package layers: ``shared`` sits under every service, and no service imports another.

``python -m trainer`` is what torchrun, deepspeed and accelerate launch start in every training process, so it
must not load (nor fail on) the servers' modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICES = {"rollout_server", "reward_server", "trainer"}
# What each package must never import.
FORBIDDEN = {"shared": SERVICES, **{service: SERVICES - {service} for service in SERVICES}}


def imported_packages(source: str) -> set[str]:
    """The top-level packages a module imports, wherever the import is (module level, functions, ...)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        # A relative import (level > 0) cannot leave its own top-level package.
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


def loaded_modules(importtime_log: str) -> set[str]:
    """The modules a ``python -X importtime`` run imported, from its stderr."""
    return {
        line.rpartition("|")[2].strip()
        for line in importtime_log.splitlines()
        if line.startswith("import time:")
    }


def test_the_import_check_sees_every_kind_of_import() -> None:
    source = textwrap.dedent(
        """
        import os, trainer.loop
        from rollout_server import app
        from . import sibling

        def serve():
            from reward_server.main import serve
        """
    )
    assert imported_packages(source) == {"os", "trainer", "rollout_server", "reward_server"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_package_above_or_beside_it(package: str) -> None:
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules
    crossings = {
        str(module.relative_to(REPO)): sorted(imported_packages(module.read_text()) & FORBIDDEN[package])
        for module in modules
    }
    assert {module: found for module, found in crossings.items() if found} == {}


def test_python_m_trainer_loads_no_server_module() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    loaded = loaded_modules(result.stderr)
    # Proves the log was read: the trainer's commands are there.
    assert "trainer.main" in loaded
    assert sorted(name for name in loaded if name.partition(".")[0] in SERVICES - {"trainer"}) == []
