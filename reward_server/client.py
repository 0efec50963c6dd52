"""The reward server as the reward of other trainers: a TRL reward function and verl's ``compute_score``.

It needs httpx, tenacity and pydantic, which TRL and verl install anyway, and this project's package for the
wire schemas (``shared.schemas``); it imports no torch and nothing of the trainer or the server.

TRL (``GRPOTrainer``, and every trainer that takes ``reward_funcs``)::

    from reward_server.client import make_trl_reward

    reward = make_trl_reward("http://127.0.0.1:5000", reward={"math": 0.9, "format": 0.1})
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=dataset)

TRL calls ``reward(prompts, completions, **columns) -> list[float]``; the ground truths are the dataset's
``solution`` column by default, as for TRL's own ``accuracy_reward``.

verl reads the server's address from ``CPPO_REWARD_URL`` (and its key from ``CPPO_REWARD_API_KEY``, the
variable the server reads too), or from ``reward_kwargs``::

    custom_reward_function.path=<this file> custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.reward=math     # optional; the default is 0.9·math + 0.1·format

With ``reward_model.reward_manager=batch``, name ``compute_score_batch`` instead: one request per batch
rather than one per response. verl loads this file by its path, so it imports nothing relative to it.

Every call sends its items in one ``POST /v1/score`` (split into requests of at most
``shared.schemas.MAX_SCORE_ITEMS``), retried with backoff on a connection error, a timeout, a 5xx or a 429
(waiting what a ``Retry-After`` asks). A refused request (4xx) and a server that stays unreachable raise
:class:`RewardServerError` with the server's own message, which names the field at fault.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError
from tenacity import stop_after_attempt

from shared.retries import explain, json_headers, retryable, retrying
from shared.schemas import MAX_SCORE_ITEMS, ScoreItem, ScoreRequest, ScoreResponse, ScoreResult

log = logging.getLogger(__name__)

URL_ENV = "CPPO_REWARD_URL"
"""Where ``compute_score`` finds the server when no ``url`` is given."""
API_KEY_ENV = "CPPO_REWARD_API_KEY"
"""The server's key, when none is given; the server reads its own key from the same variable."""

RewardSpec = str | Mapping[str, float]
"""A reward function's name (``"math"``), or a weight per function name (``{"math": 0.9, "format": 0.1}``)."""
DEFAULT_REWARD: RewardSpec = {"math": 0.9, "format": 0.1}
"""The paper's reward, as the server's OpenRLHF route applies by default."""
DEFAULT_GROUND_TRUTH_COLUMN = "solution"
"""The dataset column TRL's own ``accuracy_reward`` reads its ground truths from."""
DEFAULT_TIMEOUT_S = 300.0
"""Seconds one request may take: a full request of 10 000 math items takes about 80 s on two cores."""
DEFAULT_ATTEMPTS = 5


class RewardServerError(RuntimeError):
    """The reward server refused a request, could not be reached, or answered something else than scores."""


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the reward server URL {url!r} is not an http(s) URL such as http://127.0.0.1:5000")
    return url.rstrip("/")


