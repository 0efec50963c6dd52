"""Train step: what CPPO costs over GRPO, what HTTP costs the step, and what a weight sync costs per MB.

Three questions about one training step of the real stack (a rollout server and a reward server started
as ``cppo`` subprocesses, the trainer's own functions in this process), answered in one run, on one batch
of prompts, every ratio between numbers measured in the same round (so the machine's speed cancels out):

1. **CPPO against GRPO.** CPPO's update runs three teacher-forced passes with gradient (the clean image,
   I⁺ and I⁻) where GRPO runs one, so its update phase costs about 3× GRPO's. We time
   ``trainer.loop.update`` for both algorithms on the very same rows (made once, with the views CPPO
   needs; GRPO collates only the clean view), each algorithm with its own ``Policy``, the two taking
   turns over ``--update-rounds`` rounds (the order flipped every round). The *whole step* is
   what ``trainer.loop.train`` does per step, phase by phase, each algorithm asking for its own views:
   taking the prompts (``PromptStream.take``, which encodes the images), rollout and reward
   (``sample_and_score``), rows and advantages (``rows_with_advantages``, which runs the processor once
   per view), the update, and the weight sync (``Publisher.publish``, by value as the demo config says).
   The two algorithms take turns within every round, the order flipped from one round to the next.

   The paper reports about 1.39× for the whole step, at a scale where generation (long responses from a
   7B model on vLLM) dominates the step. The demo shape (one-token answers, n = 16) is nothing like that,
   so we also measure a *paper-like shape* on the same tiny model: the paper's instruction
   (``data.instruction``'s default, <think> and \\boxed{}), every task, the paper's reward
   (0.9·math + 0.1·format), n = 8 and ``max_tokens`` 256 (the tiny random model rarely ends early, so the
   responses are long). The estimate is that shape's whole step, combined from its measured phase times:
   ratio = (prompts + rollout + reward + rows + update_cppo + sync) / (the same with GRPO's phases). It is
   an estimate of the *shape*, not of the paper's machines: how much of the step generation takes
   depends on the engines (``transformers`` generate on CPU here, vLLM on GPUs there). So the report
   also gives the GRPO update share ``u`` of the step, with which ratio = 1 + (r − 1)·u for an update
   ratio r, and the share the paper's 1.39× implies at our measured r.
2. **HTTP and serialisation share of a demo step** (target < 5%). What the HTTP design adds to a step,
   against a trainer that called generation and scoring in-process:

   * transport: the client's wall time of each ``POST /v1/rollouts`` and ``POST /v1/score`` (timed
     around the ``httpx`` call) less the time the server's own handler took (the difference of its
     Prometheus request-latency histogram's sum, ``cppo_rollout_request_seconds`` and
     ``cppo_reward_request_seconds``, around the requests);
   * pydantic JSON, client side, measured directly on the step's own requests and responses: building
     and dumping the requests, validating the responses;
   * pydantic JSON, server side, estimated in-process on the same bodies (validating the request,
     dumping the response), since it runs inside the handler's time;
   * images: the PNG + base64 ``data:`` URLs of the clean images (encoded by the trainer, decoded by the
     server) and of the views (encoded by the server, decoded by the trainer), timed in-process.

   The share is their sum over the whole CPPO step, round by round, and is reported for GRPO too.
3. **Weight sync, seconds per MB**, by value (the safetensors file in the request body), by reference
   (a Hugging Face folder in ``sync.dir``, loaded by path; the server runs with ``--weights-root`` over
   it) and by collective broadcast (``POST /v1/weights/broadcast``, then the tensors over gloo):
   ``Publisher.publish`` timed end to end (gathering and saving the weights, the request, the server's
   load and swap), the three modes taking turns in every round, with the server's share from its
   histogram. Twice: on the tiny model (under 1 MB, where a fixed cost per publication, the server
   rebuilding its model, dominates the per-MB figure) and on the ``100mb`` profile (about 100 MB of
   weights, its own rollout server), where the per-MB cost shows; there the report gives by value's s/MB
   over broadcast's, round by round (target ≥ 10×).

Everything is warmed up with one untimed step per shape and algorithm and one publication per mode;
``--rounds`` rounds of steps are measured and medians reported. The machine, the versions, the settings
and the CPU that other processes used meanwhile are written with the results, which compare only on the
machine they describe.

Every process runs ``--threads`` torch threads (default 1: this one through ``torch.set_num_threads``,
the servers through ``OMP_NUM_THREADS``). The trainer and the servers take turns rather than run at
once, but on two cores shared with other jobs two OpenMP threads per process stall on each other: with
two, the paper-like shape's CPPO update took from 5.5 s to 21 s from one round to the next, with one,
about 2 to 3 s. Ratios are what this benchmark reports, and one thread keeps them steady.

    .venv/bin/python bench/train_step.py [--rounds 7] [--update-rounds 11] [--threads 1] [--out FILE]

The tiny model (``shared.tiny_model``, profile ``transformers``) and a small synthetic dataset are built
in a temporary folder; the run takes two to four minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import httpx
import pydantic
import torch
import transformers
from machine import REPO, CpuMeter, describe_machine
from results import add_out_argument, key_value_section, listed, met, preamble, spread, write_results
from rich.console import Console
from stats import median_seconds, ratios
from transformers import ProcessorMixin

from shared.images import ImageLimits, decode_image_url, encode_image_data_url
from shared.launch import running_service
from shared.schemas import RolloutRequest, RolloutResponse, ScoreRequest, ScoreResponse
from shared.synth_data import SynthSettings, write_dataset
from shared.tiny_model import build_tiny_model
from shared.vlm import load_processor, suppressed_token_ids
from trainer.clients import RewardClient, RolloutReplicas
from trainer.config import PAPER_INSTRUCTION, TrainConfig, load_config
from trainer.data import Example, training_prompts
from trainer.distributed import init_distributed
from trainer.experience import Row
from trainer.loop import connect, micro_batches_per_mini_batch, quiet_libraries, rows_with_advantages, update
from trainer.objective import ALGORITHMS as OBJECTIVES
from trainer.policy import Policy
from trainer.rollouts import (
    ScoredBatch,
    prompt_views,
    rollout_request,
    sample_and_score,
    score_items,
    step_seed,
)
from trainer.sync import Publisher

HTTP_SHARE_TARGET = 0.05
"""Most share of a demo step spent on HTTP and serialisation."""
PAPER_WHOLE_STEP = 1.39
"""The paper's whole-step time, CPPO over GRPO."""
ALGORITHMS = ("grpo", "cppo")
PHASES = ("prompts", "rollout", "reward", "rows", "update", "sync")
SHAPES = ("demo", "paper")
SYNC_MODES = ("value", "reference", "broadcast")
SYNC_ROUTES = {
    "value": "/v1/weights/tensors",
    "reference": "/v1/weights",
    "broadcast": "/v1/weights/broadcast",
}
SYNC_MODELS = ("transformers", "100mb")
"""The ``cppo tiny-model`` profiles the syncs are measured on."""
BROADCAST_SPEEDUP_TARGET = 10.0
"""Least by-value s/MB over broadcast s/MB, on the 100mb model."""
ROLLOUT_ROUTE, SCORE_ROUTE = "/v1/rollouts", "/v1/score"
JSON_ROUTES = (ROLLOUT_ROUTE, SCORE_ROUTE)

