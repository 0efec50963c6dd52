r"""Reward throughput: what the worker pool gains over a plain loop, and what a small batch costs.

Two questions about the reward server, answered in one run on the same items, each ratio against a
baseline measured in that same run (so the machine's speed cancels out of it):

1. **Throughput.** ``math`` items per second through ``POST /v1/score`` in batches of 256, against a
   plain in-process loop over math-verify on the same 256 items. Two baselines are measured:

   * *stock math-verify*: ``verify(parse(truth), parse(response))`` with math-verify's defaults
     (its own answer extraction over the whole response, its ``signal.alarm`` timeouts), the loop a
     user writes first; this is the baseline of the target;
   * *our ``math`` function in a loop*: the very work each server worker does per item (our answer
     extraction, then math-verify's LaTeX parser and ``verify``), without processes or HTTP; the
     ratio against it isolates what the pool and HTTP add and gain.

   The server runs ``--workers`` worker processes (default: one per core); the target is at least
   1.7x the stock loop on 2 cores, because the pool scores items in parallel and HTTP adds little.
2. **Latency.** p50 and p99 of ``POST /v1/score`` with 16 items, one request at a time, as a trainer
   scoring a small group would see it.

The items are generated from a seed: answers of several kinds (integers, fractions, decimals,
polynomials, roots, intervals, equations), half right and half wrong in an equivalent or a different
form, after a few hundred characters of reasoning. Every path scores every item and the verdicts are
compared (reported).

sympy iterates over sets, so ``PYTHONHASHSEED`` changes how much work an item takes (by up to a third
on this workload, between one process and the next). So the baselines run in a process of their own,
started with the same hash seed as the server (and so its workers), and the whole measurement is
repeated under several hash seeds (``--hash-seeds``), one server each. Every path is warmed up first;
rounds alternate the three paths (so that a change in the machine's load falls on all of them), and
medians are reported. The machine, the versions, the settings and the CPU that other processes used
meanwhile are written with the results.

    .venv/bin/python bench/reward_throughput.py [--items 256] [--rounds 3] [--hash-seeds 0,1,2]

About four minutes on two cores.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.pool
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
from machine import CpuMeter, describe_machine
from results import add_out_argument, key_value_section, listed, met, preamble, spread, write_results
from rich.console import Console
from stats import percentile, ratios

from reward_server.rewards import math_reward
from shared.launch import running_service

THROUGHPUT_TARGET = 1.7
"""Least server items/s over stock math-verify items/s, on 2 cores."""
LATENCY_BATCH = 16
PATHS = {"stock": "stock math-verify loop", "ours": "our math function loop", "server": "POST /v1/score"}
"""The three paths, by key and by the name the report gives them."""

console = Console(stderr=True)


# --- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    response: str
    truth: str


WORDS = (
    "first", "we", "note", "that", "the", "terms", "combine", "so", "we", "simplify", "both", "sides",
    "then", "substitute", "back", "and", "check", "the", "value", "carefully", "since", "each", "step",
    "must", "hold", "for", "the", "given", "constraints", "which", "means",
)  # fmt: skip


def _reasoning(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(20, 60)):
        if rng.random() < 0.2:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            parts.append(f"${a} + {b} = {a + b}$")
        else:
            parts.append(rng.choice(WORDS))
    return " ".join(parts)


def _answer(rng: random.Random) -> tuple[str, str, str]:
    """(the truth, an equivalent answer, a wrong answer) of one of several kinds."""
    kind = rng.randrange(7)
    a, b = rng.randint(1, 40), rng.randint(2, 40)
    if kind == 0:
        return str(a * b), str(a * b), str(a * b + 1)
    if kind == 1:
        return rf"\frac{{{a}}}{{{b}}}", rf"\dfrac{{{2 * a}}}{{{2 * b}}}", rf"\frac{{{a + 1}}}{{{b}}}"
    if kind == 2:
        value = a / 8
        return f"{value}", rf"\frac{{{a}}}{{8}}", f"{value + 0.5}"
    if kind == 3:
        return f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2", f"(x+{a + 1})^2"
    if kind == 4:
        return rf"{a}\sqrt{{2}}", rf"\sqrt{{{2 * a * a}}}", rf"{a}\sqrt{{3}}"
    if kind == 5:
        return f"[{a}, {a + b})", f"[{a},{a + b})", f"({a}, {a + b}]"
    return f"{a}", f"x = {a}", f"x = {a + 1}"


def make_items(count: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for index in range(count):
        truth, equivalent, wrong = _answer(rng)
        answer = equivalent if index % 2 == 0 else wrong
        response = f"<think>{_reasoning(rng)}</think> So the final answer is \\boxed{{{answer}}}."
        items.append(Item(response, truth))
    return items


# --- the three paths ----------------------------------------------------------------------------


def stock_loop(items: list[Item]) -> list[float]:
    """math-verify as its README shows it, defaults and all, one item after another."""
    from math_verify import parse, verify

    return [1.0 if verify(parse(f"${item.truth}$"), parse(item.response)) else 0.0 for item in items]


def function_loop(items: list[Item]) -> list[float]:
    """Our ``math`` reward function, one item after another, in this process."""
    return [math_reward(item.response, item.truth) for item in items]


def score_body(items: list[Item]) -> dict:
    return {
        "items": [
            {"id": str(i), "response": item.response, "ground_truth": item.truth, "reward": "math"}
            for i, item in enumerate(items)
        ]
    }


def server_scores(client: httpx.Client, items: list[Item]) -> list[float]:
    reply = client.post("/v1/score", json=score_body(items))
    reply.raise_for_status()
    results = reply.json()["results"]
    if any(result["status"] != "ok" for result in results):
        raise RuntimeError(f"some items were not scored: {[r for r in results if r['status'] != 'ok'][:3]}")
    return [result["reward"] for result in results]


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Timed:
    """One timed pass of a path, and the CPU other processes used meanwhile (cores)."""

    seconds: float
    other_cores: float


@dataclass
class Measured:
    """Everything one run measured."""

    rounds: dict[str, list[Timed]] = field(default_factory=lambda: {name: [] for name in PATHS.values()})
    """By path, every throughput round of every hash seed."""
    round_seeds: list[int] = field(default_factory=list)
    """The hash seed of each round."""
    agreement: dict[str, int] = field(default_factory=dict)
    """How many items' verdicts agree between the paths, from the first hash seed."""
    latencies: list[float] = field(default_factory=list)
    """Seconds of each small request, under the last hash seed."""
    latency_others: float = 0.0
    """CPU used by other processes while the latency was measured, in cores."""


