"""Property-based fuzzing of both servers over HTTP, from the OpenAPI schema each one serves.

Each server is started as a user starts it, with an API key. Schemathesis reads its ``/openapi.json`` and,
for every operation, sends requests that fit the schema (``positive``) and requests that break it
(``negative``: wrong types, missing and extra fields, out-of-range numbers, bodies that are not JSON).
A third variant, ``realistic``, takes positive requests and draws what the schema can only call a string
from values the server knows (image URLs that decode, or point at files in, out of and missing from the
image root; registered reward and transform names; checkpoints, broken ones included, under the weights
root): random strings there are refused early, these requests reach the image decoding, the perturbations,
the model, the weight loading and the reward functions. Requests without the key are sent too.

Whatever is sent, the server must not answer 5xx, every 4xx must be the project's JSON error body
(``shared.schemas.ErrorResponse``), a request without the key must be a 401 outside the open paths, and
afterwards the server must still serve a valid request.

The operations are listed here rather than read from the schema at collection time (the servers start in
fixtures); ``test_every_route_is_fuzzed`` fails when a server gains a route the list lacks.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import BaseSchema, Case, GenerationMode, Response
from servers import metric, running_server

from shared.http import OPEN_PATHS
from shared.launch import Service
from shared.perturbations import TRANSFORMS_BY_KIND
from shared.schemas import ErrorResponse
from shared.tiny_model import build_tiny_model

API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Per operation and variant: enough to get past each route's validation into its handler, few enough that
# the module takes about two minutes on two cores (a third of that without the slow tier).
EXAMPLES = 30
UNAUTHORISED_EXAMPLES = 5
# The generated bodies are small and the tiny model is fast: a minute means the server hangs.
REQUEST_TIMEOUT_S = 60
REWARD_WORKERS = 2

REWARD_ROUTES = [
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/rewards"),
    ("POST", "/v1/score"),
    ("POST", "/get_reward"),
]
ROLLOUT_ROUTES = [
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/rollouts"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/weights"),
    ("POST", "/v1/weights"),
    ("POST", "/v1/weights/tensors"),
    ("POST", "/v1/weights/broadcast"),
]
# Every GET takes no input at all: only a positive request can be made of it.
NO_INPUT = {(method, path) for method, path in REWARD_ROUTES + ROLLOUT_ROUTES if method == "GET"}
# Generation: about a minute for the three variants of these two, so they run in the slow tier.
SLOW = {("POST", "/v1/rollouts"), ("POST", "/v1/chat/completions")}
# The bodies that name images, reward functions, transforms, the model or a checkpoint (see ``realistic``).
STEERED = {
    ("POST", "/v1/score"),
    ("POST", "/v1/rollouts"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/v1/weights"),
}


def data_url(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


# Odd but valid images: one pixel, one pixel wide, thin, with alpha, grey, palette, JPEG and WebP, and one
# too large for the served context (its request is a 400).
DATA_URLS = [
    data_url(Image.new("RGB", (1, 1), "red"), "PNG"),
    data_url(Image.new("RGB", (1, 20), "red"), "PNG"),
    data_url(Image.new("RGB", (28, 28), "blue"), "PNG"),
    data_url(Image.new("RGBA", (30, 17), (0, 255, 0, 10)), "PNG"),
    data_url(Image.new("L", (3, 90), 128), "PNG"),
    data_url(Image.new("P", (40, 40)), "PNG"),
    data_url(Image.new("RGB", (33, 29), "yellow"), "JPEG"),
    data_url(Image.new("RGB", (16, 16), "white"), "WEBP"),
    data_url(Image.effect_noise((300, 300), 64).convert("RGB"), "PNG"),
]


@dataclass
class Pools:
    """What realistic requests draw from where the schema says only 'a string'."""

    images: list[str] = field(default_factory=lambda: list(DATA_URLS))
    rewards: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def realistic(body: Any, data: st.DataObject, pools: Pools) -> None:
    """Replaces, in place, a generated body's free strings that name something with names from ``pools``."""
    if not isinstance(body, dict):
        return
    # Only the OpenAI bodies have a top-level "model"; any other name than the served one is a 404.
    body.pop("model", None)
    if "path" in body and pools.checkpoints:
        body["path"] = data.draw(st.sampled_from(pools.checkpoints))
    _name_things(body, data, pools)


