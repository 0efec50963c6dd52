"""Evaluation on the test split, through the same rollout and reward servers as training.

- ``eval_accuracy_greedy``: greedy accuracy on the clean images;
- ``eval_accuracy_sampled``: avg@k at the rollout temperature;
- ``eval_accuracy_greedy_removed``: greedy accuracy on the views ``eval.removed_view`` names (I⁻ by
  default), made with the same transforms as in training;
- ``eval_perception_gap``: the first minus the third. A policy that answers without looking has a gap
  near 0.

With ``rollout.views_by`` set, the greedy accuracies are also logged per group (``…/colour``).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from statistics import fmean

from shared.schemas import (
    PromptRollout,
    RequestedViews,
    RolloutPrompt,
    RolloutRequest,
    SamplingParams,
    ScoreItem,
)
from trainer.clients import RewardClient, RolloutReplicas
from trainer.config import TrainConfig
from trainer.data import Example
from trainer.rollouts import prompt_views, score_item

log = logging.getLogger(__name__)


def left_out(refused: RolloutPrompt | ScoreItem, why: str) -> None:
    """A test prompt or sample a server refused is left out of the accuracies, and said so."""
    name = refused.prompt_id if isinstance(refused, RolloutPrompt) else refused.id
    log.warning("evaluation leaves out %s, which the server refused: %s", name, why)


def accuracies(
    config: TrainConfig,
    rewards: RewardClient,
    examples: list[Example],
    rollouts: list[PromptRollout],
    variant: str,
    by: Callable[[Example], str | None] = lambda example: example.group,
) -> dict[str | None, float]:
    """Accuracy of the samples drawn on ``variant``: overall (key None) and per ``by`` (the group)."""
    by_id = {e.id: e for e in examples}
    samples = [(r.prompt_id, s) for r in rollouts for s in r.samples if s.sampled_on == variant]
    items = [score_item(config, by_id[prompt_id], s) for prompt_id, s in samples]
    correct: dict[str | None, list[float]] = defaultdict(list)
    for result in rewards.score(items, left_out):
        accuracy = result.components.get(config.reward.accuracy, 0.0)
        correct[None].append(accuracy)
        if (key := by(by_id[result.id.rpartition("/")[0]])) is not None:
            correct[key].append(accuracy)
    if not correct:
        return {None: float("nan")}
    return {key: fmean(values) for key, values in correct.items()}


def chance_accuracy(examples: list[Example]) -> float:
    """What guessing earns: each example's chance of being answered right by a uniform guess among the
    distinct answers of its group (of all the examples, without groups), averaged. The level the greedy
    accuracy on I⁻ should fall to when the image's information is really gone."""
    answers: dict[str | None, set[str]] = {}
    for example in examples:
        answers.setdefault(example.group, set()).add(example.answer)
    if not examples:
        return math.nan
    return sum(1 / len(answers[example.group]) for example in examples) / len(examples)


def evaluate(
    config: TrainConfig, replicas: RolloutReplicas, rewards: RewardClient, examples: list[Example], seed: int
) -> dict[str, float]:
    removed = config.eval.removed_view
    greedy = replicas.rollouts(
        [e.rollout_prompt(prompt_views(config, e, seed, (removed,))) for e in examples],
        lambda chunk: RolloutRequest(
            prompts=chunk,
            n=1,
            sampling=SamplingParams(temperature=0.0, max_tokens=config.rollout.max_tokens),
            views=RequestedViews(positive=None, negative=None),
            sample_on=["clean", removed],
        ),
        on_refused=left_out,
    )
    sampled = replicas.rollouts(
        [e.rollout_prompt() for e in examples],
        lambda chunk: RolloutRequest(
            prompts=chunk,
            n=config.eval.samples,
            sampling=SamplingParams(
                temperature=config.rollout.temperature,
                top_p=config.rollout.top_p,
                max_tokens=config.rollout.max_tokens,
                seed=seed,
            ),
            views=RequestedViews(positive=None, negative=None),
        ),
        on_refused=left_out,
    )
    clean = accuracies(config, rewards, examples, greedy, "clean")
    blind = accuracies(config, rewards, examples, greedy, removed)
    metrics = {
        "eval_accuracy_greedy": clean[None],
        "eval_accuracy_sampled": accuracies(config, rewards, examples, sampled, "clean")[None],
        "eval_accuracy_greedy_removed": blind[None],
        "eval_perception_gap": clean[None] - blind[None],
        "eval_chance_accuracy": chance_accuracy(examples),
    }
    for group in sorted(group for group in clean if group is not None):
        metrics[f"eval_accuracy_greedy/{group}"] = clean[group]
        metrics[f"eval_accuracy_greedy_removed/{group}"] = blind.get(group, float("nan"))
    return metrics
