"""What trains: every weight, or a LoRA adapter (PEFT) on the frozen model; the vision tower and the merger
each frozen on their own switch.

With LoRA, the published weights are the merged ones, W + (alpha / r)·B·A under the base model's own names,
so the rollout replicas serve a plain checkpoint; the checkpoints hold the adapter.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor
from transformers import PreTrainedModel

from trainer.config import ConfigError, ModelConfig

ADAPTER = "default"
"""PEFT's name for the one adapter a policy has."""

Part = Literal["language", "vision", "merger"]


def model_part(name: str) -> Part:
    """Which part of a Qwen-VL model a module or parameter belongs to: the vision tower is ``visual``, its
    last stage ``visual.merger`` (the projector into the language model)."""
    parts = name.split(".")
    if "visual" not in parts:
        return "language"
    return "merger" if "merger" in parts[parts.index("visual") :] else "vision"


def make_trainable(model: PreTrainedModel, config: ModelConfig) -> torch.nn.Module:
    """The model as it trains: frozen where the switches say, or wrapped with a LoRA adapter."""
    if config.lora is None:
        for name, parameter in model.named_parameters():
            if frozen(model_part(name), config):
                parameter.requires_grad_(False)
        return model
    if config.gradient_checkpointing:
        # The frozen embeddings' output needs a gradient, or the checkpointed blocks pass none back.
        model.enable_input_require_grads()
    merger = [name for name, _ in model.named_modules() if name.endswith("visual.merger")]
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=lora_targets(model, config),
        modules_to_save=None if config.freeze_merger else merger or None,
    )
    with warnings.catch_warnings():
        # PEFT 0.21 asks transformers 5 for `is_gradient_checkpointing`, deprecated there: not ours to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, lora, adapter_name=ADAPTER)
    # The adapter's config names its base model: a local folder by its absolute path, so that the adapter
    # loads (and `cppo export --merge` merges) from any working directory.
    if Path(config.path).is_dir():
        wrapped.peft_config[ADAPTER].base_model_name_or_path = str(Path(config.path).resolve())
    return wrapped


def frozen(part: Part, config: ModelConfig) -> bool:
    return (part == "vision" and config.freeze_vision) or (part == "merger" and config.freeze_merger)


def adaptable(part: Part, config: ModelConfig) -> bool:
    """Whether a layer of ``part`` may get an adapter: not in a frozen part, nor the merger (whole or
    frozen)."""
    return part == "language" or (part == "vision" and not config.freeze_vision)


def lora_targets(model: PreTrainedModel, config: ModelConfig) -> list[str]:
    """The full names of the layers ``model.lora.target_modules`` names, outside the frozen parts and the
    merger (which trains whole). Each name must find a layer there: a typo would otherwise train less than
    asked, silently."""
    assert config.lora is not None
    layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    targets = []
    for wanted in config.lora.target_modules:
        matching = [name for name in layers if name.split(".")[-1] == wanted]
        if not matching:
            choices = sorted({name.split(".")[-1] for name in layers})
            raise ConfigError(
                f"model.lora.target_modules: {wanted!r} names no linear layer of {config.path}; "
                f"choose from {choices}"
            )
        allowed = [name for name in matching if adaptable(model_part(name), config)]
        if not allowed:
            raise ConfigError(
                f"model.lora.target_modules: {wanted!r} names only layers of the vision tower, which "
                "model.freeze_vision keeps frozen, or of the merger (model.freeze_merger decides whether it "
                "trains): nothing to adapt"
            )
        targets.extend(allowed)
    return targets


def merged_state(model: PeftModel) -> dict[str, Tensor]:
    """The weights ``merge_and_unload`` would leave, under the base model's names, computed into new
    tensors: the model itself is untouched (merging in place and back would round the base weights).

    The merger trained whole comes under its own name; the copy PEFT keeps of it, for the adapter-off
    reference, is left out."""
    base = model.get_base_model()
    deltas = {
        f"{name}.weight": layer.get_delta_weight(ADAPTER)
        for name, layer in base.named_modules()
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A
    }
    state = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")
        state[name] = tensor + deltas[name].to(tensor.dtype) if name in deltas else tensor
    return state