def _name_things(value: Any, data: st.DataObject, pools: Pools) -> None:
    if isinstance(value, list):
        for item in value:
            _name_things(item, data, pools)
        return
    if not isinstance(value, dict):
        return
    if isinstance(value.get("image_url"), dict):
        value["image_url"]["url"] = data.draw(st.sampled_from(pools.images))
    for kind, allowed in TRANSFORMS_BY_KIND.items():
        view = value.get(kind)
        if isinstance(view, dict) and isinstance(view.get("transforms"), list):
            view["transforms"] = [data.draw(st.sampled_from(allowed)) for _ in view["transforms"]]
    reward = value.get("reward")
    if isinstance(reward, str) and pools.rewards:
        value["reward"] = data.draw(st.sampled_from(pools.rewards))
    elif isinstance(reward, dict) and reward and pools.rewards:
        value["reward"] = {data.draw(st.sampled_from(pools.rewards)): w for w in reward.values()}
    for item in value.values():
        _name_things(item, data, pools)


def cases(routes: list[tuple[str, str]]) -> list:
    """(method, path, variant) for each route: positive, negative and realistic requests with the key, a
    few positive ones without it."""
    params = []
    for method, path in routes:
        variants = ["positive"]
        if (method, path) not in NO_INPUT:
            variants.append("negative")
        if (method, path) in STEERED:
            variants.append("realistic")
        marks = [pytest.mark.slow] if (method, path) in SLOW else []
        for variant in variants:
            params.append(pytest.param(method, path, variant, marks=marks, id=f"{method} {path} {variant}"))
        # Refused before any work is done: cheap on every route.
        params.append(pytest.param(method, path, "no key", id=f"{method} {path} no key"))
    return params


def fuzz(schema: BaseSchema, server: Service, method: str, path: str, variant: str, pools: Pools) -> None:
    """Sends generated requests to one operation and checks every answer."""
    operation = schema[path][method]
    mode = GenerationMode.NEGATIVE if variant == "negative" else GenerationMode.POSITIVE
    key = variant != "no key"

    @settings(
        max_examples=EXAMPLES if key else UNAUTHORISED_EXAMPLES,
        deadline=None,
        # Generated data is large or often filtered out by design: that is not a problem of this test.
        suppress_health_check=list(HealthCheck),
        # Every operation shares this function; a failure saved for one must not replay on another.
        database=None,
    )
    @given(case=operation.as_strategy(mode), data=st.data())
    def check(case: Case, data: st.DataObject) -> None:
        if variant == "realistic":
            realistic(case.body, data, pools)
        response = case.call(headers=AUTH if key else None, timeout=REQUEST_TIMEOUT_S)
        assert_well_formed(case, response, server)
        if not key and path not in OPEN_PATHS:
            assert response.status_code == 401, response.text

    check()


def assert_well_formed(case: Case, response: Response, server: Service) -> None:
    """No 5xx, the JSON error body on every 4xx, and the server process still running."""
    request = f"{case.method} {case.formatted_path} query={case.query!r} body={case.body!r:.3000}"
    assert response.status_code < 500, f"{request}\n-> {response.status_code} {response.text[:2000]}"
    if 400 <= response.status_code < 500:
        assert response.headers.get("content-type") == ["application/json"], request
        ErrorResponse.model_validate_json(response.content)
    assert server.process.poll() is None, f"{request}\nstopped the server:\n{server.output()[-5000:]}"


def load_schema(server: Service) -> BaseSchema:
    # /openapi.json is behind the key too: only the operations routes are open.
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)


