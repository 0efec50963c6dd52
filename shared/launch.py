"""Starting a service as a child process, exactly as a user starts it, and waiting until it is ready.

The tests and the benchmarks start real servers on real ports this way (and so will ``cppo stack up``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_service(
    command: str,
    args: Sequence[str],
    log: Path,
    ready_timeout: float = 120,
    env: dict | None = None,
    port: int | None = None,
) -> Iterator[Service]:
    """``cppo COMMAND ARGS --port P`` on ``port`` (a free one by default), its output in ``log``, until
    ``/ready`` answers 200; stopped (and reaped) afterwards."""
    port = port or free_port()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", command, *args, "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    service = Service(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(service, ready_timeout)
        yield service
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(service: Service, timeout: float) -> None:
    """Poll ``/ready`` until it answers 200; fail with the service's log if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=service.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {service.process.returncode}:\n{service.output()}"
                )
            try:
                if client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the service was not ready within {timeout} s:\n{service.output()}")
