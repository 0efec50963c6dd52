r"""The reward server over HTTP, started as a user starts it (``cppo reward-server``): both routes,
bad requests, hostile inputs, timeouts and crashes in the worker pool, plugins, and auth.

The server under test has two workers, a 1.5 s fast lane (so that the megabyte inputs below pass on a busy
machine) and a 2 s item timeout, and loads a
plugin of test functions (below) that crash their worker, meet at a rendezvous, record the order they
ran in, raise, or return a non-number. The lanes and cancellation are tested on a pool in-process.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from servers import metric, running_server

from reward_server.config import RewardSettings
from reward_server.main import serve
from reward_server.metrics import RewardMetrics
from reward_server.pool import Outcome, WorkerPool, _Lanes
from reward_server.registry import Task
from reward_server.service import openrlhf_response
from shared.launch import Service, free_port
from shared.schemas import MAX_SCORE_ITEMS, MAX_TEXT_CHARS, OpenRLHFRewardResponse, ScoreResponse
from shared.vlm import load_processor

ITEM_TIMEOUT_S = 2
FAST_LANE_S = 1.5
WORKERS = 2

TEST_PLUGIN = '''
import os
import signal
import time
from pathlib import Path

from reward_server.plugins import reward_function


@reward_function("crash", needs_ground_truth=False)
def crash(response: str, ground_truth: str) -> float:
    """Ends its own worker: 'exit' with os._exit(3), 'kill' with SIGKILL; anything else scores 1."""
    if response == "exit":
        os._exit(3)
    if response == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return 1.0


@reward_function("rendezvous", needs_ground_truth=False)
def rendezvous(response: str, ground_truth: str) -> float:
    """'create:PATH' creates PATH; 'wait:PATH' waits for PATH to exist (for ever). Both then score 1."""
    verb, _, path = response.partition(":")
    if verb == "create":
        Path(path).touch()
        return 1.0
    while not Path(path).exists():
        time.sleep(0.01)
    return 1.0


@reward_function("record", needs_ground_truth=False)
def record(response: str, ground_truth: str) -> float:
    """'LOG|LABEL' appends LABEL to the file LOG; 'LOG|LABEL|GATE' first waits for GATE to exist.
    Scores 1."""
    log, label, *gate = response.split("|")
    while gate and not Path(gate[0]).exists():
        time.sleep(0.01)
    with open(log, "a") as file:
        file.write(label + "\\n")
    return 1.0


@reward_function("raises", needs_ground_truth=False)
def raises(response: str, ground_truth: str) -> float:
    """Always raises."""
    raise RuntimeError("boom")


@reward_function("not_a_number", needs_ground_truth=False)
def not_a_number(response: str, ground_truth: str) -> float:
    """Returns NaN."""
    return float("nan")


@reward_function("question_length", needs_ground_truth=False)
def question_length(response: str, ground_truth: str, meta: dict | None = None) -> float:
    """The length of meta['question']."""
    return float(len((meta or {}).get("question", "")))


@reward_function("by_context", needs_ground_truth=False)
def by_context(
    response: str, ground_truth: str, prompt: str | None = None, data_source: str | None = None,
    metadata: dict | None = None,
) -> float:
    """len(prompt) + 100 for data_source 'geo' + 1000 x metadata['level']; a missing field adds 0."""
    level = (metadata or {}).get("level", 0)
    return len(prompt or "") + 100.0 * (data_source == "geo") + 1000.0 * level
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "test_rewards.py"
    path.write_text(TEST_PLUGIN)
    return path


@pytest.fixture(scope="module")
def server(plugin, tmp_path_factory):
    args = [
        "--workers",
        str(WORKERS),
        "--item-timeout-s",
        str(ITEM_TIMEOUT_S),
        "--fast-lane-s",
        str(FAST_LANE_S),
        "--plugin",
        str(plugin),
        "--plugin",
        "reward_server.examples.length_penalty",
    ]
    with running_server("reward-server", args, tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.fixture
def client(server: Service):
    with server.client(timeout=60) as client:
        wait_for_full_pool(client)
        yield client
        assert client.get("/health").status_code == 200  # whatever the test did, the server is up


def wait_for_full_pool(client: httpx.Client, deadline_s: float = 60) -> None:
    """Until every worker runs (a replaced one takes a moment to start); fails past the deadline."""
    deadline = time.monotonic() + deadline_s
    while metric(client.get("/metrics").text, "cppo_reward_workers") != WORKERS:
        assert time.monotonic() < deadline, "the pool did not get back to full size"
        time.sleep(0.05)


def item(id: str, response: str, truth: str = "", reward: str | dict = "math", **extra) -> dict:
    return {"id": id, "response": response, "ground_truth": truth, "reward": reward, **extra}


def score(client: httpx.Client, *items: dict) -> list[dict]:
    reply = client.post("/v1/score", json={"items": list(items)})
    assert reply.status_code == 200, reply.text
    results = ScoreResponse.model_validate(reply.json()).results
    return [result.model_dump() for result in results]


def refusal(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    return reply.json()["error"]


# --- ops and listing -----------------------------------------------------------------------------


def test_health_ready_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["detail"].startswith(f"{WORKERS} of {WORKERS} workers")
    text = client.get("/metrics").text
    assert metric(text, "cppo_reward_workers") == WORKERS
    for line in ('cppo_reward_items_total{status="ok"}', 'cppo_reward_worker_restarts_total{reason="crash"}'):
        assert line in text


def test_rewards_lists_builtins_and_plugins_with_parameters(client):
    catalog = client.get("/v1/rewards").json()
    functions = {entry["name"]: entry for entry in catalog["functions"]}
    builtins = {"math", "format", "choice", "exact", "numeric", "iou"}
    plugins = {"crash", "rendezvous", "record", "raises", "not_a_number", "length_penalty"}
    plugins |= {"question_length", "by_context"}
    assert set(functions) == builtins | plugins
    assert functions["iou"]["parameters"]["mode"]["enum"] == ["threshold", "continuous"]
    assert functions["format"]["parameters"]["style"]["default"] == "boxed"
    assert {name for name, entry in functions.items() if entry["fast"]} == builtins
    assert functions["length_penalty"]["parameters"] == {
        "max_chars": {"default": 2000, "minimum": 1, "type": "integer"}
    }
    assert functions["length_penalty"]["source"] == "reward_server.examples.length_penalty"
    assert functions["question_length"]["context"] == ["meta"]
    assert functions["by_context"]["context"] == ["prompt", "data_source", "metadata"]
    assert functions["math"]["context"] == []
    assert functions["math"]["needs_ground_truth"] and not functions["format"]["needs_ground_truth"]
    assert catalog["openrlhf_reward"] == {"math": 0.9, "format": 0.1}


# --- POST /v1/score ------------------------------------------------------------------------------


def test_functions_receive_the_prompt_data_source_and_metadata_they_ask_for(client):
    context = {"prompt": "What is x?", "data_source": "geo", "metadata": {"level": 2, "category": "plane"}}
    results = score(
        client,
        item("all", "r", reward="by_context", **context),
        item("none", "r", reward="by_context"),
        item("other-source", "r", reward="by_context", data_source="chart", metadata={"level": 0.5}),
        # A function that does not ask for them is scored as before.
        item("math", r"\boxed{2}", "2", reward="math", **context),
    )
    assert [result["reward"] for result in results] == [len("What is x?") + 100 + 2000, 0.0, 500.0, 1.0]


def test_metadata_must_be_scalars_within_limits(client):
    nested = client.post(
        "/v1/score", json={"items": [item("a", "r", reward="by_context", metadata={"k": [1]})]}
    )
    assert nested.status_code == 422 and nested.json()["error"]["field"].startswith("items.0.metadata.k")
    many = {f"k{i}": i for i in range(65)}
    crowded = client.post("/v1/score", json={"items": [item("a", "r", reward="by_context", metadata=many)]})
    assert crowded.status_code == 422 and crowded.json()["error"]["field"] == "items.0.metadata"


def test_every_function_scores_known_answers_in_request_order(client):
    results = score(
        client,
        item("math-right", r"<think>t</think> \boxed{\frac{1}{2}}", "0.5"),
        item("math-wrong", r"\boxed{3}", "4"),
        item("format", r"<think>t</think>\boxed{1}", reward="format"),
        item("choice", "The answer is (C).", "C", "choice"),
        item("exact", r"\boxed{\text{Red}}", "red", "exact"),
        item("numeric", "In all, 1,000 apples.", "1e3", "numeric"),
        item("iou", "[5, 0, 15, 10]", "[0, 0, 10, 10]", "iou", meta={"iou": {"mode": "continuous"}}),
        item("plugin", "x" * 3000, reward="length_penalty"),
        item("meta", "r", reward="question_length", meta={"question": "why?"}),
    )
    assert [result["id"] for result in results] == [
        "math-right", "math-wrong", "format", "choice", "exact", "numeric", "iou", "plugin", "meta"
    ]  # fmt: skip
    assert all(result["status"] == "ok" and result["detail"] is None for result in results)
    rewards = [result["reward"] for result in results]
    assert rewards == pytest.approx([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1 / 3, 0.5, 4.0])
    assert results[6]["components"] == {"iou": pytest.approx(1 / 3)}


def test_weighted_combinations(client):
    paper = {"math": 0.9, "format": 0.1}
    results = score(
        client,
        item("both", r"<think>t</think>\boxed{7}", "7", paper),
        item("right-no-think", r"\boxed{7}", "7", paper),
        item("think-wrong", r"<think>t</think>\boxed{6}", "7", paper),
        item("neither", "7", "7", paper),
        item("penalised", r"<think>t</think>\boxed{7}" + " " * 5000, "7", {**paper, "length_penalty": -0.5}),
    )
    assert [result["reward"] for result in results] == pytest.approx([1.0, 0.9, 0.1, 0.0, 0.5])
    assert results[1]["components"] == {"math": 1.0, "format": 0.0}
    # 5020 characters with max_chars 2000: the penalty is capped at 1, weighted -0.5.
    assert results[4]["components"]["length_penalty"] == 1.0


def test_a_weighted_sum_that_overflows_is_not_finite():
    from reward_server.registry import combine

    assert combine({"a": 2.0, "b": -1.0}, {"a": 0.5, "b": 0.25}) == 0.75
    # fsum raises on an intermediate overflow and on inf − inf; the service makes a non-finite sum an item
    # error instead of answering 500.
    for weights in ({"a": 1e6, "b": 1e6}, {"a": 1e6, "b": -1e6}, {"a": 1.0, "b": 1.0}):
        assert not math.isfinite(combine(weights, {"a": 1e308, "b": 1e308}))


def test_empty_request_is_valid(client):
    assert score(client) == []


def test_errors_in_functions_are_item_errors(client):
    results = score(
        client,
        item("raises", "r", reward="raises"),
        item("nan", "r", reward="not_a_number"),
        item("ok", r"\boxed{2}", "2"),
        item("bad-truth", r"\boxed{2}", "???"),
    )
    assert [result["status"] for result in results] == ["error", "error", "ok", "error"]
    assert results[0]["detail"] == "raises failed: RuntimeError: boom"
    assert results[1]["detail"] == "not_a_number returned nan, not a finite number"
    assert "cannot read the ground truth" in results[3]["detail"]
    assert all(result["reward"] == 0.0 and result["components"] == {} for result in (results[0], results[1]))


BAD_REQUESTS = [
    pytest.param([item("a", "r", "1", "nope")], 422, "items.0.reward", id="unknown-name"),
    pytest.param(
        [item("a", "r", "1"), item("b", "r", "1", {"math": 0.5, "nope": 0.5})],
        422,
        "items.1.reward",
        id="unknown-weight",
    ),
    pytest.param([item("a", "r", "", "math")], 422, "items.0.ground_truth", id="empty-truth"),
    pytest.param(
        [item("a", "r", " ", {"format": 0.1, "exact": 0.9})], 422, "items.0.ground_truth", id="blank-truth"
    ),
    pytest.param([item("a", "r", "Paris", "choice")], 422, "items.0.ground_truth", id="truth-not-a-letter"),
    pytest.param([item("a", "r", "[0,0,0,0]", "iou")], 422, "items.0.ground_truth", id="degenerate-box"),
    pytest.param(
        [item("a", "r", "[0,0,1,1]", "iou", meta={"iou": {"mode": "fuzzy"}})],
        422,
        "items.0.meta.iou.mode",
        id="param",
    ),
    pytest.param(
        [item("a", "r", "1", "numeric", meta={"numeric": {"tolerance": 1}})],
        422,
        "items.0.meta.numeric.tolerance",
        id="unknown-param",
    ),
    pytest.param([{**item("a", "r", "1"), "response": 5}], 422, "items.0.response", id="wrong-type"),
    pytest.param(
        [{"id": "a", "response": "r", "reward": "math"}], 422, "items.0.ground_truth", id="missing-truth"
    ),
    pytest.param([item("a", "r", "1", {})], 422, "items.0.reward", id="no-weights"),
    pytest.param(
        [item("a", "r", "1", {"math": 1e308, "format": 1e308})], 422, "items.0.reward", id="weights-overflow"
    ),
    pytest.param([item("a", "r", "1"), item("a", "r", "1")], 422, "items", id="duplicate-ids"),
    pytest.param([{**item("a", "r", "1"), "weight": 2}], 422, "items.0.weight", id="unknown-field"),
    pytest.param([item("a", "\ud800 lone surrogate", "1")], 422, "items.0.response", id="lone-surrogate"),
]


@pytest.mark.parametrize(("items", "status", "field"), BAD_REQUESTS)
def test_bad_requests_name_the_field(client, items, status, field):
    # Sent as `requests` would (ASCII-escaped JSON), so that a lone surrogate can travel at all.
    reply = client.post(
        "/v1/score",
        content=json.dumps({"items": items}).encode(),
        headers={"content-type": "application/json"},
    )
    error = refusal(reply, status)
    # A union field's errors name the branch too ('items.0.reward.constrained-str'): the field is still named.
    assert error["field"] == field or error["field"].startswith(field + ".")
    assert field in error["message"]


def test_too_many_items_are_refused_by_the_limit(client):
    too_many = [item(str(i), "r", "1") for i in range(100_000)]
    error = refusal(client.post("/v1/score", json={"items": too_many}), 422)
    assert error["field"] == "items"
    assert str(MAX_SCORE_ITEMS) in error["message"]


def test_undecodable_bodies_are_refused(client):
    invalid_utf8 = (
        b'{"items": [{"id": "a", "response": "\xff\xfe\xfd", "ground_truth": "1", "reward": "math"}]}'
    )
    reply = client.post("/v1/score", content=invalid_utf8, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    reply = client.post("/v1/score", content=b'{"items": [', headers={"content-type": "application/json"})
    assert refusal(reply, 400)["code"] == "invalid_json"


# --- hostile inputs, timeouts, crashes ----------------------------------------------------------


def test_hostile_inputs_cannot_stall_the_server(client):
    before = client.get("/metrics").text
    megabyte_tail = "a" * (MAX_TEXT_CHARS - 20) + r" \boxed{7}"
    results = score(
        client,
        item("tower", r"\boxed{9^{9^{9^{9}}}}", "1"),  # sympy would evaluate it for ever: never parsed
        item("factorial", r"\boxed{(10!)!}", "1"),
        item("after-tower", r"\boxed{7}", "7"),
        item("nested", "\\boxed{" + "\\frac{" * 5000 + "1" + "}{2}" * 5000 + "}", "1"),
        item("deep", "\\boxed{" + "{" * 400_000 + "1" + "}" * 400_000 + "}", "1"),
        item("megabyte", megabyte_tail, "7", {"math": 0.9, "format": 0.1}),
        item("unclosed-boxes", "\\boxed{" * (MAX_TEXT_CHARS // 7), "7"),
        item("megabyte-choice", "answer " * (MAX_TEXT_CHARS // 8) + "answer is B", "B", "choice"),
        item("megabyte-numeric", "1," * (MAX_TEXT_CHARS // 2 - 2) + "42", "42", "numeric"),
        item("megabyte-iou", "[" * (MAX_TEXT_CHARS - 20) + "[0, 0, 10, 10]", "[0, 0, 10, 10]", "iou"),
    )
    assert {result["status"] for result in results} == {"ok"}
    rewards = {result["id"]: result["reward"] for result in results}
    assert rewards == {
        "tower": 0.0,
        "factorial": 0.0,
        "after-tower": 1.0,
        "nested": 0.0,  # past the answer bounds: never parsed
        "deep": 0.0,
        "megabyte": pytest.approx(0.9),
        "unclosed-boxes": 0.0,
        "megabyte-choice": 1.0,
        "megabyte-numeric": 1.0,
        "megabyte-iou": 1.0,
    }
    after = client.get("/metrics").text
    # Every one answered in its worker, within the item timeout. (A megabyte item may run past the fast
    # lane's 0.5 s on a busy machine and be moved aside; that is the fast lane working.)
    for reason in ("timeout", "crash"):
        restarts = f'cppo_reward_worker_restarts_total{{reason="{reason}"}}'
        assert metric(after, restarts) == metric(before, restarts)


def test_an_item_past_the_timeout_scores_zero_and_its_worker_is_replaced(client, tmp_path):
    before = client.get("/metrics").text
    results = score(
        client,
        item("stuck", f"wait:{tmp_path / 'never'}", reward="rendezvous"),  # would wait for ever
        item("fine", r"\boxed{7}", "7"),
    )
    assert [(result["status"], result["reward"]) for result in results] == [("timeout", 0.0), ("ok", 1.0)]
    assert f"{ITEM_TIMEOUT_S:g} s item timeout" in results[0]["detail"]
    after = client.get("/metrics").text
    # A plugin's: it ran past the fast lane first, was moved aside, then past the item timeout.
    for reason, more in (("moved_aside", 1), ("timeout", 1)):
        restarts = f'cppo_reward_worker_restarts_total{{reason="{reason}"}}'
        assert metric(after, restarts) == metric(before, restarts) + more
    moved = "cppo_reward_moved_aside_items_total"
    assert metric(after, moved) == metric(before, moved) + 1
    wait_for_full_pool(client)


def test_a_built_in_item_past_the_fast_lane_times_out_there(client):
    # Within every limit on length, depth and digits, and yet sympy expands it for minutes.
    squares = "x"
    for _ in range(10):
        squares = f"({squares}+1)^{{2}}"
    before = client.get("/metrics").text
    results = score(client, item("squares", f"\\boxed{{{squares}}}", "7"), item("fine", r"\boxed{7}", "7"))
    assert [(result["status"], result["reward"]) for result in results] == [("timeout", 0.0), ("ok", 1.0)]
    assert f"{FAST_LANE_S:g} s fast lane's limit" in results[0]["detail"]
    after = client.get("/metrics").text
    moved = "cppo_reward_moved_aside_items_total"
    assert metric(after, moved) == metric(before, moved)  # no second try: built-ins are fast or nothing
    restarts = 'cppo_reward_worker_restarts_total{reason="timeout"}'
    assert metric(after, restarts) == metric(before, restarts) + 1
    wait_for_full_pool(client)


def test_items_are_scored_in_parallel(client, tmp_path):
    # 'wait' holds its worker until 'create' has run. Were items scored one after another, 'wait' would
    # hold the only worker for ever and time out; with a pool, another worker takes 'create'.
    meeting_point = tmp_path / "meeting-point"
    results = score(
        client,
        item("wait", f"wait:{meeting_point}", reward="rendezvous"),
        item("create", f"create:{meeting_point}", reward="rendezvous"),
    )
    assert [result["status"] for result in results] == ["ok", "ok"]


@pytest.mark.parametrize(
    ("how", "death"), [("exit", "exited with code 3"), ("kill", "was killed by SIGKILL")]
)
def test_a_dead_worker_fails_its_item_only_and_is_replaced(client, tmp_path, how, death):
    crashes = 'cppo_reward_worker_restarts_total{reason="crash"}'
    before = metric(client.get("/metrics").text, crashes)
    results = score(
        client,
        item("dies", how, reward="crash"),
        item("fine", "alive", reward="crash"),
        item("math", r"\boxed{2}", "2"),
    )
    assert [result["status"] for result in results] == ["error", "ok", "ok"]
    assert death in results[0]["detail"] and "replaced" in results[0]["detail"]
    assert metric(client.get("/metrics").text, crashes) == before + 1
    wait_for_full_pool(client)
    # Both workers work again: the rendezvous needs two at once.
    meeting_point = tmp_path / "meeting-point"
    results = score(
        client,
        item("wait", f"wait:{meeting_point}", reward="rendezvous"),
        item("create", f"create:{meeting_point}", reward="rendezvous"),
    )
    assert [result["status"] for result in results] == ["ok", "ok"]


# --- the pool in-process: lanes, fairness, cancellation, closing ----------------------------------


def waiting(gate: Path) -> Task:
    """An item that holds its worker until ``gate`` exists."""
    return Task(("rendezvous",), f"wait:{gate}", "")


def math_item(answer: str) -> Task:
    return Task(("math",), rf"\boxed{{{answer}}}", answer)


def counted(metrics: RewardMetrics, counter: str, label: str | None = None) -> float:
    family = getattr(metrics, counter)
    return (family.labels(label) if label else family)._value.get()


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (a guard of 120 s against hanging, not a timing)."""
    async with asyncio.timeout(120):
        while not condition():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def running_pool(*args: Any, **kwargs: Any) -> AsyncIterator[WorkerPool]:
    """A started ``WorkerPool(*args, **kwargs)``, closed afterwards."""
    pool = WorkerPool(*args, **kwargs)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


