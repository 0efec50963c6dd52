"""Rollout throughput: what HTTP costs, what batching buys, and what one prefill per prompt buys, on the
transformers backend.

Three questions about the rollout server, answered in one run, each against a baseline measured in that
same run (so the machine's speed cancels out of every ratio):

1. **HTTP overhead.** The trainer reaches generation through ``POST /v1/rollouts``: JSON, base64 PNG
   images, pydantic validation, the chat template, a thread hop per image, and the response's way back.
   We time that against calling ``TransformersBackend.generate`` in this process on the same rendered
   prompts, images, sampling and seeds, one request at a time on both paths, the two paths taking
   turns prompt by prompt (so that a shift in the machine's load falls on both alike). Perturbed views
   are disabled so that both paths do the same generation work, and the server derives the per-prompt
   seed exactly as we do here, so both paths draw the very same tokens (checked, and reported). The
   ratio is HTTP time / in-process time for the same tokens; the target is at most 1.10.
2. **Batching gain.** Concurrent requests share the backend's decoding steps (a request joins the batch
   at its next step). 1, 4 and 16 HTTP clients (``httpx.AsyncClient``) share the prompts, each sending its
   share back to back; each request is one prompt with ``n = 1``, so any batching comes from concurrency
   alone. The gain is generated tokens/s at 16 clients over 1 client (the sequential HTTP run of
   question 1); the target is at least 3. The mean batch is sequences per decoding step, from the
   server's ``cppo_rollout_batch_size`` histogram.
3. **One prefill per prompt.** The demo's rollouts (configs/demo.yaml on the tiny model: 16 prompts × n 16,
   its max_tokens and temperature, the views CPPO's passes ask for, one request per step as its trainer
   sends them) through this backend and through the one before it, which ran ``generate`` over each prompt
   repeated n times (the vision tower and the prompt's prefill once per sample). The "before" backend is
   ``rollout_server/transformers_backend.py`` as commit ``--before`` has it, read with ``git show`` and
   imported as a module of its own (this needs the git history); each backend runs behind its own
   ``create_app`` in this process, reached through ``httpx.ASGITransport``, with ``cppo stack up``'s batch
   size (the whole step), the two taking turns within every round. The gain is tokens/s after over before
   (prompts/s is reported too); the target is at least 3. Both draw the very same tokens (checked).

Throughput counts the tokens actually generated (``sum(len(token_ids))``): ``max_tokens`` is fixed and
``stop`` is empty, but the model may still emit an end token early. Every path is warmed up before timing;
every measurement is repeated (``--repeats`` rounds, each round measuring every path, so that drift
affects all paths alike) and the median is reported. The machine, the versions, the settings and the CPU
that other processes used meanwhile are written with the results, which are only comparable on the machine
they describe.

    .venv/bin/python bench/rollout_throughput.py [--model DIR] [--prompts N] [--max-tokens M] [--out FILE]

By default a tiny random model (``shared.tiny_model``, profile ``transformers``) is built in a
temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import transformers
from machine import REPO, CpuMeter, describe_machine
from PIL import Image
from results import add_out_argument, key_value_section, listed, met, preamble, spread, write_results
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from stats import ratios

from rollout_server.app import create_app
from rollout_server.backend import GenerationRequest, SamplingSpec
from rollout_server.config import RolloutSettings
from rollout_server.service import derive_seed
from rollout_server.transformers_backend import TransformersBackend
from shared import synth_data
from shared.images import encode_image_data_url
from shared.launch import running_service
from shared.schemas import RolloutResponse
from shared.synth_data import SynthSettings, write_dataset
from shared.tiny_model import build_tiny_model
from trainer.config import TrainConfig, load_config
from trainer.data import training_prompts
from trainer.objective import ALGORITHMS as OBJECTIVES
from trainer.rollouts import prompt_views, rollout_request, step_seed

HTTP_OVERHEAD_TARGET = 1.10
"""Most HTTP time / in-process time for the same tokens."""
BATCHING_GAIN_TARGET = 3.0
"""Least throughput at 16 clients / throughput at 1 client."""
PREFILL_SHARING_TARGET = 3.0
"""Least tokens/s at the demo shape, this backend / the one before it."""
BEFORE = "1184c3a79eac8d6455f7d5a1bb0da98b5202170c"
"""The last commit whose backend ran ``generate`` over each prompt repeated ``n`` times."""
CONCURRENCY = (1, 4, 16)

console = Console(stderr=True)


# --- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt, in both of the forms the two paths take it."""

    prompt_id: str
    question: str
    image: Image.Image
    seed: int
    body: dict
    """The ``POST /v1/rollouts`` body: this prompt alone, ``n = 1``, views off."""


