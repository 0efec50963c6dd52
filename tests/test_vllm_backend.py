"""The vLLM backend on the tiny Qwen2.5-VL: sampling, log-probs against teacher forcing, weight swaps.

Runs only where vLLM is installed (`make test-vllm`, the `.venv-vllm` virtualenv). One engine serves
the whole module: it takes ~30-60 s to start on two CPU cores. float32 throughout, so that vLLM's
log-probs can be held to those of a transformers forward pass over the same tokens.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rollout_server.backend import (
    Generation,
    GenerationRequest,
    PromptTooLongError,
    SamplingSpec,
    WeightsLoadError,
)
from rollout_server.vllm_backend import VLLMBackend
from shared import synth_data
from shared.vlm import VISION_PLACEHOLDER_TOKENS, load_model, load_processor, suppressed_token_ids
from trainer.objective import logprobs_and_entropy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# vLLM's float32 CPU kernels and transformers' eager float32 agree to ~1e-6 per token (measured);
# 1e-4 leaves room for other CPUs' GEMM blocking without hiding any real mismatch, which is O(0.01-1).
LOGPROB_TOLERANCE = 1e-4
MAX_MODEL_LEN = 1024
TEMPERATURE = 0.7

Run = Callable[[Coroutine[Any, Any, Any]], Any]


def _prompt(question: str, num_images: int) -> str:
    """A rendered chat prompt, as the service hands it to a backend."""
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def images() -> tuple[Image.Image, Image.Image]:
    first, second = synth_data.generate("train", 2, seed=11)
    # Different sizes and aspect ratios: 4 and 12 image tokens, so M-RoPE positions are exercised.
    return first.image.resize((64, 64)), second.image.resize((112, 84))


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    """One event loop for the module: the engine's output task lives on the loop that started it."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module")
def backend(model_dirs, run) -> Iterator[VLLMBackend]:
    backend = VLLMBackend(
        str(model_dirs[0]),
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        # On the CPU backend this is the share of the NUMA node's memory; the KV cache comes out of it.
        gpu_memory_utilization=0.3,
        max_num_seqs=32,
    )
    run(backend.start())
    yield backend
    run(backend.close())


@pytest.fixture(scope="module")
def teachers(model_dirs) -> dict[Path, Any]:
    return {path: load_model(path, dtype=torch.float32).eval() for path in model_dirs}


@pytest.fixture(scope="module")
def processor(model_dirs):
    return load_processor(model_dirs[0])


def _generate(run: Run, backend: VLLMBackend, prompt: str, images, n: int = 1, **sampling) -> Generation:
    return run(backend.generate(GenerationRequest(prompt, tuple(images), n, SamplingSpec(**sampling))))


def _blocked_ids(backend: VLLMBackend) -> list[int]:
    return suppressed_token_ids(backend.tokenizer)


def _teacher_logits(model, processor, prompt: str, images, response: list[int]) -> torch.Tensor:
    """[len(response), vocab] logits of a transformers forward pass over prompt + response."""
    inputs = processor(text=[prompt], images=list(images), return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    response_ids = torch.tensor([response])
    with torch.no_grad():
        logits = model(
            input_ids=torch.cat([inputs["input_ids"], response_ids], dim=1),
            attention_mask=torch.ones(1, prompt_len + len(response), dtype=torch.long),
            # Without mm_token_type_ids the response tokens' M-RoPE positions come out wrong.
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(response_ids)], dim=1),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
    return logits[0, prompt_len - 1 : prompt_len - 1 + len(response)].float()


def _sampled_logprobs(logits: torch.Tensor, tokens: list[int], temperature: float) -> torch.Tensor:
    logp, _ = logprobs_and_entropy(logits.unsqueeze(0), torch.tensor([tokens]), temperature)
    return logp[0]


