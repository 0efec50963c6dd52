"""Rollouts that overlap the update: the whole step of GRPO and CPPO at ``max_staleness`` 0 and 1.

With ``train.max_staleness: 1`` the trainer asks for step k+1's rollouts (and scores them) while step k's
update runs, so that CPPO's extra teacher-forced passes (I⁺ and I⁻, about 3× GRPO's update) hide behind
generation. The question: how much of CPPO's extra cost is left in the whole step, against GRPO's, with
and without the overlap. The update can only hide behind a generation that takes longer than it, so two
shapes are measured:

* ``demo``: the demo config (``configs/demo.yaml``: 16 prompts × n 16, one-token answers, the demo's
  views), where generation is short;
* ``paper``: the paper-like shape of ``bench/train_step.py`` on the same tiny model (the paper's
  instruction and reward, every task, 4 prompts × n 8, ``max_tokens`` 256: the random model's responses
  are long), where generation takes most of the step, as it does in the paper's runs.

Every configuration is a real ``cppo train`` against one rollout server and one reward server started
here, for ``--steps`` steps with no evaluation and no checkpoint before the end. The step's wall time is
the loop's own ``seconds_step`` (from taking the batch to the end of the weight sync; with staleness 1 the
next step's sampling runs meanwhile), the median over the steps after the first ``--warmup``. The four
runs of a shape (GRPO and CPPO, staleness 0 and 1) take turns in every round, their order reversed from
one round to the next, and every ratio is between runs of the same round.

On this machine the servers and the trainer share two cores: with one torch thread each (``--threads``,
``OMP_NUM_THREADS`` for every process), generation in the rollout server and the update in the trainer
can run at once, which is what the overlap needs. With more threads than cores they would only take turns.

    .venv/bin/python bench/overlap.py [--shapes demo paper] [--rounds 2] [--steps 12] [--out FILE]

The tiny model and the demo's data are built in a temporary folder; a round takes about 3 minutes at the
demo shape and 5 at the paper-like one on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import REPO, CpuMeter, describe_machine
from results import add_out_argument, key_value_section, met, preamble, spread, write_results
from stats import ratios

from shared.launch import running_service
from shared.synth_data import SynthSettings, write_dataset
from shared.tiny_model import build_tiny_model
from trainer.config import PAPER_INSTRUCTION

RUNS = [("grpo", 0), ("cppo", 0), ("grpo", 1), ("cppo", 1)]
PHASES = (
    "seconds_step",
    "seconds_wait",
    "seconds_rollout",
    "seconds_reward",
    "seconds_train",
    "seconds_sync",
)
SHAPES = {
    "demo": [],
    "paper": [
        f"data.instruction={json.dumps(PAPER_INSTRUCTION)}",
        "data.tasks=null",
        "reward.reward={math: 0.9, format: 0.1}",
        "reward.accuracy=math",
        "rollout.n=8",
        "rollout.max_tokens=256",
        "train.prompts_per_step=4",
    ],
}
"""Overrides of configs/demo.yaml per shape; the paper-like one is bench/train_step.py's."""
TARGET = 1.15
"""CPPO's whole step ÷ GRPO's at max_staleness 1, at most."""