console = Console(stderr=True)


# --- the configurations ---------------------------------------------------------------------------


def configs(shape: str, options: Options, model: Path, data: Path, run_dir: Path, urls: dict) -> dict:
    """The demo config (``configs/demo.yaml``) or the paper-like one, per algorithm, wired to our servers."""
    overrides = [
        f"run_dir={run_dir}",
        f"model.path={model}",
        f"data.path={data}",
        f"rollout.urls=[{json.dumps(urls['rollout'])}]",
        f"reward.url={json.dumps(urls['reward'])}",
        "log.progress=false",
        "log.tensorboard=false",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    if shape == "paper":
        overrides += [
            f"data.instruction={json.dumps(PAPER_INSTRUCTION)}",
            "data.tasks=null",
            "reward.reward={math: 0.9, format: 0.1}",
            "reward.accuracy=math",
            "rollout.n=8",
            f"rollout.max_tokens={options.paper_max_tokens}",
            f"train.prompts_per_step={options.paper_prompts}",
        ]
    return {
        algorithm: load_config(REPO / "configs/demo.yaml", [*overrides, f"objective.algorithm={algorithm}"])
        for algorithm in ALGORITHMS
    }


def take_prompts(config: TrainConfig) -> list[Example]:
    """The step's prompts, as the loop takes them: the same ones every time (a fresh seeded stream)."""
    return training_prompts(config).take(config.train.prompts_per_step)


def passes(algorithm: str) -> tuple[str, ...]:
    """The images ``algorithm``'s teacher-forced passes run on, and so the views its rollouts ask for."""
    return OBJECTIVES[algorithm].passes


# --- what the servers and the clients say about their time --------------------------------------


class PostTimer:
    """Wraps an ``httpx.Client``'s ``post`` to record each request's wall time, route and bodies."""

    def __init__(self, client: httpx.Client) -> None:
        self.calls: list[tuple[str, float, bytes, bytes]] = []
        self.lock = threading.Lock()
        post = client.post

        def timed(url, *args, **kwargs) -> httpx.Response:
            start = time.perf_counter()
            response = post(url, *args, **kwargs)
            seconds = time.perf_counter() - start
            path = httpx.URL(url).path
            # Only the JSON routes' bodies are kept; the weights' bodies are large and not looked at.
            bodies = (kwargs.get("content") or b"", response.content) if path in JSON_ROUTES else (b"", b"")
            with self.lock:
                self.calls.append((path, seconds, *bodies))
            return response

        client.post = timed

    def clear(self) -> None:
        with self.lock:
            self.calls = []

    def take(self, route: str) -> list[tuple[float, bytes, bytes]]:
        """The recorded calls to ``route`` (seconds, request body, response body), forgotten here."""
        with self.lock:
            found = [(s, body, answer) for path, s, body, answer in self.calls if path == route]
            self.calls = [call for call in self.calls if call[0] != route]
        return found


def handler_seconds(client: httpx.Client, url: str, metric: str) -> dict[str, float]:
    """The sum of the server's request-latency histogram, by route: its handlers' total time so far; for
    the rollout server also its decoding steps so far (``calls``)."""
    sums = {}
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(f"{metric}_sum{{"):
            labels, _, value = line.partition("} ")
            sums[labels.partition('route="')[2].rstrip('"')] = float(value)
        elif line.startswith("cppo_rollout_batch_size_count "):
            sums["calls"] = float(line.split()[1])
    return sums


# --- measurements --------------------------------------------------------------------------------


@dataclass
class Step:
    """One step's phases, in seconds, and what the HTTP requests cost beyond the servers' handlers."""

    phases: dict[str, float]
    transport: float
    """Client wall time of the rollout and score requests less the servers' handler time."""
    requests: float
    """Client wall time of the rollout and score requests."""
    tokens: int
    decoding_steps: int
    """``generate`` calls the rollout server made for the step's rollout request."""
    other_cores: float

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


@dataclass
class Rig:
    """Everything the measurements share."""

    processor: ProcessorMixin
    pad_id: int
    replicas: RolloutReplicas
    rewards: RewardClient
    urls: dict[str, str]
    rollout_posts: PostTimer
    reward_posts: PostTimer
    meter: CpuMeter
    version: int = 0

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def handlers(self) -> dict[str, float]:
        rollout = handler_seconds(self.replicas.client, self.urls["rollout"], "cppo_rollout_request_seconds")
        reward = handler_seconds(self.rewards.client, self.urls["reward"], "cppo_reward_request_seconds")
        return {**rollout, **{f"reward {route}": seconds for route, seconds in reward.items()}}


@dataclass
class Shape:
    """One shape's configs, policies, publishers and fixed batch."""

    name: str
    configs: dict[str, TrainConfig]
    policies: dict[str, Policy]
    publishers: dict[str, Publisher]
    examples: list[Example]
    seed: int
    rows: list[Row]
    spare: Row
    steps: dict[str, list[Step]] = field(default_factory=lambda: {a: [] for a in ALGORITHMS})
    updates: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ALGORITHMS})
    """Seconds of ``update`` alone, on the fixed rows, round by round."""
    last: dict[str, tuple[list, bytes, bytes, bytes, bytes]] = field(default_factory=dict)
    """By algorithm, the last timed step's rollouts and its request and response bodies."""


