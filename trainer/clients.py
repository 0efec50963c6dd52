"""HTTP clients of the rollout replicas and the reward server, speaking the schemas in ``shared.schemas``.

Requests retry with exponential backoff, or as a 429's or 503's Retry-After says (tenacity). A replica that
still fails is set aside for the rest of the step and tried again at the next one. When none is left, or the
reward server fails, the clients ride the outage out: they wait up to ``outage_s`` for the service to come
back and retry the step's requests, so that a restart costs time and no step; only past that does a step
fail.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import torch
from pydantic import SecretStr
from tenacity import stop_after_attempt, stop_after_delay

from shared.retries import attempts_unless_busy, explain, json_headers, retryable, retrying
from shared.schemas import (
    ErrorResponse,
    PromptRollout,
    RolloutPrompt,
    RolloutRequest,
    RolloutResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    TensorSpec,
    WeightsBroadcast,
    WeightsStatus,
    WeightsUpdate,
)
from shared.weight_broadcast import BroadcastError, Root, describe, local_address_towards
from trainer.config import RewardConfig, RolloutConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Broadcast:
    """Weights to publish by collective broadcast: the trainer's end of the group, and the tensors under the
    served checkpoint's names (``shared.weight_broadcast.checkpoint_tensors``)."""

    root: Root
    weights: dict[str, torch.Tensor]


class ReplicaError(ConnectionError):
    """No rollout replica (or the reward server) could serve a request."""


def refused_item(error: httpx.HTTPStatusError, collection: str) -> int | None:
    """Which element of the request's ``collection`` (``prompts``, ``items``) a 4xx blames, if one: the
    error's ``field`` starts with ``collection.N``."""
    if error.response.status_code not in (400, 413, 422):
        return None
    try:
        field = ErrorResponse.model_validate_json(error.response.content).error.field or ""
    except ValueError:
        return None
    name, _, rest = field.partition(".")
    index = rest.partition(".")[0]
    return int(index) if name == collection and index.isdigit() else None


def refuses_the_weights(error: BaseException) -> bool:
    """Whether a weights request failed for the weights themselves: a 4xx (they do not fit the served model,
    are too large, the key is wrong), which sending them again cannot change. Not a 408 or 429, nor a
    broadcast the replica could not join (``broadcast_failed``, a network matter)."""
    if not isinstance(error, httpx.HTTPStatusError) or error.response.status_code in (408, 429):
        return False
    if not 400 <= error.response.status_code < 500:
        return False
    try:
        code = ErrorResponse.model_validate_json(error.response.content).error.code
    except ValueError:
        return True
    return code != "broadcast_failed"


Refused = Callable[[Any, str], None]
"""Told of each prompt or item a server refused, and why; the request goes on without it."""


def _headers(api_key: SecretStr | None) -> dict[str, str]:
    return json_headers(api_key.get_secret_value() if api_key else None)


