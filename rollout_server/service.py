"""What the rollout server does, behind its routes: rollouts with perturbed views, OpenAI chat
completions (whole or streamed), vLLM's tokenizer routes, and versioned weight swaps.

Generation and weight swaps share a ``VersionGate``: every request generates under one set of weights
from start to end, and a swap waits for running requests to finish while holding new ones back. So
no sample mixes two versions, and the version a sample reports is the one that made it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from rollout_server.backend import (
    Generation,
    GenerationBackend,
    GenerationRequest,
    PromptTokens,
    PromptTooLongError,
    SampleDelta,
    SamplingSpec,
    StreamEvent,
    WeightsLoadError,
)
from rollout_server.config import RolloutSettings
from rollout_server.metrics import RolloutMetrics
from rollout_server.openai_stream import ChunkWriter, EventStream, choice_logprobs, usage
from rollout_server.weights import WeightsStager, check_compatible
from shared.http import ServiceError
from shared.images import ImageError, ImageLimits, decode_image_url, encode_image_data_url
from shared.perturbations import perturb
from shared.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ImagePart,
    PerturbedView,
    PromptRollout,
    Readiness,
    RequestedViews,
    RolloutRequest,
    RolloutResponse,
    Sample,
    TokenizeRequest,
    TokenizeResponse,
    WeightsBroadcast,
    WeightsStatus,
)
from shared.vlm import PixelBounds, chat_template_messages
from shared.weight_broadcast import BroadcastError, Invitation, TensorMeta

log = logging.getLogger("cppo.rollout")

DEFAULT_CHAT_MAX_TOKENS = 1024
_IMAGE_ERROR_STATUS = {"too_large": 413, "too_many_pixels": 413}

T = TypeVar("T")


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """``asyncio.gather``, except that the first failure cancels the rest (gather lets them run on).

    A request that fails on one of its prompts so stops the work of the others at once: generations
    are aborted, and decoding or perturbing handed to threads that have not started never starts.
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class VersionGate:
    """Many readers (generation) or one writer (a weights swap); a waiting writer holds new readers back."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._condition:
            await self._condition.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._condition:
            self._writers_waiting += 1
            try:
                await self._condition.wait_for(lambda: not self._writing and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            async with self._condition:
                self._writing = False
                self._condition.notify_all()


def derive_seed(seed: int | None, *parts: str | int) -> int:
    """A seed for one prompt and image variant, derived from the request's; fresh randomness without one."""
    if seed is None:
        return secrets.randbits(63)
    words = [seed, *(zlib.crc32(p.encode()) if isinstance(p, str) else p for p in parts)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def decode_message_images(
    messages: Sequence[ChatMessage],
    limits: ImageLimits,
    max_images: int,
    field: str,
    bounds: PixelBounds | None = None,
) -> list[Image.Image]:
    """Every image of the messages, in reading order, sized within ``bounds`` if given; a refused one
    names its field."""
    count = sum(len(message.image_urls()) for message in messages)
    if count > max_images:
        raise ServiceError(
            422,
            field,
            "too_many_images",
            f"the prompt has {count} images; this server takes at most {max_images}",
        )
    images = []
    for m, message in enumerate(messages):
        if isinstance(message.content, str):
            continue
        for p, part in enumerate(message.content):
            if not isinstance(part, ImagePart):
                continue
            try:
                image = decode_image_url(part.image_url.url, limits)
            except ImageError as error:
                status = _IMAGE_ERROR_STATUS.get(error.code, 400)
                where = f"{field}.{m}.content.{p}.image_url.url"
                raise ServiceError(status, where, error.code, error.message) from error
            images.append(bounds.fit(image) if bounds is not None else image)
    return images


class RolloutService:
    def __init__(
        self,
        settings: RolloutSettings,
        backend: GenerationBackend,
        metrics: RolloutMetrics,
        stager: WeightsStager,
        bounds: PixelBounds | None = None,
    ) -> None:
        self.settings = settings
        self.bounds = bounds
        """--min-pixels and --max-pixels, within the processor's own bounds; None when neither is set."""
        self.backend = backend
        self.metrics = metrics
        self.stager = stager
        self.gate = VersionGate()
        self.queued = 0
        self.version = 0
        self.weights_path: str | None = str(stager.model_folder)
        self.loaded_at = datetime.now(UTC)

    def readiness(self) -> Readiness:
        """``/ready``'s body: what is served, on which backend, at which policy version."""
        detail = f"{self.settings.name()} on {self.backend.name}"
        return Readiness(ready=True, detail=detail, policy_version=self.version)

    # --- generation ------------------------------------------------------------------------------

    async def _generate(self, request: GenerationRequest, field: str) -> Generation:
        self.metrics.queue_depth.inc()
        try:
            generation = await self.backend.generate(request)
        except PromptTooLongError as error:
            raise ServiceError(400, field, "context_length_exceeded", str(error)) from error
        except asyncio.CancelledError:
            # Counted here, wherever the request was (preparing, queued, generating), and on any backend:
            # its client went away, or another prompt of its request failed.
            self.metrics.samples.labels("abort").inc(request.n)
            raise
        finally:
            self.metrics.queue_depth.dec()
        for sample in generation.samples:
            self.metrics.generated_tokens.inc(len(sample.token_ids))
            self.metrics.samples.labels(sample.finish_reason).inc()
        return generation

    async def _stream(self, request: GenerationRequest, field: str) -> AsyncIterator[StreamEvent]:
        """``backend.stream`` with ``_generate``'s refusals and accounting, token by token."""
        self.metrics.queue_depth.inc()
        finished = 0
        try:
            async with aclosing(self.backend.stream(request)) as events:
                async for event in events:
                    if isinstance(event, SampleDelta):
                        self.metrics.generated_tokens.inc(len(event.token_ids))
                        if event.finish_reason is not None:
                            finished += 1
                            self.metrics.samples.labels(event.finish_reason).inc()
                    yield event
        except PromptTooLongError as error:
            raise ServiceError(400, field, "context_length_exceeded", str(error)) from error
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.samples.labels("abort").inc(request.n - finished)
            raise
        finally:
            self.metrics.queue_depth.dec()

    @asynccontextmanager
    async def _admitted(self, sequences: int) -> AsyncIterator[None]:
        """Back-pressure: a request whose sequences would take the queue past its limit is refused at once
        with 429 and Retry-After (before any image is decoded), unless nothing is queued, so that a single
        request larger than the limit is still served."""
        limit = self.settings.queue_limit()
        if self.queued and self.queued + sequences > limit:
            self.metrics.shed.inc()
            raise ServiceError(
                429,
                None,
                "overloaded",
                f"{self.queued} sequences are queued and this request adds {sequences}, more than this "
                f"server's limit of {limit}; retry later",
                retry_after=1,
            )
        self.queued += sequences
        self.metrics.queued_sequences.set(self.queued)
        try:
            yield
        finally:
            self.queued -= sequences
            self.metrics.queued_sequences.set(self.queued)

    async def rollouts(self, request: RolloutRequest) -> RolloutResponse:
        async with self._admitted(len(request.prompts) * request.n * len(request.sample_on)):
            return await self._rollouts(request)

    async def _rollouts(self, request: RolloutRequest) -> RolloutResponse:
        limits = self.settings.image_limits()
        images = await gather_or_cancel(
            *(
                asyncio.to_thread(
                    decode_message_images,
                    p.messages,
                    limits,
                    self.settings.max_images_per_prompt,
                    f"prompts.{i}.messages",
                    self.bounds,
                )
                for i, p in enumerate(request.prompts)
            )
        )
        views = await gather_or_cancel(
            *(
                asyncio.to_thread(self._views, p.views or request.views, p.prompt_id, imgs)
                for p, imgs in zip(request.prompts, images, strict=True)
            )
        )
        texts = [self._render(p.messages) for p in request.prompts]
        jobs = []
        for i, prompt in enumerate(request.prompts):
            by_view = {
                "clean": images[i],
                **{kind: [img for img, _ in made] for kind, made in views[i].items()},
            }
            for view in request.sample_on:
                sampling = _sampling_spec(
                    request.sampling, derive_seed(request.sampling.seed, prompt.prompt_id, view)
                )
                generation = GenerationRequest(texts[i], tuple(by_view[view]), request.n, sampling)
                jobs.append((i, view, generation))
        async with self.gate.reading():
            version = self.version
            generations = await gather_or_cancel(
                *(self._generate(job, f"prompts.{i}.messages") for i, _, job in jobs)
            )
        results = [
            PromptRollout(
                prompt_id=p.prompt_id, prompt_token_ids=[], views=self._view_models(views[i]), samples=[]
            )
            for i, p in enumerate(request.prompts)
        ]
        for (i, view, _), generation in zip(jobs, generations, strict=True):
            result = results[i]
            if not result.prompt_token_ids:
                result.prompt_token_ids = generation.prompt_token_ids
            result.samples.extend(
                Sample(
                    prompt_id=result.prompt_id,
                    sample_index=index,
                    sampled_on=view,
                    token_ids=sample.token_ids,
                    text=sample.text,
                    logprobs=sample.logprobs,
                    finish_reason=sample.finish_reason,
                    policy_version=version,
                )
                for index, sample in enumerate(generation.samples)
            )
        return RolloutResponse(policy_version=version, prompts=results)

    def _views(
        self, requested: RequestedViews, prompt_id: str, images: list[Image.Image]
    ) -> dict[str, list[tuple[Image.Image, object]]]:
        made = {}
        for kind in ("positive", "negative"):
            wanted = getattr(requested, kind)
            if wanted is None:
                continue
            made[kind] = [
                perturb(image, kind, derive_seed(wanted.seed, prompt_id, kind, index), wanted.transforms)
                for index, image in enumerate(images)
            ]
        return made

    @staticmethod
    def _view_models(views: dict[str, list[tuple[Image.Image, object]]]) -> list[PerturbedView]:
        return [
            PerturbedView(kind=kind, image_index=index, image_url=encode_image_data_url(image), spec=spec)
            for kind, made in views.items()
            for index, (image, spec) in enumerate(made)
        ]

    def _render(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        return self.backend.tokenizer.apply_chat_template(
            chat_template_messages(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.name():
            raise ServiceError(
                404,
                "model",
                "model_not_found",
                f"model {model!r} is not served here; use {self.settings.name()!r}",
            )

    async def _decode_images(self, messages: Sequence[ChatMessage]) -> list[Image.Image]:
        return await asyncio.to_thread(
            decode_message_images,
            messages,
            self.settings.image_limits(),
            self.settings.max_images_per_prompt,
            "messages",
            self.bounds,
        )

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        async with self._admitted(request.n):
            return await self._chat(request)

    async def _chat_request(self, request: ChatCompletionRequest) -> GenerationRequest:
        self._check_model(request.model)
        images = await self._decode_images(request.messages)
        sampling = SamplingSpec(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            max_tokens=request.max_completion_tokens or request.max_tokens or DEFAULT_CHAT_MAX_TOKENS,
            stop=tuple(request.stop_strings()),
            seed=request.seed,
            top_logprobs=request.top_logprobs or 0,
        )
        return GenerationRequest(self._render(request.messages), tuple(images), request.n, sampling)

    async def _chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        generation_request = await self._chat_request(request)
        async with self.gate.reading():
            generation = await self._generate(generation_request, "messages")
        tokenizer = self.backend.tokenizer
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(content=sample.text),
                finish_reason=sample.finish_reason,
                logprobs=choice_logprobs(tokenizer, sample.token_ids, sample.logprobs, sample.top_logprobs)
                if request.logprobs
                else None,
                token_ids=sample.token_ids if request.return_token_ids else None,
            )
            for index, sample in enumerate(generation.samples)
        ]
        completion_tokens = sum(len(s.token_ids) for s in generation.samples)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.settings.name(),
            choices=choices,
            usage=usage(len(generation.prompt_token_ids), completion_tokens),
            prompt_token_ids=generation.prompt_token_ids if request.return_token_ids else None,
        )

    async def chat_stream(self, request: ChatCompletionRequest) -> EventStream:
        """The chat completion as server-sent events. Whatever refuses the request (its model, back-pressure,
        its images, a prompt too long) raises before this returns, for a 4xx; the events then come as the
        tokens are drawn. Closing the stream, as a client's disconnect does, aborts the generation."""
        events: asyncio.Queue[str | None] = asyncio.Queue()
        producer = asyncio.ensure_future(self._chat_events(request, events))
        try:
            first = await events.get()
            if first is None:
                await producer  # raises why the request was refused
                raise RuntimeError("the chat stream ended before it began")
        except BaseException:
            producer.cancel()
            raise
        return EventStream(first, events, producer)

    async def _chat_events(self, request: ChatCompletionRequest, events: asyncio.Queue[str | None]) -> None:
        """Puts the stream's events in ``events``, then None. Raises only before the first event."""
        try:
            async with self._admitted(request.n):
                generation_request = await self._chat_request(request)
                writer = ChunkWriter(request, self.settings.name(), self.backend.tokenizer)
                async with (
                    self.gate.reading(),
                    aclosing(self._stream(generation_request, "messages")) as stream,
                ):
                    prompt = await anext(stream)
                    if not isinstance(prompt, PromptTokens):
                        raise RuntimeError(f"the backend's stream began with {prompt!r}")
                    for item in writer.start(prompt):
                        events.put_nowait(item)
                    try:
                        async for delta in stream:
                            if isinstance(delta, SampleDelta):
                                for item in writer.delta(delta):
                                    events.put_nowait(item)
                    except Exception:
                        log.exception("a streamed chat completion failed after its first event")
                        for item in writer.failed():
                            events.put_nowait(item)
                        return
                    for item in writer.end():
                        events.put_nowait(item)
        finally:
            events.put_nowait(None)

    # --- tokenizer -------------------------------------------------------------------------------

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_model(request.model)
        tokenizer = self.backend.tokenizer
        if request.messages is None:
            add_special_tokens = True if request.add_special_tokens is None else request.add_special_tokens
            tokens = await asyncio.to_thread(
                lambda: tokenizer.encode(request.prompt or "", add_special_tokens=add_special_tokens)
            )
        else:
            images = await self._decode_images(request.messages)
            try:
                text = self._render(
                    request.messages, request.add_generation_prompt, request.continue_final_message
                )
            except ValueError as error:
                # The chat template's own refusals, e.g. a final message with no text to continue.
                raise ServiceError(422, "messages", "bad_messages", str(error)) from error
            tokens = await self.backend.tokenize(text, tuple(images), bool(request.add_special_tokens))
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=self.backend.max_model_len,
            tokens=tokens,
            token_strs=tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None,
        )

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request.model)
        tokenizer = self.backend.tokenizer
        vocabulary = len(tokenizer)
        for index, token in enumerate(request.tokens):
            if token >= vocabulary:
                raise ServiceError(
                    422,
                    f"tokens.{index}",
                    "unknown_token",
                    f"token {token} is not in the tokenizer's vocabulary of {vocabulary}",
                )
        return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, request.tokens))

    # --- weights ---------------------------------------------------------------------------------

    def weights_status(self) -> WeightsStatus:
        return WeightsStatus(version=self.version, path=self.weights_path, loaded_at=self.loaded_at)

    def _check_version(self, version: int) -> None:
        if version <= self.version:
            raise ServiceError(
                409,
                "version",
                "stale_version",
                f"version {version} is not newer than the served {self.version}",
            )

    async def update_weights_from_path(self, path: str, version: int) -> WeightsStatus:
        self._check_version(version)
        try:
            folder, staged = await asyncio.to_thread(self.stager.folder_for_path, path)
        except WeightsLoadError as error:
            self.metrics.weight_updates.labels("refused").inc()
            raise ServiceError(422, "path", "bad_weights", str(error)) from error
        return await self._swap(folder, staged, version, path)

    async def update_weights_from_bytes(self, data: bytes, version: int) -> WeightsStatus:
        self._check_version(version)
        try:
            staged = await asyncio.to_thread(self.stager.folder_for_bytes, data)
        except WeightsLoadError as error:
            self.metrics.weight_updates.labels("refused").inc()
            raise ServiceError(422, "body", "bad_weights", str(error)) from error
        return await self._swap(staged, staged, version, None)

    async def _swap(self, folder: Path, staged: Path | None, version: int, path: str | None) -> WeightsStatus:
        try:
            async with self.gate.writing():
                # Checked again: another update may have landed while this one waited for the gate.
                self._check_version(version)
                try:
                    await self.backend.load_weights(folder)
                except WeightsLoadError as error:
                    self.metrics.weight_updates.labels("failed").inc()
                    raise ServiceError(422, "path" if path else "body", "bad_weights", str(error)) from error
                self._loaded(version, path)
        finally:
            if staged is not None:
                await asyncio.to_thread(shutil.rmtree, staged, True)
        return self.weights_status()

    async def update_weights_by_broadcast(self, request: WeightsBroadcast) -> WeightsStatus:
        """Join the trainer's group and receive the weights it broadcasts (``shared.weight_broadcast``).

        Everything the request says is checked before joining, so a refused broadcast never holds the trainer
        or the other replicas up. The gate is taken before joining: the transfer starts once running requests
        are done, and none starts until the weights are in."""
        self._check_version(request.version)
        invitation = self._invitation(request)
        async with self.gate.writing():
            self._check_version(request.version)
            try:
                await self.backend.receive_broadcast(invitation)
            except BroadcastError as error:
                self.metrics.weight_updates.labels("failed").inc()
                raise ServiceError(
                    422, "host", "broadcast_failed", f"{error}; the old weights keep serving"
                ) from error
            except WeightsLoadError as error:
                self.metrics.weight_updates.labels("failed").inc()
                raise ServiceError(422, "tensors", "bad_weights", str(error)) from error
            self._loaded(request.version, None)
        return self.weights_status()

    def _invitation(self, request: WeightsBroadcast) -> Invitation:
        """The request as an invitation, once its tensors are known to fit the served model."""
        names: set[str] = set()
        for index, spec in enumerate(request.tensors):
            if spec.name in names:
                raise ServiceError(422, f"tensors.{index}.name", "duplicate", f"{spec.name} is listed twice")
            names.add(spec.name)
        metas = tuple(TensorMeta(spec.name, tuple(spec.shape), spec.dtype) for spec in request.tensors)
        try:
            check_compatible({meta.name: (meta.shape, meta.dtype) for meta in metas}, self.stager.layout)
        except WeightsLoadError as error:
            self.metrics.weight_updates.labels("refused").inc()
            raise ServiceError(422, "tensors", "bad_weights", str(error)) from error
        total = sum(meta.nbytes for meta in metas)
        if total > self.settings.max_weights_bytes:
            raise ServiceError(
                413,
                "tensors",
                "too_large",
                f"{total} bytes of weights; --max-weights-bytes is {self.settings.max_weights_bytes}",
            )
        if request.backend == "nccl" and not torch.cuda.is_available():
            raise ServiceError(
                422, "backend", "unsupported", "nccl needs a CUDA device, and this server has none"
            )
        return Invitation(
            request.host,
            request.port,
            request.session,
            request.rank,
            request.backend,
            metas,
            request.bucket_bytes,
            request.timeout_s,
        )

    def _loaded(self, version: int, path: str | None) -> None:
        self.version, self.weights_path, self.loaded_at = version, path, datetime.now(UTC)
        self.metrics.weight_updates.labels("loaded").inc()
        self.metrics.policy_version.set(version)


def _sampling_spec(params, seed: int | None) -> SamplingSpec:
    return SamplingSpec(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        stop=tuple(params.stop),
        seed=seed,
    )
