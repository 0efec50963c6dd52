"""The rollout server under load and at shutdown: past its queue limit a request is refused at once with 429
and Retry-After, counted on /metrics (an idle server still takes a request larger than the limit); after
SIGTERM, running requests get ``--drain-s`` seconds before they are cancelled."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from servers import metric, running_server

from shared.tiny_model import build_tiny_model


def _request(text: str, n: int, max_tokens: int) -> dict:
    return {
        "prompts": [{"prompt_id": "p", "messages": [{"role": "user", "content": text}]}],
        "n": n,
        "sampling": {"max_tokens": max_tokens, "temperature": 0},
    }


def _full_length(client: httpx.Client, body: dict) -> bool:
    samples = client.post("/v1/rollouts", json=body).json()["prompts"][0]["samples"]
    return all(sample["finish_reason"] == "length" for sample in samples)


def test_past_the_queue_limit_a_request_gets_429_at_once(tmp_path):
    model = build_tiny_model(tmp_path / "model", seed=0)
    args = ["--model", str(model), "--max-queued-sequences", "4", "--max-batch-size", "4"]
    with running_server("rollout-server", args, tmp_path) as server, server.client(timeout=300) as client:
        # Idle: 8 sequences, twice the limit, are still served.
        assert client.post("/v1/rollouts", json=_request("hi", 8, 2)).status_code == 200
        # Greedy decoding of the random model is deterministic: a prompt that runs its whole budget keeps
        # 4 sequences queued for as long as the test needs.
        texts = ("Tell a long story.", "hi", "Count.", "Describe it.")
        text = next((t for t in texts if _full_length(client, _request(t, 1, 300))), None)
        assert text is not None, "every candidate prompt ends early under greedy decoding"
        answers: dict[str, int] = {}

        def hold_the_queue() -> None:
            with server.client(timeout=300) as own:
                answers["long"] = own.post("/v1/rollouts", json=_request(text, 4, 300)).status_code

        busy = threading.Thread(target=hold_the_queue)
        busy.start()
        deadline = time.monotonic() + 60
        while metric(client.get("/metrics").text, "cppo_rollout_queued_sequences") < 4:
            assert time.monotonic() < deadline and busy.is_alive(), "the long request never got queued"
            time.sleep(0.01)
        refused = client.post("/v1/rollouts", json=_request("hi", 1, 2))
        busy.join(timeout=300)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        assert answers["long"] == 200
        text = client.get("/metrics").text
        assert metric(text, "cppo_rollout_shed_requests_total") == 1
        assert metric(text, "cppo_rollout_queued_sequences") == 0
        # The queue has drained: the same small request is served now.
        assert client.post("/v1/rollouts", json=_request("hi", 1, 2)).status_code == 200


def test_sigterm_drains_for_at_most_drain_s(tmp_path):
    model = build_tiny_model(tmp_path / "model", seed=0)
    args = ["--model", str(model), "--drain-s", "1", "--max-batch-size", "64"]
    with running_server("rollout-server", args, tmp_path) as server, server.client(timeout=300) as client:
        texts = ("Tell a long story.", "hi", "Count.", "Describe it.")
        text = next((t for t in texts if _full_length(client, _request(t, 1, 400))), None)
        assert text is not None, "every candidate prompt ends early under greedy decoding"
        outcome: dict[str, object] = {}

        def long_request() -> None:
            try:
                with server.client(timeout=300) as own:
                    outcome["status"] = own.post("/v1/rollouts", json=_request(text, 64, 400)).status_code
            except httpx.TransportError as error:
                outcome["error"] = error

        batches = metric(client.get("/metrics").text, "cppo_rollout_batch_size_count")
        busy = threading.Thread(target=long_request)
        busy.start()
        deadline = time.monotonic() + 60
        # The transformers backend counts each batch as it starts.
        while metric(client.get("/metrics").text, "cppo_rollout_batch_size_count") == batches:
            assert time.monotonic() < deadline and busy.is_alive(), "the long request never started"
            time.sleep(0.01)
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=120)
        took = time.monotonic() - stopped
        busy.join(timeout=120)
    # 64 sequences of 400 tokens take far longer than the 1 s drain: cut short, not answered in full.
    assert outcome.get("status") != 200, outcome
    assert took < 20, took
