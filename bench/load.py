r"""Load: both servers under 1, 16 and 64 clients, with and without hostile reward items, and a flood.

Clients are closed-loop: asyncio tasks sharing one ``httpx.AsyncClient`` per scenario, each sending its
next request as soon as the previous one is answered, for ``--seconds`` per scenario. A client that is
shed (a 429 from the rollout server, a 503 from the reward server, each with ``Retry-After``) waits what
``Retry-After`` asks, as a well-behaved client does, and sends the same request again. Every scenario
reports requests/s, p50/p99 latency, what the server shed, every 5xx and transport error, and the
resident memory of the server's whole process tree (the reward server's fork server and workers
included) before the scenario, at its peak during it, and once the server is idle again.

1. **Reward server** (``cppo reward-server``, its default flags). N ordinary clients for each N of
   ``--clients``, each request ``--batch`` ``math`` items (answers of several kinds, half of them right,
   made as ``reward_throughput.py`` makes them). Each N runs twice, back to back: alone, and then with
   hostile clients added whose requests hold only hostile items, in turn an exponent tower
   ``9^{9^{9^{9}}}``, the factorial ``(10^{6})!`` and polynomial squares nested as deep as the ``math``
   reward parses (each costs math-verify seconds to minutes). A hostile share ``h`` (``--hostile``,
   0.25) is realised as round(N·h/(1−h)) hostile clients, at least one, so that hostile items are about
   ``h`` of the items the clients have in flight at any moment. Why separate clients: a hostile request
   takes far longer than an ordinary one, so closed-loop clients that mixed hostile requests into their
   own sequence would soon all be waiting on hostile ones, and the ordinary load would vanish from the
   very scenario meant to show its latency; separate clients keep the ordinary load the same with and
   without hostile work. What counts is the ordinary requests' latency: their p99 with hostile clients
   over their p99 without, for the same N in the same run, is at most 3. When the time is up the
   ordinary clients finish the request they are on, and the hostile requests still in flight are
   abandoned (the server cancels the items of a request whose client has gone).
2. **Rollout server** (``cppo rollout-server`` on the tiny model, its default limits). N clients each
   sending ``--prompts`` prompts with an image × ``--n`` samples, then a **flood**: ``--flood-clients``
   clients each sending ``--flood-prompts`` × ``--flood-n`` sequences, far past the queue bound
   (``--max-queued-sequences``, by default 16 × the batch size), which must answer 429 rather than queue
   without end: the server's resident memory may grow by less than 200 MiB at its peak. Requests in
   flight when the time is up are awaited.

Targets, over every scenario: no 5xx other than the shedding 503, no transport error, and no ordinary
request left unanswered within ``--request-timeout``; the ordinary p99 ratio; the flood's memory. The
servers are used through HTTP alone; between scenarios the bench waits until ``/metrics`` shows the
server idle (nothing queued, every reward worker back). The machine, the versions, the settings and the
CPU other processes used during each scenario are written with the results.

    .venv/bin/python bench/load.py [--seconds 20] [--clients 1 16 64] [--servers reward rollout] [--out FILE]

About six to ten minutes on two cores with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
from machine import CpuMeter, describe_machine, tree_rss
from results import add_out_argument, key_value_section, met, preamble, spread, write_results
from reward_throughput import Item, make_items, score_body
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rollout_throughput import make_prompts
from stats import percentile

from reward_server.config import RewardSettings
from reward_server.rewards import MAX_ANSWER_DEPTH
from rollout_server.config import RolloutSettings
from shared.launch import running_service
from shared.tiny_model import build_tiny_model

P99_RATIO_TARGET = 3.0
"""Most ordinary p99 with hostile clients over ordinary p99 without, for the same client count."""
FLOOD_RSS_TARGET_MIB = 200
"""Most growth of the rollout server's resident memory, from before the flood to its peak during it."""
SHED_STATUSES = (429, 503)
"""What a server sheds load with, when a ``Retry-After`` comes with it."""
TICK_S = 0.5
"""How often the server's memory is sampled and the display refreshed."""
TRANSPORT_PAUSE_S = 0.5
"""A client's pause after a transport error, so that a dead server is not hammered in a tight loop."""
SETTLE_S = 30.0
"""Longest wait for the server to become idle after a scenario: a healthy one is idle within a second or
two, once the requests in flight are answered or abandoned."""
WARM_UP_REQUESTS = 3
LOG_TAIL_CHARS = 4000
ORDINARY_BODIES = 16
"""Different ordinary reward requests the clients take in turn."""
HOSTILE_TRUTH = "7"
JSON_HEADERS = {"content-type": "application/json"}

