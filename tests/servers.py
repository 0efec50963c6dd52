"""Real servers on real ports for the tests (``shared.launch``), and reading their metrics."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from shared.launch import Service, free_port, running_service


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


@contextmanager
def app_in_a_thread(app: FastAPI) -> Iterator[int]:
    """A test's own small app, served by uvicorn on a free port in a thread of the test; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` with its labels, exactly as exposed) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