def make_prompts(count: int, max_tokens: int, seed: int) -> list[Prompt]:
    """``count`` synthetic questions with their images; request ``i`` is sampled with seed ``seed + i``."""
    prompts = []
    for index, example in enumerate(synth_data.generate("test", count, seed)):
        question = example.problem.removeprefix(synth_data.IMAGE_PLACEHOLDER)
        prompt_id = f"bench-{index}"
        body = {
            "prompts": [
                {
                    "prompt_id": prompt_id,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": encode_image_data_url(example.image)},
                                },
                                {"type": "text", "text": question},
                            ],
                        }
                    ],
                }
            ],
            "n": 1,
            "sampling": {"max_tokens": max_tokens, "temperature": 1.0, "stop": [], "seed": seed + index},
            "views": {"positive": None, "negative": None},
        }
        prompts.append(Prompt(prompt_id, question, example.image, seed + index, body))
    return prompts


def generation_request(backend: TransformersBackend, prompt: Prompt, max_tokens: int) -> GenerationRequest:
    """What the server hands its backend for ``prompt.body``: the same text, image, sampling and seed."""
    text = backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.question}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    # The server derives each prompt's seed from the request's, its prompt id and the image view.
    sampling = SamplingSpec(
        temperature=1.0,
        max_tokens=max_tokens,
        stop=(),
        seed=derive_seed(prompt.seed, prompt.prompt_id, "clean"),
    )
    return GenerationRequest(text, (prompt.image,), 1, sampling)


# --- measurements -------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed pass over all the prompts."""

    seconds: float
    """Wall time of the pass; for the paired sequential runs, the sum of this path's request times."""
    samples: dict[str, list[int]]
    """Generated token ids by prompt id."""
    mean_batch: float | None
    """Mean sequences per ``generate`` call during the pass."""
    other_cores: float
    """CPU used meanwhile by processes other than this one and the server, in cores."""

    @property
    def tokens(self) -> int:
        return sum(map(len, self.samples.values()))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Measurement:
    """Repeated runs of one path."""

    name: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def summary(self) -> dict:
        return {
            "median_seconds": self.median("seconds"),
            "median_tokens_per_second": self.median("tokens_per_second"),
            "tokens": [run.tokens for run in self.runs],
            "seconds": [round(run.seconds, 4) for run in self.runs],
            "tokens_per_second": [round(run.tokens_per_second, 2) for run in self.runs],
            "mean_batch_size": [run.mean_batch and round(run.mean_batch, 2) for run in self.runs],
            "other_processes_cpu_cores": [round(run.other_cores, 2) for run in self.runs],
        }


