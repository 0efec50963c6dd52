"""One run per run folder: a new run never writes over an earlier one.

A run folder holds the run's outputs (below) and may hold its inputs too (the demo keeps the tiny model and
the data in ``runs/demo/model`` and ``runs/demo/data``). Starting a run in a folder that already holds one
is refused, unless it continues it (``--resume``) or replaces it (``--overwrite``), which first moves the
earlier run's outputs aside to a sibling folder, ``runs/demo.replaced-2026-11-30T04-21-00``: nothing is
deleted, and checkpoint retention and ``--resume`` only ever see the new run's checkpoints. ``--resume``
in a folder that holds no run yet starts one, so that a job restarted by its scheduler always says
``--resume``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

MARKS = ("config.yaml", "metrics.jsonl", "checkpoints")
"""What a run writes first, and what shows a folder holds one."""
OUTPUTS = (
    *MARKS,
    "deepspeed.json",
    "tensorboard",
    "wandb",
    "learning_curves.png",
    "inspect.html",
    "logs",
    "weights",
)
"""Everything a run (``cppo train``, ``cppo stack up``, ``cppo inspect --run``) writes in its folder."""


class RunExistsError(ValueError):
    """The run folder holds a run, and the command neither continues nor replaces it."""


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / mark).exists() for mark in MARKS)


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    """What to resume from (None: start a new run); a new run over an earlier one is refused. Read-only,
    so that every rank checks."""
    if resume is not None and overwrite:
        raise ValueError("--resume continues the run and --overwrite replaces it: give one of them")
    if resume is None and not overwrite and holds_a_run(run_dir):
        raise RunExistsError(
            f"{run_dir} already holds a run; continue it with --resume, start again with --overwrite (the "
            f"earlier run is moved to {aside_name(run_dir, datetime.now())}), or set another run_dir=..."
        )
    if resume == "latest" and not holds_a_run(run_dir):
        return None
    return resume


def aside_name(run_dir: Path, when: datetime) -> Path:
    return run_dir.with_name(f"{run_dir.name}.replaced-{when:%Y-%m-%dT%H-%M-%S}")


def move_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's outputs to a sibling folder (inputs such as ``model/`` stay); where they went,
    or None when there was no run."""
    if not holds_a_run(run_dir):
        return None
    aside = aside_name(run_dir, datetime.now())
    while aside.exists():  # two replacements within a second
        aside = aside.with_name(aside.name + "+")
    aside.mkdir(parents=True)
    for name in OUTPUTS:
        if (run_dir / name).exists():
            (run_dir / name).rename(aside / name)
    return aside
