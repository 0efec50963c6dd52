"""Evaluation on the test split, through the same rollout and reward servers as training.

- ``eval_accuracy_greedy``: greedy accuracy on the clean images;
- ``eval_accuracy_sampled``: avg@k at the rollout temperature;
- ``eval_perception_gap``: greedy accuracy on the clean images minus greedy accuracy on their
  information-removing views. A policy that answers without looking has a gap near 0.
"""

from __future__ import annotations

from statistics import fmean

from shared.schemas import (
    PromptRollout,
    RequestedViews,
    RolloutRequest,
    SamplingParams,
    ScoreItem,
    ViewRecipe,
)
from trainer.clients import RewardClient, RolloutReplicas
from trainer.config import TrainConfig
from trainer.data import Example


def _accuracy(
    config: TrainConfig,
    rewards: RewardClient,
    examples: list[Example],
    rollouts: list[PromptRollout],
    view: str,
) -> float:
    answers = {e.id: e.answer for e in examples}
    items = [
        ScoreItem(
            id=f"{r.prompt_id}/{s.sample_index}",
            response=s.text,
            ground_truth=answers[r.prompt_id],
            reward=config.reward.reward,
        )
        for r in rollouts
        for s in r.samples
        if s.sampled_on == view
    ]
    results = rewards.score(items)
    return fmean(r.components.get(config.reward.accuracy, 0.0) for r in results) if results else float("nan")


def evaluate(
    config: TrainConfig, replicas: RolloutReplicas, rewards: RewardClient, examples: list[Example], seed: int
) -> dict[str, float]:
    prompts = [e.rollout_prompt() for e in examples]
    removed = config.eval.removed_view
    greedy = replicas.rollouts(
        prompts,
        lambda chunk: RolloutRequest(
            prompts=chunk,
            n=1,
            sampling=SamplingParams(temperature=0.0, max_tokens=config.rollout.max_tokens),
            views=RequestedViews(
                positive=ViewRecipe(seed=seed) if removed == "positive" else None,
                negative=ViewRecipe(seed=seed) if removed == "negative" else None,
            ),
            sample_on=["clean", removed],
        ),
    )
    sampled = replicas.rollouts(
        prompts,
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
    )
    clean = _accuracy(config, rewards, examples, greedy, "clean")
    blind = _accuracy(config, rewards, examples, greedy, removed)
    return {
        "eval_accuracy_greedy": clean,
        "eval_accuracy_sampled": _accuracy(config, rewards, examples, sampled, "clean"),
        "eval_accuracy_greedy_removed": blind,
        "eval_perception_gap": clean - blind,
    }
