"""The policy under DeepSpeed: teacher-forced passes, the update, and the full weights for publishing.

ZeRO stage 0-3 with optional CPU offload; bf16 on GPU, fp32 on CPU. The DeepSpeed config itself comes from
``trainer.ds_config``; the processes and their ranks from ``trainer.distributed``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from peft import PeftModel
from torch import Tensor
from transformers import AutoConfig, PreTrainedModel
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from shared.vlm import load_model
from shared.weight_broadcast import untied
from trainer.config import TrainConfig
from trainer.distributed import rank, world_size
from trainer.ds_config import deepspeed_config, use_bf16
from trainer.experience import Batch
from trainer.lora import make_trainable, merged_state
from trainer.objective import ALGORITHMS, ObjectiveInputs, logprobs_and_entropy, masked_mean, policy_objective


class Policy:
    """The trained model inside a DeepSpeed engine, plus the frozen reference when β > 0."""

    def __init__(
        self, config: TrainConfig, micro_batches_per_mini_batch: int, suppressed_ids: list[int]
    ) -> None:
        self.config = config
        self.suppressed_ids = suppressed_ids
        self.temperature = config.rollout.temperature
        self.deepspeed_config = deepspeed_config(
            config, micro_batches_per_mini_batch, world_size(), hidden_size(config.model.path)
        )
        model = load_for_deepspeed(config.model.path, torch.float32, self.deepspeed_config)
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = make_trainable(model, config.model)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.deepspeed_config,
        )
        self._grad_norm = math.nan
        # With LoRA the reference is the same model with its adapter off (reference_logprobs).
        self.reference = None
        if config.objective.beta > 0 and not self.lora:
            self.reference = reference_model(config.model.path, self.dtype, self.deepspeed_config)

    @property
    def lora(self) -> bool:
        """Whether a LoRA adapter trains on the frozen model (``model.lora``), rather than every weight."""
        return self.config.model.lora is not None

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model inside the engine (with its LoRA layers, if any)."""
        return transformers_model(self.engine)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if use_bf16(self.config) else torch.float32

    def logprobs(self, model, batch: Batch, name: str) -> tuple[Tensor, Tensor]:
        return response_logprobs(model, batch, name, self.dtype, self.temperature, self.suppressed_ids)

    @torch.no_grad()
    def score_old(self, batch: Batch, passes: tuple[str, ...]) -> dict[str, tuple[Tensor, Tensor]]:
        """Log-probs and entropies under the current weights, without gradient (old and reference)."""
        self.engine.eval()
        return {name: self.logprobs(self.engine, batch, name) for name in passes}

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> Tensor:
        """ℓ_ref of the clean pass: the reference model's, or with LoRA the policy's with its adapter off
        (the frozen starting model, without a second copy in memory)."""
        if self.reference is not None:
            return self.logprobs(self.reference, batch, "clean")[0]
        with self.engine.module.disable_adapter():
            return self.logprobs(self.engine, batch, "clean")[0]

    def micro_step(
        self, batch: Batch, logp_old: Tensor | None, weight: float, tis_cap: float | None
    ) -> dict[str, float | list[float]]:
        """Forward the passes the algorithm needs, backward ``weight × loss``, and let DeepSpeed step at the
        mini-batch boundary. ``logp_old`` None means this is the only pass over the batch, so the old
        policy is the current one and its log-probs are this pass's, detached.

        Returns the metrics: the micro-batch's means, and lists of per-response means (one per row)."""
        self.engine.train()
        mask = batch.response_mask.to(self.engine.device)
        logp, entropy = {}, {}
        for name in ALGORITHMS[self.config.objective.algorithm].passes:
            logp[name], entropy[name] = self.logprobs(self.engine, batch, name)
        clean = logp["clean"]
        old = clean.detach() if logp_old is None else logp_old.to(clean.device)
        advantages = batch.advantages.to(clean.device)[:, None].expand_as(clean)
        rollout = batch.rollout_logprobs.to(clean.device)
        if tis_cap is not None:
            # Truncated importance sampling: the samples came from the rollout engine's numerics.
            advantages = advantages * torch.exp(old - rollout).clamp(max=tis_cap)
        inputs = ObjectiveInputs(
            logp=logp, entropy=entropy, logp_old=old, advantages=advantages, response_mask=mask
        )
        if self.config.objective.beta > 0:
            inputs.logp_ref = self.reference_logprobs(batch)
        loss, metrics = policy_objective(inputs, self.config.objective)
        self.engine.backward(loss * weight, scale_wrt_gas=False)
        if self.engine.is_gradient_accumulation_boundary() and self.engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips but does not keep the norm; read it before the step.
            self._grad_norm = float(
                torch.linalg.vector_norm(
                    torch.stack(
                        [p.grad.norm() for p in self.engine.module.parameters() if p.grad is not None]
                    )
                )
            )
        self.engine.step()
        metrics["entropy_mean"] = masked_mean(entropy["clean"].detach(), mask)
        metrics["rollout_logprob_gap"] = masked_mean((old - rollout).abs(), mask)
        return {name: value.tolist() if value.ndim else float(value) for name, value in metrics.items()}

    def learning_rate(self) -> float:
        """The rate the next optimizer step uses (the scheduler's, during warm-up)."""
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float:
        """The last optimizer step's gradient norm, before clipping."""
        norm = (
            self._grad_norm
            if self.engine.zero_optimization_stage() == 0
            else self.engine.get_global_grad_norm()
        )
        return float(norm) if norm is not None and math.isfinite(float(norm)) else float("nan")

    @contextmanager
    def full_weights(self, copy: bool = True) -> Iterator[dict[str, Tensor] | None]:
        """The full state dict on rank 0 (gathered from the shards under ZeRO-3), None elsewhere; with
        LoRA, the merged weights under the base model's names. Tied tensors (lm_head = embeddings) come
        once, as save_pretrained stores them, so the names are exactly the served checkpoint's.

        By default each tensor is a CPU copy of its own. Saving needs that: under ZeRO-1 and 2 the
        parameters are views of one flat buffer, which save_pretrained refuses as shared tensors. With
        ``copy=False``, below ZeRO-3, they are the model's own tensors where they are (a GPU's included),
        which a broadcast sends from there (a 7B model's copy would cost seconds per step); they then hold
        these weights only until the next optimizer step. Under ZeRO-3 they are always a copy, since the
        gathered parameters are released when the context ends.

        Every rank must enter it: under ZeRO-3 the gather is collective."""
        module = self.engine.module
        copy = copy or self.engine.zero_optimization_stage() == 3
        with self._gathered(list(module.parameters())):
            if rank() != 0:
                yield None
            else:
                state = untied(merged_state(module) if self.lora else module.state_dict())
                state = {name: tensor.detach() for name, tensor in state.items()}
                yield {name: t.to("cpu", copy=True) for name, t in state.items()} if copy else state

    def save_pretrained(self, folder: Path, state: dict[str, Tensor]) -> None:
        """A Hugging Face folder (config + safetensors) of ``state``, as the rollout server loads it."""
        self.model.save_pretrained(folder, state_dict=state, safe_serialization=True, max_shard_size="100GB")

    def save_adapter(self, folder: Path) -> None:
        """The LoRA adapter (and the merger, if it trains) in PEFT's format, which
        ``PeftModel.from_pretrained`` loads onto ``model.path``. Every rank calls it; rank 0 writes."""
        module = self.engine.module
        with self._gathered([p for p in module.parameters() if p.requires_grad]):
            if rank() == 0:
                module.save_pretrained(folder)

    @contextmanager
    def _gathered(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        """``params`` whole on every rank for the duration: gathered from their shards under ZeRO-3."""
        if self.engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def load_for_deepspeed(path: str, dtype: torch.dtype, ds_config: dict) -> PreTrainedModel:
    """The model at ``path``; under ZeRO-3 already sharded across the ranks as it loads.

    With an ``HfDeepSpeedConfig`` alive, transformers builds the model inside ``deepspeed.zero.Init`` and
    loads each tensor straight into its shards (Accelerate's ``zero3_init_flag``), so no rank ever holds the
    whole model. The config is dropped once loaded: it is a process-wide switch that would make every later
    ``from_pretrained`` (the processor's checks, a second model) shard too."""
    if zero_stage(ds_config) != 3:
        return load_model(path, dtype=dtype)
    switch = HfDeepSpeedConfig(ds_config)
    try:
        model = load_model(path, dtype=dtype)
    finally:
        unset_hf_deepspeed_config()
        del switch
    # transformers' ZeRO-3 loading keeps every renaming it knows as the ones to undo when saving, where its
    # usual loading keeps those the checkpoint needed (Qwen2.5-VL: 2 of 8); undoing the legacy ones too would
    # save and publish `model.model.layers.*` for `model.layers.*`.
    if conversions := getattr(model, "_weight_conversions", None):
        model._weight_conversions = [c for c in conversions if c.was_used()]
    return model


def hidden_size(path: str) -> int:
    """The language model's width, from the checkpoint's config (VLMs keep it in ``text_config``)."""
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "text_config", config).hidden_size


