"""The CPU engine: Hugging Face ``generate`` with dynamic batching and per-sample sampling state.

Concurrent ``generate`` calls wait in a queue; a worker takes up to ``max_batch_size`` sequences (or
whatever arrived within ``max_wait_ms`` of the first) and runs one ``generate`` call for all of them.

Batching must not change what a sample is, so sampling is ours, not ``generate``'s: each sequence has
its own temperature, top-k, top-p, stop strings, token budget and random generator. ``RowSampler``
draws each token by the Gumbel-max trick (argmax of log-probs plus Gumbel noise from the sequence's own
generator is an exact draw from the softmax) and hands ``generate`` a one-hot score, so ``generate``
runs greedy and only keeps the KV cache and the M-RoPE positions. A seeded sample is then the same
whichever requests share its batch.

A streamed request rides the same batches: after each step, ``RowReporter`` hands the tokens its sequences
drew to the request's own queue, from the generate thread, and ``stream`` turns them into deltas.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from rollout_server.backend import (
    FinishReason,
    GeneratedSample,
    Generation,
    GenerationRequest,
    PromptTokens,
    PromptTooLongError,
    SampleDelta,
    SamplingSpec,
    StreamEvent,
    WeightsLoadError,
)
from shared.vlm import load_model, load_processor, suppressed_token_ids
from shared.weight_broadcast import Invitation, copy_into, receive

log = logging.getLogger(__name__)

# Processor outputs laid out per token (left-padded when batched) versus per image (concatenated).
_PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_seed(seed: int | None, sample_index: int) -> int:
    """The seed of one sample: derived from the request's seed, or fresh when there is none."""
    if seed is None:
        return secrets.randbits(63)
    return int(np.random.SeedSequence([seed, sample_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class _Row:
    """One sequence being generated."""

    sampling: SamplingSpec
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_text: str | None = None


class RowSampler(LogitsProcessor):
    """Draws every sequence's next token from its own processed distribution (see the module docstring)."""

    def __init__(self, rows: list[_Row], suppressed_ids: list[int]) -> None:
        self.rows = rows
        self.suppressed_ids = suppressed_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float().clone()
        logits[:, self.suppressed_ids] = -math.inf
        chosen = torch.zeros(len(self.rows), dtype=torch.long)
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None:
                continue
            logp = processed_logprobs(logits[i], row.sampling)
            if row.sampling.temperature > 0:
                noise = torch.empty_like(logp).exponential_(generator=row.generator)
                token = int(torch.argmax(logp - noise.log()))
            else:
                token = int(torch.argmax(logp))
            chosen[i] = token
            row.tokens.append(token)
            row.logprobs.append(float(logp[token]))
            if row.sampling.top_logprobs:
                values, ids = torch.topk(logp, row.sampling.top_logprobs)
                row.top_logprobs.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))
        one_hot = torch.full_like(scores, -math.inf)
        one_hot[torch.arange(len(self.rows)), chosen] = 0.0
        return one_hot


def processed_logprobs(logits: torch.Tensor, sampling: SamplingSpec) -> torch.Tensor:
    """log p of the distribution a token is drawn from: logits / T, then top-k, then top-p, renormalised.

    Greedy decoding (T = 0) reports the model's own distribution, log softmax(logits).
    """
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it does.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= sampling.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
    return torch.log_softmax(logits, dim=-1)


class RowStopper(StoppingCriteria):
    """Ends each sequence on its own terms: an end token, a stop string, its token budget, or abort."""

    def __init__(
        self,
        rows: list[_Row],
        eos_ids: set[int],
        decode: Callable[[list[int]], str],
        aborted: Callable[[int], bool],
    ) -> None:
        self.rows = rows
        self.eos_ids = eos_ids
        self.decode = decode
        self.aborted = aborted

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None:
                continue
            if row.tokens[-1] in self.eos_ids:
                row.finish_reason = "stop"
            elif row.sampling.stop and (hit := self._stop_string(row)) is not None:
                row.finish_reason, row.stop_text = "stop", hit
            elif len(row.tokens) >= row.sampling.max_tokens:
                row.finish_reason = "length"
            elif self.aborted(i):
                row.finish_reason = "abort"
        return torch.tensor([row.finish_reason is not None for row in self.rows])

    def _stop_string(self, row: _Row) -> str | None:
        text = self.decode(row.tokens)
        positions = [(text.find(stop), stop) for stop in row.sampling.stop if stop in text]
        return text[: min(positions)[0]] if positions else None


@dataclass(frozen=True)
class _Drawn:
    """A token one sequence of a streamed request drew, as the generate thread reports it."""

    index: int
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None
    finished: GeneratedSample | None
    """The whole sample, once this token ended it."""


class RowReporter(StoppingCriteria):
    """After ``RowStopper`` has judged a step, reports each streamed sequence's new token to its request's
    ``listener`` (one call per request and step). It never stops a sequence itself."""

    def __init__(
        self,
        rows: list[_Row],
        owners: list[int],
        indices: list[int],
        listeners: list[Callable[[list[_Drawn]], None] | None],
        finished: Callable[[_Row], GeneratedSample],
    ) -> None:
        self.rows, self.owners, self.indices = rows, owners, indices
        self.listeners = listeners
        self.finished = finished
        self.reported = [0] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        drawn: dict[int, list[_Drawn]] = {}
        for i, row in enumerate(self.rows):
            if self.listeners[self.owners[i]] is None or len(row.tokens) == self.reported[i]:
                continue
            self.reported[i] = len(row.tokens)
            top = row.top_logprobs[-1] if row.sampling.top_logprobs else None
            done = self.finished(row) if row.finish_reason is not None else None
            step = _Drawn(self.indices[i], row.tokens[-1], row.logprobs[-1], top, done)
            drawn.setdefault(self.owners[i], []).append(step)
        for owner, steps in drawn.items():
            listener = self.listeners[owner]
            if listener is not None:
                listener(steps)
        return torch.zeros(len(self.rows), dtype=torch.bool)


class _StreamedText:
    """One streamed sample's text, handed out as it becomes certain. It is decoded over a window of recent
    tokens, as vLLM's incremental detokenizer does, so that a long sample costs linear time; a character
    whose bytes are still arriving, and the characters that may begin a stop string, are held back."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = self.read = 0
        self.text = ""
        self.sent = 0
        self.held = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str:
        """The text that ``token_id`` made certain."""
        self.tokens.append(token_id)
        before = self.decode(self.tokens[self.prefix : self.read])
        after = self.decode(self.tokens[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        end = max(self.sent, len(self.text) - self.held)
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def finish(self, text: str) -> str:
        """What is left of the sample's final text (cut before its stop string)."""
        return text[self.sent :]


@dataclass
class _Pending:
    """A request waiting for, or in, a batch."""

    request: GenerationRequest
    inputs: dict[str, torch.Tensor]
    max_tokens: int
    future: asyncio.Future[Generation]
    listener: Callable[[list[_Drawn]], None] | None = None
    """Streamed requests: called from the generate thread with each step's tokens."""


class TransformersBackend:
    """Generation with Hugging Face transformers, batched across concurrent requests."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        max_model_len: int | None = None,
        dtype: str = "auto",
        observe_batch: Callable[[int], None] = lambda rows: None,
        observe_aborted_tokens: Callable[[int], None] = lambda tokens: None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.model_id = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_model_len = max_model_len or 0
        self.dtype = _DTYPES[dtype]
        self.observe_batch = observe_batch
        # Aborted samples never reach the service, which counts them but not the tokens they cost.
        self.observe_aborted_tokens = observe_aborted_tokens
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self.processor = await asyncio.to_thread(load_processor, self.model_id)
        self.processor.tokenizer.padding_side = "left"
        self.tokenizer = self.processor.tokenizer
        self.model = await asyncio.to_thread(self._load, self.model_id)
        text_config = self.model.config.get_text_config()
        self.max_model_len = self.max_model_len or text_config.max_position_embeddings
        self.suppressed_ids = suppressed_token_ids(self.tokenizer)
        self.eos_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        self.eos_ids |= set(_as_list(self.model.generation_config.eos_token_id))
        self.eos_ids.discard(None)
        self._worker = asyncio.create_task(self._run_batches(), name="transformers-batcher")

    def _load(self, folder: str | Path) -> torch.nn.Module:
        return load_model(folder, dtype=self.dtype).eval() if self.dtype else load_model(folder).eval()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def load_weights(self, folder: Path) -> None:
        try:
            model = await asyncio.to_thread(self._load, folder)
        except Exception as error:
            raise WeightsLoadError(f"could not load weights from {folder}: {error}") from error
        self.model = model

    async def receive_broadcast(self, invitation: Invitation) -> None:
        # In place: the tensors land in a staging copy first (``receive``), then into the live model.
        tensors = await asyncio.to_thread(receive, invitation)
        try:
            await asyncio.to_thread(copy_into, self.model, tensors)
        except ValueError as error:
            raise WeightsLoadError(f"the broadcast weights do not fit the model: {error}") from error

    async def generate(self, request: GenerationRequest) -> Generation:
        inputs = await asyncio.to_thread(self._prepare, request.prompt, request.images)
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(request, inputs, self._budget(request, inputs), future))
        return await future

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        inputs = await asyncio.to_thread(self._prepare, request.prompt, request.images)
        budget = self._budget(request, inputs)
        loop = asyncio.get_running_loop()
        # Steps, then None once the batch is over (the future's callback runs after every step's report).
        drawn: asyncio.Queue[list[_Drawn] | None] = asyncio.Queue()
        future: asyncio.Future[Generation] = loop.create_future()
        future.add_done_callback(lambda _: drawn.put_nowait(None))

        def report(steps: list[_Drawn]) -> None:
            loop.call_soon_threadsafe(drawn.put_nowait, steps)

        texts = [_StreamedText(self._decode, request.sampling.stop) for _ in range(request.n)]
        finished = [False] * request.n
        try:
            await self._queue.put(_Pending(request, inputs, budget, future, report))
            yield PromptTokens(_unpadded(inputs))
            while (steps := await drawn.get()) is not None:
                for step in steps:
                    text = texts[step.index]
                    done = step.finished
                    yield SampleDelta(
                        index=step.index,
                        token_ids=[step.token_id],
                        logprobs=[step.logprob],
                        text=text.add(step.token_id) if done is None else text.finish(done.text),
                        top_logprobs=None if step.top_logprobs is None else [step.top_logprobs],
                        finish_reason=None if done is None else done.finish_reason,
                    )
                    finished[step.index] = done is not None
            # A sequence the batch ended without a verdict of its own ends here (raises the batch's error).
            for index, sample in enumerate(future.result().samples):
                if not finished[index]:
                    text = texts[index].finish(sample.text)
                    yield SampleDelta(index, [], [], text, finish_reason=sample.finish_reason)
        finally:
            # Its sequences stop at the next step (RowStopper's abort).
            future.cancel()

    async def tokenize(
        self, prompt: str, images: tuple[Image.Image, ...], add_special_tokens: bool
    ) -> list[int]:
        inputs = await asyncio.to_thread(self._prepare, prompt, images, add_special_tokens)
        return _unpadded(inputs)

    def _budget(self, request: GenerationRequest, inputs: dict[str, torch.Tensor]) -> int:
        """The most tokens each sample may generate: its own limit, or the room the context leaves."""
        prompt_len = int(inputs["input_ids"].shape[1])
        room = self.max_model_len - prompt_len
        if room < 1:
            raise PromptTooLongError(
                f"the prompt is {prompt_len} tokens; the model's context is {self.max_model_len}"
            )
        return min(request.sampling.max_tokens, room)

    def _prepare(
        self, prompt: str, images: Sequence[Image.Image], add_special_tokens: bool = True
    ) -> dict[str, torch.Tensor]:
        return dict(
            self.processor(
                text=[prompt],
                images=list(images) or None,
                add_special_tokens=add_special_tokens,
                return_tensors="pt",
            )
        )

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while sum(p.request.n for p in batch) < self.max_batch_size:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), deadline - loop.time()))
                except TimeoutError:
                    break
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            self.observe_batch(sum(p.request.n for p in batch))
            try:
                results = await asyncio.to_thread(self._generate_batch, batch)
            except Exception as error:
                log.exception("generate failed for a batch of %d requests", len(batch))
                results = [error] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _generate_batch(self, batch: list[_Pending]) -> list[Generation]:
        rows, owners, indices = [], [], []
        for owner, pending in enumerate(batch):
            sampling = pending.request.sampling
            budget = SamplingSpec(**{**sampling.__dict__, "max_tokens": pending.max_tokens})
            for index in range(pending.request.n):
                generator = torch.Generator().manual_seed(sample_seed(sampling.seed, index))
                rows.append(_Row(budget, generator))
                owners.append(owner)
                indices.append(index)
        inputs = _merge([p.inputs for p in batch], [p.request.n for p in batch], self.tokenizer.pad_token_id)
        model = self.model
        with torch.no_grad():
            model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max(p.max_tokens for p in batch),
                logits_processor=LogitsProcessorList([RowSampler(rows, self.suppressed_ids)]),
                stopping_criteria=StoppingCriteriaList(
                    [
                        RowStopper(
                            rows,
                            self.eos_ids,
                            self._decode,
                            lambda i: batch[owners[i]].future.done(),
                        ),
                        RowReporter(rows, owners, indices, [p.listener for p in batch], self._sample),
                    ]
                ),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self.eos_ids),
            )
        generations = [Generation(prompt_token_ids=_unpadded(p.inputs), samples=[]) for p in batch]
        for row, owner in zip(rows, owners, strict=True):
            if row.finish_reason == "abort":
                self.observe_aborted_tokens(len(row.tokens))
            generations[owner].samples.append(self._sample(row))
        return generations

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _sample(self, row: _Row) -> GeneratedSample:
        text = row.stop_text if row.stop_text is not None else self._decode(row.tokens)
        return GeneratedSample(
            token_ids=row.tokens,
            logprobs=row.logprobs,
            text=text,
            finish_reason=row.finish_reason or "length",
            top_logprobs=row.top_logprobs if row.sampling.top_logprobs else None,
        )


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _unpadded(inputs: dict[str, torch.Tensor]) -> list[int]:
    return inputs["input_ids"][0].tolist()


def _merge(parts: list[dict[str, torch.Tensor]], repeats: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch from single-prompt processor outputs, each repeated ``n`` times, left-padded."""
    width = max(int(p["input_ids"].shape[1]) for p in parts)
    merged: dict[str, list[torch.Tensor]] = {}
    for part, n in zip(parts, repeats, strict=True):
        for key, value in part.items():
            if key in _PER_TOKEN_KEYS:
                fill = pad_id if key == "input_ids" else 0
                padded = torch.nn.functional.pad(value, (width - value.shape[1], 0), value=fill)
                merged.setdefault(key, []).append(padded.repeat(n, 1))
            else:
                merged.setdefault(key, []).append(torch.cat([value] * n))
    return {key: torch.cat(values) for key, values in merged.items()}