def _without(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    masked = logits.clone()
    masked[:, token_ids] = -math.inf
    return masked


# --- sampling ------------------------------------------------------------------------------------


def test_n_samples_with_aligned_tokens_logprobs_and_top_logprobs(backend, run, images):
    generation = _generate(
        run,
        backend,
        _prompt("What colour is the shape?", 1),
        images[:1],
        n=3,
        max_tokens=6,
        top_logprobs=2,
        seed=1,
    )
    assert len(generation.samples) == 3
    for sample in generation.samples:
        assert 1 <= len(sample.token_ids) <= 6
        assert len(sample.logprobs) == len(sample.token_ids)
        assert all(math.isfinite(value) and value <= 0.0 for value in sample.logprobs)
        assert sample.top_logprobs is not None and len(sample.top_logprobs) == len(sample.token_ids)
        for token, logprob, top in zip(sample.token_ids, sample.logprobs, sample.top_logprobs, strict=True):
            assert len(top) == 2
            # The sampled token is among the top 2 exactly when its log-prob reaches the 2nd best.
            assert (token in top) == (logprob >= min(top.values()))
            assert max(top.values()) >= logprob
        assert sample.finish_reason in ("stop", "length")
    # Under top-k, tokens outside the k have probability 0 and are not listed.
    narrow = _generate(
        run,
        backend,
        _prompt("What colour?", 1),
        images[:1],
        n=2,
        max_tokens=4,
        top_k=2,
        top_logprobs=5,
        seed=1,
    )
    for sample in narrow.samples:
        for token, top in zip(sample.token_ids, sample.top_logprobs or [], strict=True):
            assert token in top and len(top) == 2 and all(math.isfinite(v) for v in top.values())
            assert sum(math.exp(v) for v in top.values()) == pytest.approx(1.0, abs=1e-5)
    # Without top_logprobs there are none.
    plain = _generate(run, backend, _prompt("What colour?", 1), images[:1], n=1, max_tokens=3, seed=1)
    assert plain.samples[0].top_logprobs is None


def test_max_tokens_ends_with_length_and_eos_ends_with_stop(backend, run, images):
    eos = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = _generate(run, backend, _prompt("Describe it.", 1), images[:1], n=8, max_tokens=5, seed=3)
    reasons = [sample.finish_reason for sample in generation.samples]
    assert "length" in reasons
    for sample in generation.samples:
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == 5 and eos not in sample.token_ids
        else:
            # The end token is part of token_ids (it was sampled, and has a log-prob) but not of text.
            assert sample.finish_reason == "stop" and sample.token_ids[-1] == eos
            assert "<|im_end|>" not in sample.text


def test_eos_is_kept_in_token_ids_and_dropped_from_text(backend, run, images):
    eos = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # ~1/576 per token on the random model: 16 samples of up to 600 tokens end by EOS almost surely.
    generation = _generate(run, backend, _prompt("Describe it.", 1), images[:1], n=16, max_tokens=600, seed=5)
    stopped = [sample for sample in generation.samples if sample.finish_reason == "stop"]
    assert stopped
    for sample in stopped:
        assert sample.token_ids[-1] == eos and eos not in sample.token_ids[:-1]
        decoded = backend.tokenizer.decode(sample.token_ids[:-1], skip_special_tokens=True)
        # vLLM's incremental detokenizer withholds a trailing incomplete UTF-8 sequence, which a
        # one-shot decode renders as U+FFFD.
        assert decoded.startswith(sample.text) and not decoded[len(sample.text) :].strip("\ufffd")


def test_stop_string_cuts_the_text_and_gives_stop(backend, run, images):
    prompt = _prompt("Where is the shape?", 1)
    full = _generate(run, backend, prompt, images[:1], max_tokens=40, seed=7).samples[0]
    tokenizer = backend.tokenizer
    # A whole word from the middle of the response, so that the stop string ends on a token boundary.
    pieces = [tokenizer.decode([token]) for token in full.token_ids]
    stop = next(
        piece.strip()
        for index, piece in enumerate(pieces)
        if index >= 3 and len(piece.strip()) >= 3 and piece.strip().isalpha()
    )
    expected_text = full.text[: full.text.index(stop)]

    cut = _generate(run, backend, prompt, images[:1], max_tokens=40, seed=7, stop=(stop,)).samples[0]
    assert cut.finish_reason == "stop"
    assert cut.text == expected_text and stop not in cut.text
    # The same seed samples the same tokens up to the stop; the token completing the stop string is kept.
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids)
    assert stop not in tokenizer.decode(cut.token_ids[:-1])
    assert cut.logprobs == pytest.approx(full.logprobs[: len(cut.token_ids)], abs=LOGPROB_TOLERANCE)


def test_same_seed_same_samples_other_seed_other_samples(backend, run, images):
    prompt = _prompt("What colour is the shape?", 1)
    first = _generate(run, backend, prompt, images[:1], n=2, max_tokens=12, seed=21)
    again = _generate(run, backend, prompt, images[:1], n=2, max_tokens=12, seed=21)
    other = _generate(run, backend, prompt, images[:1], n=2, max_tokens=12, seed=22)
    tokens = [sample.token_ids for sample in first.samples]
    assert tokens == [sample.token_ids for sample in again.samples]
    for one, other_one in zip(first.samples, again.samples, strict=True):
        assert one.logprobs == pytest.approx(other_one.logprobs, abs=LOGPROB_TOLERANCE)
    assert tokens[0] != tokens[1]  # the n samples of one request are not copies of each other
    # vLLM seeds sample i of a request with seed + i, so compare sample 0 to sample 0 only.
    assert tokens[0] != other.samples[0].token_ids