def build_shape(rig: Rig, name: str, configs_by_algorithm: dict[str, TrainConfig]) -> Shape:
    """The fixed batch (sampled once with CPPO's views, rows made once) and one policy per algorithm."""
    cppo = configs_by_algorithm["cppo"]
    examples = take_prompts(cppo)
    seed = step_seed(cppo.seed, 1)
    rollouts, rewards, _, _ = sample_and_score(
        cppo, rig.replicas, rig.rewards, examples, seed, passes("cppo")
    )
    batch = ScoredBatch(step=1, examples=examples, rollouts=rollouts, rewards=rewards)
    rows, _, spare = rows_with_advantages(rig.processor, batch, passes("cppo"), cppo)
    suppressed = suppressed_token_ids(rig.processor.tokenizer)
    policies = {
        algorithm: Policy(config, micro_batches_per_mini_batch(config), suppressed)
        for algorithm, config in configs_by_algorithm.items()
    }
    publishers = {
        algorithm: Publisher(policies[algorithm], rig.replicas, config)
        for algorithm, config in configs_by_algorithm.items()
    }
    return Shape(name, configs_by_algorithm, policies, publishers, examples, seed, rows, spare)


def run_step(rig: Rig, shape: Shape, algorithm: str) -> Step:
    """One training step of ``algorithm``, phase by phase, as ``trainer.loop.train`` runs it; the update
    runs on the shape's fixed rows, so that both algorithms update on the same batch."""
    config, views = shape.configs[algorithm], passes(algorithm)
    rig.rollout_posts.clear()
    rig.reward_posts.clear()
    cpu = rig.meter.snapshot()
    start = time.perf_counter()
    examples = take_prompts(config)
    taken = time.perf_counter()
    before = rig.handlers()
    rollouts, rewards, seconds, _ = sample_and_score(
        config, rig.replicas, rig.rewards, examples, shape.seed, views
    )
    after = rig.handlers()
    scored = time.perf_counter()
    batch = ScoredBatch(step=1, examples=examples, rollouts=rollouts, rewards=rewards)
    rows_with_advantages(rig.processor, batch, views, config)
    made = time.perf_counter()
    update(shape.policies[algorithm], shape.rows, shape.spare, [], config, rig.pad_id)
    updated = time.perf_counter()
    shape.publishers[algorithm].publish(rig.next_version())
    synced = time.perf_counter()
    others = rig.meter.others(cpu)
    rollout_posts, score_posts = rig.rollout_posts.take(ROLLOUT_ROUTE), rig.reward_posts.take(SCORE_ROUTE)
    handled = sum(
        after.get(route, 0.0) - before.get(route, 0.0) for route in (ROLLOUT_ROUTE, f"reward {SCORE_ROUTE}")
    )
    requests = sum(seconds for seconds, _, _ in rollout_posts + score_posts)
    # One replica and one score request per step: the bodies of the step's only two requests.
    (_, rollout_body, rollout_answer), (_, score_body, score_answer) = rollout_posts[0], score_posts[0]
    shape.last[algorithm] = (rollouts, rollout_body, rollout_answer, score_body, score_answer)
    phases = {
        "prompts": taken - start,
        "rollout": seconds["rollout"],
        "reward": seconds["reward"],
        "rows": made - scored,
        "update": updated - made,
        "sync": synced - updated,
    }
    tokens = sum(len(s.token_ids) for r in rollouts for s in r.samples)
    calls = round(after.get("calls", 0.0) - before.get("calls", 0.0))
    return Step(phases, requests - handled, requests, tokens, calls, others)


def time_update(rig: Rig, shape: Shape, algorithm: str) -> float:
    """``trainer.loop.update`` alone, on the shape's fixed rows."""
    start = time.perf_counter()
    update(shape.policies[algorithm], shape.rows, shape.spare, [], shape.configs[algorithm], rig.pad_id)
    return time.perf_counter() - start


