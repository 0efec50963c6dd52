"""GRPO, PAPO and CPPO side by side: the same demo run, apart from ``objective.algorithm``, over seeds.

Every run is ``cppo stack up --config configs/demo.yaml`` (both servers as child processes, the trainer in
the stack's process) with only these overrides: the task (``data.tasks``), its number of steps, the seed
(which also seeds the tiny model, built once per seed and shared by the three algorithms), the algorithm,
and where the run and its inputs go. The per-task views of the demo config apply to all three algorithms;
GRPO ignores them, PAPO makes its own masked view. Runs go one after another (the machine has 2 cores).

What is reported, per task and algorithm, mean ± std over the seeds:

- steps to reach 0.9 greedy accuracy on the test prompts (the first evaluation at or above it; the runs that
  never reach it are counted, not averaged in);
- the final greedy accuracy on the clean images and on their I⁻ views, and their difference
  (``eval_perception_gap``): a policy that answers from the image fails on a view that removes the answer;
- the seconds per training step (rollout, reward, update and weight sync; evaluation excluded) and the whole
  wall time of the run (startup and evaluations included).

Every run uses the code of one commit, checked out in ``RUNS/code`` (a git worktree) when the bench first
runs. Results resume: a run whose ``metrics.jsonl`` reaches its last step is read, not rerun; an interrupted
one is resumed from its latest checkpoint (``--resume``), its wall time summed over the attempts. The run
folders live in ``--runs`` (``runs/bench-algorithms`` by default, outside git).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from machine import REPO, CpuMeter, describe_machine
from results import add_out_argument, key_value_section, preamble, write_results

ALGORITHMS = ("grpo", "papo", "cppo")
TARGET = 0.9
DEFAULT_STEPS = {"colour": 250}


@dataclass(frozen=True)
class Run:
    task: str
    algorithm: str
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.algorithm}-seed{self.seed}"


def parse_steps(values: list[str]) -> dict[str, int]:
    steps = dict(DEFAULT_STEPS)
    for value in values:
        task, _, count = value.partition("=")
        if not count.isdigit():
            raise SystemExit(f"--steps takes TASK=COUNT, e.g. colour=250; got {value!r}")
        steps[task] = int(count)
    return steps


def overrides(run: Run, runs: Path) -> list[str]:
    folder = runs / run.name
    return [
        f"run_dir={folder}",
        f"seed={run.seed}",
        f"model.path={runs / 'models' / f'seed-{run.seed}'}",
        f"data.path={runs / 'data'}",
        f"data.tasks=[{run.task}]",
        f"objective.algorithm={run.algorithm}",
        f"train.steps={run.steps}",
        "checkpoint.every=50",
        "checkpoint.keep=1",
        "log.progress=false",
    ]


def finished(run: Run, folder: Path) -> bool:
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        return False
    lines = metrics.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1])["step"] == run.steps


def code_tree(runs: Path) -> tuple[Path, str]:
    """Where every run's code comes from: a git worktree of the commit checked out when the bench first ran
    into ``runs``, so that editing the repository meanwhile changes no run. Delete ``runs`` to measure
    newer code."""
    tree = runs / "code"
    if not tree.exists():
        runs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=REPO, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, check=True
    )
    return tree, commit.stdout.strip()


def execute(run: Run, runs: Path, tree: Path) -> None:
    """Train the run, resuming it if an earlier attempt left a checkpoint; its wall time is added to
    ``wall_seconds.json`` even when the attempt is interrupted."""
    folder = runs / run.name
    if finished(run, folder):
        return
    resume = ["--resume"] if any((folder / "checkpoints").glob("step-*")) else []
    command = [sys.executable, "-m", "shared.cli", "stack", "up", "--config", "configs/demo.yaml", *resume]
    print(f"{run.name}: {'resuming' if resume else 'starting'}", file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    meter = CpuMeter([os.getpid()])
    started, since = time.monotonic(), meter.snapshot()
    try:
        with (folder / "bench.log").open("a") as log:
            # Started in the worktree, `python -m` imports its packages, and the servers inherit it.
            done = subprocess.run(
                [*command, *overrides(run, runs)], cwd=tree, stdout=log, stderr=subprocess.STDOUT
            )
    finally:
        _append(folder / "wall_seconds.json", time.monotonic() - started)
        _append(folder / "other_cores.json", meter.others(since))
    if done.returncode != 0:
        raise SystemExit(f"{run.name} failed (exit {done.returncode}); see {folder / 'bench.log'}")


def _append(record: Path, value: float) -> None:
    """One more attempt's figure in a JSON list."""
    values = json.loads(record.read_text()) if record.exists() else []
    record.write_text(json.dumps([*values, value]))


def _most(record: Path) -> float | None:
    """The largest figure of any attempt; None where it was not measured."""
    return max(json.loads(record.read_text())) if record.exists() else None


def _most(record: Path) -> float | None:
    """Cores other processes used during the run, the most of any attempt; None where not measured."""
    return max(json.loads(record.read_text())) if record.exists() else None