class RewardServerClient:
    """``POST /v1/score`` with retries, in requests of at most ``max_items`` items.

    ``timeout_s`` bounds each request (connecting: 10 s); a request that fails in a way that may pass is
    tried ``attempts`` times in all.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
        max_items: int = MAX_SCORE_ITEMS,
    ) -> None:
        if not 1 <= max_items <= MAX_SCORE_ITEMS:
            raise ValueError(
                f"max_items must be within 1..{MAX_SCORE_ITEMS}, the server's limit; got {max_items}"
            )
        self.url = _base_url(url)
        self.timeout_s, self.attempts, self.max_items = timeout_s, attempts, max_items
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)), headers=json_headers(api_key)
        )

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Each item's result, in order. Ids must be unique within each request of ``max_items``."""
        results: list[ScoreResult] = []
        for start in range(0, len(items), self.max_items):
            results += self._score_request(items[start : start + self.max_items])
        return results

    def _score_request(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        body = ScoreRequest(items=list(items)).model_dump_json(exclude_none=True)
        try:
            for attempt in retrying(stop_after_attempt(self.attempts)):
                with attempt:
                    response = self._http.post(self.url + "/v1/score", content=body)
                    response.raise_for_status()
        except httpx.HTTPStatusError as error:
            how = f"failed {self.attempts} times" if retryable(error) else "refused the request"
            raise RewardServerError(f"the reward server at {self.url} {how}: {explain(error)}") from error
        except httpx.TimeoutException as error:
            raise RewardServerError(
                f"the reward server at {self.url} did not answer within {self.timeout_s:g} s "
                f"({self.attempts} tries): {explain(error)}"
            ) from error
        except httpx.TransportError as error:
            raise RewardServerError(
                f"cannot reach the reward server at {self.url} ({self.attempts} tries): {explain(error)}"
            ) from error
        try:
            results = ScoreResponse.model_validate_json(response.content).results
        except ValidationError as error:
            raise RewardServerError(
                f"{self.url}/v1/score answered something else than scores; is it the reward server? "
                f"{response.text[:200]!r}"
            ) from error
        if [r.id for r in results] != [item.id for item in items]:
            raise RewardServerError(f"{self.url}/v1/score answered other items than it was asked for")
        return results

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """``value`` with its mappings made dicts and its sequences lists, recursively: verl's reward_kwargs are
    omegaconf containers, which the wire schemas do not take."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


def _items(
    responses: Sequence[str],
    ground_truths: Sequence[object],
    prompts: Sequence[str | None],
    data_sources: Sequence[str | None],
    reward: RewardSpec,
    meta: Mapping | None,
) -> list[ScoreItem]:
    """One item per response, its id its index. Ground truths may be numbers (a dataset's int column), read
    as their text, or None (none in the dataset, for functions that need none). The prompts and data
    sources go to the reward functions that take them."""
    spec, meta = _plain(reward), _plain(meta)
    return [
        ScoreItem(
            id=str(i),
            response=response,
            ground_truth="" if truth is None else str(truth),
            reward=spec,
            meta=meta,
            prompt=prompt,
            # verl's come as numpy strings.
            data_source=None if source is None else str(source),
        )
        for i, (response, truth, prompt, source) in enumerate(
            zip(responses, ground_truths, prompts, data_sources, strict=True)
        )
    ]


def _rewards(results: Sequence[ScoreResult]) -> list[float]:
    failed = [r for r in results if r.status != "ok"]
    if failed:
        # The server scores these 0; said once per call, so that a broken plugin is not silent.
        log.warning(
            "%d of %d responses could not be scored and count 0; the first: %s (%s)",
            len(failed),
            len(results),
            failed[0].status,
            failed[0].detail,
        )
    return [r.reward for r in results]


# --- TRL -----------------------------------------------------------------------------------------

Conversation = list[dict[str, Any]]
"""TRL's conversational prompts and completions: ``{"role", "content"}`` messages."""
# What TRL passes every reward function besides the dataset's columns.
_TRL_KWARGS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})
IMAGE_PLACEHOLDER = "<image>"
"""An image part in a prompt's text, as the trainer's score items write it."""


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:  # a message of tool calls only
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part.get("text", "") if part.get("type") == "text" else IMAGE_PLACEHOLDER
        for part in content
        if part.get("type") in ("text", "image", "image_url")
    )


def completion_text(completion: str | Conversation) -> str:
    """The response in a TRL completion: the text itself, or a conversational completion's last assistant
    message (its text parts joined, where the content is a list of parts)."""
    if isinstance(completion, str):
        return completion
    for message in reversed(completion):
        if message.get("role") == "assistant":
            return _message_text(message)
    raise ValueError(f"a conversational completion without an assistant message: {completion!r:.200}")


def prompt_text(prompt: str | Conversation) -> str:
    """A TRL prompt's text: the text itself, or each message's text on a line of its own, images as
    ``<image>`` (what the trainer's own score items carry)."""
    return prompt if isinstance(prompt, str) else "\n".join(_message_text(message) for message in prompt)


class TRLReward:
    """A TRL reward function scored by the reward server: ``(prompts, completions, **kwargs) -> list[float]``.

    ``prompts`` and ``completions`` are texts or conversations (lists of ``{"role", "content"}``
    messages); the ground truths are ``kwargs[ground_truth_column]``, one per completion, as TRL passes
    each column of the dataset. The prompts' texts, and a ``data_source`` column where the dataset has
    one, go to the reward functions that take them. Where TRL gives ``log_metric``, each reward
    component's mean is logged as ``<__name__>/<component>``. ``__name__`` is what TRL logs the reward
    under (``rewards/<__name__>/mean``).
    """

    def __init__(
        self,
        client: RewardServerClient,
        reward: RewardSpec,
        ground_truth_column: str | None,
        meta: dict | None,
        name: str,
    ) -> None:
        self.client, self.reward, self.meta = client, reward, meta
        self.ground_truth_column = ground_truth_column
        self.__name__ = name

    def __call__(
        self, prompts: list[str | Conversation], completions: list[str | Conversation], **kwargs: Any
    ) -> list[float]:
        items = _items(
            [completion_text(c) for c in completions],
            self._ground_truths(kwargs, len(completions)),
            [prompt_text(p) for p in prompts],
            kwargs.get("data_source") or [None] * len(completions),
            self.reward,
            self.meta,
        )
        results = self.client.score(items)
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        if log_metric is not None and results:
            for component in results[0].components:
                values = [r.components.get(component, 0.0) for r in results]
                log_metric(f"{self.__name__}/{component}", sum(values) / len(values))
        return _rewards(results)

    def _ground_truths(self, kwargs: dict[str, Any], count: int) -> Sequence[object]:
        if self.ground_truth_column is None:
            return [""] * count
        if self.ground_truth_column not in kwargs:
            columns = sorted(set(kwargs) - _TRL_KWARGS)
            raise ValueError(
                f"the dataset has no {self.ground_truth_column!r} column to read the ground truths from (its "
                f"columns besides the prompt: {columns}); set make_trl_reward(ground_truth_column=...)"
            )
        return kwargs[self.ground_truth_column]