def measure_shape(rig: Rig, shape: Shape, options: Options) -> None:
    """The shape's rounds of whole steps, then its rounds of updates alone; the algorithms take turns,
    the order flipped every round."""
    for number in range(options.rounds):
        for algorithm in ALGORITHMS if number % 2 == 0 else ALGORITHMS[::-1]:
            step = run_step(rig, shape, algorithm)
            shape.steps[algorithm].append(step)
            console.print(
                f"  {shape.name} round {number + 1}/{options.rounds}: {algorithm}: step "
                f"{step.seconds:.2f} s (update {step.phases['update']:.2f} s, rollout "
                f"{step.phases['rollout']:.2f} s)"
            )
    for number in range(options.update_rounds):
        for algorithm in ALGORITHMS if number % 2 == 0 else ALGORITHMS[::-1]:
            shape.updates[algorithm].append(time_update(rig, shape, algorithm))
    console.print(
        f"  {shape.name}: {options.update_rounds} rounds of updates alone: "
        f"{listed(ratios(shape.updates['cppo'], shape.updates['grpo']))}"
    )


def serialisation(shape: Shape, algorithm: str, repeats: int) -> dict[str, float]:
    """Seconds of pydantic JSON and of image data URLs in one step of ``algorithm``, timed in-process on
    the last timed step's own requests, responses and images (medians of ``repeats``)."""
    config, views = shape.configs[algorithm], passes(algorithm)
    rollouts, rollout_body, rollout_answer, score_body, score_answer = shape.last[algorithm]
    by_id = {e.id: e for e in shape.examples}
    response = RolloutResponse.model_validate_json(rollout_answer)
    scores = ScoreResponse.model_validate_json(score_answer)
    limits = ImageLimits()
    clean = [image for e in shape.examples for image in e.images]
    clean_urls = [encode_image_data_url(image) for image in clean]
    # The server encodes every view it made; the trainer decodes only those its algorithm uses.
    made = [v.image_url for r in rollouts for v in r.views]
    used = [v.image_url for r in rollouts for v in r.views if v.kind in views]
    view_images = [decode_image_url(url, limits) for url in made]
    prompts = [e.rollout_prompt(prompt_views(config, e, shape.seed, views)) for e in shape.examples]
    work = {
        # As trainer.clients sends it: explicit nulls, since a missing view means the default transforms.
        "client JSON: rollout request": lambda: (
            rollout_request(config, prompts, shape.seed).model_dump_json().encode()
        ),
        "client JSON: rollout response": lambda: RolloutResponse.model_validate_json(rollout_answer),
        "client JSON: score request": lambda: (
            ScoreRequest(items=score_items(config, by_id, rollouts))
            .model_dump_json(exclude_none=True)
            .encode()
        ),
        "client JSON: score response": lambda: ScoreResponse.model_validate_json(score_answer),
        "server JSON: rollout request": lambda: RolloutRequest.model_validate_json(rollout_body),
        "server JSON: rollout response": lambda: response.model_dump_json().encode(),
        "server JSON: score request": lambda: ScoreRequest.model_validate_json(score_body),
        "server JSON: score response": lambda: scores.model_dump_json().encode(),
        "images: clean, encode (trainer)": lambda: [encode_image_data_url(image) for image in clean],
        "images: clean, decode (server)": lambda: [decode_image_url(url, limits) for url in clean_urls],
        "images: views, encode (server)": lambda: [encode_image_data_url(image) for image in view_images],
        "images: views, decode (trainer)": lambda: [decode_image_url(url, limits) for url in used],
    }
    return {name: median_seconds(call, repeats) for name, call in work.items()}


@dataclass
class Sync:
    """One publication."""

    seconds: float
    server_seconds: float
    megabytes: float
    other_cores: float


@dataclass
class SyncTarget:
    """A rollout server and a policy of the same model, published to."""

    replicas: RolloutReplicas
    url: str
    policy: Policy
    config: TrainConfig

    def handler_seconds(self) -> dict[str, float]:
        return handler_seconds(self.replicas.client, self.url, "cppo_rollout_request_seconds")


def publish_once(rig: Rig, target: SyncTarget, publisher: Publisher, mode: str) -> Sync:
    route = SYNC_ROUTES[mode]
    before, cpu = target.handler_seconds(), rig.meter.snapshot()
    start = time.perf_counter()
    publisher.publish(rig.next_version())
    seconds = time.perf_counter() - start
    others = rig.meter.others(cpu)
    server = target.handler_seconds().get(route, 0.0) - before.get(route, 0.0)
    if mode == "reference":
        size = sum(f.stat().st_size for f in Path(publisher.last_path).glob("*.safetensors"))
    elif mode == "value":
        size = len(publisher.last_tensors)
    else:
        size = sum(t.numel() * t.element_size() for t in publisher.last_broadcast.weights.values())
    rig.rollout_posts.clear()
    return Sync(seconds, server, size / 2**20, others)


