"""Checkpoints: written to a temporary folder and renamed into place, so a crash never leaves half of one.

``run_dir/checkpoints/step-000050/`` holds the DeepSpeed engine state (model, optimizer, scheduler; one
shard per rank under ZeRO), ``policy/`` (full weights and processor as a Hugging Face folder: what
``cppo export`` copies) and ``trainer_state.json`` (step, policy version, data position). The RNG
states travel in the engine's client state. The last ``keep`` checkpoints are kept.

A LoRA run's checkpoint holds the adapter instead of the model: the engine state keeps only the trainable
tensors (the frozen ones are ``model.path``'s), and ``policy/`` is the adapter in PEFT's format, with the
processor. ``cppo export --merge`` turns it into a whole model.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftConfig, PeftModel
from transformers import ProcessorMixin

from shared.vlm import load_model, load_processor
from trainer.distributed import barrier, rank
from trainer.policy import Policy

PREFIX = "step-"
ENGINE_TAG = "engine"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read."""


@dataclass
class TrainerState:
    step: int
    policy_version: int
    data: dict[str, int]


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary folder is never listed)."""
    folder = checkpoint_dir(run_dir)
    return sorted(p for p in folder.glob(f"{PREFIX}*") if (p / "trainer_state.json").is_file())


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save(policy: Policy, processor: ProcessorMixin, run_dir: Path, state: TrainerState, keep: int) -> Path:
    """Write the checkpoint of ``state`` atomically; every rank calls it."""
    final = checkpoint_dir(run_dir) / f"{PREFIX}{state.step:06d}"
    partial = final.with_name(f".partial-{final.name}")
    if rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    policy.engine.save_checkpoint(
        str(partial),
        tag=ENGINE_TAG,
        client_state={"rng": rng_states()},
        exclude_frozen_parameters=policy.lora,
    )
    if policy.lora:
        policy.save_adapter(partial / "policy")
    else:
        with policy.full_weights() as weights:
            if weights is not None:
                policy.save_pretrained(partial / "policy", weights)
    if rank() == 0:
        processor.save_pretrained(partial / "policy")
        (partial / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    barrier()
    if rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve(run_dir: Path, resume: str) -> Path:
    """``latest`` is the run's newest checkpoint; anything else is a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"--resume latest: {checkpoint_dir(run_dir)} holds no checkpoint")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no trainer_state.json)")
    return path


def load(policy: Policy, path: Path) -> TrainerState:
    """Restore the engine, the RNGs and the trainer state from ``path``."""
    if is_adapter(path / "policy") != policy.lora:
        written = "a full fine-tuning run" if policy.lora else "a LoRA run"
        raise CheckpointError(f"{path} was written by {written}: set model.lora as that run did")
    # A LoRA checkpoint has no frozen tensors: those stay as model.path loaded them.
    loaded, client_state = policy.engine.load_checkpoint(
        str(path), tag=ENGINE_TAG, load_module_strict=not policy.lora
    )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state under {path}")
    restore_rng(client_state["rng"])
    raw = json.loads((path / "trainer_state.json").read_text())
    return TrainerState(step=raw["step"], policy_version=raw["policy_version"], data=raw["data"])


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a LoRA adapter (PEFT's format) rather than a whole model."""
    return (folder / "adapter_config.json").is_file()


def export(checkpoint: Path, out: Path, merge: bool = False) -> Path:
    """A folder of the checkpoint's policy with its processor: the whole model as a Hugging Face folder,
    or for a LoRA run its adapter (``PeftModel.from_pretrained`` loads it onto the base model it names),
    unless ``merge`` asks for the base model with the adapter merged in."""
    policy = checkpoint / "policy"
    if not (policy / "config.json").is_file() and not is_adapter(policy):
        raise CheckpointError(
            f"{checkpoint} is not a checkpoint (no policy/config.json or adapter_config.json)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if merge and is_adapter(policy):
        return write_merged(policy, out)
    for file in policy.iterdir():
        shutil.copy2(file, out / file.name)
    return out


def write_merged(adapter: Path, out: Path) -> Path:
    """A Hugging Face folder of the base model the adapter names (in its own dtype) with the adapter merged
    into its weights, and the processor saved beside the adapter."""
    base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    model = PeftModel.from_pretrained(load_model(base, dtype="auto"), str(adapter))
    model.merge_and_unload().save_pretrained(out)
    load_processor(adapter).save_pretrained(out)
    return out