console = Console(stderr=True)


# --- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What one kind of client sends, and how an answer is tallied."""

    route: str
    bodies: list[bytes]
    """Request bodies, taken in turn (each client starting at its own)."""
    units: int
    """Items or sequences per request."""
    outcomes: Callable[[dict], Counter[str]]
    """What an answer's body says: items by status, or samples."""
    abandon: bool = False
    """Abandoned in flight when the scenario's time is up, rather than awaited."""


def hostile_answers() -> dict[str, str]:
    """Final answers that cost math-verify seconds or more each, by kind, all within the ``math`` reward's
    default limits on length and depth, so that every one reaches the parser."""
    squares = "x"
    for _ in range(MAX_ANSWER_DEPTH):
        squares = f"({squares}+1)^{{2}}"
    return {
        "exponent tower": "9^{9^{9^{9}}}",
        "factorial of a million": "(10^{6})!",
        f"polynomial squares nested {MAX_ANSWER_DEPTH} deep": squares,
    }


def item_statuses(body: dict) -> Counter[str]:
    return Counter(result["status"] for result in body["results"])


def samples(body: dict) -> Counter[str]:
    return Counter(samples=sum(len(prompt["samples"]) for prompt in body["prompts"]))


def reward_loads(batch: int, seed: int) -> dict[str, Load]:
    """Ordinary requests of ``batch`` math items, and hostile requests of as many hostile items."""
    items = make_items(batch * ORDINARY_BODIES, seed)
    ordinary = [_json(score_body(items[i : i + batch])) for i in range(0, len(items), batch)]
    responses = [
        f"<think>we work it out</think> So the final answer is \\boxed{{{answer}}}."
        for answer in hostile_answers().values()
    ]
    hostile = [Item(responses[i % len(responses)], HOSTILE_TRUTH) for i in range(batch)]
    return {
        "ordinary": Load("/v1/score", ordinary, batch, item_statuses),
        "hostile": Load("/v1/score", [_json(score_body(hostile))], batch, item_statuses, abandon=True),
    }


def rollout_loads(options: Options) -> dict[str, Load]:
    """Ordinary requests (a few prompts, small n) and flood requests, each prompt with its image."""
    return {
        "ordinary": _rollout_load(options.prompts, options.n, options.max_tokens, options.seed, bodies=4),
        "flood": _rollout_load(
            options.flood_prompts, options.flood_n, options.max_tokens, options.seed, bodies=1
        ),
    }


def _rollout_load(prompts: int, n: int, max_tokens: int, seed: int, bodies: int) -> Load:
    made = make_prompts(prompts * bodies, max_tokens, seed)
    requests = []
    for start in range(0, len(made), prompts):
        chosen = made[start : start + prompts]
        # make_prompts gives one single-prompt body per prompt; one request carries several.
        body = {**chosen[0].body, "prompts": [p.body["prompts"][0] for p in chosen], "n": n}
        requests.append(_json(body))
    return Load("/v1/rollouts", requests, prompts * n, samples)


def _json(body: dict) -> bytes:
    # Serialised once: 64 clients re-encoding the same bodies would take CPU from the servers.
    return json.dumps(body).encode()


