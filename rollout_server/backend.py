"""The interface every generation engine implements, and the types that cross it.

A backend turns one rendered prompt (chat template applied, one ``<|vision_start|><|image_pad|>
<|vision_end|>`` placeholder per image) plus its images into ``n`` sampled responses with the
log-probs of the distribution they were sampled from, all at once or token by token. It knows nothing
of HTTP, views or versions' bookkeeping: ``rollout_server.service`` does that, and holds the lock that
makes weight swaps atomic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from PIL import Image
from transformers import PreTrainedTokenizerBase

from shared.weight_broadcast import Invitation

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling for one request, already validated (see ``shared.schemas.SamplingParams``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to sample ``n`` responses to."""

    prompt: str
    images: tuple[Image.Image, ...]
    n: int
    sampling: SamplingSpec


@dataclass(frozen=True)
class GeneratedSample:
    """One response. ``logprobs[t]`` is log p(token_ids[t]) under the sampling distribution actually used:
    ``shared.vlm.suppressed_token_ids`` masked out, logits divided by the temperature, then top-k/top-p
    applied and renormalised.

    ``token_ids`` run up to and including the end-of-sequence token or the token that completed a stop
    string; ``text`` is their decoding, cut before the stop string and without the end token.
    ``top_logprobs[t]`` maps token id → log-prob for the ``top_logprobs`` likeliest tokens at step t.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class Generation:
    """The answer to a ``GenerationRequest``: the prompt's tokens (image placeholders expanded) and the
    samples, in order."""

    prompt_token_ids: list[int]
    samples: list[GeneratedSample] = field(default_factory=list)


@dataclass(frozen=True)
class PromptTokens:
    """The first event of a stream: the prompt's tokens, image placeholders expanded."""

    token_ids: list[int]


@dataclass(frozen=True)
class SampleDelta:
    """What one sample of a stream added since its last delta: tokens as in ``GeneratedSample``, and the text
    they made certain. Text that may still turn out to begin a stop string, or the first bytes of a character,
    is held back until it cannot; so a sample's deltas, concatenated, are what ``generate`` returns for it.
    The sample's last delta carries its ``finish_reason``, and may hold no tokens."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: FinishReason | None = None


StreamEvent = PromptTokens | SampleDelta


class PromptTooLongError(ValueError):
    """The prompt leaves no room to generate within the model's context."""


class WeightsLoadError(ValueError):
    """New weights could not be loaded; the old ones keep serving."""


class GenerationBackend(Protocol):
    """A generation engine.

    ``generate`` may be called concurrently; the backend batches as it can. ``load_weights`` and
    ``receive_broadcast`` are only called while no ``generate`` call is in flight (the service guarantees
    it), and must either load all of the new weights or leave the old ones in place and raise.
    """

    name: str
    model_id: str
    max_model_len: int
    tokenizer: PreTrainedTokenizerBase

    async def start(self) -> None:
        """Load the model; ``/ready`` turns true when this returns."""

    async def generate(self, request: GenerationRequest) -> Generation:
        """Sample ``request.n`` responses. Cancelling the awaiting task frees the request's slot."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """``generate``, as the tokens are drawn: a ``PromptTokens`` once the prompt is accepted (a prompt too
        long raises before it), then each sample's ``SampleDelta``s, samples interleaved. The same seed gives
        the same samples as ``generate``. Closing the iterator, or cancelling its consumer, frees the slot."""

    async def tokenize(
        self, prompt: str, images: tuple[Image.Image, ...], add_special_tokens: bool
    ) -> list[int]:
        """The tokens ``generate`` feeds the model for this prompt: each image placeholder expanded."""

    async def load_weights(self, folder: Path) -> None:
        """Replace the weights with those of a Hugging Face checkpoint folder of the same architecture."""

    async def receive_broadcast(self, invitation: Invitation) -> None:
        """Join the trainer's process group and replace the weights with those it broadcasts (checkpoint
        names, checked against the served checkpoint already). A failed transfer raises
        ``shared.weight_broadcast.BroadcastError`` and leaves the old weights in place."""

    async def close(self) -> None:
        """Release the engine."""