def summarise(run: Run, runs: Path) -> dict:
    """One run's figures, from its metrics.jsonl and wall time."""
    folder = runs / run.name
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m.get("eval_accuracy_greedy") is not None]
    reached = [m["step"] for m in evals if m["eval_accuracy_greedy"] >= TARGET]
    steps = [m for m in metrics if m["step"] > 0]
    phases = ("seconds_rollout", "seconds_reward", "seconds_train", "seconds_sync")
    return {
        "task": run.task,
        "algorithm": run.algorithm,
        "seed": run.seed,
        "steps": run.steps,
        "steps_to_target": reached[0] if reached else None,
        "final_accuracy": evals[-1]["eval_accuracy_greedy"],
        "final_accuracy_removed": evals[-1]["eval_accuracy_greedy_removed"],
        "final_perception_gap": evals[-1]["eval_perception_gap"],
        "seconds_per_step": statistics.fmean(sum(m[p] or 0.0 for p in phases) for m in steps),
        "wall_seconds": sum(json.loads((folder / "wall_seconds.json").read_text())),
        "other_cores": _most(folder / "other_cores.json"),
        "curve": [(m["step"], m["eval_accuracy_greedy"], m["eval_accuracy_greedy_removed"]) for m in evals],
    }


def mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(rows: list[dict], machine: dict[str, str], settings: dict[str, str]) -> str:
    lines = preamble(
        "GRPO, PAPO and CPPO on the synthetic tasks",
        "algorithms.py",
        "Each figure is the mean ± standard deviation over the seeds; every seed's row is listed below.",
    )
    lines += key_value_section("Machine", machine)
    lines += key_value_section("Settings", settings)
    for task in dict.fromkeys(row["task"] for row in rows):
        lines += [
            f"## Task: {task}",
            "",
            f"| algorithm | seeds reaching {TARGET} | steps to {TARGET} | final accuracy (I) | "
            "final accuracy (I⁻) | perception gap | seconds per step | wall minutes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for algorithm in ALGORITHMS:
            group = [r for r in rows if r["task"] == task and r["algorithm"] == algorithm]
            if not group:
                continue
            reached = [r["steps_to_target"] for r in group if r["steps_to_target"] is not None]
            lines.append(
                f"| {algorithm} | {len(reached)} of {len(group)} | {mean_std(reached, 0)} | "
                f"{mean_std([r['final_accuracy'] for r in group])} | "
                f"{mean_std([r['final_accuracy_removed'] for r in group])} | "
                f"{mean_std([r['final_perception_gap'] for r in group])} | "
                f"{mean_std([r['seconds_per_step'] for r in group])} | "
                f"{mean_std([r['wall_seconds'] / 60 for r in group], 1)} |"
            )
        lines.append("")
    lines += [
        "## Every run",
        "",
        f"| task | algorithm | seed | steps | steps to {TARGET} | accuracy (I) | accuracy (I⁻) | gap | "
        "s/step | wall min | other processes (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['algorithm']} | {r['seed']} | {r['steps']} | "
            f"{r['steps_to_target'] or '–'} | {r['final_accuracy']:.2f} | "
            f"{r['final_accuracy_removed']:.2f} | {r['final_perception_gap']:.2f} | "
            f"{r['seconds_per_step']:.2f} | {r['wall_seconds'] / 60:.1f} | "
            f"{'–' if r['other_cores'] is None else format(r['other_cores'], '.2f')} |"
        )
    lines += [
        "",
        "The timings compare only between runs the machine ran alone: the last column is the CPU that "
        "other processes used during each run (– where it was not measured).",
        "",
        "Learning curves: `algorithms.png` beside this file (seed bands shaded).",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Greedy accuracy on I (solid) and I⁻ (dashed) against the step, one panel per task: the mean over
    seeds, the band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row["task"] for row in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for colour, algorithm in zip(("tab:blue", "tab:orange", "tab:green"), ALGORITHMS, strict=True):
            curves = [r["curve"] for r in rows if r["task"] == task and r["algorithm"] == algorithm]
            if not curves:
                continue
            steps = [point[0] for point in curves[0]]
            for index, style, label in ((1, "-", "I"), (2, "--", "I⁻")):
                values = [[curve[i][index] for curve in curves] for i in range(len(steps))]
                mean = [statistics.fmean(v) for v in values]
                axis.plot(steps, mean, style, color=colour, label=f"{algorithm} ({label})")
                axis.fill_between(
                    steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.12
                )
        axis.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
        axis.set_title(f"{task}: greedy test accuracy ({len(curves)} seeds)")
        axis.set_xlabel("step")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["colour"], help="synthetic tasks (default: colour)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--steps", nargs="*", default=[], metavar="TASK=COUNT", help="steps per task (default colour=250)"
    )
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-algorithms", help="run folders")
    add_out_argument(parser, "algorithms")
    args = parser.parse_args()
    steps = parse_steps(args.steps)
    missing = [task for task in args.tasks if task not in steps]
    if missing:
        raise SystemExit(f"give the steps for {', '.join(missing)}: --steps {missing[0]}=COUNT")
    machine = describe_machine({}, float(Path("/proc/loadavg").read_text().split()[0]))
    runs = [
        Run(task, algorithm, seed, steps[task])
        for task in args.tasks
        for seed in args.seeds
        for algorithm in ALGORITHMS
    ]
    tree, commit = code_tree(args.runs.resolve())
    machine["git commit"] = f"{commit} (the runs' code)"
    for run in runs:
        execute(run, args.runs.resolve(), tree)
    rows = [summarise(run, args.runs.resolve()) for run in runs]
    demo = yaml.safe_load((tree / "configs/demo.yaml").read_text())
    settings = {
        "config": "configs/demo.yaml, apart from the task, steps, seed and algorithm",
        "steps": ", ".join(f"{task} {steps[task]}" for task in args.tasks),
        "seeds": ", ".join(map(str, args.seeds)),
        "evaluation": ", ".join(f"{k} {v}" for k, v in demo["eval"].items()),
    }
    plot(rows, args.out.with_suffix(".png"))
    data = {"machine": machine, "settings": settings, "runs": rows}
    write_results(args.out, report(rows, machine, settings), data)


if __name__ == "__main__":
    main()
