"""Retrying HTTP calls to the services: which failures are worth another try, how long to wait before it
(exponential backoff, or what a 429's or 503's ``Retry-After`` asks), and one line that names a failure.

The trainer's clients and the reward server's client library for other trainers (``reward_server.client``)
both retry this way. It imports httpx and tenacity only, so that the library stays light enough to install
next to TRL or verl.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)
from tenacity.stop import StopBaseT

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60.0
"""The longest wait a ``Retry-After`` is honoured for: a server's hint, not a reason to hang."""


def retryable(error: BaseException) -> bool:
    """Whether asking again may succeed: the connection failed or timed out, or the server failed or was
    busy (5xx, 429). A 4xx is the request's fault and will not get better by asking again."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, httpx.TransportError)


_BACKOFF = wait_exponential(multiplier=0.2, max=5)


def wait_before_retry(state: RetryCallState) -> float:
    """Exponential backoff up to 5 s, or what a 429 or 503 asks in its Retry-After (at most a minute)."""
    error = state.outcome.exception() if state.outcome is not None else None
    if isinstance(error, httpx.HTTPStatusError):
        after = error.response.headers.get("retry-after", "")
        if after.isdigit():
            return min(float(after), MAX_RETRY_AFTER_S)
    return _BACKOFF(state)


def explain(error: BaseException) -> str:
    """One line for a failed request: the server's own error message where it sent one."""
    if isinstance(error, httpx.HTTPStatusError):
        try:
            detail = error.response.json()["error"]
            return f"{error.response.status_code} {detail.get('field') or ''} {detail['message']}".strip()
        except (ValueError, KeyError, TypeError):
            return f"{error.response.status_code} {error.response.text[:200]}"
    return f"{type(error).__name__}: {error}"


def _say_retrying(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    pause = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("%s; try %d failed, retrying in %.1f s", explain(error), state.attempt_number, pause)


def attempts_unless_busy(attempts: int, busy_s: float) -> StopBaseT:
    """``attempts`` tries for a failure, but up to ``busy_s`` seconds of them while the server answers
    429: a server that sheds load is alive and will take the request once its queue drains, so it is not
    to be given up on as failed."""
    by_attempts, by_time = stop_after_attempt(attempts), stop_after_delay(busy_s)

    def stop(state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome is not None else None
        busy = isinstance(error, httpx.HTTPStatusError) and error.response.status_code == 429
        return by_time(state) if busy else by_attempts(state)

    return stop


def retrying(stop: StopBaseT, health_check: Callable[[], None] = lambda: None) -> Retrying:
    """Retries of the retryable failures until ``stop``, each logged; ``health_check`` runs before each
    wait and may raise to give up at once. The last failure is re-raised as it was."""

    def before_sleep(state: RetryCallState) -> None:
        health_check()
        _say_retrying(state)

    return Retrying(
        stop=stop,
        wait=wait_before_retry,
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        reraise=True,
    )


def json_headers(api_key: str | None) -> dict[str, str]:
    """Headers of a JSON request, with the bearer key where there is one."""
    # Bodies are pydantic's JSON, sent as bytes, so the type is set here rather than by httpx.
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