@dataclass
class Bench:
    """Everything the measurements share."""

    backend: TransformersBackend
    requests: dict[str, GenerationRequest]
    """In-process requests by prompt id."""
    batches: list[int]
    """Sequences per ``generate`` call of the in-process backend."""
    client: httpx.AsyncClient
    prompts: list[Prompt]
    meter: CpuMeter

    async def local(self, prompt: Prompt) -> list[int]:
        """One prompt through ``TransformersBackend.generate``."""
        generation = await self.backend.generate(self.requests[prompt.prompt_id])
        return generation.samples[0].token_ids

    async def remote(self, prompt: Prompt) -> list[int]:
        """One prompt through ``POST /v1/rollouts``, the response parsed as a trainer parses it."""
        response = await self.client.post("/v1/rollouts", json=prompt.body)
        response.raise_for_status()
        return RolloutResponse.model_validate_json(response.content).prompts[0].samples[0].token_ids

    async def sequential(self, flip: bool) -> tuple[Run, Run]:
        """Every prompt on both paths, one request at a time: (in-process, HTTP).

        The paths alternate prompt by prompt (in-process first on even prompts, HTTP first on odd ones,
        the other way round when ``flip``), so that a change in the machine's load falls on both alike.
        """
        paths = {"local": self.local, "remote": self.remote}
        seconds = dict.fromkeys(paths, 0.0)
        samples: dict[str, dict[str, list[int]]] = {name: {} for name in paths}
        self.batches.clear()
        before, cpu = await self.batch_histogram(), self.meter.snapshot()
        for index, prompt in enumerate(self.prompts):
            order = ("local", "remote") if (index + flip) % 2 == 0 else ("remote", "local")
            for name in order:
                start = time.perf_counter()
                samples[name][prompt.prompt_id] = await paths[name](prompt)
                seconds[name] += time.perf_counter() - start
        others = self.meter.others(cpu)
        remote_batch = _mean_batch(before, await self.batch_histogram())
        return (
            Run(seconds["local"], samples["local"], statistics.fmean(self.batches), others),
            Run(seconds["remote"], samples["remote"], remote_batch, others),
        )

    async def concurrent(self, clients: int) -> Run:
        """Every prompt over HTTP, ``clients`` clients each sending its share back to back."""
        samples: dict[str, list[int]] = {}

        async def one_client(share: list[Prompt]) -> None:
            for prompt in share:
                samples[prompt.prompt_id] = await self.remote(prompt)

        before, cpu = await self.batch_histogram(), self.meter.snapshot()
        start = time.perf_counter()
        await asyncio.gather(*(one_client(self.prompts[k::clients]) for k in range(clients)))
        seconds = time.perf_counter() - start
        others = self.meter.others(cpu)
        return Run(seconds, samples, _mean_batch(before, await self.batch_histogram()), others)

    async def batch_histogram(self) -> tuple[float, float]:
        """The server's ``cppo_rollout_batch_size`` histogram: (sequences, ``generate`` calls)."""
        text = (await self.client.get("/metrics")).text
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("cppo_rollout_batch_size_sum", "cppo_rollout_batch_size_count"):
                values[name] = float(value)
        return values.get("cppo_rollout_batch_size_sum", 0.0), values.get(
            "cppo_rollout_batch_size_count", 0.0
        )


def _mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    calls = after[1] - before[1]
    return (after[0] - before[0]) / calls if calls else None


# --- section 3: one prefill per prompt, at the demo shape ----------------------------------------


@dataclass
class DemoShape:
    """The demo's rollouts, this backend against the one before it, each behind its own in-process app."""

    requests: list[dict]
    """``POST /v1/rollouts`` bodies, one per training step, as the demo's trainer sends them."""
    clients: dict[str, httpx.AsyncClient]
    """By backend (``before``, ``after``): a client of that backend's app."""
    batches: dict[str, list[int]]
    """By backend: sequences per generation step (a ``generate`` call before, a decoding step after)."""
    meter: CpuMeter

    async def run(self, which: str) -> Run:
        """Every step's request, one after the other, through ``which`` backend's app."""
        samples: dict[str, list[int]] = {}
        self.batches[which].clear()
        cpu = self.meter.snapshot()
        start = time.perf_counter()
        for step, body in enumerate(self.requests):
            response = await self.clients[which].post("/v1/rollouts", json=body)
            response.raise_for_status()
            for prompt in RolloutResponse.model_validate_json(response.content).prompts:
                for sample in prompt.samples:
                    samples[f"{step}/{prompt.prompt_id}/{sample.sample_index}"] = sample.token_ids
        seconds = time.perf_counter() - start
        return Run(seconds, samples, statistics.fmean(self.batches[which]), self.meter.others(cpu))


def previous_backend(revision: str) -> type[TransformersBackend]:
    """``TransformersBackend`` as ``revision`` had it, imported from git as a module of its own."""
    path = "rollout_server/transformers_backend.py"
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("transformers_backend_before")
    # Its dataclasses look their module up by name.
    sys.modules[module.__name__] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module.TransformersBackend