def test_greedy_is_the_argmax_and_ignores_the_seed(backend, run, images, teachers, processor, model_dirs):
    prompt = _prompt("What colour is the shape?", 1)
    first = _generate(run, backend, prompt, images[:1], max_tokens=10, temperature=0.0, seed=1).samples[0]
    second = _generate(run, backend, prompt, images[:1], max_tokens=10, temperature=0.0, seed=2).samples[0]
    assert first.token_ids == second.token_ids
    logits = _without(
        _teacher_logits(teachers[model_dirs[0]], processor, prompt, images[:1], first.token_ids),
        _blocked_ids(backend),
    )
    assert first.token_ids == logits.argmax(dim=-1).tolist()
    # Greedy log-probs are of the untempered distribution.
    expected = _sampled_logprobs(logits, first.token_ids, 1.0)
    assert first.logprobs == pytest.approx(expected.tolist(), abs=LOGPROB_TOLERANCE)


def test_blocked_special_tokens_are_never_sampled(backend, run, images):
    blocked = set(_blocked_ids(backend))
    assert len(blocked) == len(VISION_PLACEHOLDER_TOKENS)
    # At temperature 2 the random model puts ~5/576 of its mass on them: ~9 expected in 1024 tokens.
    generation = _generate(
        run, backend, _prompt("Describe it.", 1), images[:1], n=16, max_tokens=64, temperature=2.0, seed=9
    )
    sampled = [token for sample in generation.samples for token in sample.token_ids]
    assert len(sampled) > 600
    assert not blocked & set(sampled)


# --- what the engine saw, and log-probs ---------------------------------------------------------


def test_prompt_token_ids_are_the_processors_input_ids(backend, run, images, processor):
    prompt = _prompt("Which shape is bigger?", 2)
    generation = _generate(run, backend, prompt, images, max_tokens=2, seed=0)
    expected = processor(text=[prompt], images=list(images), return_tensors="pt")["input_ids"][0].tolist()
    assert generation.prompt_token_ids == expected
    image_pad = backend.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert generation.prompt_token_ids.count(image_pad) == 4 + 12


@pytest.mark.parametrize(("temperature", "top_k"), [(TEMPERATURE, -1), (1.0, 40)])
def test_logprobs_match_a_teacher_forced_pass(
    backend, run, images, teachers, processor, model_dirs, temperature, top_k
):
    prompt = _prompt("Which shape is bigger?", 2)
    generation = _generate(
        run, backend, prompt, images, n=2, max_tokens=24, temperature=temperature, top_k=top_k, seed=13
    )
    blocked = _blocked_ids(backend)
    for sample in generation.samples:
        logits = _teacher_logits(teachers[model_dirs[0]], processor, prompt, images, sample.token_ids)
        # The distribution vLLM sampled from: blocked tokens removed, then the top k kept.
        sampled_from = _without(logits, blocked) / temperature
        if top_k > 0:
            kth = sampled_from.topk(top_k, dim=-1).values[:, -1:]
            sampled_from = sampled_from.masked_fill(sampled_from < kth, -math.inf)
        expected = _sampled_logprobs(sampled_from, sample.token_ids, 1.0)
        got = torch.tensor(sample.logprobs)
        assert (got - expected).abs().max().item() < LOGPROB_TOLERANCE
        if top_k < 0:
            # Against the unmasked full-vocabulary softmax, the gap is exactly the
            # renormalisation over the unblocked tokens: -log(1 - p_blocked), per step.
            full = _sampled_logprobs(logits, sample.token_ids, temperature)
            p_blocked = torch.softmax(logits / temperature, dim=-1)[:, blocked].sum(-1)
            gap = got - full
            assert gap.tolist() == pytest.approx((-torch.log1p(-p_blocked)).tolist(), abs=LOGPROB_TOLERANCE)
            assert gap.min().item() > 1e-3  # the random model gives blocked tokens real mass


