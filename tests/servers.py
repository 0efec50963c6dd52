"""Real servers on real ports for the tests (``shared.launch``), and reading their metrics."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.launch import Service, running_service


@contextmanager
def running_server(
    command: str,
    args: list[str],
    log_dir: Path,
    ready_timeout: float = 120,
    env: dict | None = None,
    port: int | None = None,
) -> Iterator[Service]:
    log = log_dir / f"{command}-{uuid.uuid4().hex[:8]}.log"
    with running_service(command, args, log, ready_timeout, env, port) as service:
        yield service


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` with its labels, exactly as exposed) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
