"""``cppo inspect``: the perception tokens of a few test prompts as one self-contained HTML page (inline CSS,
images as data URLs, no script, nothing fetched), from the template ``templates/inspect.html``. Every text
the model or the dataset wrote is escaped."""

from __future__ import annotations

import math
import tempfile
from contextlib import ExitStack
from pathlib import Path

import jinja2

from trainer.config import TrainConfig
from trainer.inspection import COLUMNS, InspectedPrompt, InspectedResponse, summary
from trainer.objective import ObjectiveConfig

TEMPLATES = Path(__file__).resolve().parent / "templates"


def render_page(prompts: list[InspectedPrompt], title: str, objective: ObjectiveConfig) -> str:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    shifts = [abs(v) for p in prompts for r in p.responses for v in r.values["entropy_shift"]]
    scale = max([v for v in shifts if math.isfinite(v)], default=0.0) or 1e-6
    # Each prompt with its distinct responses, ready to draw.
    shown = [(p, [_response(r, count, scale) for r, count in _distinct(p.responses)]) for p in prompts]
    return environment.get_template("inspect.html").render(
        title=title,
        prompts=shown,
        summary=summary(prompts),
        columns=COLUMNS,
        scale=scale,
        top_fraction=objective.top_fraction,
        tau=objective.tau,
    )


def _distinct(responses: list[InspectedResponse]) -> list[tuple[InspectedResponse, int]]:
    """Identical responses once, with their count: a trained policy often answers the same way every time,
    and the same tokens of the same prompt have the same numbers."""
    counts: dict[tuple[str, ...], list] = {}
    for response in responses:
        counts.setdefault(tuple(response.tokens), [response, 0])[1] += 1
    return [(response, count) for response, count in counts.values()]


def _response(response: InspectedResponse, count: int, scale: float) -> dict:
    cells = []
    for t, text in enumerate(response.tokens):
        values = {key: column[t] for key, column in response.values.items()}
        selected, trained = response.selected[t], response.trained[t]
        classes = "tok" + (" selected" if selected else "") + (" dropped" if selected and not trained else "")
        cells.append(
            {
                "text": text.replace("\n", "↵\n") or "∅",
                "classes": classes,
                "colour": _colour(values["entropy_shift"], scale),
                "title": " · ".join(f"{COLUMNS[key]} {values[key]:.4f}" for key in COLUMNS),
                "selected": selected,
                "trained": trained,
                "numbers": values,
            }
        )
    return {"reward": response.reward, "advantage": response.advantage, "count": count, "cells": cells}


def _colour(shift: float, scale: float) -> str:
    """Red where the entropy rises without the image's information, blue where it falls."""
    if not math.isfinite(shift):
        return "transparent"
    alpha = min(1.0, abs(shift) / scale) * 0.85
    rgb = "220 50 47" if shift > 0 else "38 139 210"
    return f"rgb({rgb} / {alpha:.3f})"


def write_inspection(
    config: TrainConfig,
    model: str,
    count: int,
    out: Path,
    rollout_url: str | None = None,
    reward_url: str | None = None,
) -> Path:
    """``cppo inspect``: sample ``count`` test prompts of ``config.data`` (through the given servers, or
    through a rollout server on ``model`` and a reward server started here and stopped after), run the
    teacher-forced passes of ``model`` in this process, and write the page to ``out``."""
    import torch

    from shared.launch import running_service
    from shared.vlm import load_model, load_processor, suppressed_token_ids
    from trainer.clients import RewardClient, RolloutReplicas
    from trainer.data import evaluation_examples, image_bounds
    from trainer.experience import Batch
    from trainer.inspection import inspect_tokens, sample
    from trainer.policy import response_logprobs

    processor = load_processor(model)
    examples = evaluation_examples(config, count, image_bounds(processor, config.data), asked_by="--prompts")
    with ExitStack() as stack, tempfile.TemporaryDirectory() as logs:
        if rollout_url is None:
            args = ["--model", model, "--backend", "transformers", "--host", "127.0.0.1"]
            started = running_service("rollout-server", args, Path(logs) / "rollout-server.log")
            rollout_url = stack.enter_context(started).url
        if reward_url is None:
            started = running_service(
                "reward-server", ["--host", "127.0.0.1"], Path(logs) / "reward-server.log"
            )
            reward_url = stack.enter_context(started).url
        replicas = RolloutReplicas.from_config(config.rollout, [rollout_url])
        rewards = RewardClient.from_config(config.reward, reward_url)
        stack.callback(replicas.close)
        stack.callback(rewards.close)
        replicas.wait_until_ready(config.rollout.ready_timeout_s)
        rewards.wait_until_ready(config.reward.ready_timeout_s)
        sampled = sample(config, replicas, rewards, examples, config.seed)

    policy = load_model(model, dtype=torch.float32).eval()
    suppressed = suppressed_token_ids(processor.tokenizer)
    temperature = config.rollout.temperature

    @torch.no_grad()
    def score(batch: Batch, passes: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            name: response_logprobs(policy, batch, name, torch.float32, temperature, suppressed)
            for name in passes
        }

    prompts = inspect_tokens(config, processor, score, examples, sampled)
    title = f"{model} · {config.data.path} ({config.data.test_split}) · seed {config.seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(prompts, title, config.objective))
    return out