def demo_requests(model: Path, scratch: Path, steps: int) -> tuple[TrainConfig, list[dict]]:
    """configs/demo.yaml on the tiny model and fresh synthetic data: the first ``steps`` steps' requests,
    each with the step's prompts, the views CPPO's passes need, and the step's seed."""
    data = write_dataset(scratch / "data", SynthSettings(train=200, test=8))
    config = load_config(REPO / "configs/demo.yaml", [f"model.path={model}", f"data.path={data}"])
    stream = training_prompts(config)
    passes = OBJECTIVES[config.objective.algorithm].passes
    requests = []
    for step in range(1, steps + 1):
        seed = step_seed(config.seed, step)
        examples = stream.take(config.train.prompts_per_step)
        prompts = [e.rollout_prompt(prompt_views(config, e, seed, passes)) for e in examples]
        requests.append(rollout_request(config, prompts, seed).model_dump(mode="json"))
    return config, requests


@asynccontextmanager
async def demo_apps(
    model: Path, backends: dict[str, type[TransformersBackend]], max_batch_size: int, max_wait_ms: float
) -> AsyncIterator[tuple[dict[str, httpx.AsyncClient], dict[str, list[int]]]]:
    """Each backend behind its own app in this process (``cppo stack up``'s batch size: the whole step); the
    apps' clients once every model is loaded, and each backend's step sizes."""
    settings = RolloutSettings(model=str(model), max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    batches: dict[str, list[int]] = {name: [] for name in backends}
    async with AsyncExitStack() as stack:
        clients = {}
        for name, backend in backends.items():
            engine = backend(
                str(model),
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                observe_batch=batches[name].append,
            )
            app = create_app(settings, engine)
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://demo", timeout=600
            )
            clients[name] = await stack.enter_async_context(client)
            while (await clients[name].get("/ready")).status_code != 200:
                if app.state.startup.error is not None:
                    raise RuntimeError(f"the {name} backend did not load: {app.state.startup.error}")
                await asyncio.sleep(0.05)
        yield clients, batches


# --- the server ---------------------------------------------------------------------------------


