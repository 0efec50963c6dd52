"""What CPPO sees in a response: for every token, how much its entropy rises when the image loses its
information (ΔH), whether the perception mask selects it, whether the advantage gate keeps it, and its
contrastive term, with the three images the numbers come from.

Sampling, scoring, rows and advantages go through the trainer's own functions (``sample_and_score``,
``rows_with_advantages``), and every number comes from ``trainer.objective.perception_tokens``, the function
``cppo_term`` trains on: what is shown cannot drift from what is trained. ``cppo inspect`` renders the result
as an HTML page (``trainer.inspect_page``); the trainer draws it to TensorBoard at every evaluation
(``perception_figure``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import ProcessorMixin

from shared.images import encode_image_data_url
from shared.schemas import PromptRollout, RequestedViews, RolloutRequest, SamplingParams
from trainer.clients import RewardClient, RolloutReplicas
from trainer.config import TrainConfig
from trainer.data import Example
from trainer.evaluate import accuracies
from trainer.experience import Batch, collate, rows_with_advantages
from trainer.objective import ObjectiveInputs, perception_tokens
from trainer.rollouts import Rewards, ScoredBatch, prompt_views, sample_and_score

PASSES = ("clean", "positive", "negative")
VARIANTS = {"clean": "I", "positive": "I⁺", "negative": "I⁻"}

# Per-token columns: key in ``InspectedResponse.values``, and the paper's symbol.
COLUMNS = {
    "logp": "ℓ(I)",
    "logp_positive": "ℓ(I⁺)",
    "logp_negative": "ℓ(I⁻)",
    "d_positive": "D⁺",
    "d_negative": "D⁻",
    "entropy": "H(I)",
    "entropy_negative": "H(I⁻)",
    "entropy_shift": "ΔH",
    "contrastive": "CPL",
}

# The teacher-forced passes of a collated batch: ``{pass: (ℓ, H)}``, each ``[B, R]``.
Scorer = Callable[[Batch, tuple[str, ...]], dict[str, tuple[Tensor, Tensor]]]


@dataclass
class Sampled:
    """What the rollout and reward servers said about the inspected prompts: the trainer's sampling with
    I⁺ and I⁻ views, its rewards, and the greedy accuracy of each prompt on each image variant."""

    rollouts: list[PromptRollout]
    rewards: Rewards
    accuracy: dict[str, dict[str | None, float]]


@dataclass
class InspectedResponse:
    text: str
    tokens: list[str]
    reward: float
    advantage: float
    values: dict[str, list[float]]
    """One value per token for each of ``COLUMNS``."""
    selected: list[bool]
    trained: list[bool]


@dataclass
class InspectedPrompt:
    id: str
    group: str | None
    question: str
    answer: str
    images: dict[str, str]
    """The first image under each pass, as a data URL."""
    recipes: dict[str, str]
    """How each view was made: transform, parameters and seed."""
    accuracy: dict[str, float]
    """Greedy accuracy on each image variant."""
    responses: list[InspectedResponse]

    @property
    def selected_fraction(self) -> float:
        return _fraction([s for r in self.responses for s in r.selected])

    @property
    def trained_fraction(self) -> float:
        return _fraction([s for r in self.responses for s in r.trained])


def _fraction(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def sample(
    config: TrainConfig, replicas: RolloutReplicas, rewards: RewardClient, examples: list[Example], seed: int
) -> Sampled:
    """The training step's sampling of ``examples`` with both views, and greedy answers on I, I⁺ and I⁻."""
    rollouts, scored, _, _ = sample_and_score(config, replicas, rewards, examples, seed, PASSES)
    greedy = replicas.rollouts(
        [e.rollout_prompt(prompt_views(config, e, seed, PASSES)) for e in examples],
        lambda chunk: RolloutRequest(
            prompts=chunk,
            n=1,
            sampling=SamplingParams(temperature=0.0, max_tokens=config.rollout.max_tokens),
            views=RequestedViews(positive=None, negative=None),
            sample_on=list(PASSES),
        ),
    )
    accuracy = {
        variant: accuracies(config, rewards, examples, greedy, variant, by=lambda e: e.id)
        for variant in PASSES
    }
    return Sampled(rollouts, scored, accuracy)