@contextmanager
def reward_server(workers: int, log: Path) -> Iterator[tuple[str, int]]:
    """``cppo reward-server`` on a free port, as a user starts it; yields its URL and pid once ``/ready``."""
    args = ["--workers", str(workers), "--log-level", "warning"]
    with running_service("reward-server", args, log) as service:
        yield service.url, service.process.pid


def _timed_request(client: httpx.Client, items: list[Item]) -> float:
    start = time.perf_counter()
    server_scores(client, items)
    return time.perf_counter() - start


# --- the baseline process ------------------------------------------------------------------------

_child_items: list[Item] = []
LOOPS: dict[str, Callable[[list[Item]], list[float]]] = {"stock": stock_loop, "ours": function_loop}


def _child_start(count: int, seed: int) -> None:
    """In the baseline process: make the same items, and warm both loops up on all of them."""
    global _child_items
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _child_items = make_items(count, seed)
    for loop in LOOPS.values():
        loop(_child_items)


def _child_loop(name: str) -> tuple[float, list[float]]:
    """In the baseline process: one timed pass of a loop over the items."""
    start = time.perf_counter()
    scores = LOOPS[name](_child_items)
    return time.perf_counter() - start, scores


@contextmanager
def hash_seed(seed: int) -> Iterator[None]:
    """``PYTHONHASHSEED`` for the processes started meanwhile (the baseline process, the server and so its
    workers). sympy iterates over sets, so the hash seed changes how much work an item takes: by a
    third between seeds on this workload. Both sides of every ratio run under the same seed."""
    previous = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = previous


# --- the report ---------------------------------------------------------------------------------