@contextmanager
def rollout_server(
    model: Path, max_batch_size: int, max_wait_ms: float, log: Path
) -> Iterator[tuple[str, int]]:
    """``cppo rollout-server`` on a free port, as a user starts it; yields its URL and pid once ``/ready``."""
    args = ["--model", str(model), "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]
    with running_service("rollout-server", [*args, "--log-level", "warning"], log) as service:
        yield service.url, service.process.pid


# --- the report ---------------------------------------------------------------------------------


def round_ratios(numerator: Measurement, denominator: Measurement, attribute: str) -> list[float]:
    """``numerator / denominator`` of one attribute, round by round (both were measured in each round)."""
    return ratios(
        (getattr(run, attribute) for run in numerator.runs),
        (getattr(run, attribute) for run in denominator.runs),
    )


def report(
    machine_info: dict[str, str],
    settings: dict[str, str],
    measurements: dict[str, Measurement],
    identical: dict[str, bool],
    wall_seconds: float,
) -> tuple[str, dict]:
    """The results as markdown, and as a dict for the JSON file."""
    overhead_lines, overhead = http_overhead_section(measurements, identical["http"])
    batching_lines, batching = batching_section(
        measurements, identical["concurrent"], settings["max_wait_ms"]
    )
    demo_lines, demo = demo_section(measurements, identical["demo"], settings)
    others = [run.other_cores for m in measurements.values() for run in m.runs]
    lines = [
        *preamble(
            "Rollout throughput",
            "rollout_throughput.py",
            "Every ratio is between numbers measured in the same round; each figure is the median of",
            f"{len(measurements['in-process'].runs)} rounds.",
        ),
        *key_value_section(
            "Machine", {**machine_info, "CPU used by other processes while measuring": spread(others)}
        ),
        *key_value_section("Settings", settings),
        *overhead_lines,
        *batching_lines,
        *demo_lines,
        f"Whole run, model build and server start included: {wall_seconds:.0f} s.",
        "",
    ]
    data = {
        "machine": machine_info,
        "settings": settings,
        "http_overhead": overhead,
        "batching_gain": batching,
        "prefill_sharing": demo,
        "identical_samples": identical,
        "measurements": {name: m.summary() for name, m in measurements.items()},
        "wall_seconds": wall_seconds,
    }
    return "\n".join(lines), data


def table_row(m: Measurement) -> str:
    """Tokens, then the medians of time, tokens/s, mean batch and other processes' CPU."""
    batches = [run.mean_batch for run in m.runs if run.mean_batch is not None]
    return (
        f"{m.runs[0].tokens} | {m.median('seconds'):.2f} | {m.median('tokens_per_second'):.1f} | "
        f"{statistics.median(batches):.1f} | {m.median('other_cores'):.2f}"
    )


def http_overhead_section(measurements: dict[str, Measurement], identical: bool) -> tuple[list[str], dict]:
    """Section 1, HTTP time against in-process time for the same tokens: its lines and its numbers."""
    local, sequential = measurements["in-process"], measurements["http-1"]
    overheads = round_ratios(sequential, local, "seconds")
    overhead = statistics.median(overheads)
    per_request_ms = statistics.median(
        (remote.seconds - here.seconds) / len(here.samples) * 1000
        for remote, here in zip(sequential.runs, local.runs, strict=True)
    )
    lines = [
        "## 1. HTTP overhead (sequential, one request at a time)",
        "",
        "The two paths alternate prompt by prompt; time is the sum of each path's request times.",
        "",
        "| path | generated tokens | time (s) | tokens/s | mean batch | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| in-process `TransformersBackend.generate` | {table_row(local)} |",
        f"| HTTP `POST /v1/rollouts` | {table_row(sequential)} |",
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| HTTP time ÷ in-process time, same tokens | {overhead:.3f} | ≤ {HTTP_OVERHEAD_TARGET:.2f} "
        f"| {met(overhead <= HTTP_OVERHEAD_TARGET)} |",
        "",
        f"Round by round: {listed(overheads, 3)}. HTTP time less in-process time, per request: "
        f"{per_request_ms:+.1f} ms (median of rounds).",
        f"Both paths drew identical tokens for every prompt: {'yes' if identical else 'NO'}.",
        "",
    ]
    numbers = {
        "ratio": overhead,
        "by_round": overheads,
        "added_ms_per_request": per_request_ms,
        "target_max": HTTP_OVERHEAD_TARGET,
        "met": overhead <= HTTP_OVERHEAD_TARGET,
    }
    return lines, numbers


def batching_section(
    measurements: dict[str, Measurement], identical: bool, max_wait_ms: str
) -> tuple[list[str], dict]:
    """Section 2, tokens/s at each concurrency against one client: its lines and its numbers."""
    sequential = measurements["http-1"]
    gains = {c: round_ratios(measurements[f"http-{c}"], sequential, "tokens_per_second") for c in CONCURRENCY}
    gain = statistics.median(gains[max(CONCURRENCY)])
    lines = [
        "## 2. Batching gain (HTTP, concurrent clients, n = 1 per request)",
        "",
        "| clients | generated tokens | time (s) | tokens/s | mean batch | other processes (cores) "
        "| gain over 1 client |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {c} | {table_row(measurements[f'http-{c}'])} | {statistics.median(gains[c]):.2f}× |"
            for c in CONCURRENCY
        ),
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| tokens/s at {max(CONCURRENCY)} clients ÷ tokens/s at 1 client | {gain:.2f}× "
        f"| ≥ {BATCHING_GAIN_TARGET:.0f}× | {met(gain >= BATCHING_GAIN_TARGET)} |",
        "",
        f"Round by round: {listed(gains[max(CONCURRENCY)])}. The 1-client row is the HTTP side of section 1.",
        "Mean batch: sequences per decoding step, from the server's `cppo_rollout_batch_size` histogram.",
        "Every concurrency level drew the same tokens as the in-process run: "
        f"{'yes' if identical else 'NO'}.",
        *_small_batches_note(measurements, max_wait_ms),
        "",
    ]
    numbers = {
        "ratio": gain,
        "clients": max(CONCURRENCY),
        "by_round": {str(c): gains[c] for c in CONCURRENCY},
        "target_min": BATCHING_GAIN_TARGET,
        "met": gain >= BATCHING_GAIN_TARGET,
    }
    return lines, numbers