def make_trl_reward(
    url: str | None = None,
    *,
    reward: RewardSpec = DEFAULT_REWARD,
    ground_truth_column: str | None = DEFAULT_GROUND_TRUTH_COLUMN,
    meta: dict | None = None,
    name: str | None = None,
    api_key: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    attempts: int = DEFAULT_ATTEMPTS,
) -> TRLReward:
    """A TRL reward function, ``reward(prompts, completions, **kwargs) -> list[float]``, that scores each
    completion against its ground truth on the reward server at ``url`` (default: ``$CPPO_REWARD_URL``).

    ``reward`` is a function's name or a weight per function (``GET /v1/rewards`` lists them); ``meta``
    their parameters, sent with every item (``{"iou": {"mode": "continuous"}}``). The ground truths are
    the dataset's ``ground_truth_column``; ``None`` for functions that need none (``"format"``). ``name``
    is what TRL logs the reward under: by default the function's name, or the weighted names joined by
    ``+``. ``api_key`` defaults to ``$CPPO_REWARD_API_KEY``.
    """
    client = RewardServerClient(
        _url(url), api_key or os.environ.get(API_KEY_ENV), timeout_s=timeout_s, attempts=attempts
    )
    if name is None:
        name = reward if isinstance(reward, str) else "+".join(reward)
    return TRLReward(client, reward, ground_truth_column, meta, name)


# --- verl ----------------------------------------------------------------------------------------


def _url(url: str | None) -> str:
    found = url or os.environ.get(URL_ENV)
    if not found:
        raise RewardServerError(
            f"no reward server URL: set {URL_ENV}=http://HOST:5000, or pass url= "
            "(verl: +custom_reward_function.reward_kwargs.url=...)"
        )
    return found


@functools.cache
def _shared_client(url: str, api_key: str | None) -> RewardServerClient:
    # verl calls compute_score once per response: one client per server keeps its connections open.
    return RewardServerClient(url, api_key)


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[object],
    extra_infos: Sequence[dict | None] | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    reward: RewardSpec = DEFAULT_REWARD,
    meta: dict | None = None,
) -> list[float]:
    """verl's batched reward function (``reward_model.reward_manager=batch``):
    ``compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos) -> list[float]``,
    all responses in one request.

    The keyword arguments come from ``custom_reward_function.reward_kwargs``: ``url`` (default
    ``$CPPO_REWARD_URL``), ``api_key`` (default ``$CPPO_REWARD_API_KEY``), ``reward`` and ``meta`` as for
    :func:`make_trl_reward`. The data sources go to the reward functions that take a ``data_source``;
    ``extra_infos`` are accepted as verl passes them.
    """
    client = _shared_client(_url(url), api_key or os.environ.get(API_KEY_ENV))
    # verl gives a reward function no prompt.
    items = _items(solution_strs, ground_truths, [None] * len(solution_strs), data_sources, reward, meta)
    return _rewards(client.score(items))


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: object,
    extra_info: dict | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    reward: RewardSpec = DEFAULT_REWARD,
    meta: dict | None = None,
) -> float:
    """verl's custom reward function: ``compute_score(data_source, solution_str, ground_truth,
    extra_info=None) -> float``, the reward of one response; keyword arguments as for
    :func:`compute_score_batch`."""
    return compute_score_batch(
        [data_source],
        [solution_str],
        [ground_truth],
        [extra_info],
        url=url,
        api_key=api_key,
        reward=reward,
        meta=meta,
    )[0]


def make_verl_compute_score(
    url: str,
    *,
    reward: RewardSpec = DEFAULT_REWARD,
    meta: dict | None = None,
    api_key: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    attempts: int = DEFAULT_ATTEMPTS,
) -> Callable[[str, str, object, dict | None], float]:
    """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float`` for the
    server at ``url``, for a reward file of one's own (``compute_score = make_verl_compute_score(...)``)."""
    client = RewardServerClient(
        url, api_key or os.environ.get(API_KEY_ENV), timeout_s=timeout_s, attempts=attempts
    )

    def compute_score(
        data_source: str, solution_str: str, ground_truth: object, extra_info: dict | None = None
    ) -> float:
        items = _items([solution_str], [ground_truth], [None], [data_source], reward, meta)
        return _rewards(client.score(items))[0]

    return compute_score