def measure_syncs(rig: Rig, target: SyncTarget, rounds: int) -> dict[str, list[Sync]]:
    """``rounds`` publications of ``target``'s policy per sync mode, the modes taking turns in every round
    (the order rotated from one round to the next)."""
    sync = target.config.sync
    publishers = {
        mode: Publisher(
            target.policy,
            target.replicas,
            # Broadcast: the store on any free port, as on one machine.
            target.config.model_copy(
                update={"sync": sync.model_copy(update={"mode": mode, "broadcast_port": 0})}
            ),
        )
        for mode in SYNC_MODES
    }
    syncs: dict[str, list[Sync]] = {mode: [] for mode in SYNC_MODES}
    for mode in SYNC_MODES:  # warm-up
        publish_once(rig, target, publishers[mode], mode)
    for number in range(rounds):
        shift = number % len(SYNC_MODES)
        for mode in SYNC_MODES[shift:] + SYNC_MODES[:shift]:
            syncs[mode].append(publish_once(rig, target, publishers[mode], mode))
            console.print(f"  sync {number + 1}/{rounds}: {mode}: {syncs[mode][-1].seconds:.3f} s")
    return syncs


@contextmanager
def large_sync_target(scratch: Path, config: TrainConfig, threads: dict[str, str]) -> Iterator[SyncTarget]:
    """The ``100mb`` model, a rollout server of its own, and a policy of it configured as ``config``."""
    model = build_tiny_model(scratch / "model-100mb", profile="100mb")
    run_dir = scratch / "run-100mb"
    (run_dir / "weights").mkdir(parents=True)
    args = ["--model", str(model), "--weights-root", str(run_dir), "--log-level", "warning"]
    with running_service("rollout-server", args, scratch / "rollout-100mb.log", env=threads) as server:
        large = config.model_copy(
            update={
                "run_dir": run_dir,
                "model": config.model.model_copy(update={"path": str(model)}),
                "rollout": config.rollout.model_copy(update={"urls": [server.url]}),
            }
        )
        replicas = RolloutReplicas.from_config(large.rollout)
        suppressed = suppressed_token_ids(load_processor(model).tokenizer)
        try:
            yield SyncTarget(
                replicas, server.url, Policy(large, micro_batches_per_mini_batch(large), suppressed), large
            )
        finally:
            replicas.close()


# --- the report ----------------------------------------------------------------------------------


def report(
    info: dict[str, str],
    settings: dict[str, str],
    shapes: dict[str, Shape],
    codecs: dict[str, dict[str, float]],
    syncs: dict[str, dict[str, list[Sync]]],
    wall_seconds: float,
) -> tuple[str, dict]:
    """The results as markdown, and as a dict for the JSON file."""
    results = {name: compare(shape) for name, shape in shapes.items()}
    r = results["paper"]["update_ratio"]
    implied_share = (PAPER_WHOLE_STEP - 1) / (r - 1) if r > 1 else float("nan")
    http = {a: http_share(shapes["demo"].steps[a], codecs[a]) for a in ALGORITHMS}
    share = http["cppo"]["share"]
    sync = {model: sync_summary(by_mode) for model, by_mode in syncs.items()}
    others = [s.other_cores for shape in shapes.values() for a in ALGORITHMS for s in shape.steps[a]]
    others += [s.other_cores for by_mode in syncs.values() for runs in by_mode.values() for s in runs]
    demo = shapes["demo"]
    lines = [
        *preamble(
            "Train step",
            "train_step.py",
            "Every ratio is between numbers measured in the same round; each figure is a median over rounds",
            f"({len(demo.steps['cppo'])} rounds of steps, {len(demo.updates['cppo'])} of updates alone, "
            f"{len(syncs['transformers']['value'])} publications per sync mode and model).",
        ),
        *key_value_section(
            "Machine", {**info, "CPU used by other processes while measuring": spread(others)}
        ),
        *key_value_section("Settings", settings),
        "## 1. CPPO against GRPO",
        "",
        *update_section(results, len(demo.updates["cppo"])),
        *whole_step_sections(results, shapes["paper"], implied_share),
        *http_section(http, codecs),
        *sync_section(sync),
        f"Whole run, model build and server start included: {wall_seconds:.0f} s.",
        "",
    ]
    data = {
        "machine": info,
        "settings": settings,
        "cppo_vs_grpo": results,
        "paper_whole_step": PAPER_WHOLE_STEP,
        "implied_paper_grpo_update_share": implied_share,
        "http_share": {**http, "target_max": HTTP_SHARE_TARGET, "met": share < HTTP_SHARE_TARGET},
        "weight_sync": sync,
        "wall_seconds": wall_seconds,
    }
    return "\n".join(lines), data


def compare(shape: Shape) -> dict:
    """CPPO against GRPO in one shape: the update alone, the whole step and its phases, round by round."""
    grpo, cppo = shape.steps["grpo"], shape.steps["cppo"]
    update_ratios = ratios(shape.updates["cppo"], shape.updates["grpo"])
    step_ratios = ratios((c.seconds for c in cppo), (g.seconds for g in grpo))
    return {
        "update_ratio": statistics.median(update_ratios),
        "update_ratio_by_round": update_ratios,
        "update_seconds": {a: statistics.median(shape.updates[a]) for a in ALGORITHMS},
        "update_seconds_by_round": shape.updates,
        "update_ratio_within_steps": statistics.median(
            ratios((c.phases["update"] for c in cppo), (g.phases["update"] for g in grpo))
        ),
        "whole_step_ratio": statistics.median(step_ratios),
        "whole_step_ratio_by_round": step_ratios,
        "grpo_update_share": statistics.median(g.phases["update"] / g.seconds for g in grpo),
        "phases": {
            a: {p: statistics.median(s.phases[p] for s in shape.steps[a]) for p in PHASES} for a in ALGORITHMS
        },
        "step_seconds": {a: statistics.median(s.seconds for s in shape.steps[a]) for a in ALGORITHMS},
        "rounds": {a: [asdict(s) for s in shape.steps[a]] for a in ALGORITHMS},
    }


