"""The CPU engine: our own decoding loop over a Hugging Face model, with continuous batching.

Each prompt is prefilled once: one forward pass over the distinct prompts of the requests that join (their
images through the vision tower once), after which each prompt's KV cache is copied to its ``n``
sequences, which draw their first token from the prompt's last logits. The trainer's teacher-forced passes
share a prompt's pass the same way (``trainer.policy.teacher_forced_logits``). Then every step feeds each
live sequence its last token. Requests that arrive while a batch decodes join it at the next step (their
prompts prefilled, the two caches left-padded to one length), up to ``max_batch_size`` sequences; finished
sequences leave it. An idle backend waits up to ``max_wait_ms`` after the first request for others to share
its prefill.

Batching must not change what a sample is, so each sequence has its own temperature, top-k, top-p, stop
strings, token budget and random generator. ``draw`` takes each token by the Gumbel-max trick (argmax of
log-probs plus Gumbel noise from the sequence's own generator is an exact draw from the softmax). A seeded
sample is then the same whichever requests share its batch, and the same as when each sample ran its own
prompt pass (``tests/test_prefill_sharing.py`` checks it against a per-sample reference).

A streamed request rides the same batches: after each step, its sequences' new tokens go to the request's
own queue, and ``stream`` turns them into deltas.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

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
from shared.weight_broadcast import Invitation, Member, copy_into

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
    reported: int = 0
    """Tokens already handed to a streamed request's listener."""


def draw(rows: Sequence[_Row], logits: torch.Tensor, suppressed_ids: list[int]) -> None:
    """Appends to each row its next token, drawn from its own processed distribution over its row of
    ``logits`` (see the module docstring), with its log-prob and top log-probs."""
    logits = logits.float().clone()
    logits[:, suppressed_ids] = -math.inf
    for row, row_logits in zip(rows, logits, strict=True):
        logp = processed_logprobs(row_logits, row.sampling)
        if row.sampling.temperature > 0:
            noise = torch.empty_like(logp).exponential_(generator=row.generator)
            token = int(torch.argmax(logp - noise.log()))
        else:
            token = int(torch.argmax(logp))
        row.tokens.append(token)
        row.logprobs.append(float(logp[token]))
        if row.sampling.top_logprobs:
            values, ids = torch.topk(logp, row.sampling.top_logprobs)
            row.top_logprobs.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))


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


@dataclass(frozen=True)
class _Drawn:
    """A token one sequence of a streamed request drew."""

    index: int
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None
    finished: GeneratedSample | None
    """The whole sample, once this token ended it."""


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


@dataclass(eq=False)
class _Pending:
    """A request waiting for, or in, the batch."""

    request: GenerationRequest
    inputs: dict[str, torch.Tensor]
    max_tokens: int
    future: asyncio.Future[Generation]
    listener: Callable[[list[_Drawn]], None] | None = None
    """Streamed requests: called after each step with the tokens its sequences drew."""
    rows: list[_Row] = field(init=False)
    """Its ``n`` sequences, in sample order."""

    def __post_init__(self) -> None:
        sampling = self.request.sampling
        budget = SamplingSpec(**{**sampling.__dict__, "max_tokens": self.max_tokens})
        self.rows = [
            _Row(budget, torch.Generator().manual_seed(sample_seed(sampling.seed, index)))
            for index in range(self.request.n)
        ]