def reference_config(ds_config: dict) -> dict:
    """The frozen reference's DeepSpeed config: the policy's ZeRO-3 partitioning, sizes and parameter
    offload, without optimizer, gradients or accumulation (OpenRLHF's evaluation config)."""
    zero = {key: value for key, value in ds_config["zero_optimization"].items() if key != "offload_optimizer"}
    return {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": ds_config.get("bf16", {"enabled": False}),
        "steps_per_print": ds_config.get("steps_per_print", 1 << 30),
    }


def reference_model(path: str, dtype: torch.dtype, ds_config: dict) -> torch.nn.Module:
    """The frozen reference policy π_ref, in eval mode, for passes without gradient.

    Under ZeRO-3 it is sharded like the policy, in a DeepSpeed engine of its own, so every rank holds a
    share of it, as of the policy; every rank must then run its passes together. Below stage 3 the policy's
    parameters are whole on every rank anyway, and so is the reference, a plain module."""
    if zero_stage(ds_config) != 3:
        reference = load_model(path, dtype=dtype).to(get_accelerator().current_device_name())
    else:
        config = reference_config(ds_config)
        reference, *_ = deepspeed.initialize(model=load_for_deepspeed(path, dtype, config), config=config)
    reference.requires_grad_(False)
    reference.eval()  # a DeepSpeed engine's eval() returns None, not the engine
    return reference