def discover_replicas(url: str) -> list[str]:
    """Every address the URL's host resolves to, as base URLs (a headless Service lists each ready pod).
    Raises ``socket.gaierror`` when the name does not resolve."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    addresses = sorted({info[4][0] for info in infos})
    return [
        urlunsplit((parts.scheme, f"[{a}]:{port}" if ":" in a else f"{a}:{port}", parts.path, "", ""))
        for a in addresses
    ]


# How often a wait for a replica says what it waits for.
WAIT_REPORT_EVERY_S = 30.0


class RolloutReplicas:
    """All rollout replicas: rollouts spread over the live ones, weights pushed to every one."""

    def __init__(
        self,
        urls: Sequence[str],
        discover: str | None,
        api_key: SecretStr | None,
        timeout_s: float,
        attempts: int,
        outage_s: float,
        health_check: Callable[[], None] = lambda: None,
    ) -> None:
        self.static_urls = list(urls)
        self.discover = discover
        self.attempts, self.outage_s, self.timeout_s = attempts, outage_s, timeout_s
        self.health_check = health_check
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10), headers=_headers(api_key))
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rollout")
        self.urls: list[str] = []
        self.dead: dict[str, str] = {}
        # Why discovery lists no replica, while it lists none.
        self.unresolved: str | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the replica list and give every replica another chance.

        A discovery name that does not resolve lists no replica rather than failing: a headless Service's
        name has no address until one of its pods is ready, so "no replica yet" looks exactly like this.
        Waiting for one is bounded by the callers (``rollout.ready_timeout_s``, ``rollout.outage_s``)."""
        self.dead = {}
        self.unresolved = None
        if not self.discover:
            self.urls = list(self.static_urls)
            return
        try:
            self.urls = discover_replicas(self.discover)
        except socket.gaierror as error:
            self.urls = []
            self.unresolved = f"{urlsplit(self.discover).hostname} does not resolve ({error.strerror})"

    def live(self) -> list[str]:
        return [url for url in self.urls if url not in self.dead]

    def _post(self, url: str, path: str, **kwargs) -> httpx.Response:
        for attempt in retrying(attempts_unless_busy(self.attempts, self.timeout_s)):
            with attempt:
                response = self.client.post(url + path, **kwargs)
                response.raise_for_status()
        return response

    def _get(self, url: str, path: str) -> httpx.Response:
        for attempt in retrying(stop_after_attempt(self.attempts)):
            with attempt:
                response = self.client.get(url + path)
                response.raise_for_status()
        return response

    def _set_aside(self, url: str, error: BaseException) -> None:
        self.dead[url] = explain(error)
        log.warning("rollout replica %s set aside until the next step: %s", url, self.dead[url])

    @classmethod
    def from_config(
        cls,
        config: RolloutConfig,
        urls: Sequence[str] | None = None,
        health_check: Callable[[], None] = lambda: None,
    ) -> RolloutReplicas:
        """The replicas ``config`` names, or ``urls``. ``health_check`` raises to stop waiting for a
        replica to come back (``cppo stack up``: its own server died, and will not)."""
        discover = None if urls is not None else config.discover
        return cls(
            config.urls if urls is None else urls,
            discover,
            config.api_key,
            config.timeout_s,
            config.attempts,
            config.outage_s,
            health_check,
        )

    def _revive(self, deadline: float, failure: str) -> list[str]:
        """Every replica has failed: give each another chance, and wait until one answers ``/ready`` (a
        restart, a network blip). ReplicaError past ``deadline``, even while replicas answer ``/ready``
        but fail every request."""
        reasons = "; ".join(f"{url}: {why}" for url, why in self.dead.items()) or self.unresolved
        left = deadline - time.monotonic()
        if left <= 0:
            raise ReplicaError(f"{failure} for rollout.outage_s = {self.outage_s:g} s: {reasons}")
        log.warning("%s (%s); waiting up to %.0f s for a replica to come back", failure, reasons, left)
        self.refresh()
        try:
            self.wait_until_ready(left)
        except ReplicaError:
            raise ReplicaError(
                f"{failure}, and none came back within rollout.outage_s = {self.outage_s:g} s: {reasons}"
            ) from None
        return self.live()

    def wait_until_ready(self, timeout_s: float) -> None:
        """Block until at least one replica answers ``/ready``, saying now and then what it waits for."""
        started = time.monotonic()
        deadline = started + timeout_s
        report_at = started
        while True:
            for url in self.live():
                try:
                    if self.client.get(url + "/ready", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            now = time.monotonic()
            if now > deadline:
                raise ReplicaError(f"no rollout replica became ready in {timeout_s:.0f} s: {self._awaited()}")
            if now >= report_at:
                waited, awaited = now - started, self._awaited()
                log.warning("waiting for a rollout replica (%.0f s of %.0f): %s", waited, timeout_s, awaited)
                report_at = now + WAIT_REPORT_EVERY_S
            self.health_check()
            time.sleep(0.5)
            if self.discover:
                self.refresh()

    def _awaited(self) -> str:
        return self.unresolved or f"none of {self.urls} answers /ready"

    def rollouts(
        self,
        prompts: Sequence[RolloutPrompt],
        make_request: Callable[[list[RolloutPrompt]], RolloutRequest],
        on_chunk: Callable[[list[PromptRollout]], None] = lambda chunk: None,
        on_refused: Refused | None = None,
    ) -> list[PromptRollout]:
        """Rollouts of every prompt, in order, the prompts split evenly over the live replicas.

        ``on_chunk`` gets each replica's answer as it arrives (to score it while others still generate).
        A chunk whose replica fails goes to the next live replica. A prompt the replica refuses (a 4xx
        that names it) goes to ``on_refused`` and is left out, when that is given; otherwise the refusal
        stops the step.
        """
        pending = {i: list(prompts[i :: max(1, len(self.live()))]) for i in range(max(1, len(self.live())))}
        results: dict[str, PromptRollout] = {}
        deadline: float | None = None
        while pending:
            live = self.live()
            if not live:
                deadline = deadline or time.monotonic() + self.outage_s
                live = self._revive(deadline, "no rollout replica is left")
            futures: dict[Future, tuple[int, str]] = {}
            for slot, chunk in pending.items():
                url = live[slot % len(live)]
                request = make_request(chunk)
                futures[self.pool.submit(self._rollout_chunk, url, request)] = (slot, url)
            failed: dict[int, list[RolloutPrompt]] = {}
            for future, (slot, url) in futures.items():
                try:
                    answered = future.result()
                except (httpx.HTTPError, ValueError) as error:
                    if isinstance(error, httpx.HTTPStatusError) and not retryable(error):
                        index = refused_item(error, "prompts")
                        if on_refused is None or index is None:
                            raise ReplicaError(
                                f"{url} refused the rollout request: {explain(error)}"
                            ) from error
                        on_refused(pending[slot][index], explain(error))
                        if rest := pending[slot][:index] + pending[slot][index + 1 :]:
                            failed[slot] = rest
                        continue
                    self._set_aside(url, error)
                    failed[slot] = pending[slot]
                    continue
                on_chunk(answered)
                results.update((r.prompt_id, r) for r in answered)
            pending = failed
        return [results[p.prompt_id] for p in prompts if p.prompt_id in results]

    def _rollout_chunk(self, url: str, request: RolloutRequest) -> list[PromptRollout]:
        # Nulls are meaningful here (views.positive: null makes no I⁺), so they are sent.
        response = self._post(url, "/v1/rollouts", content=request.model_dump_json())
        return RolloutResponse.model_validate_json(response.content).prompts

    def versions(self) -> dict[str, int]:
        """Each live replica's policy version; a replica that does not answer is set aside."""
        found = {}
        for url in self.live():
            try:
                found[url] = WeightsStatus.model_validate_json(self._get(url, "/v1/weights").content).version
            except (httpx.HTTPError, ValueError) as error:
                self._set_aside(url, error)
        return found

    def publish(
        self,
        version: int,
        *,
        path: str | None = None,
        tensors: bytes | None = None,
        broadcast: Broadcast | None = None,
        only: list[str] | None = None,
    ) -> list[str]:
        """Load the weights on every live replica, or ``only`` those (by reference: ``path``; by value:
        ``tensors``; by collective broadcast: ``broadcast``), and return the replicas that report ``version``.
        A replica that fails is set aside. When every one refused the weights themselves (a 4xx: they do not
        fit the served model, say), ReplicaError at once: waiting out ``outage_s`` cannot change that."""

        def push(url: str) -> str:
            if path is not None:
                body = WeightsUpdate(path=path, version=version).model_dump_json()
                response = self._post(url, "/v1/weights", content=body)
            else:
                response = self._post(
                    url,
                    "/v1/weights/tensors",
                    params={"version": version},
                    content=tensors,
                    headers={"Content-Type": "application/octet-stream"},
                )
            return self._check_version(url, response, version)

        deadline: float | None = None
        while True:
            targets = [url for url in self.live() if only is None or url in only]
            if broadcast is not None and targets:
                synced, refusals = self._outcomes(self._broadcast(version, broadcast, targets))
            else:
                synced, refusals = self._outcomes([(url, self.pool.submit(push, url)) for url in targets])
            if synced:
                return synced
            if targets and len(refusals) == len(targets):
                why = "; ".join(f"{url}: {reason}" for url, reason in refusals.items())
                raise ReplicaError(f"every rollout replica refused the weights of version {version}: {why}")
            deadline = deadline or time.monotonic() + self.outage_s
            self._revive(deadline, f"no rollout replica loaded version {version}")

    @staticmethod
    def _check_version(url: str, response: httpx.Response, version: int) -> str:
        reported = WeightsStatus.model_validate_json(response.content).version
        if reported != version:
            raise ValueError(f"{url} reports version {reported} after loading {version}")
        return url

    def _outcomes(self, requests: list[tuple[str, Future[str]]]) -> tuple[list[str], dict[str, str]]:
        """The replicas whose weights request reported the version, and those that refused the weights
        themselves, with why. Every replica that failed is set aside."""
        synced, refusals = [], {}
        for url, future in requests:
            try:
                synced.append(future.result())
            except (httpx.HTTPError, ValueError) as error:
                self._set_aside(url, error)
                if refuses_the_weights(error):
                    refusals[url] = self.dead[url]
        return synced, refusals

    def _broadcast(
        self, version: int, broadcast: Broadcast, targets: list[str]
    ) -> list[tuple[str, Future[str]]]:
        """Invite ``targets`` to the broadcast (each with a rank of its own), send while they receive, and
        return each one's request, done.

        An invitation is one attempt: a broadcast cannot be joined again once it has started. A replica that
        refuses it (4xx), or that has not joined within ``sync.timeout_s``, is left out of the group (and
        ``_outcomes`` sets it aside), and the others go on without it."""
        root = broadcast.root
        first = urlsplit(targets[0])
        address = local_address_towards(first.hostname or "localhost", first.port or 80)
        session = f"v{version}-{secrets.token_hex(4)}"
        specs = [
            TensorSpec(name=m.name, shape=list(m.shape), dtype=m.dtype) for m in describe(broadcast.weights)
        ]
        # Joining may take timeout_s, and so may each bucket; a replica always answers by then.
        timeout = httpx.Timeout(2 * root.timeout_s, connect=10)

        def invite(url: str, rank: int) -> str:
            body = WeightsBroadcast(
                version=version,
                host=address,
                port=root.port,
                session=session,
                rank=rank,
                backend=root.backend,
                tensors=specs,
                bucket_bytes=root.bucket_bytes,
                timeout_s=root.timeout_s,
            )
            response = self.client.post(
                url + "/v1/weights/broadcast", content=body.model_dump_json(), timeout=timeout
            )
            response.raise_for_status()
            return self._check_version(url, response, version)

        futures = {
            rank: (url, self.pool.submit(invite, url, rank)) for rank, url in enumerate(targets, start=1)
        }
        try:
            root.broadcast(session, futures, lambda rank: futures[rank][1].done(), address, broadcast.weights)
        except BroadcastError as error:
            log.warning("weights broadcast of version %d failed: %s", version, error)
        return list(futures.values())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class RewardClient:
    """``POST /v1/score`` with retries."""

    def __init__(
        self,
        url: str,
        api_key: SecretStr | None,
        timeout_s: float,
        outage_s: float,
        health_check: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url.rstrip("/")
        self.outage_s = outage_s
        self.health_check = health_check
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10), headers=_headers(api_key))

    def score(self, items: list[ScoreItem], on_refused: Refused | None = None) -> list[ScoreResult]:
        """The items' scores, in order. An item the server refuses (a 4xx that names it) goes to
        ``on_refused`` and is left out, when that is given; otherwise the refusal is raised."""
        items = list(items)
        while items:
            try:
                return self._score(items)
            except httpx.HTTPStatusError as error:
                index = refused_item(error, "items")
                if on_refused is None or index is None:
                    raise
                on_refused(items.pop(index), explain(error))
        return []

    def _score(self, items: list[ScoreItem]) -> list[ScoreResult]:
        body = ScoreRequest(items=items).model_dump_json(exclude_none=True)
        # One server, nowhere else to go: retried for as long as an outage may last.
        for attempt in retrying(stop_after_delay(self.outage_s), self.health_check):
            with attempt:
                response = self.client.post(self.url + "/v1/score", content=body)
                response.raise_for_status()
        return ScoreResponse.model_validate_json(response.content).results

    @classmethod
    def from_config(
        cls, config: RewardConfig, url: str | None = None, health_check: Callable[[], None] = lambda: None
    ) -> RewardClient:
        """The reward server ``config`` names, or ``url``; ``health_check`` as for ``RolloutReplicas``."""
        return cls(url or config.url, config.api_key, config.timeout_s, config.outage_s, health_check)

    def wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.client.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            self.health_check()
            time.sleep(0.5)
        raise ReplicaError(f"the reward server at {self.url} did not become ready in {timeout_s:.0f} s")

    def close(self) -> None:
        self.client.close()