def train(
    options: argparse.Namespace,
    inputs: Path,
    urls: dict[str, str],
    shape: str,
    algorithm: str,
    staleness: int,
) -> dict:
    """One ``cppo train`` run; each phase's median over the steps after the warm-up, and the wall time."""
    run = inputs / f"run-{shape}-{algorithm}-{staleness}"
    overrides = [
        *SHAPES[shape],
        f"run_dir={run}",
        f"model.path={inputs / 'model'}",
        f"data.path={inputs / 'data'}",
        f"rollout.urls=[{urls['rollout']}]",
        f"reward.url={urls['reward']}",
        f"objective.algorithm={algorithm}",
        f"train.max_staleness={staleness}",
        f"train.steps={options.steps}",
        "eval.every=0",
        "checkpoint.every=0",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    command = [sys.executable, "-m", "shared.cli", "train", "--config", str(REPO / "configs/demo.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
    started = time.perf_counter()
    done = subprocess.run([*command, *overrides, "--overwrite"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cppo train ({algorithm}, staleness {staleness}) failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [row for row in rows if row["step"] > options.warmup]
    return {
        **{phase: statistics.median(row[phase] for row in timed) for phase in PHASES},
        "steps": [row["seconds_step"] for row in timed],
        "wall_s": wall,
    }


def measure(
    options: argparse.Namespace, inputs: Path, urls: dict[str, str], roots: list[int], shape: str
) -> list[dict]:
    meter = CpuMeter(roots)
    rounds = []
    for index in range(options.rounds):
        order = RUNS if index % 2 == 0 else RUNS[::-1]
        results = {}
        for algorithm, staleness in order:
            before, children = meter.snapshot(), _children_cpu()
            result = train(options, inputs, urls, shape, algorithm, staleness)
            # The trainer has exited by the second snapshot, so its CPU is no longer in our process tree's.
            trainer_cores = (_children_cpu() - children) / result["wall_s"]
            result["other_cores"] = max(0.0, meter.others(before) - trainer_cores)
            results[f"{algorithm}-{staleness}"] = result
            step = result["seconds_step"]
            print(
                f"{shape}, round {index + 1}, {algorithm}, staleness {staleness}: {step:.3f} s",
                file=sys.stderr,
            )
        rounds.append(results)
    return rounds


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def report(options: argparse.Namespace, machine: dict[str, str], measured: dict[str, list[dict]]) -> str:
    every = [round[key]["other_cores"] for rounds in measured.values() for round in rounds for key in round]
    lines = preamble(
        "Rollouts that overlap the update",
        "overlap.py",
        f"Every figure is a median: over steps {options.warmup + 1} to {options.steps} of a run, then over "
        f"{options.rounds} rounds; every ratio is between runs of the same round.",
    )
    lines += key_value_section("Machine", machine)
    lines += key_value_section(
        "Settings",
        {
            "runs": f"`cppo train --config configs/demo.yaml` with each shape's overrides, {options.steps} "
            "steps, eval and checkpoints off, sync by value",
            "demo shape": "16 prompts × n 16, max_tokens 1, the demo's views and reward",
            "paper-like shape": "4 prompts × n 8, max_tokens 256, the paper's instruction, reward and tasks",
            "servers": "`cppo rollout-server` (transformers backend), `cppo reward-server`, on this machine",
            "threads": f"{options.threads} torch thread(s) in every process (OMP_NUM_THREADS)",
            "CPU used by other processes": spread(every),
        },
    )
    for shape, rounds in measured.items():
        lines += shape_section(shape, rounds)
    return "\n".join(lines) + "\n"


def shape_section(shape: str, rounds: list[dict]) -> list[str]:
    def median(key: str, phase: str = "seconds_step") -> float:
        return statistics.median(r[key][phase] for r in rounds)

    def ratio(top: str, bottom: str) -> list[float]:
        return ratios([r[top]["seconds_step"] for r in rounds], [r[bottom]["seconds_step"] for r in rounds])

    def shown(values: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in values)

    lines = [
        f"## The {shape} shape",
        "",
        "| phase (seconds) | GRPO, staleness 0 | CPPO, staleness 0 | GRPO, staleness 1 | CPPO, staleness 1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase in PHASES:
        cells = " | ".join(f"{median(f'{a}-{s}', phase):.3f}" for a, s in RUNS)
        lines.append(f"| {phase.removeprefix('seconds_')} | {cells} |")
    at_0, at_1 = ratio("cppo-0", "grpo-0"), ratio("cppo-1", "grpo-1")
    saved = {algorithm: ratio(f"{algorithm}-1", f"{algorithm}-0") for algorithm in ("grpo", "cppo")}
    return [
        *lines,
        "",
        "`step` is the loop's wall time per step; with staleness 1 the phases inside it overlap (`wait` is "
        "how long the step waited for its batch; `rollout` and `reward` are how long making it took, in the "
        "background).",
        "",
        "| | measured | rounds |",
        "|---|---:|---|",
        f"| CPPO ÷ GRPO, staleness 0 | {statistics.median(at_0):.2f}× | {shown(at_0)} |",
        f"| CPPO ÷ GRPO, staleness 1 | **{statistics.median(at_1):.2f}×** | {shown(at_1)} |",
        f"| GRPO, staleness 1 ÷ 0 | {statistics.median(saved['grpo']):.2f}× | {shown(saved['grpo'])} |",
        f"| CPPO, staleness 1 ÷ 0 | {statistics.median(saved['cppo']):.2f}× | {shown(saved['cppo'])} |",
        "",
        f"Target: CPPO ÷ GRPO at most {TARGET:.2f}× with staleness 1: "
        f"{met(statistics.median(at_1) <= TARGET)}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(SHAPES), default=["demo", "paper"], help="shapes to measure"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four runs per shape (default 2)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="first steps left out of the medians (default 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    add_out_argument(parser, "overlap")
    options = parser.parse_args()
    if options.warmup >= options.steps:
        parser.error("--warmup must be smaller than --steps")
    load = os.getloadavg()[0]
    os.environ["OMP_NUM_THREADS"] = str(options.threads)
    with tempfile.TemporaryDirectory(prefix="cppo-overlap-") as scratch:
        inputs = Path(scratch)
        build_tiny_model(inputs / "model", seed=0)
        write_dataset(inputs / "data", SynthSettings(train=2000, test=200, seed=0))
        logs = inputs / "logs"
        logs.mkdir()
        rollout_args = ["--model", str(inputs / "model"), "--max-batch-size", "256"]
        with (
            running_service("rollout-server", rollout_args, logs / "rollout.log") as rollout,
            running_service("reward-server", [], logs / "reward.log") as reward,
        ):
            urls = {"rollout": rollout.url, "reward": reward.url}
            roots = [os.getpid(), rollout.process.pid, reward.process.pid]
            measured = {shape: measure(options, inputs, urls, roots, shape) for shape in options.shapes}
    machine = describe_machine({"torch threads": str(options.threads)}, load)
    write_results(options.out, report(options, machine, measured), {"machine": machine, "shapes": measured})


if __name__ == "__main__":
    main()