# --- the clients --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients of one kind saw during a scenario."""

    latencies: list[float] = field(default_factory=list)
    """Seconds of each answered (2xx) attempt, from its sending."""
    waits: list[float] = field(default_factory=list)
    """Seconds from a request's first attempt to its answer, the waits after being shed included."""
    shed: int = 0
    """Answers 429 or 503 with ``Retry-After``."""
    statuses: Counter[int] = field(default_factory=Counter)
    """Every other answer, by status."""
    transport: Counter[str] = field(default_factory=Counter)
    """Transport errors other than the client's own timeout, by exception."""
    timeouts: int = 0
    """Requests unanswered within the request timeout."""
    unfinished: int = 0
    """Requests unanswered when the scenario ended: abandoned in flight, or shed and not sent again."""
    outcomes: Counter[str] = field(default_factory=Counter)
    """What the answers' bodies said: reward items by status, or rollout samples."""

    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def failures(self) -> int:
        """Answers and errors a healthy server never gives: every 5xx but shedding, transport errors."""
        return self.server_errors() + sum(self.transport.values())


async def client(http: httpx.AsyncClient, load: Load, tally: Tally, first: int, deadline: float) -> None:
    """Requests back to back, until ``deadline`` (``time.monotonic``) has passed."""
    turn = first
    while time.monotonic() < deadline:
        await request(http, load, load.bodies[turn % len(load.bodies)], tally, deadline)
        turn += 1


async def request(http: httpx.AsyncClient, load: Load, body: bytes, tally: Tally, deadline: float) -> None:
    """One request until it is answered, sent again after each shed answer once ``Retry-After`` has
    passed, unless the scenario has ended meanwhile."""
    first = time.perf_counter()
    try:
        while True:
            sent = time.perf_counter()
            try:
                reply = await http.post(load.route, content=body, headers=JSON_HEADERS)
            except httpx.TimeoutException:
                tally.timeouts += 1
                return
            except httpx.TransportError as error:
                tally.transport[type(error).__name__] += 1
                await asyncio.sleep(TRANSPORT_PAUSE_S)
                return
            answered = time.perf_counter()
            if reply.status_code in SHED_STATUSES and "retry-after" in reply.headers:
                tally.shed += 1
                await asyncio.sleep(float(reply.headers["retry-after"]))
                if time.monotonic() >= deadline:
                    tally.unfinished += 1
                    return
                continue
            tally.statuses[reply.status_code] += 1
            if reply.is_success:
                tally.latencies.append(answered - sent)
                tally.waits.append(answered - first)
                tally.outcomes.update(load.outcomes(reply.json()))
            return
    except asyncio.CancelledError:
        tally.unfinished += 1
        raise


# --- a scenario ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """How a server is started, and what its ``/metrics`` say about its load."""

    name: str
    command: str
    args: list[str]
    shed_metric: str
    queue_metric: str
    """What the server has queued: 0 when it is idle."""

    def idle(self, now: dict[str, float], ready: dict[str, float]) -> bool:
        """Nothing queued, and every reward worker back (``ready``: the metrics once warmed up)."""
        workers = "cppo_reward_workers"
        return now[self.queue_metric] == 0 and now.get(workers, 0) >= ready.get(workers, 0)


def reward_server() -> Server:
    return Server("reward", "reward-server", [], "cppo_reward_shed_requests_total", "cppo_reward_queue_depth")


def rollout_server(model: Path) -> Server:
    return Server(
        "rollout",
        "rollout-server",
        ["--model", str(model)],
        "cppo_rollout_shed_requests_total",
        "cppo_rollout_queued_sequences",
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: dict[str, int]
    """Clients by load kind."""


@dataclass
class Run:
    """One scenario, measured."""

    server: str
    scenario: Scenario
    seconds: float
    """From the first request to the last awaited answer."""
    tallies: dict[str, Tally]
    units: dict[str, int]
    """Items or sequences per request, by load kind."""
    rss: dict[str, int]
    """The server tree's resident bytes: before, peak (sampled every ``TICK_S``) and after."""
    shed_by_server: float
    """Requests shed, by the server's own count."""
    other_cores: float
    """CPU other processes used while the clients ran."""
    queued_after: float | None
    """What the server still counted as queued ``SETTLE_S`` after the scenario; None once it was idle."""


async def scrape(control: httpx.AsyncClient) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}``."""
    values = {}
    for line in (await control.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def settle(control: httpx.AsyncClient, server: Server, ready: dict[str, float]) -> float | None:
    """Wait until the server is idle: None once it is, or what it still counts as queued after
    ``SETTLE_S``."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = await scrape(control)
        if server.idle(now, ready):
            return None
        if time.monotonic() > deadline:
            return now[server.queue_metric]
        await asyncio.sleep(TICK_S)