def test_prompt_too_long_and_too_many_images_are_refused(backend, run, images):
    with pytest.raises(PromptTooLongError):
        _generate(run, backend, _prompt("red " * MAX_MODEL_LEN, 1), images[:1], max_tokens=4)
    with pytest.raises(ValueError, match="at most"):
        _generate(run, backend, _prompt("?", 5), images[:1] * 5, max_tokens=4)
    # The engine still serves.
    assert _generate(run, backend, _prompt("?", 1), images[:1], max_tokens=2, seed=0).samples


def test_cancelling_generate_aborts_the_request(backend, run, images):
    engine = backend.engine

    async def start_then_cancel() -> tuple[bool, int]:
        request = GenerationRequest(
            _prompt("Describe it.", 1), images[:1], 8, SamplingSpec(max_tokens=900, seed=17)
        )
        task = asyncio.create_task(backend.generate(request))
        deadline = time.monotonic() + 60
        while engine.get_num_unfinished_requests() == 0:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # a few decoding steps in
        running_when_cancelled = not task.done()
        unfinished_before = engine.get_num_unfinished_requests()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while engine.get_num_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return running_when_cancelled, unfinished_before

    running_when_cancelled, unfinished_before = run(start_then_cancel())
    assert running_when_cancelled and unfinished_before > 0
    assert engine.get_num_unfinished_requests() == 0
    assert _generate(run, backend, _prompt("?", 1), images[:1], max_tokens=2, seed=0).samples


# --- weights -------------------------------------------------------------------------------------


def _max_gap_to_teacher(generation: Generation, teacher, processor, prompt, images, blocked) -> float:
    gaps = []
    for sample in generation.samples:
        logits = _without(_teacher_logits(teacher, processor, prompt, images, sample.token_ids), blocked)
        expected = _sampled_logprobs(logits, sample.token_ids, TEMPERATURE)
        gaps.append((torch.tensor(sample.logprobs) - expected).abs().max().item())
    return max(gaps)


def test_load_weights_swaps_the_model_and_failed_loads_keep_the_old_one(
    backend, run, images, teachers, processor, model_dirs, tmp_path
):
    old_dir, new_dir = model_dirs
    prompt = _prompt("What colour is the shape?", 1)
    blocked = _blocked_ids(backend)

    def sample() -> Generation:
        return _generate(
            run, backend, prompt, images[:1], n=2, max_tokens=16, temperature=TEMPERATURE, seed=31
        )

    def gaps(generation: Generation) -> tuple[float, float]:
        return tuple(
            _max_gap_to_teacher(generation, teachers[path], processor, prompt, images[:1], blocked)
            for path in (old_dir, new_dir)
        )

    before = sample()
    to_old, to_new = gaps(before)
    assert to_old < LOGPROB_TOLERANCE < 0.01 < to_new
    try:
        run(backend.load_weights(new_dir))
        swapped = sample()
        to_old, to_new = gaps(swapped)
        assert to_new < LOGPROB_TOLERANCE < 0.01 < to_old

        # A truncated file is refused before any weight is touched.
        truncated = tmp_path / "truncated"
        shutil.copytree(old_dir, truncated)
        weights = truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        with pytest.raises(WeightsLoadError, match="safetensors"):
            run(backend.load_weights(truncated))
        assert _same(sample(), swapped)

        # A file that reads but does not fit fails half-way through vLLM's reload; the backend
        # puts the serving weights back.
        misshapen = tmp_path / "misshapen"
        shutil.copytree(old_dir, misshapen)
        weights = misshapen / "model.safetensors"
        tensors = load_file(weights)
        victim = next(name for name in sorted(tensors) if name.endswith("layers.1.mlp.down_proj.weight"))
        tensors[victim] = torch.zeros(3, 3)
        save_file(tensors, weights, metadata={"format": "pt"})
        with pytest.raises(WeightsLoadError, match="keep serving"):
            run(backend.load_weights(misshapen))
        assert _same(sample(), swapped)

        with pytest.raises(WeightsLoadError, match="not a directory"):
            run(backend.load_weights(tmp_path / "missing"))
    finally:
        run(backend.load_weights(old_dir))
    assert _same(sample(), before)


def _same(first: Generation, second: Generation) -> bool:
    """Same tokens, and log-probs equal up to float noise (a prefix-cache hit reorders some sums)."""
    return len(first.samples) == len(second.samples) and all(
        one.token_ids == two.token_ids
        and all(abs(a - b) < LOGPROB_TOLERANCE for a, b in zip(one.logprobs, two.logprobs, strict=True))
        for one, two in zip(first.samples, second.samples, strict=True)
    )