def http_share(steps: list[Step], codecs: dict[str, float]) -> dict:
    """What HTTP and serialisation took of one algorithm's demo steps: transport, measured in every round,
    plus the JSON and image times ``codecs``, timed in-process once."""
    fixed = sum(codecs.values())
    pydantic_only = sum(v for k, v in codecs.items() if "JSON" in k)
    return {
        "share": statistics.median((s.transport + fixed) / s.seconds for s in steps),
        "share_by_round": [(s.transport + fixed) / s.seconds for s in steps],
        "share_transport_and_json": statistics.median(
            (s.transport + pydantic_only) / s.seconds for s in steps
        ),
        "transport_seconds": statistics.median(s.transport for s in steps),
        "request_seconds": statistics.median(s.requests for s in steps),
        "in_process_seconds": codecs,
        "step_seconds": statistics.median(s.seconds for s in steps),
    }


def sync_summary(by_mode: dict[str, list[Sync]]) -> dict:
    """One model's publications: per mode, medians of seconds and of seconds per MB, the server's share
    too; and by value's s/MB over broadcast's, round by round."""
    summary: dict = {
        mode: {
            "megabytes": runs[0].megabytes,
            "seconds": statistics.median(s.seconds for s in runs),
            "server_seconds": statistics.median(s.server_seconds for s in runs),
            "seconds_per_mb": statistics.median(s.seconds / s.megabytes for s in runs),
            "server_seconds_per_mb": statistics.median(s.server_seconds / s.megabytes for s in runs),
            "rounds": [asdict(s) for s in runs],
        }
        for mode, runs in by_mode.items()
    }
    speedups = ratios(
        (s.seconds / s.megabytes for s in by_mode["value"]),
        (s.seconds / s.megabytes for s in by_mode["broadcast"]),
    )
    summary["broadcast_speedup"] = {"median": statistics.median(speedups), "by_round": speedups}
    return summary


def update_section(results: dict[str, dict], update_rounds: int) -> list[str]:
    """Section 1's first part: the update phase alone, on the same rows, in both shapes."""
    return [
        "### The update phase, on the same rows",
        "",
        "| shape | GRPO update (s) | CPPO update (s) | CPPO ÷ GRPO | rounds |",
        "|---|---:|---:|---:|---|",
        *(
            f"| {name} | {results[name]['update_seconds']['grpo']:.3f} | "
            f"{results[name]['update_seconds']['cppo']:.3f} | **{results[name]['update_ratio']:.2f}×** | "
            f"{listed(results[name]['update_ratio_by_round'])} |"
            for name in SHAPES
        ),
        "",
        f"`trainer.loop.update` alone, {update_rounds} rounds per shape after the steps. Inside the steps",
        f"below the same ratio came out at {results['demo']['update_ratio_within_steps']:.2f}× "
        f"(demo) and {results['paper']['update_ratio_within_steps']:.2f}× (paper-like).",
        "",
        "CPPO runs three teacher-forced passes with gradient (clean, I⁺, I⁻) where GRPO runs one, so the",
        "passes alone cost 3×; the optimizer step, the same for both, pulls the ratio below that, and CPPO's",
        "extra loss terms (the contrastive loss over the top-entropy tokens) push it above.",
        "",
    ]


def whole_step_sections(results: dict[str, dict], paper: Shape, implied_share: float) -> list[str]:
    """Section 1's whole steps: the demo shape's, then the paper-like shape's, the estimate."""
    return [
        *phase_table("### The whole step, demo shape (seconds, medians)", results["demo"]),
        "",
        *phase_table(
            "### The whole step, paper-like shape: the estimate (seconds, medians)", results["paper"]
        ),
        *_decoding_steps_note(paper),
        "",
        "The estimate at the paper's shape is this table's whole step: the phases measured on the tiny model",
        "with the paper's instruction, reward, n = 8 and long responses, summed per algorithm. How much of a",
        "step the update takes depends on the engines, so read it with the update share: with GRPO's update",
        "taking a share u of GRPO's step and an update ratio r, the step ratio is 1 + (r − 1)·u. Here",
        f"u = {results['paper']['grpo_update_share']:.2f} (paper-like shape) and "
        f"{results['demo']['grpo_update_share']:.2f} (demo);",
        f"the paper's {PAPER_WHOLE_STEP}× at our r = {results['paper']['update_ratio']:.2f} implies "
        f"u ≈ {implied_share:.2f} on its machines.",
        "",
    ]


def phase_table(heading: str, result: dict) -> list[str]:
    """One shape's phases and whole step, GRPO against CPPO, and the whole-step ratio round by round."""
    phases, steps = result["phases"], result["step_seconds"]
    return [
        heading,
        "",
        "| phase | GRPO | CPPO | CPPO ÷ GRPO |",
        "|---|---:|---:|---:|",
        *(
            f"| {phase} | {phases['grpo'][phase]:.3f} | {phases['cppo'][phase]:.3f} | "
            f"{phases['cppo'][phase] / phases['grpo'][phase]:.2f}× |"
            for phase in PHASES
        ),
        f"| **whole step** | **{steps['grpo']:.3f}** | **{steps['cppo']:.3f}** | "
        f"**{result['whole_step_ratio']:.2f}×** (median of rounds) |",
        "",
        f"Whole step, round by round: {listed(result['whole_step_ratio_by_round'])}.",
    ]


