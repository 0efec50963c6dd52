"""The training loop: sample → score → advantages → loss → step → push weights → log.

Every rank runs this loop on its own share of each step's prompts; DeepSpeed averages the gradients,
and rank 0 publishes the weights, evaluates, logs and writes the checkpoints' shared files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from statistics import fmean, pstdev

import datasets
import torch
import transformers
from rich.console import Console

from shared.hub import reference_problem
from shared.vlm import load_processor, suppressed_token_ids
from trainer import checkpoint
from trainer.checkpoint import TrainerState
from trainer.clients import ReplicaError, RewardClient, RolloutReplicas
from trainer.config import TrainConfig
from trainer.data import evaluation_examples, image_bounds, training_prompts
from trainer.distributed import (
    barrier,
    broadcast_from_rank0,
    init_distributed,
    mean_over_ranks,
    rank,
    sum_over_ranks,
    world_size,
)
from trainer.evaluate import evaluate
from trainer.experience import Batch, Row, collate, rows_with_advantages
from trainer.inspection import inspect_tokens, perception_figure, sample
from trainer.logs import RunLog, plot_curves, read_metrics, summary_table
from trainer.objective import ALGORITHMS, metric_names
from trainer.policy import Policy
from trainer.rollouts import Sampler, ScoredBatch, step_seed
from trainer.rundir import check_run_dir, move_aside
from trainer.sync import Publisher

log = logging.getLogger(__name__)


class StopTraining(ChildProcessError):
    """Raised by a stack's health check when a service the run needs has gone."""


def train(
    config: TrainConfig,
    resume: str | None = None,
    health_check: Callable[[], None] = lambda: None,
    overwrite: bool = False,
) -> Path:
    """Train as ``config`` says; returns the run folder. ``health_check`` raises to stop the run; a run
    folder that holds a run is refused unless the run is resumed or ``overwrite`` moves it aside."""
    init_distributed()
    quiet_libraries()
    torch.manual_seed(config.seed)
    console = Console(stderr=True)
    resume = claim_run_dir(config, resume, overwrite, console)
    processor = load_processor(config.model.path)
    pad_id = processor.tokenizer.pad_token_id
    passes = ALGORITHMS[config.objective.algorithm].passes
    bounds = image_bounds(processor, config.data)
    stream = training_prompts(config, bounds)
    evaluated = config.eval.prompts if config.eval.every else 0
    tests = evaluation_examples(config, evaluated, bounds)
    replicas, rewards = connect(config, health_check)
    policy = Policy(config, micro_batches_per_mini_batch(config), suppressed_token_ids(processor.tokenizer))
    state = TrainerState(step=0, policy_version=0, data=stream.state())
    if resume is not None:
        state = checkpoint.load(policy, checkpoint.resolve(config.run_dir, resume))
        stream.restore(state.data)
    publisher = Publisher(policy, replicas, config)
    # Replicas may hold newer weights than ours (a resumed run): publish ours under a newer version.
    version = publisher.publish(max([state.policy_version, *replicas.versions().values()]) + 1)
    run_log = RunLog(config, state.step, policy.deepspeed_config, console) if rank() == 0 else None
    sampler = Sampler(config, replicas, rewards, stream, share_of, passes)
    evaluation = Evaluator(config, replicas, rewards, tests, policy, processor, run_log)
    try:
        if state.step == 0 and config.eval.every:
            record(run_log, {"step": 0, "policy_version": version, **evaluation(0)})
        for step in range(state.step + 1, config.train.steps + 1):
            began = time.perf_counter()
            health_check()
            publisher.catch_up()
            batch = sampler.next(step, version)  # sample + score
            rows, groups_dropped, spare = rows_with_advantages(processor, batch, passes, config)  # advantages
            started = time.perf_counter()
            metrics = update(policy, rows, spare, stream.groups, config, pad_id)  # loss + step
            metrics["seconds_train"] = time.perf_counter() - started
            started = time.perf_counter()
            version = publisher.publish(version + 1)  # push weights
            metrics["seconds_sync"] = time.perf_counter() - started
            # Less than the phases add up to when the next rollouts overlap this step (max_staleness ≥ 1).
            metrics["seconds_step"] = time.perf_counter() - began
            metrics |= batch_metrics(batch, rows, groups_dropped, version, config)
            metrics = {"step": step, "policy_version": version, **mean_over_ranks(metrics)}
            metrics["prompt_ids"] = batch.prompt_ids
            if config.eval.every and (step % config.eval.every == 0 or step == config.train.steps):
                metrics |= evaluation(step)
            record(run_log, metrics)  # log
            if step == config.train.steps or (
                config.checkpoint.every and step % config.checkpoint.every == 0
            ):
                state = TrainerState(step=step, policy_version=version, data=batch.data_position)
                checkpoint.save(policy, processor, config.run_dir, state, config.checkpoint.keep)
    except ReplicaError as error:
        raise ReplicaError(f"{error}. {resume_hint(config.run_dir)}") from error
    finally:
        sampler.close()
        replicas.close()
        rewards.close()
        if run_log is not None:
            run_log.close()
    if rank() == 0:
        finish(config, console)
    return config.run_dir


