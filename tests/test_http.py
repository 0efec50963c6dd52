"""The servers' HTTP layer on a real port: an unexpected exception answers 500 in the JSON error format
and leaves the connection open for the client's next request; a refusal that quotes a huge field name is
still a 4xx; a body past ``--max-request-bytes`` is a JSON 413 however it is sent, chunked included."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from servers import app_in_a_thread, running_server

from shared.http import UnexpectedErrors, install_error_handlers
from shared.launch import Service
from shared.schemas import MAX_DETAIL_CHARS, MAX_PATH_CHARS, ErrorResponse, WeightsUpdate


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(UnexpectedErrors)

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    @app.get("/ok")
    async def ok() -> dict:
        return {"ok": True}

    @app.post("/weights")
    async def weights(body: WeightsUpdate) -> dict:
        return {"ok": True}

    with app_in_a_thread(app) as port:
        yield port


def test_an_unexpected_error_is_a_json_500_and_the_connection_stays_open(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/boom")
    failed = connection.getresponse()
    body = json.loads(failed.read())
    assert failed.status == 500 and failed.getheader("content-type") == "application/json"
    assert body["error"]["code"] == "internal_error" and "a bug" not in body["error"]["message"]
    assert failed.getheader("connection") != "close"
    socket = connection.sock
    # The same socket answers the next request: other requests of a pooled client are not failed.
    connection.request("GET", "/ok")
    answered = connection.getresponse()
    assert answered.status == 200 and json.loads(answered.read()) == {"ok": True}
    assert connection.sock is socket
    connection.close()


def test_a_refusal_quoting_a_huge_unknown_field_is_a_422_with_the_field_clipped(port: int) -> None:
    # The field path names the unknown key, and the message repeats it: both past what ErrorDetail allows.
    key = "k" * (MAX_DETAIL_CHARS + 10)
    refused = httpx.post(f"http://127.0.0.1:{port}/weights", json={"path": "/w", "version": 1, key: 0})
    assert refused.status_code == 422, refused.text
    error = ErrorResponse.model_validate_json(refused.content).error
    assert error.code == "validation_error"
    assert error.field == key[: MAX_PATH_CHARS - 1] + "…"
    assert len(error.message) == MAX_DETAIL_CHARS and error.message.startswith(key[:100])


# --- the body limit on a real server --------------------------------------------------------------

MAX_REQUEST_BYTES = 64 * 1024


def chunked(total: int, piece: int = 16 * 1024) -> Iterator[bytes]:
    """``total`` bytes of JSON whitespace; httpx sends a generator chunked, without Content-Length."""
    for start in range(0, total, piece):
        yield b" " * min(piece, total - start)


def valid_body(command: str) -> tuple[str, bytes]:
    if command == "reward-server":
        item = {"id": "a", "response": r"\boxed{2}", "ground_truth": "2", "reward": "math"}
        return "/v1/score", json.dumps({"items": [item]}).encode()
    message = {"role": "user", "content": "hi"}
    return "/v1/chat/completions", json.dumps({"messages": [message], "max_tokens": 2}).encode()


@pytest.fixture(scope="module", params=["reward-server", "rollout-server"])
def limited_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Service]]:
    args = ["--max-request-bytes", str(MAX_REQUEST_BYTES)]
    if request.param == "reward-server":
        args += ["--workers", "1"]
    else:
        args += ["--model", str(request.getfixturevalue("tiny"))]
    with running_server(request.param, args, tmp_path_factory.mktemp("logs")) as server:
        yield request.param, server


def test_a_chunked_body_over_the_limit_is_a_json_413_and_the_server_stays_up(
    limited_server: tuple[str, Service],
) -> None:
    command, server = limited_server
    path, body = valid_body(command)
    headers = {"content-type": "application/json"}
    with server.client(timeout=60) as client:
        # Under the limit, a chunked body is read like any other.
        answered = client.post(path, content=iter([body]), headers=headers)
        assert answered.status_code == 200, answered.text
        refused = client.post(path, content=chunked(16 * MAX_REQUEST_BYTES), headers=headers)
        assert refused.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in refused.request.headers
        assert refused.status_code == 413, refused.text
        error = ErrorResponse.model_validate_json(refused.content).error
        assert (error.field, error.code) == ("body", "too_large")
        assert str(MAX_REQUEST_BYTES) in error.message
        assert client.get("/health").status_code == 200
        assert client.post(path, content=iter([body]), headers=headers).status_code == 200
    assert server.process.poll() is None
