"""The servers' HTTP layer on a real port: an unexpected exception answers 500 in the JSON error format
and leaves the connection open for the client's next request."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from servers import app_in_a_thread

from shared.http import UnexpectedErrors, install_error_handlers


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
