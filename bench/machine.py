"""What a benchmark ran on: recorded with every result, since numbers compare only on one machine."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def describe_machine() -> dict[str, str]:
    """CPU, cores, memory, OS, Python, date and commit; each benchmark adds its own library versions."""
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name", lambda value: value),
        "cores": f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()}",
        "memory": _proc_field(
            "/proc/meminfo", "MemTotal", lambda value: f"{int(value.split()[0]) / 2**20:.1f} GiB"
        ),
        "os": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git commit": commit,
    }


def _proc_field(path: str, name: str, render) -> str:
    try:
        with Path(path).open() as info:
            for line in info:
                if line.startswith(name):
                    return render(line.partition(":")[2].strip())
    except OSError:
        pass
    return "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
