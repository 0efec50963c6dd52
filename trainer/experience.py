"""From rollouts and rewards to the tensors of the update: one row per sampled response.

Each row keeps the prompt's inputs for every teacher-forced pass its algorithm runs (on the clean image, I⁺,
I⁻, or PAPO's masked view), made locally by the model's processor from the images the rollout server
returned, so that the passes see exactly the pixels the views were defined by. Rows are batched with the
prompt left-padded and the response right-padded, so every response starts at the same column and the
logits are only computed over the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from transformers import ProcessorMixin

from shared.images import ImageLimits, decode_image_url
from shared.perturbations import perturb
from shared.schemas import PromptRollout, Sample
from shared.vlm import chat_template_messages, processed_size
from trainer.config import TrainConfig
from trainer.data import Example
from trainer.objective import grpo_advantages
from trainer.rollouts import ScoredBatch, step_seed

# A prompt's images for each teacher-forced pass, by pass name; "clean" is always there.
PassImages = dict[str, tuple[Image.Image, ...]]


class ExperienceError(ValueError):
    """A rollout that the trainer cannot turn into training rows."""


@dataclass
class PromptInputs:
    """A prompt's processor outputs under one pass's images (batch dimension 1)."""

    input_ids: Tensor
    mm_token_type_ids: Tensor
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None


@dataclass
class Row:
    """One sampled response and everything the update needs about it."""

    prompt_id: str
    prompt: dict[str, PromptInputs]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    group: str | None = None
    advantage: float = 0.0


def pass_images(
    processor: ProcessorMixin, example: Example, rollout: PromptRollout, passes: Sequence[str], seed: int
) -> PassImages:
    """The prompt's images for each pass: clean from the dataset, I⁺/I⁻ as the server made them, and PAPO's
    masked view made here (deterministic given the seed).

    The masked view is made at the size the processor resizes to, so that its 14-pixel patches are the
    vision tower's patches, as in PAPO; the processor then leaves its size as it is.
    """
    images: PassImages = {"clean": example.images}
    limits = ImageLimits()
    for kind in ("positive", "negative"):
        if kind not in passes:
            continue
        made = sorted((v for v in rollout.views if v.kind == kind), key=lambda v: v.image_index)
        if len(made) != len(example.images):
            raise ExperienceError(
                f"prompt {rollout.prompt_id}: the server returned {len(made)} {kind} views "
                f"for {len(example.images)} images"
            )
        images[kind] = tuple(decode_image_url(view.image_url, limits) for view in made)
    if "masked" in passes:
        resized = [
            image.resize(processed_size(processor, image), Image.Resampling.BICUBIC)
            for image in example.images
        ]
        images["masked"] = tuple(perturb(image, "masked", seed + i)[0] for i, image in enumerate(resized))
    return images


def prompt_inputs(processor: ProcessorMixin, example: Example, images: PassImages) -> dict[str, PromptInputs]:
    """Processor outputs of the prompt for each pass; the token ids are the same in every pass."""
    text = processor.tokenizer.apply_chat_template(
        chat_template_messages(example.messages), tokenize=False, add_generation_prompt=True
    )
    made = {}
    for name, seen in images.items():
        out = processor(text=[text], images=list(seen) or None, return_tensors="pt")
        made[name] = PromptInputs(
            input_ids=out["input_ids"][0],
            mm_token_type_ids=out.get("mm_token_type_ids", torch.zeros_like(out["input_ids"]))[0],
            pixel_values=out.get("pixel_values"),
            image_grid_thw=out.get("image_grid_thw"),
        )
    return made


def make_rows(
    processor: ProcessorMixin,
    examples: Sequence[Example],
    rollouts: Sequence[PromptRollout],
    rewards: dict[tuple[str, int], tuple[float, dict[str, float]]],
    passes: Sequence[str],
    seed: int,
) -> list[Row]:
    """One row per clean-image sample, with its reward; the prompt's tokens are checked against the
    server's, since a tokenizer mismatch would silently train on different sequences."""
    rows = []
    for index, (example, rollout) in enumerate(zip(examples, rollouts, strict=True)):
        inputs = prompt_inputs(
            processor, example, pass_images(processor, example, rollout, passes, seed + 1000 * index)
        )
        if inputs["clean"].input_ids.tolist() != rollout.prompt_token_ids:
            raise ExperienceError(
                f"prompt {rollout.prompt_id}: the trainer's prompt tokens differ from the rollout server's; "
                "do both load the same tokenizer and chat template?"
            )
        for sample in _clean_samples(rollout):
            reward, _ = rewards[(rollout.prompt_id, sample.sample_index)]
            rows.append(
                Row(
                    prompt_id=rollout.prompt_id,
                    prompt=inputs,
                    response_ids=list(sample.token_ids),
                    rollout_logprobs=list(sample.logprobs),
                    reward=reward,
                    group=example.group,
                )
            )
    return rows


