"""Trainer pieces without servers: the teacher-forced passes, rows and batches, advantages, config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.images import encode_image_data_url
from shared.schemas import ChatMessage, ImagePart, ImageURL, PromptRollout, Sample, TextPart
from shared.tiny_model import build_tiny_model
from shared.vlm import load_model, load_processor
from trainer.data import Example
from trainer.engine import teacher_forced_logits
from trainer.experience import collate, make_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def _example(name: str, text: str, colour: tuple[int, int, int]) -> Example:
    image = Image.new("RGB", (64, 64), colour)
    parts = [
        ImagePart(type="image_url", image_url=ImageURL(url=encode_image_data_url(image))),
        TextPart(type="text", text=text),
    ]
    return Example(name, (ChatMessage(role="user", content=parts),), (image,), "red")


def _rollout(processor, example: Example, responses: list[list[int]]) -> PromptRollout:
    from trainer.experience import prompt_inputs

    ids = prompt_inputs(processor, example, {"clean": example.images})["clean"].input_ids.tolist()
    samples = [
        Sample(
            prompt_id=example.id,
            sample_index=i,
            token_ids=tokens,
            text="",
            logprobs=[0.0] * len(tokens),
            finish_reason="stop",
            policy_version=0,
        )
        for i, tokens in enumerate(responses)
    ]
    return PromptRollout(prompt_id=example.id, prompt_token_ids=ids, samples=samples)


def test_prefix_shared_passes_equal_full_sequence_passes(tiny):
    """One pass per prompt plus cached continuations gives the logits of a pass per whole sequence."""
    processor = load_processor(tiny)
    model = load_model(tiny, dtype=torch.float32).eval()
    examples = [
        _example("a", "What colour is the shape?", (200, 30, 30)),
        _example("b", "Tell me, in one word, what colour fills this picture?", (30, 30, 200)),
    ]
    # Ordinary words: a vision placeholder in a response would break the reference pass itself.
    words = processor.tokenizer("red green blue yellow purple orange circle square left right").input_ids
    responses = {"a": [words[0:4], words[4:5]], "b": [words[5:7], words[1:4], words[6:10]]}
    rollouts = [_rollout(processor, e, responses[e.id]) for e in examples]
    rewards = {(e.id, i): (0.0, {}) for e in examples for i in range(len(responses[e.id]))}
    rows = make_rows(processor, examples, rollouts, rewards, ["clean"], seed=0)
    batch = collate(rows, ["clean"], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        shared = teacher_forced_logits(
            model, batch.inputs["clean"], batch.owner, batch.response_ids, torch.float32
        )
        for b, row in enumerate(rows):
            prompt = row.prompt["clean"]
            ids = torch.cat([prompt.input_ids, torch.tensor(row.response_ids)])[None]
            types = torch.cat(
                [prompt.mm_token_type_ids, torch.zeros(len(row.response_ids), dtype=torch.long)]
            )
            full = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=types[None],
                pixel_values=prompt.pixel_values,
                image_grid_thw=prompt.image_grid_thw,
            ).logits[0]
            length = len(row.response_ids)
            expected = full[len(prompt.input_ids) - 1 : len(prompt.input_ids) - 1 + length]
            torch.testing.assert_close(shared[b, :length], expected, atol=1e-5, rtol=1e-5)