@dataclass
class Rig:
    """One running server and what every scenario on it shares."""

    server: Server
    url: str
    pid: int
    control: httpx.AsyncClient
    """A client of its own for ``/metrics``, outside the scenario's connection limits."""
    ready: dict[str, float]
    meter: CpuMeter
    progress: Progress


async def run_scenario(
    rig: Rig, scenario: Scenario, loads: dict[str, Load], seconds: float, timeout: float
) -> Run:
    """The scenario's clients for ``seconds``, then the wait until the server is idle again."""
    shed_before = (await scrape(rig.control)).get(rig.server.shed_metric, 0.0)
    rss = dict.fromkeys(("before", "peak"), tree_rss([rig.pid]))
    tallies = {kind: Tally() for kind in scenario.clients}
    task = rig.progress.add_task(f"{rig.server.name}: {scenario.name}", total=seconds)
    connections = sum(scenario.clients.values())
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    cpu = rig.meter.snapshot()
    started, deadline = time.perf_counter(), time.monotonic() + seconds

    def show() -> None:
        answered = sum(len(tally.latencies) for tally in tallies.values())
        shed = sum(tally.shed for tally in tallies.values())
        failed = sum(tally.failures() + tally.timeouts for tally in tallies.values())
        rig.progress.update(
            task,
            completed=min(seconds, time.perf_counter() - started),
            description=f"{rig.server.name}: {scenario.name}: {answered} answered, {shed} shed, "
            f"{failed} failed",
        )

    async with httpx.AsyncClient(base_url=rig.url, timeout=timeout, limits=limits) as http:
        clients = {
            kind: [
                asyncio.create_task(client(http, loads[kind], tallies[kind], k, deadline)) for k in range(n)
            ]
            for kind, n in scenario.clients.items()
        }
        watcher = asyncio.create_task(watch(rig.pid, rss, show))
        await asyncio.gather(*(t for kind, ts in clients.items() if not loads[kind].abandon for t in ts))
        elapsed = time.perf_counter() - started
        abandoned = [t for kind, ts in clients.items() if loads[kind].abandon for t in ts]
        for waiting in abandoned:
            waiting.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
    other_cores = rig.meter.others(cpu)
    rig.progress.update(task, description=f"{rig.server.name}: {scenario.name}: waiting until idle")
    queued = await settle(rig.control, rig.server, rig.ready)
    watcher.cancel()
    rss["after"] = tree_rss([rig.pid])
    show()
    shed_after = (await scrape(rig.control)).get(rig.server.shed_metric, 0.0)
    units = {kind: loads[kind].units for kind in scenario.clients}
    return Run(
        rig.server.name, scenario, elapsed, tallies, units, rss, shed_after - shed_before, other_cores, queued
    )


async def watch(pid: int, rss: dict[str, int], show: Callable[[], None]) -> None:
    """The server's peak memory into ``rss``, and the display refreshed, until cancelled."""
    while True:
        rss["peak"] = max(rss["peak"], tree_rss([pid]))
        show()
        await asyncio.sleep(TICK_S)


