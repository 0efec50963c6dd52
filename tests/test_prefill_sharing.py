"""The transformers backend prefills each prompt once for its ``n`` samples and lets requests join a batch
that is already decoding; every sample must still be the one its own uncached, unbatched forward passes
give with the same seed: the same tokens, and log-probs within float noise."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from rollout_server.backend import Generation, GenerationRequest, SamplingSpec
from rollout_server.transformers_backend import TransformersBackend, _Row, draw, sample_seed


def _prompt(backend: TransformersBackend, question: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def _image(size: tuple[int, int], colour: str) -> Image.Image:
    return Image.new("RGB", size, colour)


def reference(
    backend: TransformersBackend, request: GenerationRequest
) -> list[tuple[list[int], list[float]]]:
    """Each sample on its own: the whole sequence through the model at every step (no cache, no padding,
    positions as the model computes them), its token drawn with the sample's own seeded generator."""
    inputs = backend._prepare(request.prompt, request.images)
    samples = []
    for index in range(request.n):
        generator = torch.Generator().manual_seed(sample_seed(request.sampling.seed, index))
        row = _Row(request.sampling, generator)
        while not row.tokens or (
            row.tokens[-1] not in backend.eos_ids and len(row.tokens) < request.sampling.max_tokens
        ):
            drawn = torch.tensor([row.tokens], dtype=torch.long)
            input_ids = torch.cat([inputs["input_ids"], drawn], dim=1)
            sequence = {
                **inputs,
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(drawn)], dim=1),
            }
            with torch.no_grad():
                logits = backend.model(**sequence, use_cache=False).logits[:, -1]
            draw([row], logits, backend.suppressed_ids)
        samples.append((row.tokens, row.logprobs))
    return samples


def assert_matches_reference(
    backend: TransformersBackend, request: GenerationRequest, generation: Generation
) -> None:
    expected = reference(backend, request)
    assert [sample.token_ids for sample in generation.samples] == [tokens for tokens, _ in expected]
    for sample, (_, logprobs) in zip(generation.samples, expected, strict=True):
        assert sample.logprobs == pytest.approx(logprobs, abs=1e-5)


def run(tiny: Path, scenario: Callable[[TransformersBackend, list[int]], Awaitable[None]]) -> None:
    """``scenario`` against a started backend, with the sizes of its decoding steps as they happen."""

    async def main() -> None:
        steps: list[int] = []
        backend = TransformersBackend(str(tiny), max_wait_ms=50, observe_batch=steps.append)
        await backend.start()
        try:
            await scenario(backend, steps)
        finally:
            await backend.close()

    asyncio.run(main())


def test_concurrent_requests_share_one_prefill_and_sample_as_alone(tiny):
    async def scenario(backend: TransformersBackend, steps: list[int]) -> None:
        # Prompts of different lengths (images of 4 and 8 tokens, two images, none), every kind of sampling.
        requests = [
            GenerationRequest(
                _prompt(backend, "What colour is the shape?", 1),
                (_image((64, 64), "red"),),
                3,
                SamplingSpec(temperature=1.0, max_tokens=8, seed=1),
            ),
            GenerationRequest(
                _prompt(backend, "Which is larger, and by how much?", 2),
                (_image((112, 56), "blue"), _image((64, 64), "green")),
                2,
                SamplingSpec(temperature=0.0, max_tokens=6),
            ),
            GenerationRequest(
                _prompt(backend, "Say something.", 0),
                (),
                3,
                SamplingSpec(temperature=1.5, top_p=0.9, top_k=20, max_tokens=7, seed=2, top_logprobs=2),
            ),
        ]
        generations = await asyncio.gather(*(backend.generate(request) for request in requests))
        assert steps[0] == 3 + 2 + 3, "the three requests were prefilled in one step"
        for request, generation in zip(requests, generations, strict=True):
            assert_matches_reference(backend, request, generation)

    run(tiny, scenario)


def test_a_request_joins_a_batch_that_is_decoding(tiny):
    async def scenario(backend: TransformersBackend, steps: list[int]) -> None:
        long = GenerationRequest(
            _prompt(backend, "Tell a long story about the shape.", 1),
            (_image((64, 64), "red"),),
            2,
            SamplingSpec(temperature=1.0, max_tokens=48, seed=3),
        )
        short = GenerationRequest(
            _prompt(backend, "Colour?", 1),
            (_image((112, 56), "blue"),),
            3,
            SamplingSpec(temperature=1.0, max_tokens=5, seed=4),
        )
        running = asyncio.create_task(backend.generate(long))
        while not steps:
            await asyncio.sleep(0.001)
        joined = await backend.generate(short)
        assert 2 + 3 in steps, f"the short request never decoded beside the long one: {steps}"
        assert_matches_reference(backend, short, joined)
        assert_matches_reference(backend, long, await running)

    run(tiny, scenario)


def test_a_cancelled_request_leaves_the_batch_and_the_rest_is_unchanged(tiny):
    async def scenario(backend: TransformersBackend, steps: list[int]) -> None:
        kept = GenerationRequest(
            _prompt(backend, "Describe the shape.", 1),
            (_image((64, 64), "red"),),
            2,
            SamplingSpec(temperature=1.0, max_tokens=32, seed=5),
        )
        dropped = GenerationRequest(
            _prompt(backend, "And this one?", 1),
            (_image((64, 64), "blue"),),
            4,
            SamplingSpec(temperature=1.0, max_tokens=32, seed=6),
        )
        task_kept = asyncio.create_task(backend.generate(kept))
        task_dropped = asyncio.create_task(backend.generate(dropped))
        while len(steps) < 3:
            await asyncio.sleep(0.001)
        task_dropped.cancel()
        generation = await task_kept
        assert task_dropped.cancelled()
        assert steps[0] == 6 and steps[-1] <= 2, steps
        assert_matches_reference(backend, kept, generation)

    run(tiny, scenario)
