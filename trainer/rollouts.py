"""Sampling and scoring a step's prompts over HTTP, ahead of time when staleness allows it.

With ``max_staleness: k`` the rollouts of the next ``k`` steps are requested while this step trains.
Samples whose policy version lags more than ``k`` behind the trainer's are regenerated.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shared.schemas import (
    PromptRollout,
    RequestedViews,
    RolloutPrompt,
    RolloutRequest,
    Sample,
    SamplingParams,
    ScoreItem,
    ViewRecipe,
)
from trainer.clients import RewardClient, RolloutReplicas
from trainer.config import TrainConfig
from trainer.data import BadExample, Example, PromptStream
from trainer.distributed import gather_from_ranks

# Rewards by (prompt id, sample index): (weighted reward, components).
Rewards = dict[tuple[str, int], tuple[float, dict[str, float]]]


@dataclass
class ScoredBatch:
    """One step's prompts (this rank's share), their rollouts and the rewards of their clean-image samples.

    The bookkeeping fields default to empty, so a batch can be made from a rollout alone (as the bench does).
    """

    step: int
    examples: list[Example]
    rollouts: list[PromptRollout]
    rewards: Rewards
    prompt_ids: list[str] = field(default_factory=list)
    """Every rank's prompt ids of the step, for the log."""
    data_position: dict[str, int] = field(default_factory=dict)
    """Where the prompt stream stands after the step, for its checkpoint."""
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    """Examples skipped so far in the run: bad ones, and those a server refused."""


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A seed for one step's sampling and views: the same on a resumed run, different every step."""
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0])


def prompt_views(config: TrainConfig, example: Example, seed: int, kinds: Iterable[str]) -> RequestedViews:
    """The perturbed views of ``example`` to ask the rollout server for: each kind in ``kinds`` with the
    transforms of the example's group, the other kinds explicitly null (a missing one gets the default
    set)."""
    recipes = {
        kind: ViewRecipe(transforms=config.rollout.transforms(kind, example.group), seed=seed)
        for kind in ("positive", "negative")
        if kind in kinds
    }
    return RequestedViews(positive=recipes.get("positive"), negative=recipes.get("negative"))


def rollout_request(config: TrainConfig, prompts: list[RolloutPrompt], seed: int) -> RolloutRequest:
    """Sample on the clean images; each prompt carries the views it needs (``prompt_views``)."""
    rollout = config.rollout
    return RolloutRequest(
        prompts=prompts,
        n=rollout.n,
        sampling=SamplingParams(
            temperature=rollout.temperature, top_p=rollout.top_p, max_tokens=rollout.max_tokens, seed=seed
        ),
        views=RequestedViews(positive=None, negative=None),
    )


def score_item(config: TrainConfig, example: Example, sample: Sample) -> ScoreItem:
    """A sample as the reward server scores it: the reward of its example's data source, and the prompt,
    source and metadata that reward functions may take."""
    return ScoreItem(
        id=f"{sample.prompt_id}/{sample.sample_index}",
        response=sample.text,
        ground_truth=example.answer,
        reward=config.reward.for_source(example.data_source),
        prompt=example.prompt or None,
        data_source=example.data_source,
        metadata=example.metadata or None,
    )


def score_items(
    config: TrainConfig, examples: dict[str, Example], rollouts: list[PromptRollout]
) -> list[ScoreItem]:
    return [
        score_item(config, examples[r.prompt_id], s)
        for r in rollouts
        for s in r.samples
        if s.sampled_on == "clean"
    ]


def sample_and_score(
    config: TrainConfig,
    replicas: RolloutReplicas,
    rewards: RewardClient,
    examples: list[Example],
    seed: int,
    passes: tuple[str, ...],
) -> tuple[list[PromptRollout], Rewards, dict[str, float], dict[str, str]]:
    """Rollouts of the examples, each replica's answer scored while the others still generate, and the
    prompts a server refused (by id: why). A refused prompt is left out, with all its samples."""
    by_id = {e.id: e for e in examples}
    refused: dict[str, str] = {}
    scoring = ThreadPoolExecutor(max_workers=4, thread_name_prefix="score")
    scored: list[Future] = []
    start = time.perf_counter()

    def refuse_item(item: ScoreItem, why: str) -> None:
        refused[item.id.rpartition("/")[0]] = why

    rollouts = replicas.rollouts(
        [e.rollout_prompt(prompt_views(config, e, seed, passes)) for e in examples],
        lambda chunk: rollout_request(config, chunk, seed),
        on_chunk=lambda chunk: scored.append(
            scoring.submit(rewards.score, score_items(config, by_id, chunk), refuse_item)
        ),
        on_refused=lambda prompt, why: refused.__setitem__(prompt.prompt_id, why),
    )
    generated = time.perf_counter()
    results: Rewards = {}
    for future in scored:
        for result in future.result():
            prompt_id, _, index = result.id.rpartition("/")
            results[(prompt_id, int(index))] = (result.reward, result.components)
    scoring.shutdown()
    seconds = {"rollout": generated - start, "reward": time.perf_counter() - generated}
    rollouts = [r for r in rollouts if r.prompt_id not in refused]
    results = {key: value for key, value in results.items() if key[0] not in refused}
    return rollouts, results, seconds, refused