async def measure_server(
    server: Server, scenarios: list[Scenario], loads: dict[str, Load], options: Options, log: Path
) -> list[Run]:
    """The server started as a user starts it, warmed up, and every scenario on it in turn."""
    args = [*server.args, "--log-level", "warning"]
    with running_service(server.command, args, log, env={"OMP_NUM_THREADS": str(options.threads)}) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=options.request_timeout) as control:
            ordinary = loads["ordinary"]
            for turn in range(WARM_UP_REQUESTS):
                body = ordinary.bodies[turn % len(ordinary.bodies)]
                reply = await control.post(ordinary.route, content=body, headers=JSON_HEADERS)
                reply.raise_for_status()
            meter = CpuMeter([os.getpid(), service.process.pid])
            columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                rig = Rig(
                    server, service.url, service.process.pid, control, await scrape(control), meter, progress
                )
                runs = [
                    await run_scenario(rig, scenario, loads, options.seconds, options.request_timeout)
                    for scenario in scenarios
                ]
        if any(tally.failures() for run in runs for tally in run.tallies.values()):
            # The log goes with the temporary folder; its tail holds the tracebacks of any 5xx.
            console.print(f"{server.name} server's log, last lines:\n{service.output()[-LOG_TAIL_CHARS:]}")
    return runs


def hostile_clients(ordinary: int, share: float) -> int:
    """Hostile clients that make ``share`` of the items in flight hostile, beside ``ordinary`` clients
    (every request holding as many items); at least one when ``share`` is above 0."""
    return max(1, round(ordinary * share / (1 - share))) if share > 0 else 0


def reward_scenarios(options: Options) -> list[Scenario]:
    """For each client count, without and then with hostile clients: the ratio's two sides adjacent."""
    scenarios = []
    for n in options.clients:
        scenarios.append(Scenario(client_count(n), {"ordinary": n}))
        hostile = hostile_clients(n, options.hostile)
        name = f"{n} + {client_count(hostile, 'hostile ')}"
        scenarios.append(Scenario(name, {"ordinary": n, "hostile": hostile}))
    return scenarios


def rollout_scenarios(options: Options) -> list[Scenario]:
    flood = Scenario(f"flood, {client_count(options.flood_clients)}", {"flood": options.flood_clients})
    return [*(Scenario(client_count(n), {"ordinary": n}) for n in options.clients), flood]


def client_count(count: int, kind: str = "") -> str:
    return f"{count} {kind}client{'s' if count > 1 else ''}"


# --- the report ---------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def quantile(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def at(values: list[float], q: float) -> str:
    """The ``q``-quantile of latencies, for a table."""
    return duration(quantile(values, q))


def mib(size: float) -> str:
    return f"{size / 2**20:.0f}"


def memory(run: Run) -> str:
    rss = run.rss
    return f"{mib(rss['before'])} → {mib(rss['peak'])} → {mib(rss['after'])}"


def failure_list(tally: Tally) -> str:
    """Non-2xx answers other than shedding, and transport errors, by kind; '0' when none."""
    parts = [f"{count}× {status}" for status, count in sorted(tally.statuses.items()) if status >= 300]
    parts += [f"{count}× {name}" for name, count in tally.transport.items()]
    return ", ".join(parts) or "0"


def by_status(tally: Tally) -> str:
    return " / ".join(str(tally.outcomes[status]) for status in ("ok", "timeout", "error"))


def idle_note(run: Run) -> str:
    if run.queued_after is None:
        return ""
    return f" (not idle: {run.queued_after:g} queued by its metrics {SETTLE_S:.0f} s later)"


