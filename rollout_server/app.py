"""The rollout server's routes. What they do lives in ``rollout_server.service``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rollout_server.backend import GenerationBackend
from rollout_server.config import RolloutSettings
from rollout_server.engine import make_backend, resolve_model_folder
from rollout_server.metrics import RolloutMetrics
from rollout_server.service import RolloutService
from rollout_server.weights import WeightsStager
from shared.http import (
    BodyLimit,
    Instrument,
    ServiceError,
    bearer_auth,
    cancel_on_disconnect,
    install_error_handlers,
)
from shared.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    RolloutRequest,
    RolloutResponse,
    WeightsStatus,
    WeightsUpdate,
)

log = logging.getLogger("cppo.rollout")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 503)}


def loaded_service(request: Request) -> RolloutService:
    """The service, once the model has loaded; 503 until then."""
    service = request.app.state.service
    if service is None:
        detail = request.app.state.load_error or "the model is still loading"
        raise ServiceError(503, None, "not_ready", detail)
    return service


Service = Annotated[RolloutService, Depends(loaded_service)]


def create_app(settings: RolloutSettings, backend: GenerationBackend | None = None) -> FastAPI:
    """The app; the model loads in the background after start-up, and ``/ready`` says when it is done."""
    metrics = RolloutMetrics()
    started = time.time()

    async def load() -> None:
        try:
            folder = await asyncio.to_thread(resolve_model_folder, settings.model)
            engine = backend or make_backend(settings, folder, metrics)
            stager = await asyncio.to_thread(WeightsStager, folder, settings.weights_root)
            await engine.start()
            app.state.service = RolloutService(settings, engine, metrics, stager)
            log.info("model %s loaded with the %s backend; ready", settings.model, engine.name)
        except Exception as error:
            app.state.load_error = f"{type(error).__name__}: {error}"
            log.exception("the model failed to load")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        if app.state.service is not None:
            await app.state.service.backend.close()

    app = FastAPI(
        title="CPPO rollout server",
        summary="VLM generation with perturbed views and versioned weights; OpenAI-compatible chat.",
        lifespan=lifespan,
        dependencies=[
            Depends(bearer_auth(settings.api_key.get_secret_value() if settings.api_key else None))
        ],
        responses=ERRORS,
    )
    app.state.service = None
    app.state.load_error = None
    install_error_handlers(app)
    app.add_middleware(
        BodyLimit,
        default_limit=settings.max_request_bytes,
        limits={"/v1/weights/tensors": settings.max_weights_bytes},
    )
    app.add_middleware(Instrument, requests=metrics.requests, latency=metrics.latency)

    @app.get("/health", tags=["ops"])
    async def health() -> Health:
        """The process is alive."""
        return Health()

    @app.get("/ready", tags=["ops"], responses={503: {"model": Readiness}})
    async def ready() -> JSONResponse:
        """The model is loaded and requests are served (503 until then, or if loading failed)."""
        loaded = app.state.service
        if loaded is None:
            body = Readiness(ready=False, detail=app.state.load_error or "the model is still loading")
            return JSONResponse(body.model_dump(), status_code=503)
        body = Readiness(
            ready=True, detail=f"{settings.name()} on {loaded.backend.name}", policy_version=loaded.version
        )
        return JSONResponse(body.model_dump())

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["openai"])
    async def models(rollouts: Service) -> ModelList:
        """The served model, as OpenAI clients list models."""
        card = ModelCard(
            id=settings.name(), created=int(started), max_model_len=rollouts.backend.max_model_len
        )
        return ModelList(data=[card])

    @app.post("/v1/rollouts", tags=["rollouts"])
    async def rollouts(body: RolloutRequest, request: Request, rollouts: Service) -> RolloutResponse:
        """Sample ``n`` responses per prompt, with its perturbed views, tagged with the policy version."""
        return await cancel_on_disconnect(request, rollouts.rollouts(body))

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, rollouts: Service
    ) -> ChatCompletion:
        """OpenAI-compatible chat completion, images as ``image_url`` parts."""
        return await cancel_on_disconnect(request, rollouts.chat(body))

    @app.get("/v1/weights", tags=["weights"])
    async def weights(rollouts: Service) -> WeightsStatus:
        """The policy version being served."""
        return rollouts.weights_status()

    if settings.enable_weight_updates:

        @app.post("/v1/weights", tags=["weights"])
        async def load_weights(body: WeightsUpdate, rollouts: Service) -> WeightsStatus:
            """Load a checkpoint (a Hugging Face folder or a .safetensors file) from storage the server sees.

            Running requests finish on the old weights; new ones wait for the swap. A failed load leaves
            the old weights serving."""
            return await rollouts.update_weights_from_path(body.path, body.version)

        @app.post(
            "/v1/weights/tensors",
            tags=["weights"],
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                    },
                }
            },
        )
        async def load_weights_by_value(
            request: Request,
            rollouts: Service,
            version: Annotated[int, Query(ge=0, description="The policy version of these weights.")],
        ) -> WeightsStatus:
            """Load weights sent in the body as one safetensors file (as ``save_pretrained`` writes it),
            for trainers without shared storage."""
            return await rollouts.update_weights_from_bytes(await request.body(), version)

    return app