def test_slow_items_are_moved_aside_and_ordinary_ones_go_on(plugin, tmp_path):
    # Three items that wait for a gate. The first two run past the 0.2 s fast lane on both workers and
    # are moved aside; the slow lane may hold only one of the two workers, and their request, suspect
    # now, may not take the other for its third item. Ordinary items go through that one.
    async def scenario() -> None:
        metrics = RewardMetrics()
        settings = {"item_timeout_s": 120, "fast_lane_s": 0.2, "metrics": metrics}
        async with running_pool(2, [str(plugin)], **settings) as pool:
            gate = tmp_path / "gate"
            slow = asyncio.create_task(pool.score([waiting(gate)] * 3))
            await until(lambda: counted(metrics, "moved_aside") == 2 and pool.queued == 2)
            ordinary = await pool.score([math_item(str(n)) for n in range(6)])
            assert [outcome.status for outcome in ordinary] == ["ok"] * 6
            assert [outcome.components for outcome in ordinary] == [{"math": 1.0}] * 6
            assert not slow.done() and pool.queued == 2  # one slow item runs; one waits per lane
            gate.touch()
            assert [outcome.status for outcome in await slow] == ["ok"] * 3  # scored again, in full
            assert counted(metrics, "worker_restarts", "moved_aside") == 2

    asyncio.run(scenario())