def response_logprobs(
    model: torch.nn.Module,
    batch: Batch,
    name: str,
    dtype: torch.dtype,
    temperature: float,
    suppressed_ids: list[int],
) -> tuple[Tensor, Tensor]:
    """ℓ_t and H_t of the response tokens in pass ``name``, teacher-forced: ``[B, R]`` each."""
    logits = teacher_forced_logits(model, batch.inputs[name], batch.owner, batch.response_ids, dtype)
    ids = batch.response_ids.to(logits.device)
    return logprobs_and_entropy(logits, ids, temperature, suppressed_ids)


def teacher_forced_logits(
    model: torch.nn.Module,
    prompts: dict[str, Tensor],
    owner: Tensor,
    response_ids: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    """The logits that predict each response token, ``[B, R, V]``: one pass over the distinct prompts
    (with a KV cache), then one over all responses continuing their prompt's cache.

    The same numbers as a pass over each full sequence, as generation computes them, at a fraction of the
    cost when a prompt has many responses (a group of G shares one prompt pass).
    """
    device = next(iter(getattr(model, "module", model).parameters())).device
    prompts = {k: v.to(device) for k, v in prompts.items()}
    if "pixel_values" in prompts:
        prompts["pixel_values"] = prompts["pixel_values"].to(dtype)
    owner, response_ids = owner.to(device), response_ids.to(device)
    if checkpointing(transformers_model(model)):
        # Checkpointed layers drop every KV cache (their backward replay would write it a second time), so
        # no response can continue its prompt's: each runs with its prompt, as one whole sequence.
        return whole_sequence_logits(model, prompts, owner, response_ids)
    core = transformers_model(model).model
    mask = prompts["attention_mask"]
    positions, _ = core.get_rope_index(
        prompts["input_ids"], prompts["mm_token_type_ids"], prompts.get("image_grid_thw"), attention_mask=mask
    )
    prefill = model(**prompts, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = prefill.logits[owner, -1:]
    width = response_ids.shape[1]
    if width == 1:
        return first.float()
    cache = getattr(prefill, "cache", None) or prefill.past_key_values
    cache.reorder_cache(owner)
    # Text after the prompt advances all three M-RoPE axes together, from the prompt's largest position.
    following = positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2))[owner] + 1
    steps = following[:, None] + torch.arange(width - 1, device=device)
    with warnings.catch_warnings():
        # transformers 5.24 renames the argument `cache`; the old name is the one every pinned version takes.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        rest = model(
            input_ids=response_ids[:, :-1],
            attention_mask=torch.cat([mask[owner], torch.ones_like(response_ids[:, :-1])], dim=1),
            position_ids=steps[None].expand(3, -1, -1),
            past_key_values=cache,
            use_cache=True,
        )
    return torch.cat([first, rest.logits], dim=1).float()


