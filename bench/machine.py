"""What a benchmark ran on, and how busy the machine was meanwhile: recorded with every result, since
numbers compare only on one machine, and other jobs on a shared one slow some paths more than others."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

Snapshot = tuple[float, float, float]
"""(wall time, CPU seconds of the whole machine, CPU seconds of our processes)."""


def describe_machine(extras: dict[str, str], load_at_start: float) -> dict[str, str]:
    """CPU, cores, memory, OS, Python, date and commit, then ``extras`` (the benchmark's library versions
    and the like), then the 1-minute load average when the run started."""
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
        **extras,
        "load average (1 min) at start": f"{load_at_start:.2f}",
    }


class CpuMeter:
    """How much CPU the rest of the machine used during a measurement: ``/proc/stat`` (all CPUs) less the
    process trees of ``roots`` (this process, the servers, their workers). The trees are walked afresh at
    every snapshot, since a server may replace a worker meanwhile."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.tick = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> Snapshot:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
        busy = user + nice + system + irq + softirq + steal
        stats = _process_stats()
        ours = sum(int(stats[pid][11]) + int(stats[pid][12]) for pid in process_tree(self.roots, stats))
        return time.perf_counter(), busy / self.tick, ours / self.tick

    def others(self, since: Snapshot) -> float:
        """Cores that other processes used, on average, since the snapshot ``since``."""
        now = self.snapshot()
        return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / (now[0] - since[0])


def tree_rss(roots: Iterable[int]) -> int:
    """Resident memory of ``roots`` and their descendants, in bytes. Pages that forked workers share with
    their parent count in each process, so this is an upper bound; its growth is what tells a leak."""
    stats = _process_stats()
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(int(stats[pid][21]) * page for pid in process_tree(roots, stats))


def process_tree(roots: Iterable[int], stats: dict[int, list[str]]) -> set[int]:
    """``roots`` and their descendants, among the running processes ``stats`` describes."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = set(), [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(child for child in children.get(pid, []) if child not in found)
    return found


def _process_stats() -> dict[int, list[str]]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces), by pid: the parent
    at index 1, user and system CPU ticks at 11 and 12, resident pages at 21."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(path.parent.name)] = path.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
    return stats


def _proc_field(path: str, name: str, render: Callable[[str], str]) -> str:
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