def test_a_request_is_pushed_back_by_the_worker_time_it_used(plugin, tmp_path):
    # One worker. 'greedy' has used the worker for as long as its first item waited for the gate, longer
    # than 'thrifty' (queued meanwhile) came after it: both of thrifty's items run before greedy's others.
    async def scenario() -> list[str]:
        async with running_pool(1, [str(plugin)], item_timeout_s=120, fast_lane_s=60) as pool:
            log, gate = tmp_path / "order", tmp_path / "gate"

            def record(label: str, *wait: Path) -> Task:
                return Task(("record",), "|".join([str(log), label, *map(str, wait)]), "")

            greedy = asyncio.create_task(pool.score([record("g1", gate), record("g2"), record("g3")]))
            await until(lambda: pool.queued == 2)  # g1 is with the worker
            thrifty = asyncio.create_task(pool.score([record("t1"), record("t2")]))
            await until(lambda: pool.queued == 4)
            gate.touch()
            await asyncio.gather(greedy, thrifty)
            return log.read_text().split()

    assert asyncio.run(scenario()) == ["g1", "t1", "t2", "g2", "g3"]


def test_a_request_that_used_worker_time_waits_its_turn_but_never_starves():
    # The scheduler alone: its turn is its arrival plus PUSH_BACK (10) times the worker time it has used.
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        lanes = _Lanes(slow_capacity=1, wary_capacity=1)
        await lanes.add([math_item("1")] * 3, [loop.create_future() for _ in range(3)])
        await lanes.add([math_item("2")], [loop.create_future()])
        old, new = lanes._requests
        old.arrival, old.seconds = new.arrival - 10, 0.5  # came 10 s earlier, has used 0.5 s: still first
        assert (await lanes.take()).request is old
        old.seconds = 20.0  # has used 20 s (slow items): the newcomer goes first
        assert (await lanes.take()).request is new
        assert (await lanes.take()).request is old  # and then it is old's turn again, nobody else waiting

    asyncio.run(scenario())