def checkpointing(model: PreTrainedModel) -> bool:
    """Whether this pass recomputes its layers in the backward pass (gradient checkpointing, training)."""
    return (
        model.training
        and torch.is_grad_enabled()
        and any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    )


def whole_sequence_logits(
    model: torch.nn.Module, prompts: dict[str, Tensor], owner: Tensor, response_ids: Tensor
) -> Tensor:
    """``teacher_forced_logits`` without a KV cache: each row's prompt (its images too) and its response in
    one sequence, ``[B, R, V]``. The same numbers, at the cost of a prompt pass per response."""
    rows = prompts_per_row(prompts, owner, transformers_model(model).config.vision_start_token_id)
    width = response_ids.shape[1]
    rows["input_ids"] = torch.cat([rows["input_ids"], response_ids[:, :-1]], dim=1)
    rows["attention_mask"] = torch.cat([rows["attention_mask"], torch.ones_like(response_ids[:, :-1])], dim=1)
    rows["mm_token_type_ids"] = torch.cat(
        [rows["mm_token_type_ids"], torch.zeros_like(response_ids[:, :-1])], dim=1
    )
    positions, _ = transformers_model(model).model.get_rope_index(
        rows["input_ids"],
        rows["mm_token_type_ids"],
        rows.get("image_grid_thw"),
        attention_mask=rows["attention_mask"],
    )
    return model(**rows, position_ids=positions, use_cache=False, logits_to_keep=width).logits.float()


def prompts_per_row(prompts: dict[str, Tensor], owner: Tensor, vision_start_id: int) -> dict[str, Tensor]:
    """The prompt inputs of row ``b`` are prompt ``owner[b]``'s: token rows and image patches repeated.

    ``pixel_values`` holds every image's patches one image after the other, in prompt order, and
    ``image_grid_thw`` one (t, h, w) per image: an image has t·h·w patches, and a prompt as many images as
    it has vision-start tokens."""
    rows = {name: prompts[name][owner] for name in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" not in prompts:
        return rows
    grids = prompts["image_grid_thw"]
    images = (prompts["input_ids"] == vision_start_id).sum(dim=1)
    first_image = torch.cumsum(images, dim=0) - images
    patches = grids.prod(dim=1)
    first_patch = torch.cumsum(patches, dim=0) - patches
    taken = [range(int(first_image[p]), int(first_image[p] + images[p])) for p in owner.tolist()]
    rows["image_grid_thw"] = torch.cat([grids[list(ids)] for ids in taken])
    rows["pixel_values"] = torch.cat(
        [prompts["pixel_values"][first_patch[i] : first_patch[i] + patches[i]] for ids in taken for i in ids]
    )
    return rows


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a DeepSpeed engine and a PEFT wrapper, whichever of them are there."""
    model = getattr(model, "module", model)
    return model.get_base_model() if isinstance(model, PeftModel) else model