def _clean_samples(rollout: PromptRollout) -> list[Sample]:
    return [s for s in rollout.samples if s.sampled_on == "clean" and s.token_ids]


@dataclass
class Batch:
    """Rows collated for the teacher-forced passes.

    The prompts are stored once each (``inputs[pass]``: left-padded ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, and the images), and ``owner[b]`` says which prompt row ``b`` answers: the
    passes run each prompt once and continue it with all of its responses. Response tensors are ``[B, R]``.
    """

    inputs: dict[str, dict[str, Tensor]]
    owner: Tensor
    response_ids: Tensor
    response_mask: Tensor
    rollout_logprobs: Tensor
    advantages: Tensor


def collate(rows: Sequence[Row], passes: Sequence[str], pad_id: int) -> Batch:
    """Left-pad the prompts and right-pad the responses, so that the responses share their columns."""
    prompts: dict[int, int] = {}
    for row in rows:
        prompts.setdefault(id(row.prompt), len(prompts))
    unique = list({id(row.prompt): row.prompt for row in rows}.values())
    owner = torch.tensor([prompts[id(row.prompt)] for row in rows], dtype=torch.long)
    width_prompt = max(len(p["clean"].input_ids) for p in unique)
    width_response = max(len(r.response_ids) for r in rows)
    response = torch.full((len(rows), width_response), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width_response), dtype=torch.bool)
    logprobs = torch.zeros((len(rows), width_response))
    for i, row in enumerate(rows):
        length = len(row.response_ids)
        response[i, :length] = torch.tensor(row.response_ids)
        mask[i, :length] = True
        logprobs[i, :length] = torch.tensor(row.rollout_logprobs)
    inputs = {}
    for name in passes:
        ids, types, attention, pixels, grids = [], [], [], [], []
        for prompt in (p[name] for p in unique):
            pad = width_prompt - len(prompt.input_ids)
            ids.append(torch.cat([torch.full((pad,), pad_id), prompt.input_ids]))
            types.append(torch.cat([torch.zeros(pad, dtype=torch.long), prompt.mm_token_type_ids]))
            attention.append(
                torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones_like(prompt.input_ids)])
            )
            if prompt.pixel_values is not None and prompt.image_grid_thw is not None:
                pixels.append(prompt.pixel_values)
                grids.append(prompt.image_grid_thw)
        inputs[name] = {
            "input_ids": torch.stack(ids),
            "attention_mask": torch.stack(attention),
            "mm_token_type_ids": torch.stack(types),
        }
        if pixels:
            inputs[name] |= {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}
    advantages = torch.tensor([row.advantage for row in rows], dtype=torch.float32)
    return Batch(inputs, owner, response, mask, logprobs, advantages)


def rows_with_advantages(
    processor, batch: ScoredBatch, passes: tuple[str, ...], config: TrainConfig
) -> tuple[list[Row], int, Row]:
    """Training rows with Â = grpo_advantages per prompt (groups of equal rewards dropped if asked), the
    number dropped, and a row to run zero-weight passes on if this rank has none left."""
    seed = step_seed(config.seed, batch.step, 2)
    rows = make_rows(processor, batch.examples, batch.rollouts, batch.rewards, passes, seed)
    kept, dropped = [], 0
    for prompt_id in dict.fromkeys(row.prompt_id for row in rows):
        group = [row for row in rows if row.prompt_id == prompt_id]
        rewards = torch.tensor([[row.reward for row in group]])
        if config.train.drop_uniform_groups and bool((rewards == rewards[0, 0]).all()):
            dropped += 1
            continue
        for row, advantage in zip(group, grpo_advantages(rewards)[0].tolist(), strict=True):
            row.advantage = advantage
        kept.extend(group)
    return kept, dropped, rows[0]