def test_a_suspect_requests_items_leave_a_worker_for_ordinary_ones():
    # With two workers, items of requests that have already run past the fast lane hold at most one.
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        lanes = _Lanes(slow_capacity=1, wary_capacity=1)
        await lanes.add([math_item("1")] * 2, [loop.create_future() for _ in range(2)])
        await lanes.add([math_item("2")], [loop.create_future()])
        suspect, ordinary = lanes._requests
        suspect.suspect = True
        first = await lanes.take()
        assert first.request is suspect  # it came first
        assert (await lanes.take()).request is ordinary  # its second item would take the last worker
        await lanes.done(first, 0.5)
        assert (await lanes.take()).request is suspect  # and once a worker is free of it, it goes on

    asyncio.run(scenario())


def test_a_cancelled_request_stops_its_running_items_too(plugin, tmp_path):
    async def scenario() -> None:
        metrics = RewardMetrics()
        settings = {"item_timeout_s": 120, "fast_lane_s": 60, "metrics": metrics}
        async with running_pool(2, [str(plugin)], **settings) as pool:
            never = tmp_path / "never"
            scoring = asyncio.create_task(pool.score([waiting(never)] * 3))
            await until(lambda: pool.queued == 1)  # two running, one waiting
            scoring.cancel()
            await until(lambda: counted(metrics, "worker_restarts", "cancelled") == 2)
            assert counted(metrics, "items", "cancelled") == 3
            assert pool.queued == 0 and metrics.queue_depth._value.get() == 0  # the waiting one forgotten
            await until(lambda: pool.alive == 2)  # both replaced, and they work
            assert [outcome.status for outcome in await pool.score([math_item("1")] * 2)] == ["ok"] * 2

    asyncio.run(scenario())