def demo_section(
    measurements: dict[str, Measurement], identical: bool, settings: dict[str, str]
) -> tuple[list[str], dict]:
    """Section 3, this backend against the one before it at the demo shape: its lines and its numbers."""
    before, after = measurements["demo-before"], measurements["demo-after"]
    gains = round_ratios(after, before, "tokens_per_second")
    gain = statistics.median(gains)
    prompts = int(settings["demo prompts per step"]) * int(settings["demo steps per round"])
    lines = [
        "## 3. One prefill per prompt (the demo shape, in-process apps)",
        "",
        f"Each round sends {settings['demo steps per round']} demo steps' `POST /v1/rollouts` "
        f"({settings['demo shape']}) to each backend's app, one after the other.",
        "",
        "| backend | generated tokens | time (s) | tokens/s | mean batch | other processes (cores) "
        "| prompts/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {label} | {table_row(m)} | {prompts / m.median('seconds'):.2f} |"
            for label, m in ((f"before (`{settings['before']}`)", before), ("after (this commit)", after))
        ),
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| tokens/s after ÷ before | {gain:.2f}× | ≥ {PREFILL_SHARING_TARGET:.0f}× "
        f"| {met(gain >= PREFILL_SHARING_TARGET)} |",
        "",
        f"Round by round: {listed(gains)}. Mean batch: sequences per `generate` call before, per decoding",
        "step after (a step's prefill counts each prompt's n sequences).",
        f"Both backends drew identical tokens for every sample: {'yes' if identical else 'NO'}.",
        "",
    ]
    numbers = {
        "ratio": gain,
        "by_round": gains,
        "prompts_per_second": {
            "before": prompts / before.median("seconds"),
            "after": prompts / after.median("seconds"),
        },
        "target_min": PREFILL_SHARING_TARGET,
        "met": gain >= PREFILL_SHARING_TARGET,
    }
    return lines, numbers


def _small_batches_note(measurements: dict[str, Measurement], max_wait_ms: str) -> list[str]:
    """A line explaining batches well below the client count, where there were any."""
    short = []
    for clients in CONCURRENCY[1:]:
        batches = [run.mean_batch for run in measurements[f"http-{clients}"].runs if run.mean_batch]
        if batches and statistics.median(batches) < 0.75 * clients:
            short.append(f"{statistics.median(batches):.1f} with {clients} clients")
    if not short:
        return []
    return [
        f"Batches held fewer sequences than there were clients ({', '.join(short)}): a request joins the",
        "decoding batch at its next step, but from one answer until the same client's next request reaches",
        "the batch (the response, JSON, image decoding and the processor, on the same cores) that client has",
        f"no sequence in it. An idle backend waits {max_wait_ms} ms after a first request for others.",
    ]


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Options:
    model: Path | None
    prompts: int
    max_tokens: int
    repeats: int
    max_batch_size: int
    max_wait_ms: float
    seed: int
    demo_steps: int
    before: str
    out: Path


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="model folder (default: build the tiny model in a temp dir)"
    )
    parser.add_argument("--prompts", type=int, default=48, help="prompts per run (default 48)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of measurements; medians are kept")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the server's --max-batch-size")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms")
    parser.add_argument("--seed", type=int, default=0, help="data seed; request i samples with seed + i")
    parser.add_argument(
        "--demo-steps", type=int, default=3, help="demo steps per backend and round in section 3 (default 3)"
    )
    parser.add_argument(
        "--before",
        default=BEFORE,
        help="the commit whose backend section 3 compares against (default: %(default).10s)",
    )
    add_out_argument(parser, "rollout_throughput")
    args = parser.parse_args(argv)
    if args.prompts < max(CONCURRENCY):
        parser.error(f"--prompts must be at least {max(CONCURRENCY)}, one per client")
    return Options(**vars(args))