# --- reward server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    args = ["--api-key", API_KEY, "--workers", str(REWARD_WORKERS), "--item-timeout-s", "5"]
    with running_server("reward-server", args, tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.fixture(scope="module")
def reward_schema(reward_server: Service) -> BaseSchema:
    return load_schema(reward_server)


@pytest.fixture(scope="module")
def reward_pools(reward_server: Service) -> Pools:
    with reward_server.client(headers=AUTH) as client:
        catalog = client.get("/v1/rewards").json()
    return Pools(rewards=[function["name"] for function in catalog["functions"]])


@pytest.mark.parametrize(("method", "path", "variant"), cases(REWARD_ROUTES))
def test_the_reward_server_answers_any_request_without_a_5xx(
    reward_schema: BaseSchema,
    reward_server: Service,
    reward_pools: Pools,
    method: str,
    path: str,
    variant: str,
) -> None:
    fuzz(reward_schema, reward_server, method, path, variant, reward_pools)


def test_the_reward_server_scores_after_the_fuzz(reward_server: Service) -> None:
    with reward_server.client(timeout=REQUEST_TIMEOUT_S, headers=AUTH) as client:
        assert client.get("/ready").status_code == 200
        assert metric(client.get("/metrics").text, "cppo_reward_workers") == REWARD_WORKERS
        item = {"id": "a", "response": r"\boxed{2}", "ground_truth": "2", "reward": "math"}
        scored = client.post("/v1/score", json={"items": [item]})
    assert scored.status_code == 200, scored.text
    assert scored.json()["results"][0]["reward"] == 1.0


# --- rollout server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The image root, with one PNG in it, and the weights root, with a checkpoint of the served model's
    shape, its bare safetensors file, a broken one and a folder without weights."""
    images, weights = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("weights")
    Image.new("RGB", (28, 28), "green").save(images / "green.png")
    build_tiny_model(weights / "checkpoint", seed=1)
    (weights / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (weights / "no-weights").mkdir()
    return images, weights


@pytest.fixture(scope="module")
def rollout_server(
    tiny: Path, roots: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    images, weights = roots
    args = [
        "--model",
        str(tiny),
        "--api-key",
        API_KEY,
        # A short context bounds what a generated request can ask of the model: max_tokens is clipped to it.
        "--max-model-len",
        "128",
        "--image-root",
        str(images),
        "--weights-root",
        str(weights),
    ]
    with running_server("rollout-server", args, tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.fixture(scope="module")
def rollout_schema(rollout_server: Service) -> BaseSchema:
    return load_schema(rollout_server)


@pytest.fixture(scope="module")
def rollout_pools(tiny: Path, roots: tuple[Path, Path]) -> Pools:
    images, weights = roots
    too_long = "a" * 300  # a name longer than file systems take
    files = [
        (images / "green.png").as_uri(),
        (images / "missing.png").as_uri(),
        f"file://{images}/{too_long}.png",
        (tiny / "config.json").as_uri(),  # outside the root
    ]
    checkpoints = [
        weights / "checkpoint",
        weights / "checkpoint" / "model.safetensors",
        weights / "broken.safetensors",
        weights / "no-weights",
        weights / "missing",
        weights / too_long,
        tiny,  # outside the root
    ]
    return Pools(images=DATA_URLS + files, checkpoints=[str(path) for path in checkpoints])


@pytest.mark.parametrize(("method", "path", "variant"), cases(ROLLOUT_ROUTES))
def test_the_rollout_server_answers_any_request_without_a_5xx(
    rollout_schema: BaseSchema,
    rollout_server: Service,
    rollout_pools: Pools,
    method: str,
    path: str,
    variant: str,
) -> None:
    fuzz(rollout_schema, rollout_server, method, path, variant, rollout_pools)


def test_the_rollout_server_generates_after_the_fuzz(rollout_server: Service) -> None:
    content = [{"type": "image_url", "image_url": {"url": DATA_URLS[2]}}, {"type": "text", "text": "colour?"}]
    body = {
        "prompts": [{"prompt_id": "p", "messages": [{"role": "user", "content": content}]}],
        "n": 2,
        "sampling": {"max_tokens": 4},
    }
    with rollout_server.client(timeout=REQUEST_TIMEOUT_S, headers=AUTH) as client:
        assert client.get("/ready").status_code == 200
        answered = client.post("/v1/rollouts", json=body)
    assert answered.status_code == 200, answered.text
    assert len(answered.json()["prompts"][0]["samples"]) == 2


def test_every_route_is_fuzzed(reward_schema: BaseSchema, rollout_schema: BaseSchema) -> None:
    for schema, routes in ((reward_schema, REWARD_ROUTES), (rollout_schema, ROLLOUT_ROUTES)):
        served = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
        assert served == set(routes)