def report(
    info: dict[str, str], options: Options, measured: Measured, wall_seconds: float
) -> tuple[str, dict]:
    """The results as markdown, and as a dict for the JSON file."""
    rates = {name: [options.items / run.seconds for run in runs] for name, runs in measured.rounds.items()}
    vs_stock = ratios(rates[PATHS["server"]], rates[PATHS["stock"]])
    vs_ours = ratios(rates[PATHS["server"]], rates[PATHS["ours"]])
    others = [run.other_cores for runs in measured.rounds.values() for run in runs]
    p50, p99 = percentile(measured.latencies, 0.5), percentile(measured.latencies, 0.99)
    machine_rows = {
        **info,
        "CPU used by other processes while measuring throughput": spread(others),
        "... while measuring latency": f"{measured.latency_others:.2f} cores",
    }
    lines = [
        *preamble(
            "Reward throughput",
            "reward_throughput.py",
            "Every ratio is between numbers measured in the same round, under the same `PYTHONHASHSEED`;",
            f"figures are medians of {len(measured.round_seeds)} rounds ({options.rounds} for each hash seed "
            f"{', '.join(map(str, options.hash_seeds))}).",
        ),
        *key_value_section("Machine", machine_rows),
        *key_value_section("Settings", settings(options)),
        "## Verdicts",
        "",
        "| | items |",
        "|---|---:|",
        *(f"| {key} | {value} of {options.items} |" for key, value in measured.agreement.items()),
        "",
        *throughput_section(rates, vs_stock, vs_ours, measured.round_seeds),
        *latency_section(measured.latencies, p50, p99),
        f"Whole run: {wall_seconds:.0f} s.",
        "",
    ]
    raw = {
        "machine": info,
        "settings": {
            "items": options.items,
            "rounds_per_hash_seed": options.rounds,
            "hash_seeds": options.hash_seeds,
            "seed": options.seed,
            "workers": options.workers,
        },
        "verdicts": measured.agreement,
        "round_hash_seeds": measured.round_seeds,
        "items_per_second": rates,
        "ratios": {"server_over_stock": vs_stock, "server_over_our_function": vs_ours},
        "other_processes_cpu_cores": {
            name: [r.other_cores for r in runs] for name, runs in measured.rounds.items()
        },
        "latency_seconds": {"p50": p50, "p99": p99, "all": measured.latencies},
    }
    return "\n".join(lines), raw


def settings(options: Options) -> dict[str, str]:
    return {
        "throughput batch": f"{options.items} `math` items, one request",
        "latency batch": f"{LATENCY_BATCH} items, {options.latency_requests} requests one at a time",
        "workload seed": str(options.seed),
        "server": f"`cppo reward-server --workers {options.workers}` (item timeout 10 s, the default)",
        "baselines": "in a separate process (same `PYTHONHASHSEED`), warmed up on every item",
    }


def throughput_section(
    rates: dict[str, list[float]], vs_stock: list[float], vs_ours: list[float], round_seeds: list[int]
) -> list[str]:
    """Section 1: items/s of every path, and the server's ratios over the two loops."""
    ratio_stock = statistics.median(vs_stock)
    return [
        "## 1. Throughput (items/s)",
        "",
        f"| path | median | rounds (hash seeds {listed(round_seeds, 0)}) |",
        "|---|---:|---|",
        *(f"| {name} | {statistics.median(rate):.1f} | {listed(rate, 1)} |" for name, rate in rates.items()),
        "",
        "| ratio | median | rounds | target | |",
        "|---|---:|---|---:|---|",
        f"| server / stock math-verify loop | {ratio_stock:.2f} | {listed(vs_stock)} | "
        f"≥ {THROUGHPUT_TARGET} | {met(ratio_stock >= THROUGHPUT_TARGET)} |",
        f"| server / our math function loop | {statistics.median(vs_ours):.2f} | {listed(vs_ours)} | | |",
        "",
    ]