async def measure(
    options: Options, model: Path, profile: str, log_dir: Path, started: float
) -> tuple[str, dict]:
    """Every measurement, in rounds; the report, ``started`` being when the run started."""
    load = os.getloadavg()[0]
    prompts = make_prompts(options.prompts, options.max_tokens, options.seed)
    batches: list[int] = []
    backend = TransformersBackend(
        str(model),
        max_batch_size=options.max_batch_size,
        max_wait_ms=options.max_wait_ms,
        observe_batch=batches.append,
    )
    await backend.start()
    requests = {p.prompt_id: generation_request(backend, p, options.max_tokens) for p in prompts}
    measurements = {name: Measurement(name) for name in ("in-process", *(f"http-{c}" for c in CONCURRENCY))}
    server = rollout_server(model, options.max_batch_size, options.max_wait_ms, log_dir / "server.log")
    with server as (url, pid):
        connections = 2 * max(CONCURRENCY)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            bench = Bench(backend, requests, batches, client, prompts, CpuMeter([os.getpid(), pid]))
            # Warm-up: one request on each path.
            await bench.local(prompts[0])
            await bench.remote(prompts[0])
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("measuring", total=options.repeats * len(CONCURRENCY))
                for repeat in range(options.repeats):
                    flip = repeat % 2 == 1
                    where = f"round {repeat + 1}/{options.repeats}"
                    progress.update(task, description=f"{where}: sequential, in-process and HTTP")
                    local, remote = await bench.sequential(flip)
                    measurements["in-process"].runs.append(local)
                    measurements["http-1"].runs.append(remote)
                    progress.advance(task)
                    concurrent = [c for c in CONCURRENCY if c > 1]
                    for clients in reversed(concurrent) if flip else concurrent:
                        progress.update(task, description=f"{where}: {clients} HTTP clients")
                        measurements[f"http-{clients}"].runs.append(await bench.concurrent(clients))
                        progress.advance(task)
    await backend.close()

    config, demo = demo_requests(model, log_dir, options.demo_steps)
    rows = config.train.prompts_per_step * config.rollout.n
    backends = {"before": previous_backend(options.before), "after": TransformersBackend}
    async with demo_apps(model, backends, max(64, rows), options.max_wait_ms) as (clients, demo_batches):
        shape = DemoShape(demo, clients, demo_batches, CpuMeter([os.getpid()]))
        for name in backends:  # warm-up
            await shape.run(name)
        for repeat in range(options.repeats):
            for name in ("before", "after") if repeat % 2 == 0 else ("after", "before"):
                console.print(f"demo shape, round {repeat + 1}/{options.repeats}: {name}")
                measurements.setdefault(f"demo-{name}", Measurement(f"demo-{name}")).runs.append(
                    await shape.run(name)
                )

    reference = measurements["in-process"].runs[0].samples
    identical = {
        "http": all(run.samples == reference for run in measurements["http-1"].runs),
        "concurrent": all(
            run.samples == reference for c in CONCURRENCY for run in measurements[f"http-{c}"].runs
        ),
        "demo": all(
            run.samples == measurements["demo-before"].runs[0].samples
            for name in ("demo-before", "demo-after")
            for run in measurements[name].runs
        ),
    }
    settings = {
        "model": str(options.model) if options.model else f"tiny random Qwen2.5-VL, profile {profile!r}",
        "backend": "transformers",
        "prompts": str(options.prompts),
        "n per request": "1",
        "max_tokens": str(options.max_tokens),
        "sampling": "temperature 1.0, top_p 1.0, top_k off, stop empty, seed fixed per request",
        "views": "off",
        "max_batch_size": str(options.max_batch_size),
        "max_wait_ms": str(options.max_wait_ms),
        "rounds": str(options.repeats),
        "concurrency": ", ".join(map(str, CONCURRENCY)),
        "demo shape": f"configs/demo.yaml: {config.train.prompts_per_step} prompts × n {config.rollout.n}, "
        f"max_tokens {config.rollout.max_tokens}, temperature {config.rollout.temperature}, "
        f"views for {config.objective.algorithm}'s passes, max_batch_size {max(64, rows)}",
        "demo prompts per step": str(config.train.prompts_per_step),
        "demo steps per round": str(options.demo_steps),
        "before": options.before[:10],
    }
    info = describe_machine(
        {
            "torch threads": str(torch.get_num_threads()),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "httpx": httpx.__version__,
        },
        load,
    )
    return report(info, settings, measurements, identical, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cppo-bench-") as scratch:
        model, profile = options.model, "custom"
        if model is None:
            with console.status("building the tiny model"):
                model, profile = (
                    build_tiny_model(Path(scratch) / "tiny", profile="transformers"),
                    "transformers",
                )
        markdown, data = asyncio.run(measure(options, model, profile, Path(scratch), started))
    write_results(options.out, markdown, data)


if __name__ == "__main__":
    main()
