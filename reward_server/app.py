"""The reward server's routes. What they do lives in ``reward_server.service``, the reward functions in
``reward_server.registry`` and ``reward_server.rewards``, the worker processes in ``reward_server.pool``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request

from reward_server.config import RewardSettings
from reward_server.metrics import RewardMetrics
from reward_server.plugins import load_registry, resolve_plugins
from reward_server.pool import WorkerPool
from reward_server.registry import RewardCatalog
from reward_server.service import RewardService
from shared.http import cancel_on_disconnect
from shared.schemas import OpenRLHFRewardRequest, OpenRLHFRewardResponse, ScoreRequest, ScoreResponse
from shared.server import Startup, service_app, started_service

OPENRLHF_PATH = "/get_reward"

Service = Annotated[RewardService, Depends(started_service)]


def create_app(settings: RewardSettings) -> FastAPI:
    """The app. Plugins load now (a bad one raises ``ValueError`` before anything is served); the
    worker processes start in the background after start-up, and ``/ready`` says when they have."""
    plugins = resolve_plugins(settings.plugin)
    registry = load_registry(plugins)
    metrics = RewardMetrics()
    pool = WorkerPool(
        settings.workers,
        plugins,
        item_timeout_s=settings.item_timeout_s,
        fast_lane_s=settings.fast_lane_s,
        memory_mb=settings.worker_memory_mb,
        max_queued=settings.max_queued_items,
        metrics=metrics,
    )
    scoring = RewardService(registry, pool, settings.openrlhf_weights())

    async def close(_: RewardService | None) -> None:
        # Whether or not the service started: workers of a start cut short must stop too.
        await pool.close()

    app = service_app(
        Startup(
            scoring.start,
            close,
            starting=f"starting {pool.size} worker processes",
            waiting="the worker processes are still starting",
        ),
        title="CPPO reward server",
        summary="Scores responses against ground truths with isolated, time-limited reward functions; "
        "OpenRLHF's remote reward protocol included.",
        ready_doc="Every worker process has started (503 until then, or with the reason they could not).",
        settings=settings,
        metrics=metrics,
        errors=(400, 401, 413, 422, 503),
        query_key_paths=frozenset({OPENRLHF_PATH}),
    )

    @app.get("/v1/rewards", tags=["rewards"])
    async def rewards() -> RewardCatalog:
        """The registered reward functions: what each accepts, its parameters, whether it needs a ground
        truth; and the reward ``/get_reward`` applies."""
        return scoring.catalog()

    @app.post("/v1/score", tags=["rewards"])
    async def score(body: ScoreRequest, request: Request, scorer: Service) -> ScoreResponse:
        """Score each item with the reward it names (one function, or weights for several). Results come
        in request order; an item that times out or fails scores 0 with its status and a detail."""
        return await cancel_on_disconnect(request, scorer.score(body))

    @app.post(OPENRLHF_PATH, tags=["openrlhf"])
    async def get_reward(
        body: OpenRLHFRewardRequest, request: Request, scorer: Service
    ) -> OpenRLHFRewardResponse:
        """OpenRLHF's remote reward model protocol (``--remote_rm_url http://HOST:PORT/get_reward``).

        Each query is the prompt followed by the response, as OpenRLHF decodes them; the response is
        what follows the prompt, with trailing end-of-sequence tokens removed. The server's
        ``--openrlhf-reward`` applies to every query, with the labels as ground truths. ``rewards`` are
        the weighted rewards, ``scores`` the heaviest component (a 0-1 accuracy, for dynamic
        filtering), ``extra_logs`` every component; a query that timed out or failed scores 0 in all."""
        return await cancel_on_disconnect(request, scorer.openrlhf(body))

    return app
