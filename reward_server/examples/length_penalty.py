"""An example reward-function plugin: a penalty on long responses.

Start the server with it, by module name or by file::

    cppo reward-server --plugin reward_server.examples.length_penalty
    cppo reward-server --plugin reward_server/examples/length_penalty.py

and weigh it against the paper's reward in a request::

    {"id": "a", "response": "...", "ground_truth": "42",
     "reward": {"math": 0.9, "format": 0.1, "length_penalty": -0.05},
     "meta": {"length_penalty": {"max_chars": 4000}}}
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from reward_server.plugins import reward_function


@reward_function("length_penalty", needs_ground_truth=False)
def length_penalty(
    response: str,
    ground_truth: str,
    max_chars: Annotated[int, Field(ge=1)] = 2000,
) -> float:
    """How far the response runs past ``max_chars`` characters: 0.0 up to ``max_chars``, rising linearly
    to 1.0 at twice ``max_chars`` and staying there. Give it a negative weight to penalise length; the
    ground truth is not used.
    """
    excess = len(response) - max_chars
    if excess <= 0:
        return 0.0
    return min(excess / max_chars, 1.0)
