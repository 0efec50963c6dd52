"""The trainer's HTTP clients under outages: Retry-After honoured, a restart ridden out, and past the outage
budget a clear error naming the setting."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from servers import app_in_a_thread, running_server

from shared.launch import free_port
from shared.schemas import (
    PromptRollout,
    RolloutPrompt,
    RolloutRequest,
    RolloutResponse,
    SamplingParams,
    ScoreItem,
    ScoreResponse,
    ScoreResult,
)
from shared.tiny_model import build_tiny_model
from trainer.clients import ReplicaError, RewardClient, RolloutReplicas

ITEM = ScoreItem(id="a", response="7", ground_truth="7", reward="exact")


@pytest.fixture
def busy_then_ready() -> Iterator[tuple[str, list[float]]]:
    """A reward endpoint that answers 429 with Retry-After: 1 once, then scores; it records when it was
    asked."""
    asked: list[float] = []
    app = FastAPI()

    @app.post("/v1/score")
    async def score() -> JSONResponse:
        asked.append(time.monotonic())
        if len(asked) == 1:
            return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"Retry-After": "1"})
        result = ScoreResult(id="a", reward=1.0, components={"exact": 1.0}, status="ok")
        return JSONResponse(ScoreResponse(results=[result]).model_dump())

    with app_in_a_thread(app) as port:
        yield f"http://127.0.0.1:{port}", asked


def test_a_429s_retry_after_is_honoured(busy_then_ready):
    url, asked = busy_then_ready
    client = RewardClient(url, None, timeout_s=10, outage_s=30)
    assert [r.reward for r in client.score([ITEM])] == [1.0]
    # Asked twice, the second time after the second the server asked for (the backoff alone starts at 0.2 s).
    assert len(asked) == 2 and asked[1] - asked[0] >= 0.95


def test_a_replica_that_sheds_load_is_waited_for_not_set_aside():
    """Busy for longer than its attempts allow (attempts=2, three 429s): still asked, since it is alive."""
    asked: list[float] = []
    app = FastAPI()

    @app.post("/v1/rollouts")
    async def rollouts() -> JSONResponse:
        asked.append(time.monotonic())
        if len(asked) <= 3:
            return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"Retry-After": "1"})
        rollout = PromptRollout(prompt_id="p", prompt_token_ids=[1], samples=[])
        return JSONResponse(RolloutResponse(policy_version=0, prompts=[rollout]).model_dump())

    prompt = RolloutPrompt(prompt_id="p", messages=[{"role": "user", "content": "hi"}])
    with app_in_a_thread(app) as port:
        replicas = RolloutReplicas([f"http://127.0.0.1:{port}"], None, None, 60, attempts=2, outage_s=0)
        answered = replicas.rollouts([prompt], lambda chunk: RolloutRequest(prompts=chunk))
    assert [r.prompt_id for r in answered] == ["p"] and len(asked) == 4 and replicas.dead == {}


def test_past_its_outage_budget_a_client_names_the_setting():
    nowhere = f"http://127.0.0.1:{free_port()}"
    replicas = RolloutReplicas([nowhere], None, None, timeout_s=5, attempts=1, outage_s=1)
    request = RolloutRequest(
        prompts=[RolloutPrompt(prompt_id="p", messages=[{"role": "user", "content": "hi"}])]
    )
    with pytest.raises(ReplicaError, match=r"rollout\.outage_s = 1 s"):
        replicas.rollouts(request.prompts, lambda chunk: request.model_copy(update={"prompts": chunk}))
    with pytest.raises(ReplicaError, match="none came back"):
        replicas.publish(3, path="/nowhere", tensors=None)


def test_a_replica_that_is_ready_but_fails_every_publication_is_given_up_on_after_the_outage_budget():
    """Up (``/ready`` answers 200) but failing (a 503 on every weights request): asked again until
    rollout.outage_s, then a clear error, not forever."""
    asked: list[float] = []
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/weights")
    async def weights() -> JSONResponse:
        asked.append(time.monotonic())
        return JSONResponse({"error": {"message": "reloading", "code": "unavailable"}}, status_code=503)

    with app_in_a_thread(app) as port:
        replicas = RolloutReplicas([f"http://127.0.0.1:{port}"], None, None, 5, attempts=1, outage_s=1)
        with pytest.raises(ReplicaError, match=r"for rollout\.outage_s = 1 s: .*503"):
            replicas.publish(1, path="/weights", tensors=None)
    assert len(asked) >= 2


def test_weights_every_replica_refuses_stop_the_publication_at_once_with_the_servers_reason(tmp_path):
    """Weights that do not fit the served model will not fit later either: no waiting out outage_s."""
    served = build_tiny_model(tmp_path / "served", seed=0)
    other = build_tiny_model(tmp_path / "other", profile="vllm", seed=0)
    with running_server("rollout-server", ["--model", str(served)], tmp_path) as server:
        replicas = RolloutReplicas([server.url], None, None, timeout_s=60, attempts=1, outage_s=20)
        with pytest.raises(ReplicaError, match=r"refused the weights of version 1: .*do not fit the served"):
            replicas.publish(1, tensors=(other / "model.safetensors").read_bytes())
        metrics = httpx.get(server.url + "/metrics").text
    assert 'cppo_rollout_weight_updates_total{outcome="refused"} 1.0' in metrics


def test_the_clients_ride_out_a_server_that_starts_late(tmp_path):
    """Both clients asked before their server exists: they wait for it, and get their answers."""
    model = build_tiny_model(tmp_path / "model", seed=0)
    ports = {"rollout": free_port(), "reward": free_port()}
    replicas = RolloutReplicas([f"http://127.0.0.1:{ports['rollout']}"], None, None, 60, 1, outage_s=120)
    rewards = RewardClient(f"http://127.0.0.1:{ports['reward']}", None, 60, outage_s=120)
    prompt = RolloutPrompt(prompt_id="p", messages=[{"role": "user", "content": "hi"}])
    answers: dict[str, object] = {}

    def ask() -> None:
        answers["scores"] = rewards.score([ITEM])
        answers["rollouts"] = replicas.rollouts(
            [prompt], lambda chunk: RolloutRequest(prompts=chunk, sampling=SamplingParams(max_tokens=2))
        )

    asking = threading.Thread(target=ask)
    asking.start()
    # The servers start only once the clients have failed to reach them at least once.
    time.sleep(1)
    with (
        running_server("reward-server", ["--workers", "1"], tmp_path, port=ports["reward"]),
        running_server("rollout-server", ["--model", str(model)], tmp_path, port=ports["rollout"]),
    ):
        asking.join(timeout=240)
    assert not asking.is_alive()
    assert [r.reward for r in answers["scores"]] == [1.0]
    assert [r.prompt_id for r in answers["rollouts"]] == ["p"]