def test_closing_the_pool_resolves_every_item(plugin, tmp_path):
    # One worker held by an item, one item queued behind it; closing answers both.
    async def scenario() -> list[Outcome]:
        pool = WorkerPool(1, [str(plugin)], item_timeout_s=600, fast_lane_s=600)
        await pool.start()
        tasks = [waiting(tmp_path / "never"), math_item("1")]
        scoring = asyncio.create_task(pool.score(tasks))
        while pool.queued != 1:  # the first is with the worker, the other item waits
            await asyncio.sleep(0.01)
        await pool.close()
        assert pool.alive == 0
        return await asyncio.wait_for(scoring, 120)  # a guard against hanging, not a timing

    outcomes = asyncio.run(scenario())
    assert [(outcome.status, outcome.detail) for outcome in outcomes] == [
        ("error", "the server is shutting down")
    ] * 2


def test_metrics_count_items_by_status(client):
    counts = {
        status: f'cppo_reward_items_total{{status="{status}"}}' for status in ("ok", "error", "timeout")
    }
    before = {status: metric(client.get("/metrics").text, line) for status, line in counts.items()}
    score(client, item("a", r"\boxed{1}", "1"), item("b", r"\boxed{1}", "2"), item("c", "r", reward="raises"))
    after = {status: metric(client.get("/metrics").text, line) for status, line in counts.items()}
    assert {status: after[status] - before[status] for status in counts} == {
        "ok": 2,
        "error": 1,
        "timeout": 0,
    }
    assert (
        metric(client.get("/metrics").text, 'cppo_reward_requests_total{route="/v1/score",status="200"}') >= 1
    )