def _decoding_steps_note(shape: Shape) -> list[str]:
    """Rollout seconds against the server's decoding steps, round by round."""
    parts = {
        a: ", ".join(f"{s.phases['rollout']:.2f} s ({s.decoding_steps})" for s in shape.steps[a])
        for a in ALGORITHMS
    }
    return [
        "",
        "Rollout, round by round, with the server's decoding steps for the step's request in brackets",
        "(a prefill, then one step per token; the step's prompts share them when they reach it together):",
        f"GRPO {parts['grpo']}; CPPO {parts['cppo']}.",
    ]


def http_section(http: dict[str, dict], codecs: dict[str, dict[str, float]]) -> list[str]:
    """Section 2: what HTTP and serialisation take of a demo step, part by part, against the target."""
    share = http["cppo"]["share"]
    return [
        "## 2. HTTP and serialisation, demo step",
        "",
        "| | GRPO step | CPPO step |",
        "|---|---:|---:|",
        *(
            f"| {label} | {http['grpo'][key] * 1000:.1f} ms | {http['cppo'][key] * 1000:.1f} ms |"
            for label, key in (
                ("whole step", "step_seconds"),
                ("rollout and score requests, client wall time", "request_seconds"),
                ("transport: the same less the servers' handler time", "transport_seconds"),
            )
        ),
        *(
            f"| {name} | {codecs['grpo'][name] * 1000:.1f} ms | {codecs['cppo'][name] * 1000:.1f} ms |"
            for name in codecs["cppo"]
        ),
        f"| **share of the step: transport, JSON and images** | {http['grpo']['share']:.1%} | "
        f"**{share:.1%}** |",
        f"| share of the step: transport and JSON only | {http['grpo']['share_transport_and_json']:.1%} | "
        f"{http['cppo']['share_transport_and_json']:.1%} |",
        "",
        "| measure | measured | target | |",
        "|---|---:|---:|---|",
        f"| HTTP and serialisation share of a CPPO demo step | {share:.1%} | < {HTTP_SHARE_TARGET:.0%} "
        f"| {met(share < HTTP_SHARE_TARGET)} |",
        "",
        f"Round by round (CPPO): {', '.join(f'{v:.1%}' for v in http['cppo']['share_by_round'])}.",
        "Transport is measured in every round; the JSON and image lines are timed in-process on the last",
        "round's own requests, responses and images (server-side JSON: pydantic on the same bodies, an",
        "estimate of what FastAPI does inside the handler).",
        "",
    ]


def sync_section(sync: dict[str, dict]) -> list[str]:
    """Section 3: seconds per MB of a publication, by value, by reference and by broadcast, per model."""
    large = sync["100mb"]["broadcast_speedup"]
    return [
        "## 3. Weight sync",
        "",
        "| model | mode | weights (MB) | publish (s) | of which the server's handler (s) | publish s/MB "
        "| server s/MB |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(sync_row(model, mode, sync[model][mode]) for model in SYNC_MODELS for mode in SYNC_MODES),
        "",
        f"By value's s/MB over broadcast's, same round, on the 100mb model: **{large['median']:.1f}×** "
        f"(rounds: {listed(large['by_round'], 1)}; target ≥ {BROADCAST_SPEEDUP_TARGET:g}×: "
        f"{met(large['median'] >= BROADCAST_SPEEDUP_TARGET)}). On the tiny model: "
        f"{sync['transformers']['broadcast_speedup']['median']:.1f}×.",
        "",
        "Publish: `Publisher.publish` end to end (gathering the weights; `save_pretrained` by value and",
        "by reference; the request; the server's load and swap, or by broadcast its joining the group,",
        "receiving and copying into the model). The tiny model is under 1 MB, so the fixed cost of every",
        "load (the server building its model afresh, or making the group) weighs on its per-MB figures;",
        "the 100mb model's show the cost per MB.",
        "",
    ]


def sync_row(model: str, mode: str, summary: dict) -> str:
    return (
        f"| {model} | by {mode} | {summary['megabytes']:.2f} | {summary['seconds']:.3f} | "
        f"{summary['server_seconds']:.3f} | **{summary['seconds_per_mb']:.4f}** | "
        f"{summary['server_seconds_per_mb']:.4f} |"
    )


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Options:
    rounds: int
    update_rounds: int
    sync_rounds: int
    threads: int
    paper_prompts: int
    paper_max_tokens: int
    serialisation_repeats: int
    out: Path


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of steps per shape (default 7)")
    parser.add_argument(
        "--update-rounds", type=int, default=11, help="rounds of updates alone per shape (default 11)"
    )
    parser.add_argument("--sync-rounds", type=int, default=9, help="publications per sync mode (default 9)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of every process, servers too (default 1)"
    )
    parser.add_argument(
        "--paper-prompts", type=int, default=4, help="prompts per step of the paper-like shape (default 4)"
    )
    parser.add_argument(
        "--paper-max-tokens", type=int, default=256, help="max_tokens of the paper-like shape (default 256)"
    )
    parser.add_argument(
        "--serialisation-repeats", type=int, default=5, help="repeats of each in-process timing (default 5)"
    )
    add_out_argument(parser, "train_step")
    return Options(**vars(parser.parse_args(argv)))