def latency_section(latencies: list[float], p50: float, p99: float) -> list[str]:
    """Section 2: the latency of a small request, one at a time."""
    return [
        f"## 2. Latency of a {LATENCY_BATCH}-item request",
        "",
        "| p50 | p99 | mean | max |",
        "|---:|---:|---:|---:|",
        f"| {p50 * 1000:.1f} ms | {p99 * 1000:.1f} ms | {statistics.mean(latencies) * 1000:.1f} ms | "
        f"{max(latencies) * 1000:.1f} ms |",
        "",
    ]


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Options:
    items: int
    rounds: int
    hash_seeds: list[int]
    latency_requests: int
    workers: int
    seed: int
    out: Path


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=256, help="items per throughput batch (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per hash seed (default 3)")
    parser.add_argument(
        "--hash-seeds", default="0,1,2", help="PYTHONHASHSEED values, one server each (default 0,1,2)"
    )
    parser.add_argument(
        "--latency-requests", type=int, default=200, help="16-item requests timed (default 200)"
    )
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="server workers")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    add_out_argument(parser, "reward_throughput")
    args = parser.parse_args(argv)
    args.hash_seeds = [int(seed) for seed in args.hash_seeds.split(",")]
    return Options(**vars(args))


def measure(options: Options, scratch: Path) -> Measured:
    """Every hash seed in turn, each with a baseline process and a server of its own."""
    items = make_items(options.items, options.seed)
    latency_items = make_items(LATENCY_BATCH * 8, options.seed + 1)
    batches = [latency_items[i : i + LATENCY_BATCH] for i in range(0, len(latency_items), LATENCY_BATCH)]
    measured = Measured()
    spawn = multiprocessing.get_context("spawn")
    for hash_index, seed in enumerate(options.hash_seeds):
        console.print(f"PYTHONHASHSEED={seed}: starting the baseline process and the server, warming up")
        with (
            hash_seed(seed),
            spawn.Pool(1, initializer=_child_start, initargs=(options.items, options.seed)) as baseline,
            reward_server(options.workers, scratch / f"server-{seed}.log") as (url, pid),
            httpx.Client(base_url=url, timeout=600) as client,
        ):
            meter = CpuMeter([os.getpid(), pid])
            served = server_scores(client, items)  # warm-up, and the verdicts
            if not measured.agreement:
                measured.agreement = verdicts(baseline, served)
            paths: dict[str, Callable[[], float]] = {
                PATHS["stock"]: lambda: baseline.apply(_child_loop, ("stock",))[0],
                PATHS["ours"]: lambda: baseline.apply(_child_loop, ("ours",))[0],
                PATHS["server"]: lambda: _timed_request(client, items),
            }
            for number in range(options.rounds):
                order = list(paths) if number % 2 == 0 else list(reversed(paths))
                for name in order:
                    before = meter.snapshot()
                    seconds = paths[name]()
                    measured.rounds[name].append(Timed(seconds, meter.others(before)))
                    console.print(f"  round {number + 1}: {name}: {options.items / seconds:.1f} items/s")
                measured.round_seeds.append(seed)
            if hash_index == len(options.hash_seeds) - 1:
                console.print(f"latency: {options.latency_requests} requests of {LATENCY_BATCH} items")
                for batch in batches:  # warm-up
                    server_scores(client, batch)
                before = meter.snapshot()
                for request in range(options.latency_requests):
                    measured.latencies.append(_timed_request(client, batches[request % len(batches)]))
                measured.latency_others = meter.others(before)
    return measured


def verdicts(baseline: multiprocessing.pool.Pool, served: list[float]) -> dict[str, int]:
    """How many items the paths agree on, and how many answers are right."""
    _, expected = baseline.apply(_child_loop, ("ours",))
    _, stock = baseline.apply(_child_loop, ("stock",))
    return {
        "server = our function": sum(a == b for a, b in zip(served, expected, strict=True)),
        "stock math-verify = our function": sum(a == b for a, b in zip(stock, expected, strict=True)),
        "right answers (our function)": int(sum(expected)),
    }


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    started = time.perf_counter()
    info = describe_machine(
        {
            "math-verify": version("math-verify"),
            "latex2sympy2_extended": version("latex2sympy2_extended"),
            "sympy": version("sympy"),
            "fastapi": version("fastapi"),
            "uvicorn": version("uvicorn"),
            "httpx": httpx.__version__,
            "server workers": str(options.workers),
        },
        os.getloadavg()[0],
    )
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as scratch:
        measured = measure(options, Path(scratch))
    write_results(options.out, *report(info, options, measured, time.perf_counter() - started))


if __name__ == "__main__":
    main()