# --- POST /get_reward (OpenRLHF) -----------------------------------------------------------------

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant. Put the final answer in \\boxed{}, e.g. \\boxed{42}."
    "<|im_end|>\n<|im_start|>user\nWhat is 1/2 + 1/4?<|im_end|>\n<|im_start|>assistant\n"
)


def openrlhf_post(client: httpx.Client, queries, prompts, labels, url="/get_reward") -> httpx.Response:
    """The request exactly as OpenRLHF's ``remote_rm_fn_ray`` sends it: ``requests.post(url, json=data,
    headers={"Content-Type": "application/json"})`` with ``data = {"query": ..., "prompts": ...,
    "labels": ...}``; requests serialises with ``json.dumps(data)``."""
    data = {"query": queries, "prompts": prompts, "labels": labels}
    return client.post(url, content=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def test_openrlhf_protocol_as_openrlhf_sends_it(client):
    responses = [
        r"<think>1/2 + 1/4 = 3/4</think> \boxed{\frac{3}{4}}",  # right, formatted: 1.0
        r"It is \boxed{0.75}",  # right, no thinking: 0.9
        r"<think>hmm</think> \boxed{1}",  # wrong, formatted: 0.1
        "no idea",  # no answer, and no layout: 0.0
    ]
    # OpenRLHF decodes prompt and response tokens together, special tokens kept: the EOS ends the query.
    # Unless the prompt is split off, no query opens with <think> and the format scores are all 0.
    queries = [CHAT_PROMPT + response + "<|im_end|>" for response in responses]
    reply = openrlhf_post(client, queries, [CHAT_PROMPT] * 4, ["\\frac{3}{4}"] * 4)
    assert reply.status_code == 200, reply.text
    body = OpenRLHFRewardResponse.model_validate(reply.json())
    assert body.rewards == pytest.approx([1.0, 0.9, 0.1, 0.0])
    assert body.scores == [1.0, 1.0, 0.0, 0.0]  # the heaviest component, math: 0/1 for dynamic filtering
    assert body.extra_logs == {"math": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert set(reply.json()) == {"rewards", "scores", "extra_logs"}


def test_openrlhf_vision_queries_are_split_after_the_expanded_image(client, tiny):
    # As OpenRLHF makes them: the prompt is the chat template applied to a message with an image (one
    # <|image_pad|>); the query is the decoded token ids, where the processor expanded it into many.
    processor = load_processor(tiny)
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1/2 + 1/4?"}]}]
    prompt = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    ids = processor(text=[prompt], images=[Image.new("RGB", (56, 56), "red")])["input_ids"][0]
    expanded = processor.tokenizer.decode(ids)
    assert expanded.count("<|image_pad|>") > 1 and prompt.count("<|image_pad|>") == 1
    query = expanded + r"<think>1/2 + 1/4 = 3/4</think> \boxed{\frac{3}{4}}<|im_end|>"
    with_prompts = openrlhf_post(client, [query], [prompt], ["\\frac{3}{4}"]).json()
    assert with_prompts["extra_logs"] == {"math": [1.0], "format": [1.0]}  # the response starts at <think>
    # Without prompts, the response follows the last assistant header; a label may be a number.
    reply = client.post("/get_reward", json={"query": [query], "labels": [0.75]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["rewards"] == pytest.approx([1.0])


def test_openrlhf_empty_lists_keep_the_log_keys(client):
    # OpenRLHF splits a batch across servers, so a server may get nothing; extra_logs keys must match.
    reply = openrlhf_post(client, [], [], [])
    assert reply.json() == {"rewards": [], "scores": [], "extra_logs": {"math": [], "format": []}}


def test_openrlhf_refusals_name_the_field(client):
    error = refusal(openrlhf_post(client, ["q a"], ["q"], [""]), 422)
    assert error["field"] == "labels.0"
    error = refusal(client.post("/get_reward", json={"query": ["q a"], "prompts": ["q"]}), 422)
    assert error["field"] == "labels"
    error = refusal(openrlhf_post(client, ["q a", "q b"], ["q"], ["1", "2"]), 422)
    assert error["field"] == "prompts"
    error = refusal(client.post("/get_reward", json={"prompts": []}), 422)
    assert error["field"] == "query"


def test_openrlhf_hostile_answers_score_zero(client):
    reply = openrlhf_post(
        client, ["Q" + r"\boxed{9^{9^{9^{9}}}}", "Q" + r"\boxed{1}"], ["Q", "Q"], ["1", "1"]
    )
    body = reply.json()
    assert body["rewards"] == pytest.approx([0.0, 0.9])
    assert body["extra_logs"] == {"math": [0.0, 1.0], "format": [0.0, 0.0]}
    wait_for_full_pool(client)


@pytest.mark.parametrize(
    ("query", "prompt", "response"),
    [
        ("PROMPT the response", "PROMPT", " the response"),
        ("<s>PROMPT answer</s>", "PROMPT", " answer"),  # a BOS token decoded before the prompt
        ("PROMPT answer<|im_end|><|endoftext|>\n", "PROMPT", " answer"),
        ("no prompt in here", "PROMPT", "no prompt in here"),
        ("whole query", "", "whole query"),
        ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>", "", "answer"),
        (
            "<|im_start|>user\n<|image_pad|><|image_pad|>q<|im_start|>assistant\nA",
            "<|image_pad|>q",
            "<|im_start|>assistant\nA",
        ),
        ("PROMPT", "PROMPT", ""),
    ],
)
def test_openrlhf_response_is_split_off_the_prompt(query, prompt, response):
    assert openrlhf_response(query, prompt) == response


# --- auth, limits, start-up ----------------------------------------------------------------------


def test_api_key_and_queue_limit(tmp_path):
    # The key comes from the environment, as CPPO_REWARD_API_KEY; the queue limit from a flag.
    args = ["--workers", "1", "--max-queued-items", "4", "--openrlhf-reward", "exact"]
    with (
        running_server("reward-server", args, tmp_path, env={"CPPO_REWARD_API_KEY": "s3cret-key"}) as server,
        server.client(timeout=60) as client,
    ):
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200
        one = {"items": [item("a", "red", "red", "exact")]}
        assert refusal(client.post("/v1/score", json=one), 401)["field"] == "Authorization"
        assert client.get("/v1/rewards").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/v1/score", json=one, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret-key"}
        assert client.post("/v1/score", json=one, headers=right).json()["results"][0]["reward"] == 1.0
        # OpenRLHF sends no headers, so /get_reward (and only it) also takes the key in the URL.
        assert openrlhf_post(client, ["Q red"], ["Q"], ["red"], "/get_reward?api_key=s3cret-key").json() == {
            "rewards": [1.0],
            "scores": [1.0],
            "extra_logs": {"exact": [1.0]},
        }
        assert openrlhf_post(client, ["Q red"], ["Q"], ["red"], "/get_reward?api_key=nope").status_code == 401
        assert client.post("/v1/score?api_key=s3cret-key", json=one).status_code == 401
        # The key is checked on the headers: a client announcing 100 MB without it gets its 401 after
        # sending 1 KB, not after the server has waited for (and held) the rest.
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000000\r\n\r\n" + b"[" * 1024
            )
            assert raw.recv(65536).startswith(b"HTTP/1.1 401")
        five = {"items": [item(str(i), "red", "red", "exact") for i in range(5)]}
        shed = client.post("/v1/score", json=five, headers=right)
        assert refusal(shed, 503)["code"] == "overloaded" and shed.headers["retry-after"] == "1"
        assert metric(client.get("/metrics").text, "cppo_reward_shed_requests_total") == 1
        assert "s3cret-key" not in server.output()  # the access log redacts ?api_key=


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "reward-server", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without an API key"),
        (["--plugin", "/nowhere/rewards.py"], "plugin file /nowhere/rewards.py does not exist"),
        (["--openrlhf-reward", "math:0.5,nope:0.5"], "unknown reward function 'nope'"),
        (["--openrlhf-reward", "math:x"], "--openrlhf-reward"),
        (["--item-timeout-s", "0"], "--item-timeout-s"),
    ],
)
def test_the_command_refuses_bad_settings_in_one_line(args, message):
    done = cli(*args, "--port", "1")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_before_listening():
    with pytest.raises(ValueError, match="without an API key"):
        serve(RewardSettings(host="0.0.0.0", port=1))


def test_a_plugin_that_fails_in_the_workers_stops_the_server_in_one_line(tmp_path):
    # Loads in the server, fails in each worker: a server that can never be ready exits and says why.
    plugin = tmp_path / "server_only.py"
    plugin.write_text(
        textwrap.dedent(
            """
            import multiprocessing
            from reward_server.plugins import reward_function

            if multiprocessing.parent_process() is not None:
                raise ImportError("only in the server")

            @reward_function("fine", needs_ground_truth=False)
            def fine(response: str, ground_truth: str) -> float:
                return 1.0
            """
        )
    )
    command = [sys.executable, "-m", "shared.cli", "reward-server", "--workers", "1", "--plugin", str(plugin)]
    done = subprocess.run([*command, "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cppo reward-server: error: the service failed to start: WorkerStartError")
    assert "only in the server" in last and "Traceback" not in done.stderr


def test_a_port_in_use_is_named_with_the_flag_to_change_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "shared.cli", "reward-server", "--port", str(port)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"cppo reward-server: error: port {port} on 127.0.0.1 is already in use; choose another with --port"
    )
