"""Starting a service as a child process, exactly as a user starts it, and waiting until it is ready.

The tests and the benchmarks start real servers on real ports this way (and so will ``cppo stack up``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

_ACCESS_LOG = re.compile(r'^INFO: +\S+ - "[A-Z]+ \S+ HTTP/[\d.]+" \d{3}')
"""uvicorn's access-log lines (``INFO:     127.0.0.1:5123 - "GET /ready HTTP/1.1" 503``)."""


class LaunchError(ChildProcessError):
    """A service exited, or was not ready in time; the message ends with the last lines of its log."""


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

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log that say something: the access log's are left out."""
        said = [line for line in self.output().splitlines() if not _ACCESS_LOG.match(line)]
        return "\n".join(said[-lines:])


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
        wait_ready(service, ready_timeout, command)
        yield service
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(service: Service, timeout: float, name: str = "service") -> None:
    """Poll ``/ready`` until it answers 200; a :class:`LaunchError` with the end of the service's log if
    it dies or takes too long."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=service.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise LaunchError(
                    f"the {name} exited with code {service.process.returncode}; the end of {service.log}:\n"
                    f"{service.tail()}"
                )
            try:
                if client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise LaunchError(
        f"the {name} was not ready within {timeout:g} s; the end of {service.log}:\n{service.tail()}"
    )