# --- helpers, in the order the loop calls them ---------------------------------------------------


def check_inputs(config: TrainConfig) -> None:
    """The model and the data are folders, or may be on the hub: a typo stops the run at once, in one
    line, instead of minutes later as retries against the hub."""
    for problem in (
        reference_problem(config.model.path, "model.path", "config.json"),
        reference_problem(config.data.path, "data.path"),
    ):
        if problem is not None:
            raise ValueError(problem)


def claim_run_dir(config: TrainConfig, resume: str | None, overwrite: bool, console: Console) -> str | None:
    """What to resume from. Every rank checks the run folder and the inputs (so all refuse together);
    then rank 0 moves an earlier run aside."""
    run_dir = config.run_dir
    checked = check_run_dir(run_dir, resume, overwrite)
    check_inputs(config)
    if rank() == 0:
        if resume is not None and checked is None:
            console.print(f"--resume: {run_dir} holds no run yet, so this one starts it")
        if overwrite and (aside := move_aside(run_dir)) is not None:
            console.print(f"moved the earlier run in {run_dir} to {aside}")
    barrier()
    return checked


def resume_hint(run_dir: Path) -> str:
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        return "No checkpoint was written yet"
    return f"The latest checkpoint is {found[-1]}: continue from it with --resume"


def quiet_libraries() -> None:
    """The run's own progress bar is the one to watch; the libraries' per-call bars only scroll it away."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def connect(config: TrainConfig, health_check: Callable[[], None]) -> tuple[RolloutReplicas, RewardClient]:
    replicas = RolloutReplicas.from_config(config.rollout, health_check=health_check)
    rewards = RewardClient.from_config(config.reward, health_check=health_check)
    replicas.wait_until_ready(config.rollout.ready_timeout_s)
    rewards.wait_until_ready(config.reward.ready_timeout_s)
    return replicas, rewards


def micro_batches_per_mini_batch(config: TrainConfig) -> int:
    """Fixed per run, so that every rank runs the same number of passes (ZeRO-3's gathers are collective)."""
    rows = config.train.prompts_per_step * config.rollout.n
    per_rank_mini_batch = math.ceil(rows / world_size() / config.train.mini_batches)
    return max(1, math.ceil(per_rank_mini_batch / config.train.micro_batch_size))


def share_of(examples: list) -> list:
    """This rank's prompts of the step: every rank reads the same stream and keeps its stripe."""
    return examples[rank() :: world_size()]


class Evaluator:
    """Evaluation on the test split, by rank 0 only (the others get no metrics to log), and the picture of
    the perception tokens of a few test prompts for the dashboards: sampled by rank 0, with every rank
    running the passes (under ZeRO-3 a forward pass is collective)."""

    def __init__(
        self,
        config: TrainConfig,
        replicas: RolloutReplicas,
        rewards: RewardClient,
        tests: list,
        policy: Policy,
        processor,
        run_log: RunLog | None,
    ) -> None:
        self.config, self.replicas, self.rewards, self.tests = config, replicas, rewards, tests
        self.policy, self.processor, self.run_log = policy, processor, run_log

    def __call__(self, step: int) -> dict[str, float]:
        seed = step_seed(self.config.seed, step, salt=1)
        self.draw_perception_tokens(step, seed)
        if rank() != 0:
            return {}
        return evaluate(self.config, self.replicas, self.rewards, self.tests, seed)

    def draw_perception_tokens(self, step: int, seed: int) -> None:
        log = self.config.log
        if not self.config.eval.inspect_prompts or not (log.tensorboard or log.wandb_project):
            return
        examples = self.tests[: self.config.eval.inspect_prompts]
        sampled = sample(self.config, self.replicas, self.rewards, examples, seed) if rank() == 0 else None
        sampled = broadcast_from_rank0(sampled)
        prompts = inspect_tokens(self.config, self.processor, self.policy.score_old, examples, sampled)
        if self.run_log is not None:
            self.run_log.figure("perception_tokens", perception_figure(prompts), step)


def record(run_log: RunLog | None, metrics: dict) -> None:
    if run_log is not None:
        run_log.write(metrics)


def update(
    policy: Policy, rows: list[Row], spare: Row, groups: list[str], config: TrainConfig, pad_id: int
) -> dict[str, float]:
    """``mini_batches`` optimizer steps, each over a fixed number of micro-batches (padded with
    zero-weight passes where this rank has too few rows). Per-response metrics come back as means over
    the step's tokens on every rank, overall and per group (``name/group``)."""
    micro_count = micro_batches_per_mini_batch(config)
    passes = ALGORITHMS[config.objective.algorithm].passes
    mini_batches = [rows[i :: config.train.mini_batches] for i in range(config.train.mini_batches)]
    old: dict[int, torch.Tensor] = {}
    if config.train.mini_batches > 1 and not config.train.max_staleness:
        # Several optimizer steps: the old policy is the one before the first, scored once up front.
        for mini in mini_batches:
            for micro in _split(mini, micro_count):
                if micro:
                    logp, _ = policy.score_old(collate(micro, passes, pad_id), ("clean",))["clean"]
                    for i, row in enumerate(micro):
                        old[id(row)] = logp[i, : len(row.response_ids)].cpu()
    totals: dict[str, float] = {"lr": policy.learning_rate()}
    token_means = TokenMeans(groups)
    for mini in mini_batches:
        for micro in _split(mini, micro_count):
            weight = len(micro) / max(1, len(mini))
            placeholder = micro or [spare]
            batch = collate(placeholder, passes, pad_id)
            logp_old = old_logprobs(batch, micro, old, config)
            metrics = policy.micro_step(batch, logp_old, weight, config.train.tis_cap)
            for name, value in metrics.items():
                if isinstance(value, list):
                    token_means.add(name, micro, value)
                else:
                    totals[name] = totals.get(name, 0.0) + weight * value / len(mini_batches)
    totals["grad_norm"] = policy.grad_norm()
    # Every run logs the same columns; a term its algorithm does not have is null.
    return {name: totals.get(name, math.nan) for name in metric_names()} | totals | token_means.over_ranks()


class TokenMeans:
    """Per-response means, weighted by the responses' token counts into means over the step's tokens of
    every rank: overall (``name``) and per group (``name/group``; null when the step has none of it)."""

    def __init__(self, groups: list[str]) -> None:
        self.groups = groups
        # Per metric, rows (overall, then each group) of (Σ value × tokens, Σ tokens).
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, rows: list[Row], values: list[float]) -> None:
        # Made even by a zero-row pass (its placeholder's values count for nothing): every rank must
        # reduce the same metrics.
        sums = self.sums.setdefault(name, torch.zeros((1 + len(self.groups), 2), dtype=torch.float64))
        if not rows:
            return
        for row, value in zip(rows, values, strict=True):
            tokens = len(row.response_ids)
            slots = [0] + ([1 + self.groups.index(row.group)] if row.group in self.groups else [])
            sums[slots] += torch.tensor([value * tokens, tokens], dtype=torch.float64)

    def over_ranks(self) -> dict[str, float]:
        means = {}
        for name in sorted(self.sums):
            total = sum_over_ranks(self.sums[name])
            ratio = (total[:, 0] / total[:, 1]).tolist()  # 0/0 is NaN: logged as null
            means[name] = ratio[0]
            means |= {f"{name}/{group}": value for group, value in zip(self.groups, ratio[1:], strict=True)}
        return means


