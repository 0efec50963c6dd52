"""What the reward server does, behind its routes: scoring items with the registry's reward functions in
the worker pool, and OpenRLHF's remote reward protocol on top of that.

Every item is checked against the registry in the server, before any work is queued: one the registry
refuses fails the whole request with a 422 naming its field. An item that then times out or fails in
its worker scores 0, with its status and a detail.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from reward_server.pool import Outcome, PoolBusy, WorkerPool
from reward_server.registry import ItemProblem, Registry, RewardCatalog, Task, combine
from shared.http import ServiceError
from shared.schemas import (
    OpenRLHFRewardRequest,
    OpenRLHFRewardResponse,
    Readiness,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)

log = logging.getLogger("cppo.reward")


class RewardService:
    """The registry's reward functions, run in a worker pool; ``openrlhf_weights`` is the reward that
    OpenRLHF's protocol applies (``ValueError`` if it names an unregistered function)."""

    def __init__(self, registry: Registry, pool: WorkerPool, openrlhf_weights: Mapping[str, float]) -> None:
        self.registry = registry
        self.pool = pool
        self.openrlhf_weights = registry.check_weights(openrlhf_weights)
        # The component OpenRLHF's dynamic filtering reads as the 0-1 "score": the heaviest one.
        self.openrlhf_main = max(self.openrlhf_weights, key=lambda name: self.openrlhf_weights[name])

    async def start(self) -> RewardService:
        """Start every worker process; the service, once they have."""
        await self.pool.start()
        names = ", ".join(self.registry.names())
        log.info("%d worker processes ready; reward functions: %s", self.pool.size, names)
        return self

    def readiness(self) -> Readiness:
        """``/ready``'s body: the live workers and the reward functions."""
        names = ", ".join(self.registry.names())
        detail = f"{self.pool.alive} of {self.pool.size} workers; reward functions: {names}"
        return Readiness(ready=True, detail=detail)

    def catalog(self) -> RewardCatalog:
        return RewardCatalog(functions=self.registry.info(), openrlhf_reward=self.openrlhf_weights)

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """Each item scored with the reward it names, in request order."""
        weights, tasks = [], []
        for index, item in enumerate(request.items):
            try:
                context = item.model_dump(include={"prompt", "data_source", "metadata"})
                item_weights, task = self.registry.plan(
                    item.reward, item.response, item.ground_truth, item.meta, context
                )
            except ItemProblem as problem:
                field = f"items.{index}.{problem.field}"
                raise ServiceError(422, field, "invalid_item", f"{field}: {problem}") from None
            weights.append(item_weights)
            tasks.append(task)
        outcomes = await self._run(tasks)
        return ScoreResponse(
            results=[
                _result(item.id, item_weights, outcome)
                for item, item_weights, outcome in zip(request.items, weights, outcomes, strict=True)
            ]
        )

    async def openrlhf(self, request: OpenRLHFRewardRequest) -> OpenRLHFRewardResponse:
        """Each query's response scored with ``openrlhf_weights``, its label as the ground truth."""
        count = len(request.query)
        prompts = request.prompts or [""] * count
        labels = request.labels or [""] * count
        tasks = []
        for index in range(count):
            response = openrlhf_response(request.query[index], prompts[index])
            try:
                _, task = self.registry.plan(self.openrlhf_weights, response, labels[index])
            except ItemProblem as problem:
                field = f"labels.{index}" if request.labels else "labels"
                raise ServiceError(422, field, "invalid_item", f"{field}: {problem}") from None
            tasks.append(task)
        outcomes = await self._run(tasks)
        results = [
            _result(str(index), self.openrlhf_weights, outcome) for index, outcome in enumerate(outcomes)
        ]
        return OpenRLHFRewardResponse(
            rewards=[result.reward for result in results],
            scores=[result.components.get(self.openrlhf_main, 0.0) for result in results],
            extra_logs={
                name: [result.components.get(name, 0.0) for result in results]
                for name in self.openrlhf_weights
            },
        )

    async def _run(self, tasks: list[Task]) -> list[Outcome]:
        try:
            return await self.pool.score(tasks)
        except PoolBusy as busy:
            raise ServiceError(503, None, "overloaded", str(busy), retry_after=1) from None


def _result(item_id: str, weights: Mapping[str, float], outcome: Outcome) -> ScoreResult:
    if outcome.status != "ok":
        return ScoreResult(id=item_id, reward=0.0, status=outcome.status, detail=outcome.detail)
    reward = combine(weights, outcome.components)
    if not abs(reward) < float("inf"):
        detail = "the weighted sum of the components is not a finite number"
        return ScoreResult(id=item_id, reward=0.0, status="error", detail=detail)
    return ScoreResult(id=item_id, reward=reward, components=outcome.components, status="ok")


_END_TOKENS = ("</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_ASSISTANT_HEADERS = (
    "<|im_start|>assistant\n",  # Qwen2.5-VL and the other ChatML templates
    "<|start_header_id|>assistant<|end_header_id|>\n\n",  # Llama 3
    "<start_of_turn>model\n",  # Gemma
)
_IMAGE_PADS = re.compile(r"(?:<\|image_pad\|>)+")


def openrlhf_response(query: str, prompt: str) -> str:
    """The response in an OpenRLHF query, which is the prompt followed by the response: the text after
    the prompt (OpenRLHF's own examples do ``query[len(prompt):]``). Qwen-VL's image placeholder counts
    once however many ``<|image_pad|>`` tokens the query's decoding expanded it into. Without the
    prompt in the query, the text after its last assistant header; failing that, the whole query.
    End-of-sequence tokens that OpenRLHF's decoding leaves at the end (``<|im_end|>``,
    ``<|endoftext|>``, ``</s>``…) are removed."""
    query, prompt = _IMAGE_PADS.sub("<|image_pad|>", query), _IMAGE_PADS.sub("<|image_pad|>", prompt)
    if prompt and query.startswith(prompt):
        query = query[len(prompt) :]
    elif prompt and (at := query.find(prompt)) >= 0:  # e.g. a BOS token decoded before the prompt
        query = query[at + len(prompt) :]
    else:
        header = max(_ASSISTANT_HEADERS, key=query.rfind)
        if (at := query.rfind(header)) >= 0:
            query = query[at + len(header) :]
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
