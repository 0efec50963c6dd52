"""The files every benchmark writes, and the markdown pieces their reports share.

A run writes ``bench/results/NAME.md`` (the report, also printed) and ``NAME.json`` (every round's raw
numbers) beside it, or the same pair at the benchmark's ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

from machine import REPO


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out FILE``, by default ``bench/results/NAME.md``."""
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / f"{name}.md", help="markdown results file"
    )


def write_results(out: Path, markdown: str, data: dict) -> None:
    """The report to ``out`` and to stdout, the raw numbers to ``out`` with the suffix ``.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    print(markdown)
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)


def preamble(title: str, script: str, *about: str) -> list[str]:
    """The report's title, the script that produced it, and ``about`` lines on how its figures are taken."""
    return [
        f"# {title}",
        "",
        f"Produced by `bench/{script}`; its docstring says what is measured and why.",
        *about,
        "",
    ]


def key_value_section(title: str, values: dict[str, str]) -> list[str]:
    """A ``##`` section holding a two-column table (the machine, the settings)."""
    return [
        f"## {title}",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in values.items()),
        "",
    ]


def spread(cores: list[float]) -> str:
    """The CPU other processes used while measuring, over every measurement: median and range."""
    return f"median {statistics.median(cores):.2f} cores (from {min(cores):.2f} to {max(cores):.2f})"


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def listed(values: Iterable[float], digits: int = 2) -> str:
    return ", ".join(f"{value:.{digits}f}" for value in values)