@dataclass
class _Batch:
    """The sequences decoding together; row i of ``cache``, ``mask`` and ``positions`` is ``rows[i]``."""

    rows: list[_Row]
    owners: list[_Pending]
    cache: DynamicCache
    mask: torch.Tensor
    """``[rows, cached tokens]``: 1 where the cache holds one of the row's tokens, 0 for left padding."""
    positions: torch.Tensor
    """``[rows]``: the M-RoPE position of each row's next token (text advances all three axes together)."""

    def pending(self) -> list[_Pending]:
        """The requests with sequences in the batch, each once, in order."""
        return list(dict.fromkeys(self.owners))

    def live(self) -> _Batch:
        """The batch without its finished sequences, and without the cache columns that pad every row left."""
        keep = torch.tensor(
            [i for i, row in enumerate(self.rows) if row.finish_reason is None], dtype=torch.long
        )
        mask = self.mask[keep]
        start = int(mask.any(dim=0).int().argmax())
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep, :, start:], layer.values[keep, :, start:]
        return _Batch(
            [self.rows[i] for i in keep.tolist()],
            [self.owners[i] for i in keep.tolist()],
            self.cache,
            mask[:, start:],
            self.positions[keep],
        )

    def join(self, other: _Batch) -> _Batch:
        """Both batches as one: the shorter cache is left-padded to the other's length, and masked."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = _stacked(mine.keys, theirs.keys, width, dim=2)
            mine.values = _stacked(mine.values, theirs.values, width, dim=2)
        return _Batch(
            self.rows + other.rows,
            self.owners + other.owners,
            self.cache,
            _stacked(self.mask, other.mask, width, dim=1),
            torch.cat([self.positions, other.positions]),
        )


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
        # Sequences in each decoding step.
        self.observe_batch = observe_batch
        # Aborted samples never reach the service, which counts them but not the tokens they cost.
        self.observe_aborted_tokens = observe_aborted_tokens
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._member = Member()
        # Broadcast buckets (see ``receive_broadcast``): the parameters are views of the last broadcast's,
        # and the ones before are free to receive the next broadcast into. A load from a folder keeps both
        # (its model uses neither), so that broadcasts after it do not fault their memory in again.
        self._live_buckets: list[torch.Tensor] = []
        self._spare_buckets: list[torch.Tensor] = []

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
        # The tensors land in buckets first (``receive``), then become the model's parameters
        # (``copy_into``), which frees the buckets of the broadcast before. Those are written over next
        # time, since fresh memory costs a page fault per 4 KiB, so the weights take twice their size from
        # the second broadcast on.
        tensors, buckets = await asyncio.to_thread(self._member.receive, invitation, self._spare_buckets)
        try:
            await asyncio.to_thread(copy_into, self.model, tensors)
        except ValueError as error:
            raise WeightsLoadError(f"the broadcast weights do not fit the model: {error}") from error
        self._spare_buckets, self._live_buckets = self._live_buckets, buckets

    async def generate(self, request: GenerationRequest) -> Generation:
        inputs = await asyncio.to_thread(self._prepare, request.prompt, request.images)
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(request, inputs, self._budget(request, inputs), future))
        return await future

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        inputs = await asyncio.to_thread(self._prepare, request.prompt, request.images)
        budget = self._budget(request, inputs)
        # Steps, then None once the request is over (the future's callback runs after its last report).
        drawn: asyncio.Queue[list[_Drawn] | None] = asyncio.Queue()
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: drawn.put_nowait(None))
        texts = [_StreamedText(self._decode, request.sampling.stop) for _ in range(request.n)]
        finished = [False] * request.n
        try:
            self._enqueue(_Pending(request, inputs, budget, future, drawn.put_nowait))
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
            # A sequence that ended without a verdict of its own ends here (raises the batch's error).
            for index, sample in enumerate(future.result().samples):
                if not finished[index]:
                    text = texts[index].finish(sample.text)
                    yield SampleDelta(index, [], [], text, finish_reason=sample.finish_reason)
        finally:
            # Its sequences are aborted before the next step.
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

    def _enqueue(self, pending: _Pending) -> None:
        self._queue.append(pending)
        self._arrived.set()

    # --- the decoding loop: the event loop admits, settles and aborts; a worker thread computes ---------

    async def _run_batches(self) -> None:
        batch: _Batch | None = None
        while True:
            running = self._abort_cancelled(batch)
            admitted = await self._admit(running)
            if not running:
                batch = None
                if not admitted:
                    continue
            try:
                batch = await asyncio.to_thread(self._step, batch, admitted)
            except Exception as error:
                failed = [*(batch.pending() if batch else []), *admitted]
                log.exception("generation failed for a batch of %d requests", len(failed))
                for pending in failed:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                batch = None
                continue
            self._settle(batch)

    def _abort_cancelled(self, batch: _Batch | None) -> int:
        """Ends the sequences of requests whose caller went away; the number of sequences still live."""
        if batch is None:
            return 0
        running = 0
        for row, owner in zip(batch.rows, batch.owners, strict=True):
            if row.finish_reason is None and owner.future.done():
                row.finish_reason = "abort"
                self.observe_aborted_tokens(len(row.tokens))
            running += row.finish_reason is None
        return running

    async def _admit(self, running: int) -> list[_Pending]:
        """The queued requests that join the next step, within ``max_batch_size`` sequences (an idle backend
        takes a larger request alone). An idle backend first waits for a request, then up to ``max_wait``
        for more to share its prefill; a busy one takes what is queued without waiting."""
        loop = asyncio.get_running_loop()
        if not running:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while sum(p.request.n for p in self._queue) < self.max_batch_size:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except TimeoutError:
                    break
        admitted: list[_Pending] = []
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():
                self._queue.popleft()
            elif running + pending.request.n <= self.max_batch_size or not (running or admitted):
                admitted.append(self._queue.popleft())
                running += pending.request.n
            else:
                break
        return admitted

    def _settle(self, batch: _Batch) -> None:
        """Hands streamed requests their new tokens, and answers the requests whose sequences all ended."""
        for pending in batch.pending():
            if pending.future.done():
                continue
            if pending.listener is not None:
                drawn = [self._drawn(index, row) for index, row in enumerate(pending.rows)]
                if steps := [step for step in drawn if step is not None]:
                    pending.listener(steps)
            if all(row.finish_reason is not None for row in pending.rows):
                samples = [self._sample(row) for row in pending.rows]
                pending.future.set_result(Generation(_unpadded(pending.inputs), samples))

    def _drawn(self, index: int, row: _Row) -> _Drawn | None:
        """A streamed sequence's token drawn since its last report, if any."""
        if row.reported == len(row.tokens):
            return None
        row.reported = len(row.tokens)
        top = row.top_logprobs[-1] if row.sampling.top_logprobs else None
        done = self._sample(row) if row.finish_reason is not None else None
        return _Drawn(index, row.tokens[-1], row.logprobs[-1], top, done)

    def _step(self, batch: _Batch | None, admitted: list[_Pending]) -> _Batch:
        """One step, in a worker thread: the live sequences draw their next token, the admitted requests'
        sequences their first, and each sequence is judged."""
        with torch.no_grad():
            if batch is not None:
                batch = self._decode_step(batch.live())
            if admitted:
                joining = self._prefill(admitted)
                batch = joining if batch is None else batch.join(joining)
        assert batch is not None, "a step has live sequences or admitted requests"
        self.observe_batch(len(batch.rows))
        for row in batch.rows:
            self._judge(row)
        return batch

    def _prefill(self, admitted: list[_Pending]) -> _Batch:
        """One pass over the admitted prompts, each once; each prompt's cache is then copied to its
        sequences, which draw their first token from the prompt's last logits."""
        inputs = _merge([p.inputs for p in admitted], self.tokenizer.pad_token_id)
        mask = inputs["attention_mask"]
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            inputs.get("image_grid_thw"),
            attention_mask=mask,
        )
        output = self.model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        owner = torch.repeat_interleave(torch.tensor([p.request.n for p in admitted]))
        cache = output.past_key_values
        cache.reorder_cache(owner)
        # Text after the prompt advances all three M-RoPE axes together, from the prompt's largest position.
        following = positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
        rows = [row for pending in admitted for row in pending.rows]
        draw(rows, output.logits[owner, -1], self.suppressed_ids)
        owners = [pending for pending in admitted for _ in pending.rows]
        return _Batch(rows, owners, cache, mask[owner], following[owner])

    def _decode_step(self, batch: _Batch) -> _Batch:
        """Each sequence's last token through the model, and its next token drawn."""
        last = torch.tensor([[row.tokens[-1]] for row in batch.rows])
        mask = torch.cat([batch.mask, torch.ones_like(last)], dim=1)
        with warnings.catch_warnings():
            # transformers 5.24 renames the argument `cache`; every pinned version takes the old name.
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            output = self.model(
                input_ids=last,
                attention_mask=mask,
                position_ids=batch.positions[None, :, None].expand(3, -1, -1),
                past_key_values=batch.cache,
                use_cache=True,
            )
        draw(batch.rows, output.logits[:, -1], self.suppressed_ids)
        return _Batch(batch.rows, batch.owners, batch.cache, mask, batch.positions + 1)

    def _judge(self, row: _Row) -> None:
        """Ends a sequence on its own terms: an end token, a stop string or its token budget."""
        if row.finish_reason is not None:
            return
        if row.tokens[-1] in self.eos_ids:
            row.finish_reason = "stop"
        elif row.sampling.stop and (hit := self._stop_string(row)) is not None:
            row.finish_reason, row.stop_text = "stop", hit
        elif len(row.tokens) >= row.sampling.max_tokens:
            row.finish_reason = "length"

    def _stop_string(self, row: _Row) -> str | None:
        text = self._decode(row.tokens)
        positions = [(text.find(stop), stop) for stop in row.sampling.stop if stop in text]
        return text[: min(positions)[0]] if positions else None

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


def _merge(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch from single-prompt processor outputs, left-padded."""
    width = max(int(p["input_ids"].shape[1]) for p in parts)
    merged: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for key, value in part.items():
            if key in _PER_TOKEN_KEYS:
                fill = pad_id if key == "input_ids" else 0
                merged.setdefault(key, []).append(_left_padded(value, width, 1, fill))
            else:
                merged.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in merged.items()}


def _left_padded(tensor: torch.Tensor, width: int, dim: int, fill: int = 0) -> torch.Tensor:
    """``tensor`` widened to ``width`` along ``dim`` by ``fill`` on the left."""
    shape = list(tensor.shape)
    shape[dim] = width - shape[dim]
    return torch.cat([tensor.new_full(shape, fill), tensor], dim=dim)


def _stacked(first: torch.Tensor, second: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``first`` above ``second`` in the batch, each left-padded with zeros to ``width`` along ``dim``."""
    return torch.cat([_left_padded(first, width, dim), _left_padded(second, width, dim)])