def old_logprobs(
    batch: Batch, rows: list[Row], old: dict[int, torch.Tensor], config: TrainConfig
) -> torch.Tensor | None:
    """ℓ_old of a micro-batch, the policy the ratio ρ_t = exp(ℓ_t − ℓ_old,t) is taken against:

    - samples that may be stale (``max_staleness`` ≥ 1): the behaviour policy's, as the rollout server
      reported them, since an older version sampled them and the current pass would make every ratio 1;
    - several optimizer steps per step: the policy before the first, scored up front (``old``);
    - otherwise None: the pass itself, detached (the same parameters sampled the batch).
    """
    if config.train.max_staleness:
        return batch.rollout_logprobs
    if old and rows:
        return _stack_old(old, rows, batch.response_ids.shape[1])
    return None


def _split(rows: list[Row], parts: int) -> list[list[Row]]:
    return [rows[i::parts] for i in range(parts)]


def _stack_old(old: dict[int, torch.Tensor], rows: list[Row], width: int) -> torch.Tensor:
    stacked = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        stacked[i, : len(old[id(row)])] = old[id(row)]
    return stacked


def batch_metrics(
    batch: ScoredBatch, rows: list[Row], groups_dropped: int, version: int, config: TrainConfig
) -> dict[str, float]:
    rewards = [reward for reward, _ in batch.rewards.values()]
    components = [parts for _, parts in batch.rewards.values()]
    tokens = sum(len(s.token_ids) for r in batch.rollouts for s in r.samples)
    seconds = batch.seconds
    # The version each sample was made by, relative to the version being trained on.
    staleness = [version - 1 - s.policy_version for r in batch.rollouts for s in r.samples]
    return {
        "reward_mean": fmean(rewards),
        "reward_std": pstdev(rewards),
        "accuracy_mean": fmean(c.get(config.reward.accuracy, 0.0) for c in components),
        "format_mean": fmean(c.get("format", math.nan) for c in components),
        "response_length_mean": tokens / max(1, len(staleness)),
        "staleness_mean": fmean(staleness),
        "groups_dropped": float(groups_dropped),
        "examples_skipped": float(batch.skipped),
        "rows": float(len(rows)),
        "regenerated_prompts": seconds["regenerated_prompts"],
        "seconds_rollout": seconds["rollout"],
        "seconds_reward": seconds["reward"],
        "seconds_wait": seconds["wait"],
        "tokens_per_s": tokens / max(seconds["rollout"], 1e-9),
    }


def finish(config: TrainConfig, console: Console) -> None:
    """The summary table, the plot, and where to find them."""
    metrics = read_metrics(config.run_dir / "metrics.jsonl")
    if not metrics:
        return
    title = f"{config.run_dir.name}: {config.objective.algorithm.upper()}, seed {config.seed}"
    plot = plot_curves(metrics, config.run_dir / "learning_curves.png", title)
    console.print(summary_table(metrics))
    console.print(f"metrics: {config.run_dir / 'metrics.jsonl'}")
    console.print(f"plot:    {plot}")
