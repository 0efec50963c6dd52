"""The DeepSpeed JSON config of a run: built from the training config, or the launcher's, Accelerate-style.

Without a launcher config, ``deepspeed.*`` and ``train.*`` say everything. Under ``accelerate launch``
with DeepSpeed (its config file's ``deepspeed_config`` section, or ``--use_deepspeed --zero_stage …``), or
with ``deepspeed.config_file``, the Hugging Face Accelerate conventions apply: Accelerate's own
``DeepSpeedPlugin`` reads the launcher's settings and the DeepSpeed JSON, every ``"auto"`` value is filled
from the training config, and the values the trainer's loop depends on (batch sizes, accumulation steps,
precision) must agree with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, TrainConfig

# Values the update loop itself fixes: a launcher config may leave them "auto" but not change them.
_FIXED_BY_THE_TRAINER = (
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "bf16.enabled",
    "fp16.enabled",
)


def use_bf16(config: TrainConfig) -> bool:
    if config.model.dtype == "auto":
        return torch.cuda.is_available()
    return config.model.dtype == "bfloat16"


def deepspeed_config(
    config: TrainConfig, gradient_accumulation_steps: int, processes: int, hidden_size: int | None = None
) -> dict:
    """The DeepSpeed JSON config for ``deepspeed.initialize``: ``processes`` data-parallel ranks, each
    stepping once per ``gradient_accumulation_steps`` micro-batches; ZeRO-3's sizes from the model's width
    ``hidden_size`` where given (``zero3_sizes``), unless a launcher's JSON sets them."""
    sizes = zero3_sizes(hidden_size) if hidden_size else {}
    ours = _from_training_config(config, gradient_accumulation_steps, sizes)
    if config.deepspeed.config_file is None and not launched_by_accelerate_with_deepspeed():
        return ours
    return _from_launcher(config, ours, processes, sizes)


def zero3_sizes(hidden_size: int) -> dict[str, int]:
    """ZeRO-3's sizes from the language model's width h: Accelerate's rule for the buckets and the persistence
    threshold (h², 0.9·h², 10·h), and 0.9·h² as the most parameters kept gathered at once or kept for reuse.

    DeepSpeed's defaults (10⁹ parameters live and reuse distance) are sized for large models: they keep a
    smaller one's parameters gathered after its first pass, so every rank holds the whole policy and the
    whole reference again (measured in ``bench/memory.py``)."""
    square = hidden_size * hidden_size
    return {
        "reduce_bucket_size": square,
        "stage3_prefetch_bucket_size": int(0.9 * square),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_max_live_parameters": int(0.9 * square),
        "stage3_max_reuse_distance": int(0.9 * square),
    }


def launched_by_accelerate_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _from_training_config(config: TrainConfig, gradient_accumulation_steps: int, sizes: dict) -> dict:
    train = config.train
    zero: dict[str, Any] = {"stage": config.deepspeed.zero_stage}
    if config.deepspeed.zero_stage == 3:
        zero |= sizes
    if config.deepspeed.offload and config.deepspeed.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if config.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(config)},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "weight_decay": train.weight_decay,
                # DeepSpeed's fused CPU Adam must be compiled first (~50 s); torch's is as good here.
                "torch_adam": True,
            },
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train.warmup_steps:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0,
                "warmup_max_lr": train.lr,
                "warmup_num_steps": train.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return ds


def _from_launcher(config: TrainConfig, ours: dict, processes: int, sizes: dict) -> dict:
    """Accelerate's reading of the launcher settings and the DeepSpeed JSON, completed from ``ours``.

    Precedence, as in Accelerate: an explicit value in the JSON, then the launcher's flags, then this
    training config.
    """
    from accelerate.utils import DeepSpeedPlugin

    stage = config.deepspeed.zero_stage
    offload = config.deepspeed.offload
    source = config.deepspeed.config_file or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    where = f"the DeepSpeed config {source}" if source else "the accelerate launch DeepSpeed settings"
    _check_launcher_precision(config)
    try:
        plugin = DeepSpeedPlugin(
            hf_ds_config=_read_json(source) if source else None,
            gradient_accumulation_steps=ours["gradient_accumulation_steps"],
            gradient_clipping=_unless_launcher_sets("ACCELERATE_GRADIENT_CLIPPING", config.train.grad_clip),
            zero_stage=_unless_launcher_sets("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage),
            offload_optimizer_device=_unless_launcher_sets(
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu" if offload and stage > 0 else "none"
            ),
            offload_param_device=_unless_launcher_sets(
                "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu" if offload and stage == 3 else "none"
            ),
        )
    except (ValueError, OSError) as error:
        raise ConfigError(f"deepspeed.config_file: {where}: {error}") from error
    ds = plugin.deepspeed_config
    train = config.train
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "train_batch_size": train.micro_batch_size * ours["gradient_accumulation_steps"] * processes,
        "gradient_accumulation_steps": ours["gradient_accumulation_steps"],
        "gradient_clipping": train.grad_clip,
        "bf16.enabled": ours["bf16"]["enabled"],
        "fp16.enabled": False,
        "zero_optimization.stage": stage,
        "optimizer.params.lr": train.lr,
        "optimizer.params.betas": list(train.betas),
        "optimizer.params.weight_decay": train.weight_decay,
        "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": train.lr,
        "scheduler.params.warmup_num_steps": train.warmup_steps,
        **{f"zero_optimization.{key}": value for key, value in sizes.items()},
    }
    unfilled = [key for key in _auto_keys(ds) if key not in values]
    if unfilled:
        raise ConfigError(
            f'deepspeed.config_file: {where} leaves {", ".join(unfilled)} as "auto", and the trainer has '
            "no value for it; write the value in the file"
        )
    plugin.deepspeed_config_process(must_match=False, **values)
    for key in _FIXED_BY_THE_TRAINER:
        value = plugin.get_value(key)
        if value is not None and value != values[key]:
            raise ConfigError(
                f"deepspeed.config_file: {where} sets {key}={value!r}, but this run needs {values[key]!r} "
                '(from train.* and model.dtype); set it to "auto" or remove it'
            )
    ds.setdefault("optimizer", ours["optimizer"])
    if "scheduler" in ours:
        ds.setdefault("scheduler", ours["scheduler"])
    ds.setdefault("bf16", ours["bf16"])
    ds["steps_per_print"] = ours["steps_per_print"]
    return ds


def _read_json(path: str) -> dict:
    body = json.loads(Path(path).read_text())
    if not isinstance(body, dict):
        raise ValueError("the file holds no JSON object")
    # The plugin would take a missing accumulation count as 1; the batch shape is the loop's to fill.
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        body.setdefault(key, "auto")
    return body


def _unless_launcher_sets(variable: str, value: Any) -> Any:
    """``value``, or None when ``accelerate launch`` passed its own (the plugin then reads ``variable``)."""
    return None if variable in os.environ else value


def _check_launcher_precision(config: TrainConfig) -> None:
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    have = "bf16" if use_bf16(config) else "no"
    if asked not in ("no", have):
        raise ConfigError(
            f"accelerate launch asks for mixed precision {asked!r}, but this run computes in "
            f"{'bfloat16' if have == 'bf16' else 'float32'}: the trainer takes its precision from "
            "model.dtype (auto, float32 or bfloat16); set that, or launch with --mixed_precision no"
        )


def _auto_keys(node: dict, prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"
