"""Streamed chat completions on the transformers backend, from the inside and at the server's limits: the
text of a streamed sample as it is handed out (characters split across tokens, stop strings), and streamed
requests under the server's auth and back-pressure. What every backend must do is in
``tests/test_rollout_contract.py``."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from servers import metric, running_server

from rollout_server.transformers_backend import _StreamedText
from shared.launch import free_port
from shared.vlm import load_processor

API_KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_streamed_text_never_runs_ahead_of_the_final_text(tiny: Path) -> None:
    tokenizer = load_processor(tiny).tokenizer

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    text = "Grün, 青 and blue; stop there, not here."
    ids = tokenizer.encode(text)
    assert decode(ids) == text
    split = [count for count in range(1, len(ids)) if decode(ids[:count]).endswith("\ufffd")]
    assert split, "no character of the text spans tokens: the test proves nothing"
    # Without stop strings: the pieces add up to the text, and a character whose bytes span tokens waits for
    # its last byte instead of going out as a replacement character.
    streamed = _StreamedText(decode, ())
    pieces = [streamed.add(token) for token in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # With a stop string the sample ends at the step whose text holds it, cut before it (as RowStopper does).
    # Whatever went out before must be a prefix of that final text: the stop string's first characters are
    # held back while it is still incomplete.
    stop = "stop"
    final = text[: text.index(stop)]
    assert len(tokenizer.encode(stop)) > 1, "a one-token stop string proves nothing here"
    held, eager = _StreamedText(decode, (stop, "x")), _StreamedText(decode, ())
    sent = eagerly_sent = ""
    for count, token in enumerate(ids, 1):
        if stop in decode(ids[:count]):
            break
        sent += held.add(token)
        eagerly_sent += eager.add(token)
        assert final.startswith(sent), (sent, final)
    assert not final.startswith(eagerly_sent), "without holding back, the stop string's start would go out"
    assert sent + held.finish(final) == final


def _chat(text: str, n: int, max_tokens: int, stream: bool = False) -> dict:
    return {
        "messages": [{"role": "user", "content": text}],
        "n": n,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def test_streamed_requests_keep_the_servers_auth_and_back_pressure(tiny: Path, tmp_path: Path) -> None:
    args = [
        "--model",
        str(tiny),
        "--api-key",
        API_KEY,
        "--max-queued-sequences",
        "4",
        "--max-batch-size",
        "4",
    ]
    with (
        running_server("rollout-server", args, tmp_path) as server,
        server.client(timeout=300, headers=AUTH) as client,
    ):
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=_chat("hi", 1, 2, stream=True))
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        # Greedy decoding of the random model is deterministic: a prompt that runs its whole budget keeps 4
        # sequences queued while the stream below is open.
        texts = ("Tell a long story.", "hi", "Count.", "Describe it.")
        finishes = {
            text: client.post("/v1/chat/completions", json=_chat(text, 1, 300)).json()["choices"][0][
                "finish_reason"
            ]
            for text in texts
        }
        text = next((text for text, reason in finishes.items() if reason == "length"), None)
        assert text is not None, f"every candidate prompt ends early under greedy decoding: {finishes}"
        with client.stream("POST", "/v1/chat/completions", json=_chat(text, 4, 300, stream=True)) as held:
            assert held.status_code == 200
            # Kept open: an iterator dropped early closes the connection, and the server aborts.
            lines = held.iter_lines()
            assert next(lines).startswith("data: ")
            overloaded = client.post("/v1/chat/completions", json=_chat("hi", 1, 2, stream=True))
        assert overloaded.status_code == 429 and overloaded.headers["retry-after"] == "1"
        assert overloaded.headers["content-type"] == "application/json"
        assert overloaded.json()["error"]["code"] == "overloaded"
        deadline = time.monotonic() + 60
        while metric(client.get("/metrics").text, "cppo_rollout_queued_sequences") != 0:
            assert time.monotonic() < deadline, "the abandoned stream still holds the queue"
            time.sleep(0.02)
        assert metric(client.get("/metrics").text, "cppo_rollout_shed_requests_total") == 1
        with client.stream("POST", "/v1/chat/completions", json=_chat("hi", 1, 2, stream=True)) as served:
            assert served.status_code == 200
            assert [line for line in served.iter_lines() if line][-1] == "data: [DONE]"


def _image_messages(side: int) -> list[dict]:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def test_max_pixels_sizes_images_as_the_trainer_does(tiny: Path, tmp_path: Path) -> None:
    """--max-pixels 3136 (56×56): a 112×112 image becomes 56×56, 4 image tokens instead of 16, as the
    trainer's data.max_pixels sizes it (shared.vlm.PixelBounds); an image within the bounds is unchanged."""
    pad = load_processor(tiny).tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def image_tokens(server, side: int) -> int:
        with server.client() as client:
            reply = client.post("/tokenize", json={"messages": _image_messages(side)})
        assert reply.status_code == 200, reply.text
        return reply.json()["tokens"].count(pad)

    with running_server(
        "rollout-server", ["--model", str(tiny), "--max-pixels", "3136"], tmp_path
    ) as bounded:
        assert (image_tokens(bounded, 112), image_tokens(bounded, 56)) == (4, 4)
    with running_server("rollout-server", ["--model", str(tiny)], tmp_path) as own:
        assert (image_tokens(own, 112), image_tokens(own, 56)) == (16, 4)
    command = [sys.executable, "-m", "shared.cli", "rollout-server", "--model", str(tiny)]
    command += ["--port", str(free_port()), "--max-pixels", "100000"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "--max-pixels: pixel bounds 3136..100000 must lie within" in refused.stderr
    assert "Traceback" not in refused.stderr