def quiet() -> None:
    quiet_libraries()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def measure(options: Options, scratch: Path, started: float) -> tuple[str, dict]:
    """Both servers, the steps of both shapes, the serialisation timings and the syncs; the report,
    ``started`` being when the run started."""
    load = os.getloadavg()[0]
    torch.set_num_threads(options.threads)
    threads = {"OMP_NUM_THREADS": str(options.threads)}
    console.print("building the tiny model and the data")
    model = build_tiny_model(scratch / "model", profile="transformers")
    data = write_dataset(scratch / "data", SynthSettings(train=200, test=8))
    run_dir = scratch / "run"
    (run_dir / "weights").mkdir(parents=True)
    # Room for a whole step in one ``generate`` call: 16 demo prompts × n 16, or the paper-like ones × n 8.
    max_batch_size = max(64, 16 * 16, options.paper_prompts * 8)
    rollout_args = [
        "--model",
        str(model),
        "--weights-root",
        str(run_dir),
        "--max-batch-size",
        str(max_batch_size),
    ]
    with (
        running_service(
            "rollout-server", [*rollout_args, "--log-level", "warning"], scratch / "rollout.log", env=threads
        ) as rs,
        running_service(
            "reward-server", ["--log-level", "warning"], scratch / "reward.log", env=threads
        ) as ws,
    ):
        urls = {"rollout": rs.url, "reward": ws.url}
        init_distributed()
        by_shape = {shape: configs(shape, options, model, data, run_dir, urls) for shape in SHAPES}
        replicas, rewards = connect(by_shape["demo"]["cppo"], lambda: None)
        processor = load_processor(model)
        rig = Rig(
            processor,
            processor.tokenizer.pad_token_id,
            replicas,
            rewards,
            urls,
            PostTimer(replicas.client),
            PostTimer(rewards.client),
            CpuMeter([os.getpid(), rs.process.pid, ws.process.pid]),
        )
        shapes = {}
        for name in SHAPES:
            console.print(f"{name} shape: sampling the fixed batch, building the policies, warming up")
            shapes[name] = build_shape(rig, name, by_shape[name])
            for algorithm in ALGORITHMS:
                run_step(rig, shapes[name], algorithm)
        for shape in shapes.values():
            measure_shape(rig, shape, options)
        codecs = {a: serialisation(shapes["demo"], a, options.serialisation_repeats) for a in ALGORITHMS}
        console.print("weight sync on the tiny model: by value, by reference and by broadcast")
        demo = shapes["demo"].configs["cppo"]
        tiny = SyncTarget(replicas, urls["rollout"], shapes["demo"].policies["cppo"], demo)
        syncs = {"transformers": measure_syncs(rig, tiny, options.sync_rounds)}
        replicas.close()
        rewards.close()
    console.print("weight sync on the 100mb model")
    with large_sync_target(scratch, demo, threads) as large:
        syncs["100mb"] = measure_syncs(rig, large, options.sync_rounds)
    info = describe_machine(
        {
            "torch threads": str(torch.get_num_threads()),
            "OMP_NUM_THREADS in the environment": os.environ.get("OMP_NUM_THREADS", "unset"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__,
            "pydantic": pydantic.__version__,
            "httpx": httpx.__version__,
        },
        load,
    )
    settings = describe_settings(options, shapes, max_batch_size)
    return report(info, settings, shapes, codecs, syncs, time.perf_counter() - started)


def describe_settings(options: Options, shapes: dict[str, Shape], max_batch_size: int) -> dict[str, str]:
    return {
        "model": "tiny random Qwen2.5-VL, profile 'transformers'; fp32, DeepSpeed ZeRO 0, one process",
        "servers": "`cppo rollout-server` (transformers backend, --max-batch-size "
        f"{max_batch_size}) and `cppo reward-server` (default workers), on this machine",
        "demo shape": describe_shape(shapes["demo"]),
        "paper-like shape": describe_shape(shapes["paper"]),
        "rounds": f"{options.rounds} steps and then {options.update_rounds} updates alone per shape and "
        "algorithm, after one warm-up step each",
        "threads": f"{options.threads} torch thread(s) in every process (this one and the servers'; "
        "OMP_NUM_THREADS for the servers)",
        "weight sync": f"{options.sync_rounds} publications per mode (after one warm-up each), the modes "
        "taking turns; the tiny model (CPPO's demo policy) and the 100mb profile (its own rollout server)",
    }


def describe_shape(shape: Shape) -> str:
    config = shape.configs["cppo"]
    instruction = "the paper's" if config.data.instruction == PAPER_INSTRUCTION else "none"
    tasks = ", ".join(config.data.tasks) if config.data.tasks else "all"
    reward = config.reward.reward
    rewarded = " + ".join(f"{w}·{n}" for n, w in reward.items()) if isinstance(reward, dict) else reward
    lengths = [len(row.response_ids) for row in shape.rows]
    return (
        f"{config.train.prompts_per_step} prompts × n {config.rollout.n} = {len(shape.rows)} rows, "
        f"max_tokens {config.rollout.max_tokens} (fixed batch: mean response {statistics.fmean(lengths):.0f} "
        f"tokens), instruction {instruction}, tasks {tasks}, reward {rewarded}, micro_batch_size "
        f"{config.train.micro_batch_size}, mini_batches {config.train.mini_batches}, sync by "
        f"{config.sync.mode}"
    )


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    started = time.perf_counter()
    quiet()
    with tempfile.TemporaryDirectory(prefix="cppo-bench-") as scratch:
        markdown, data = measure(options, Path(scratch), started)
    write_results(options.out, markdown, data)


if __name__ == "__main__":
    main()