def reward_section(runs: list[Run], options: Options) -> list[str]:
    lines = [
        "## 1. Reward server",
        "",
        f"Requests of {options.batch} `math` items. Latencies are of answered requests, from their sending.",
        "",
        "| clients | hostile share in flight | ordinary requests/s | ordinary items/s | ordinary p50 "
        "| ordinary p99 | hostile answered | hostile p50 | hostile p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        ordinary, hostile = run.tallies["ordinary"], run.tallies.get("hostile", Tally())
        share = run.scenario.clients.get("hostile", 0) / sum(run.scenario.clients.values())
        lines.append(
            f"| {run.scenario.name} | {share:.0%} | {len(ordinary.latencies) / run.seconds:.1f} "
            f"| {sum(ordinary.outcomes.values()) / run.seconds:.0f} "
            f"| {at(ordinary.latencies, 0.5)} | {at(ordinary.latencies, 0.99)} "
            f"| {len(hostile.latencies)} | {at(hostile.latencies, 0.5)} "
            f"| {at(hostile.latencies, 0.99)} |"
        )
    lines += [
        "",
        "| clients | ordinary items ok / timeout / error | hostile items ok / timeout / error "
        "| shed (503), clients / server | 5xx, transport errors | client timeouts, ordinary / hostile "
        "| hostile abandoned at the end | RSS MiB before → peak → after | other processes (cores) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        ordinary, hostile = run.tallies["ordinary"], run.tallies.get("hostile", Tally())
        lines.append(
            f"| {run.scenario.name} | {by_status(ordinary)} | {by_status(hostile)} "
            f"| {ordinary.shed + hostile.shed} / {run.shed_by_server:.0f} "
            f"| {failure_list(ordinary)}; {failure_list(hostile)} | {ordinary.timeouts} / {hostile.timeouts} "
            f"| {hostile.unfinished} | {memory(run)}{idle_note(run)} | {run.other_cores:.2f} |"
        )
    return [*lines, ""]


def rollout_section(runs: list[Run]) -> list[str]:
    lines = [
        "## 2. Rollout server",
        "",
        "Latencies are of answered requests, from their sending; the last column counts from a request's",
        "first attempt, the waits after each 429 included.",
        "",
        "| scenario | sequences per request | requests/s | sequences/s | p50 | p99 "
        "| p99 from the first attempt |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        ((kind, tally),) = run.tallies.items()
        lines.append(
            f"| {run.scenario.name} | {run.units[kind]} | {len(tally.latencies) / run.seconds:.2f} "
            f"| {tally.outcomes['samples'] / run.seconds:.1f} | {at(tally.latencies, 0.5)} "
            f"| {at(tally.latencies, 0.99)} | {at(tally.waits, 0.99)} |"
        )
    lines += [
        "",
        "| scenario | shed (429), clients / server | other failures | client timeouts "
        "| unanswered at the end | RSS MiB before → peak → after | other processes (cores) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        (tally,) = run.tallies.values()
        lines.append(
            f"| {run.scenario.name} | {tally.shed} / {run.shed_by_server:.0f} | {failure_list(tally)} "
            f"| {tally.timeouts} | {tally.unfinished} | {memory(run)}{idle_note(run)} "
            f"| {run.other_cores:.2f} |"
        )
    return [*lines, ""]


def targets_section(reward: list[Run], rollout: list[Run]) -> tuple[list[str], dict]:
    """The targets, met or not: their lines and their numbers."""
    lines = ["## Targets", "", "| target | measured | target | |", "|---|---:|---:|---|"]
    data: dict[str, dict] = {}
    for name, runs in (("reward", reward), ("rollout", rollout)):
        if not runs:
            continue
        tallies = [(kind, tally) for run in runs for kind, tally in run.tallies.items()]
        errors = sum(tally.server_errors() for _, tally in tallies)
        transport = sum(sum(tally.transport.values()) for _, tally in tallies)
        timeouts = sum(tally.timeouts for kind, tally in tallies if kind != "hostile")
        ok = errors == transport == timeouts == 0
        which = " of ordinary requests" if name == "reward" else ""
        lines.append(
            f"| {name} server, {len(runs)} scenarios: 5xx other than shedding, transport errors, client "
            f"timeouts{which} | {errors}, {transport}, {timeouts} | 0, 0, 0 | {met(ok)} |"
        )
        data[f"{name}_no_failures"] = {"5xx": errors, "transport": transport, "timeouts": timeouts, "met": ok}
    for alone, loaded in zip(reward[::2], reward[1::2], strict=True):
        without, with_ = (
            quantile(alone.tallies["ordinary"].latencies, 0.99),
            quantile(loaded.tallies["ordinary"].latencies, 0.99),
        )
        ratio = with_ / without if with_ is not None and without else None
        ok = ratio is not None and ratio <= P99_RATIO_TARGET
        shown = f"{ratio:.2f}" if ratio is not None else "–"
        lines.append(
            f"| ordinary p99, {loaded.scenario.name} ÷ {alone.scenario.name} "
            f"({duration(with_)} ÷ {duration(without)}) | {shown} | ≤ {P99_RATIO_TARGET:g} | {met(ok)} |"
        )
        data[f"p99_ratio_{alone.scenario.clients['ordinary']}_clients"] = {"ratio": ratio, "met": ok}
    for run in rollout:
        if "flood" in run.scenario.clients:
            growth = (run.rss["peak"] - run.rss["before"]) / 2**20
            ok = growth < FLOOD_RSS_TARGET_MIB
            lines.append(
                f"| rollout server's memory, {run.scenario.name}: peak less before (MiB) | {growth:.0f} "
                f"| < {FLOOD_RSS_TARGET_MIB} | {met(ok)} |"
            )
            data["flood_rss_growth_mib"] = {"growth": growth, "met": ok}
    return [*lines, ""], data


def describe_settings(options: Options) -> dict[str, str]:
    reward, rollout = RewardSettings(), RolloutSettings(model="MODEL")
    h = options.hostile
    kinds = "; ".join(hostile_answers())
    return {
        "scenario": f"{options.seconds:g} s of requests; then the requests in flight are awaited (hostile "
        f"ones abandoned), and the server is given up to {SETTLE_S:g} s to become idle",
        "clients": f"{', '.join(map(str, options.clients))}, closed-loop, one `httpx.AsyncClient` per "
        "scenario",
        "hostile clients": f"round(N × {h:g} / (1 − {h:g})), at least one, beside the N ordinary clients: "
        f"about {h:.0%} of the items in flight are hostile",
        "reward requests": f"{options.batch} `math` items; ordinary: answers of seven kinds after some "
        f"reasoning, half of them right ({ORDINARY_BODIES} different requests taken in turn); hostile: "
        f"{kinds}, in turn",
        "rollout requests": f"{options.prompts} prompts × n {options.n}, one 112-px synthetic image each, "
        f"max_tokens {options.max_tokens}, temperature 1, views off",
        "flood": f"{options.flood_clients} clients × {options.flood_prompts} prompts × n {options.flood_n}, "
        f"max_tokens {options.max_tokens}",
        "model": str(options.model) if options.model else "tiny random Qwen2.5-VL, profile 'transformers'",
        "request timeout": f"{options.request_timeout:g} s; a request unanswered by then is a client "
        "timeout and its connection is closed",
        "shed answers": "429 or 503 with `Retry-After`: the client waits as long and sends the request again",
        "reward server": f"`cppo reward-server --log-level warning`: {reward.workers} workers, item timeout "
        f"{reward.item_timeout_s:g} s, at most {reward.max_queued_items} queued items, "
        f"{reward.worker_memory_mb} MiB per worker (its defaults)",
        "rollout server": "`cppo rollout-server --model MODEL --log-level warning`: batches of at most "
        f"{rollout.max_batch_size} sequences, waiting {rollout.max_wait_ms:g} ms, at most "
        f"{rollout.queue_limit()} queued sequences (its defaults)",
        "threads": f"OMP_NUM_THREADS={options.threads} for both servers",
        "workload seed": str(options.seed),
    }


def tally_data(tally: Tally) -> dict:
    return {
        "latencies": [round(value, 4) for value in tally.latencies],
        "waits": [round(value, 4) for value in tally.waits],
        "shed": tally.shed,
        "statuses": {str(status): count for status, count in tally.statuses.items()},
        "transport_errors": dict(tally.transport),
        "timeouts": tally.timeouts,
        "unfinished": tally.unfinished,
        "outcomes": dict(tally.outcomes),
    }


def run_data(run: Run) -> dict:
    return {
        "server": run.server,
        "scenario": run.scenario.name,
        "clients": run.scenario.clients,
        "units_per_request": run.units,
        "seconds": run.seconds,
        "rss_bytes": run.rss,
        "shed_by_server": run.shed_by_server,
        "other_processes_cpu_cores": run.other_cores,
        "queued_after_settling": run.queued_after,
        "by_kind": {kind: tally_data(tally) for kind, tally in run.tallies.items()},
    }


def report(
    info: dict[str, str], options: Options, reward: list[Run], rollout: list[Run], wall_seconds: float
) -> tuple[str, dict]:
    """The results as markdown, and as a dict for the JSON file."""
    runs = [*reward, *rollout]
    target_lines, target_data = targets_section(reward, rollout)
    settings = describe_settings(options)
    lines = [
        *preamble(
            "Load",
            "load.py",
            "Each p99 ratio is between two scenarios run back to back on the same server in this run.",
        ),
        *key_value_section(
            "Machine",
            {**info, "CPU used by other processes while measuring": spread([r.other_cores for r in runs])},
        ),
        *key_value_section("Settings", settings),
        *(reward_section(reward, options) if reward else []),
        *(rollout_section(rollout) if rollout else []),
        *target_lines,
        f"Whole run, server starts included: {wall_seconds:.0f} s.",
        "",
    ]
    data = {
        "machine": info,
        "settings": settings,
        "options": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(options).items()
        },
        "runs": [run_data(run) for run in runs],
        "targets": target_data,
        "wall_seconds": wall_seconds,
    }
    return "\n".join(lines), data


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Options:
    seconds: float
    clients: list[int]
    hostile: float
    batch: int
    prompts: int
    n: int
    max_tokens: int
    flood_clients: int
    flood_prompts: int
    flood_n: int
    request_timeout: float
    servers: list[str]
    threads: int
    model: Path | None
    seed: int
    out: Path


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="seconds of requests per scenario (20)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64], help="client counts (1 16 64)")
    parser.add_argument("--hostile", type=float, default=0.25, help="hostile share of reward items (0.25)")
    parser.add_argument("--batch", type=int, default=8, help="items per reward request (8)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per rollout request (2)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt of a rollout request (4)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every rollout request (16)")
    parser.add_argument("--flood-clients", type=int, default=64, help="clients of the flood (64)")
    parser.add_argument("--flood-prompts", type=int, default=16, help="prompts per flood request (16)")
    parser.add_argument("--flood-n", type=int, default=16, help="samples per prompt of a flood request (16)")
    parser.add_argument(
        "--request-timeout", type=float, default=60, help="seconds a client waits for an answer (60)"
    )
    parser.add_argument(
        "--servers", nargs="+", choices=("reward", "rollout"), default=["reward", "rollout"], help="which"
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the servers (1)")
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny model)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (0)")
    add_out_argument(parser, "load")
    args = parser.parse_args(argv)
    if not 0 < args.hostile < 1:
        parser.error("--hostile is a share above 0 and below 1 (0 is always measured, as the baseline)")
    if min(args.clients) < 1:
        parser.error("--clients must be at least 1")
    return Options(**vars(args))


async def measure(options: Options, scratch: Path) -> tuple[list[Run], list[Run]]:
    """Every scenario of the chosen servers, one server at a time: (reward runs, rollout runs)."""
    reward: list[Run] = []
    rollout: list[Run] = []
    if "reward" in options.servers:
        loads = reward_loads(options.batch, options.seed)
        reward = await measure_server(
            reward_server(), reward_scenarios(options), loads, options, scratch / "reward.log"
        )
    if "rollout" in options.servers:
        model = options.model
        if model is None:
            with console.status("building the tiny model"):
                model = build_tiny_model(scratch / "tiny", profile="transformers")
        rollout = await measure_server(
            rollout_server(model),
            rollout_scenarios(options),
            rollout_loads(options),
            options,
            scratch / "rollout.log",
        )
    return reward, rollout


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cppo-load-") as scratch:
        reward, rollout = asyncio.run(measure(options, Path(scratch)))
    packages = ("httpx", "fastapi", "uvicorn", "math-verify", "sympy", "torch", "transformers")
    info = describe_machine({name: version(name) for name in packages}, load)
    write_results(options.out, *report(info, options, reward, rollout, time.perf_counter() - started))


if __name__ == "__main__":
    main()