def inspect_tokens(
    config: TrainConfig, processor: ProcessorMixin, score: Scorer, examples: list[Example], sampled: Sampled
) -> list[InspectedPrompt]:
    """Each prompt's responses, token by token, under the objective's own functions (one prompt per
    teacher-forced batch). ``score`` runs the passes: every rank must call this under ZeRO-3."""
    keep_all = config.model_copy(
        update={"train": config.train.model_copy(update={"drop_uniform_groups": False})}
    )
    batch = ScoredBatch(step=0, examples=examples, rollouts=sampled.rollouts, rewards=sampled.rewards)
    rows, _, _ = rows_with_advantages(processor, batch, PASSES, keep_all)
    tokenizer = processor.tokenizer
    inspected = []
    for example, rollout in zip(examples, sampled.rollouts, strict=True):
        own = [row for row in rows if row.prompt_id == example.id]
        responses = []
        if own:
            collated = collate(own, PASSES, tokenizer.pad_token_id)
            passes = score(collated, PASSES)
            logp = {name: values[0].float().cpu() for name, values in passes.items()}
            entropy = {name: values[1].float().cpu() for name, values in passes.items()}
            inputs = ObjectiveInputs(
                logp=logp,
                entropy=entropy,
                logp_old=logp["clean"],
                advantages=collated.advantages,
                response_mask=collated.response_mask,
            )
            tokens = perception_tokens(inputs, config.objective)
            columns = {
                "logp": logp["clean"],
                "logp_positive": logp["positive"],
                "logp_negative": logp["negative"],
                "d_positive": tokens.d_positive,
                "d_negative": tokens.d_negative,
                "entropy": entropy["clean"],
                "entropy_negative": entropy["negative"],
                "entropy_shift": tokens.entropy_shift,
                "contrastive": tokens.contrastive,
            }
            for i, row in enumerate(own):
                length = len(row.response_ids)
                responses.append(
                    InspectedResponse(
                        text=tokenizer.decode(row.response_ids, skip_special_tokens=False),
                        tokens=[tokenizer.decode([token]) for token in row.response_ids],
                        reward=row.reward,
                        advantage=row.advantage,
                        values={key: column[i, :length].tolist() for key, column in columns.items()},
                        selected=tokens.selected[i, :length].tolist(),
                        trained=tokens.trained[i, :length].tolist(),
                    )
                )
        inspected.append(
            InspectedPrompt(
                id=example.id,
                group=example.group,
                question=_question(example),
                answer=example.answer,
                images=_images(example, rollout),
                recipes={
                    VARIANTS[view.kind]: _recipe(view.spec.transform, view.spec.params, view.spec.seed)
                    for view in rollout.views
                    if view.image_index == 0
                },
                accuracy={VARIANTS[v]: sampled.accuracy[v].get(example.id, float("nan")) for v in PASSES},
                responses=responses,
            )
        )
    return inspected


def _question(example: Example) -> str:
    return " ".join(
        part.text for message in example.messages for part in message.content if getattr(part, "text", None)
    )


def _images(example: Example, rollout: PromptRollout) -> dict[str, str]:
    images = {}
    if example.images:
        images[VARIANTS["clean"]] = encode_image_data_url(example.images[0])
    for view in rollout.views:
        if view.image_index == 0:
            images[VARIANTS[view.kind]] = view.image_url
    return images


def _recipe(transform: str, params: dict, seed: int) -> str:
    shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items() if k != "image_size")
    return f"{transform}({shown}) seed {seed}" if shown else f"{transform} seed {seed}"


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple) and len(value) > 4:
        return f"[{len(value)} values]"
    return str(value)


def summary(prompts: list[InspectedPrompt]) -> dict[str, float]:
    """Reward, greedy accuracy on each variant, and the share of tokens selected and trained on."""
    responses = [r for p in prompts for r in p.responses]
    out = {"reward": sum(r.reward for r in responses) / max(1, len(responses))}
    for variant in VARIANTS.values():
        values = [p.accuracy[variant] for p in prompts if variant in p.accuracy]
        out[f"accuracy {variant}"] = sum(values) / max(1, len(values))
    out["tokens selected"] = _fraction([s for r in responses for s in r.selected])
    out["tokens trained on"] = _fraction([s for r in responses for s in r.trained])
    return out


def perception_figure(prompts: list[InspectedPrompt], max_responses: int = 8, max_tokens: int = 24):
    """The page's picture as a matplotlib figure, for TensorBoard and wandb: per prompt its three images
    and a grid of its first responses' tokens (rows), coloured by ΔH on one scale for the whole figure, the
    selected tokens outlined (solid: trained on; dashed: dropped by the advantage gate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from shared.images import ImageLimits, decode_image_url

    shifts = [abs(v) for p in prompts for r in p.responses[:max_responses] for v in r.values["entropy_shift"]]
    limit = max(shifts, default=0.0) or 1e-6
    figure, axes = plt.subplots(
        len(prompts), 4, figsize=(14, 2.6 * len(prompts) + 0.6), squeeze=False, width_ratios=[1, 1, 1, 3]
    )
    for row, prompt in zip(axes, prompts, strict=True):
        for axis, variant in zip(row[:3], VARIANTS.values(), strict=True):
            axis.axis("off")
            if variant in prompt.images:
                axis.imshow(decode_image_url(prompt.images[variant], ImageLimits()))
                axis.set_title(
                    f"{variant}: greedy acc {prompt.accuracy.get(variant, math.nan):.0f}", fontsize=9
                )
        grid = row[3]
        responses = prompt.responses[:max_responses]
        width = min(max((len(r.tokens) for r in responses), default=1), max_tokens)
        shift = torch.full((max(1, len(responses)), width), math.nan)
        for i, response in enumerate(responses):
            values = response.values["entropy_shift"][:width]
            shift[i, : len(values)] = torch.tensor(values)
        grid.imshow(shift.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
        for i, response in enumerate(responses):
            for t, token in enumerate(response.tokens[:width]):
                shown = "".join(c for c in token.strip() if c.isprintable())[:8] or "␣"
                grid.text(t, i, shown, ha="center", va="center", fontsize=7)
                if response.selected[t]:
                    style = "-" if response.trained[t] else "--"
                    grid.add_patch(
                        Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, linewidth=1.6, linestyle=style)
                    )
        grid.set_yticks(range(len(responses)), [f"r={r.reward:.2f} Â={r.advantage:+.2f}" for r in responses])
        grid.set_xticks([])
        grid.set_title(
            f"{prompt.id} ({prompt.group or '-'}), answer {prompt.answer}: tokens selected "
            f"{prompt.selected_fraction:.2f}, trained on {prompt.trained_fraction:.2f}",
            fontsize=9,
        )
    figure.suptitle(
        f"ΔH = H(I⁻) − H(I), blue −{limit:.2f} to red +{limit:.2f}; outlined: perception tokens "
        "(solid: trained on, dashed: Â ≤ 0)",
        fontsize=10,
    )
    figure.tight_layout()
    return figure