class Sampler:
    """Produces scored batches in step order, keeping up to ``max_staleness`` steps in flight."""

    def __init__(
        self,
        config: TrainConfig,
        replicas: RolloutReplicas,
        rewards: RewardClient,
        stream: PromptStream,
        share: Callable[[list[Example]], list[Example]],
        passes: tuple[str, ...],
    ) -> None:
        self.config = config
        self.replicas = replicas
        self.rewards = rewards
        self.stream = stream
        self.share = share
        self.passes = passes
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.in_flight: deque[tuple[int, Future, list[Example], list[str], dict[str, int]]] = deque()

    def _submit(self, step: int) -> None:
        everyone = self.stream.take(self.config.train.prompts_per_step)
        # Where the stream stands after this step's prompts: what its checkpoint records, even when
        # later steps' prompts are already in flight.
        position = self.stream.state()
        examples = self.share(everyone)
        seed = step_seed(self.config.seed, step)
        future = self.worker.submit(
            sample_and_score, self.config, self.replicas, self.rewards, examples, seed, self.passes
        )
        self.in_flight.append((step, future, examples, [e.id for e in everyone], position))

    def next(self, step: int, version: int) -> ScoredBatch:
        """The batch of ``step``, every sample at most ``max_staleness`` versions behind ``version``."""
        last = step + self.config.train.max_staleness
        while not self.in_flight or self.in_flight[-1][0] < min(last, self.config.train.steps):
            self._submit(self.in_flight[-1][0] + 1 if self.in_flight else step)
        _, future, examples, prompt_ids, position = self.in_flight.popleft()
        start = time.perf_counter()
        rollouts, rewards, seconds, refused = future.result()
        examples = self._drop_refused(examples, refused)
        rollouts, rewards, regenerated = self._refresh_stale(examples, rollouts, rewards, step, version)
        seconds["wait"] = time.perf_counter() - start
        batch = ScoredBatch(step, examples, rollouts, rewards, prompt_ids, position, seconds)
        batch.seconds["regenerated_prompts"] = regenerated
        batch.skipped = self.stream.skipped
        return batch

    def _drop_refused(self, examples: list[Example], refused: dict[str, str]) -> list[Example]:
        """The examples less those a server refused, whose rows the stream skips from now on: on every
        rank (a collective), so that the ranks go on reading the same prompts."""
        rows = [(e.row, e.id, refused[e.id]) for e in examples if e.id in refused and e.row is not None]
        for row, example_id, why in (entry for entries in gather_from_ranks(rows) for entry in entries):
            self.stream.skip(row, BadExample(example_id, f"refused: {why}"))
        return [e for e in examples if e.id not in refused]

    def _refresh_stale(
        self,
        examples: list[Example],
        rollouts: list[PromptRollout],
        rewards: Rewards,
        step: int,
        version: int,
    ) -> tuple[list[PromptRollout], Rewards, int]:
        oldest = version - self.config.train.max_staleness
        stale = [i for i, r in enumerate(rollouts) if any(s.policy_version < oldest for s in r.samples)]
        if not stale:
            return rollouts, rewards, 0
        again, scores, _, refused = sample_and_score(
            self.config,
            self.replicas,
            self.rewards,
            [examples[i] for i in stale],
            step_seed(self.config.seed, step, salt=version),
            self.passes,
        )
        # A prompt refused now was served before: its earlier samples stay.
        fresh = {r.prompt_id: r for r in again}
        for i in stale:
            rollouts[i] = fresh.get(rollouts[i].prompt_id, rollouts[i])
        rewards.update(scores)
        return rollouts, rewards, len(stale) - len(refused)

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
