"""The rollout server's routes. What they do lives in ``rollout_server.service``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from rollout_server.backend import GenerationBackend
from rollout_server.config import RolloutSettings
from rollout_server.engine import image_bounds, make_backend, resolve_model_folder
from rollout_server.metrics import RolloutMetrics
from rollout_server.service import RolloutService
from rollout_server.weights import WeightsStager
from shared.http import cancel_on_disconnect
from shared.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    RolloutRequest,
    RolloutResponse,
    TokenizeRequest,
    TokenizeResponse,
    WeightsBroadcast,
    WeightsStatus,
    WeightsUpdate,
)
from shared.server import Startup, service_app, started_service

log = logging.getLogger("cppo.rollout")

Service = Annotated[RolloutService, Depends(started_service)]


def create_app(settings: RolloutSettings, backend: GenerationBackend | None = None) -> FastAPI:
    """The app; the model loads in the background after start-up, and ``/ready`` says when it is done."""
    metrics = RolloutMetrics()
    started = time.time()

    async def load() -> RolloutService:
        folder = await asyncio.to_thread(resolve_model_folder, settings.model)
        engine = backend or make_backend(settings, folder, metrics)
        stager = await asyncio.to_thread(WeightsStager, folder, settings.weights_root)
        bounds = await asyncio.to_thread(image_bounds, settings, folder)
        await engine.start()
        service = RolloutService(settings, engine, metrics, stager, bounds)
        log.info("model %s loaded with the %s backend; ready", settings.model, engine.name)
        return service

    async def close(service: RolloutService | None) -> None:
        if service is not None:
            await service.backend.close()

    loading = "the model is still loading"
    app = service_app(
        Startup(load, close, starting=loading, waiting=loading),
        title="CPPO rollout server",
        summary="VLM generation with perturbed views and versioned weights; OpenAI-compatible chat.",
        ready_doc="The model is loaded and requests are served (503 until then, or if loading failed).",
        settings=settings,
        metrics=metrics,
        errors=(400, 401, 404, 409, 413, 422, 503),
        body_limits={"/v1/weights/tensors": settings.max_weights_bytes},
    )

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

    @app.post(
        "/v1/chat/completions",
        tags=["openai"],
        response_model=ChatCompletion,
        responses={
            200: {
                "description": "The completion; with stream=true, server-sent events instead.",
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "string",
                            "description": "Events 'data: {chunk}', each chunk a chat.completion.chunk "
                            "(ChatCompletionChunk in shared/schemas.py), then 'data: [DONE]'.",
                        }
                    }
                },
            }
        },
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, rollouts: Service
    ) -> ChatCompletion | StreamingResponse:
        """OpenAI-compatible chat completion, images as ``image_url`` parts; streamed with ``stream``.

        A refused request is a 4xx before any event is sent."""
        if not body.stream:
            return await cancel_on_disconnect(request, rollouts.chat(body))
        events = await cancel_on_disconnect(request, rollouts.chat_stream(body))
        # The background task also stops a stream whose client left before its first event was sent.
        return StreamingResponse(
            events, media_type="text/event-stream", background=BackgroundTask(events.aclose)
        )

    @app.post("/tokenize", tags=["openai"])
    async def tokenize(body: TokenizeRequest, rollouts: Service) -> TokenizeResponse:
        """vLLM's tokenizer route: the tokens of a prompt, or of chat messages as a chat completion renders
        them, images expanded into their tokens."""
        return await rollouts.tokenize(body)

    @app.post("/detokenize", tags=["openai"])
    async def detokenize(body: DetokenizeRequest, rollouts: Service) -> DetokenizeResponse:
        """vLLM's detokenizer route: the text of token ids, special tokens included."""
        return await rollouts.detokenize(body)

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

        @app.post("/v1/weights/broadcast", tags=["weights"])
        async def load_weights_by_broadcast(body: WeightsBroadcast, rollouts: Service) -> WeightsStatus:
            """Join the trainer's process group (a TCP store at ``host:port``) and receive the weights by
            collective broadcast; answers once they serve. The tensor list must match the served checkpoint
            (names and shapes; 422 before joining). A transfer that fails leaves the old weights serving."""
            return await rollouts.update_weights_by_broadcast(body)

    return app
