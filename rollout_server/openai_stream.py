"""OpenAI's chat completion format for what a backend generates: log-probs and usage, and the server-sent
events of a streamed completion.

A stream sends, per choice, a chunk with the role, a chunk for each delta of the backend (its text, and its
tokens' log-probs and ids where asked for), and a chunk with an empty delta and the finish reason, as OpenAI
does; choices interleave. With ``stream_options.include_usage``, a chunk without choices counts the request's
tokens; ``data: [DONE]`` ends it. A failure once the status line is out can only be told in the stream: an
``error`` event (as vLLM sends one), then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from rollout_server.backend import PromptTokens, SampleDelta
from shared.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    ErrorDetail,
    ErrorResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {payload.model_dump_json()}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def choice_logprobs(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    top_logprobs: Sequence[dict[int, float]] | None,
) -> ChoiceLogprobs:
    """One entry per token, the end token and other special tokens included, so that the entries line up
    with ``token_ids`` and ``usage.completion_tokens``."""
    alternatives = top_logprobs if top_logprobs is not None else [{}] * len(token_ids)
    content = []
    for token_id, logprob, top in zip(token_ids, logprobs, alternatives, strict=True):
        token = tokenizer.decode([token_id])
        content.append(
            TokenLogprob(
                token=token,
                logprob=logprob,
                bytes=list(token.encode()),
                top_logprobs=[
                    TopLogprob(token=(text := tokenizer.decode([i])), logprob=lp, bytes=list(text.encode()))
                    for i, lp in top.items()
                ],
            )
        )
    return ChoiceLogprobs(content=content)


class ChunkWriter:
    """The events of one streamed chat completion, in order."""

    def __init__(
        self, request: ChatCompletionRequest, model: str, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def start(self, prompt: PromptTokens) -> list[str]:
        """Each choice's role chunk; the first one carries the prompt's tokens where they were asked for."""
        self.prompt_tokens = len(prompt.token_ids)
        prompt_ids = prompt.token_ids if self.request.return_token_ids else None
        return [
            self._chunk(
                [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))],
                prompt_token_ids=prompt_ids if index == 0 else None,
            )
            for index in range(self.request.n)
        ]

    def delta(self, delta: SampleDelta) -> list[str]:
        """A content chunk, if the delta holds tokens or text; a finish chunk, if it ends its sample."""
        self.completion_tokens += len(delta.token_ids)
        chunks = []
        if delta.token_ids or delta.text:
            logprobs = None
            if self.request.logprobs:
                logprobs = choice_logprobs(
                    self.tokenizer, delta.token_ids, delta.logprobs, delta.top_logprobs
                )
            choice = ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(content=delta.text),
                logprobs=logprobs,
                token_ids=delta.token_ids if self.request.return_token_ids else None,
            )
            chunks.append(self._chunk([choice]))
        if delta.finish_reason is not None:
            finish = ChatChunkChoice(index=delta.index, delta=ChatDelta(), finish_reason=delta.finish_reason)
            chunks.append(self._chunk([finish]))
        return chunks

    def end(self) -> list[str]:
        """The usage chunk, where it was asked for, and ``[DONE]``."""
        options = self.request.stream_options
        if options is None or not options.include_usage:
            return [DONE]
        return [self._chunk([], counts=usage(self.prompt_tokens, self.completion_tokens)), DONE]

    @staticmethod
    def failed() -> list[str]:
        """The stream's end after an unexpected failure (logged by the caller)."""
        detail = ErrorDetail(
            code="internal_error", message="the server failed on this request; its log has the details"
        )
        return [event(ErrorResponse(error=detail)), DONE]

    def _chunk(
        self,
        choices: list[ChatChunkChoice],
        counts: Usage | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=counts,
            prompt_token_ids=prompt_token_ids,
        )
        return event(chunk)


class EventStream:
    """Server-sent events that a producer task puts in a queue (``None`` ends them), relayed to the response.

    The producer generates in a task of its own, not in the response's: Starlette cancels the response's
    iteration through an AnyIO cancel scope when the client disconnects, which would cancel every await of the
    clean-up too (the engine's abort included). Cancelling the task instead runs its clean-up as usual.
    """

    def __init__(self, first: str, events: asyncio.Queue[str | None], producer: asyncio.Task[None]) -> None:
        self.first = first
        self.events = events
        self.producer = producer

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            yield self.first
            while (item := await self.events.get()) is not None:
                yield item
        finally:
            self.producer.cancel()

    async def aclose(self) -> None:
        """Stop the producer; also for a response that ended before its iteration began."""
        self.producer.cancel()
