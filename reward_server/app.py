"""The reward server's routes. The reward functions live in ``reward_server.functions``, the worker
processes that run them in ``reward_server.pool``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reward_server.config import RewardSettings
from reward_server.functions import ItemProblem, RewardCatalog, combine
from reward_server.metrics import RewardMetrics
from reward_server.plugins import load_registry, resolve_plugins
from reward_server.pool import Outcome, PoolBusy, WorkerPool
from shared.http import (
    BodyLimit,
    Instrument,
    ServiceError,
    bearer_auth,
    cancel_on_disconnect,
    install_error_handlers,
)
from shared.schemas import (
    ErrorResponse,
    Health,
    OpenRLHFRewardRequest,
    OpenRLHFRewardResponse,
    Readiness,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)

log = logging.getLogger("cppo.reward")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 503)}
OPENRLHF_PATH = "/get_reward"


def running_pool(request: Request) -> WorkerPool:
    """The worker pool, once every worker has started; 503 until then."""
    if not request.app.state.ready:
        detail = request.app.state.start_error or "the worker processes are still starting"
        raise ServiceError(503, None, "not_ready", detail)
    return request.app.state.pool


Pool = Annotated[WorkerPool, Depends(running_pool)]


def create_app(settings: RewardSettings) -> FastAPI:
    """The app. Plugins load now (a bad one raises ``ValueError`` before anything is served); the
    worker processes start in the background after start-up, and ``/ready`` says when they have."""
    plugins = resolve_plugins(settings.plugin)
    registry = load_registry(plugins)
    openrlhf_weights = registry.check_weights(settings.openrlhf_weights())
    # The component OpenRLHF's dynamic filtering reads as the 0-1 "score": the heaviest one.
    openrlhf_main = max(openrlhf_weights, key=lambda name: openrlhf_weights[name])
    metrics = RewardMetrics()
    pool = WorkerPool(
        settings.workers,
        plugins,
        item_timeout_s=settings.item_timeout_s,
        memory_mb=settings.worker_memory_mb,
        max_queued=settings.max_queued_items,
        metrics=metrics,
    )

    async def start() -> None:
        try:
            await pool.start()
            app.state.ready = True
            log.info(
                "%d worker processes ready; reward functions: %s", pool.size, ", ".join(registry.names())
            )
        except Exception as error:
            app.state.start_error = f"{type(error).__name__}: {error}"
            log.exception("the worker processes failed to start")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(start())
        yield
        starting.cancel()
        await pool.close()

    app = FastAPI(
        title="CPPO reward server",
        summary="Scores responses against ground truths with isolated, time-limited reward functions; "
        "OpenRLHF's remote reward protocol included.",
        lifespan=lifespan,
        dependencies=[
            Depends(
                bearer_auth(
                    settings.api_key.get_secret_value() if settings.api_key else None,
                    query_key_paths=frozenset({OPENRLHF_PATH}),
                )
            )
        ],
        responses=ERRORS,
    )
    app.state.pool = pool
    app.state.ready = False
    app.state.start_error = None
    install_error_handlers(app)
    app.add_middleware(BodyLimit, default_limit=settings.max_request_bytes)
    app.add_middleware(Instrument, requests=metrics.requests, latency=metrics.latency)

    async def run(request: Request, tasks: list) -> list[Outcome]:
        try:
            return await cancel_on_disconnect(request, pool.score(tasks))
        except PoolBusy as busy:
            raise ServiceError(503, None, "overloaded", str(busy)) from None

    @app.get("/health", tags=["ops"])
    async def health() -> Health:
        """The process is alive."""
        return Health()

    @app.get("/ready", tags=["ops"], responses={503: {"model": Readiness}})
    async def ready() -> JSONResponse:
        """Every worker process has started (503 until then, or with the reason they could not)."""
        if not app.state.ready:
            detail = app.state.start_error or f"starting {pool.size} worker processes"
            return JSONResponse(Readiness(ready=False, detail=detail).model_dump(), status_code=503)
        detail = f"{pool.alive} of {pool.size} workers; reward functions: {', '.join(registry.names())}"
        return JSONResponse(Readiness(ready=True, detail=detail).model_dump())

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/rewards", tags=["rewards"])
    async def rewards() -> RewardCatalog:
        """The registered reward functions: what each accepts, its parameters, whether it needs a ground
        truth; and the reward ``/get_reward`` applies."""
        return RewardCatalog(functions=registry.info(), openrlhf_reward=openrlhf_weights)

    @app.post("/v1/score", tags=["rewards"])
    async def score(body: ScoreRequest, request: Request, _: Pool) -> ScoreResponse:
        """Score each item with the reward it names (one function, or weights for several). Results come
        in request order; an item that times out or fails scores 0 with its status and a detail."""
        weights, tasks = [], []
        for index, item in enumerate(body.items):
            try:
                item_weights, task = registry.plan(item.reward, item.response, item.ground_truth, item.meta)
            except ItemProblem as problem:
                field = f"items.{index}.{problem.field}"
                raise ServiceError(422, field, "invalid_item", f"{field}: {problem}") from None
            weights.append(item_weights)
            tasks.append(task)
        outcomes = await run(request, tasks)
        return ScoreResponse(
            results=[
                _result(item.id, item_weights, outcome)
                for item, item_weights, outcome in zip(body.items, weights, outcomes, strict=True)
            ]
        )

    @app.post(OPENRLHF_PATH, tags=["openrlhf"])
    async def get_reward(body: OpenRLHFRewardRequest, request: Request, _: Pool) -> OpenRLHFRewardResponse:
        """OpenRLHF's remote reward model protocol (``--remote_rm_url http://HOST:PORT/get_reward``).

        Each query is the prompt followed by the response, as OpenRLHF decodes them; the response is
        what follows the prompt, with trailing end-of-sequence tokens removed. The server's
        ``--openrlhf-reward`` applies to every query, with the labels as ground truths. ``rewards`` are
        the weighted rewards, ``scores`` the heaviest component (a 0-1 accuracy, for dynamic
        filtering), ``extra_logs`` every component; a query that timed out or failed scores 0 in all."""
        count = len(body.query)
        prompts = body.prompts or [""] * count
        labels = body.labels or [""] * count
        tasks = []
        for index in range(count):
            response = openrlhf_response(body.query[index], prompts[index])
            try:
                _, task = registry.plan(openrlhf_weights, response, labels[index])
            except ItemProblem as problem:
                field = f"labels.{index}" if body.labels else "labels"
                raise ServiceError(422, field, "invalid_item", f"{field}: {problem}") from None
            tasks.append(task)
        outcomes = await run(request, tasks)
        results = [_result(str(index), openrlhf_weights, outcome) for index, outcome in enumerate(outcomes)]
        return OpenRLHFRewardResponse(
            rewards=[result.reward for result in results],
            scores=[result.components.get(openrlhf_main, 0.0) for result in results],
            extra_logs={
                name: [result.components.get(name, 0.0) for result in results] for name in openrlhf_weights
            },
        )

    return app


def _result(item_id: str, weights: Mapping[str, float], outcome: Outcome) -> ScoreResult:
    if outcome.status != "ok":
        return ScoreResult(id=item_id, reward=0.0, status=outcome.status, detail=outcome.detail)
    reward = combine(weights, outcome.components)
    if not abs(reward) < float("inf"):
        detail = "the weighted sum of the components is not a finite number"
        return ScoreResult(id=item_id, reward=0.0, status="error", detail=detail)
    return ScoreResult(id=item_id, reward=reward, components=outcome.components, status="ok")


_END_TOKENS = ("</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def openrlhf_response(query: str, prompt: str) -> str:
    """The response in an OpenRLHF query, which is the prompt followed by the response: the text after
    the prompt (OpenRLHF's own examples do ``query[len(prompt):]``); the whole query when the prompt is
    empty or not found in it. End-of-sequence tokens that OpenRLHF's decoding leaves at the end
    (``<|im_end|>``, ``<|endoftext|>``, ``</s>``…) are removed."""
    if prompt:
        if query.startswith(prompt):
            query = query[len(prompt) :]
        elif (at := query.find(prompt)) >= 0:  # e.g. a BOS token decoded before the prompt
            query = query[at + len(prompt) :]
    for _ in range(8):
        stripped = query.rstrip()
        for token in _END_TOKENS:
            if stripped.endswith(token):
                stripped = stripped[: -len(token)]
                break
        else:
            return stripped
        query = stripped
    return query.rstrip()
