"""ZeRO-3 from the start, in one process: the policy and the reference load already partitioned, the weights
they publish carry the checkpoint's own names and values, and the reference scores as the policy does before
any step. (Two processes: ``test_trainer_e2e.py``'s ZeRO-3 run under ``accelerate launch``.)"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch
from PIL import Image
from safetensors.torch import load_file

from shared.images import encode_image_data_url
from shared.schemas import ChatMessage, ImagePart, ImageURL, TextPart
from shared.vlm import load_processor, suppressed_token_ids
from shared.weight_broadcast import checkpoint_tensors
from trainer.config import load_config
from trainer.data import Example
from trainer.distributed import init_distributed
from trainer.experience import Batch, Row, collate, prompt_inputs
from trainer.policy import Policy, response_logprobs


def _policy(tiny: Path, *overrides: str) -> Policy:
    init_distributed()
    config = load_config(None, [f"model.path={tiny}", "train.micro_batch_size=4", *overrides])
    return Policy(config, 1, suppressed_token_ids(load_processor(tiny).tokenizer))


def one_batch(tiny: Path) -> Batch:
    """Two responses of three tokens to one image prompt."""
    processor = load_processor(tiny)
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    parts = [
        ImagePart(type="image_url", image_url=ImageURL(url=encode_image_data_url(image))),
        TextPart(type="text", text="What colour?"),
    ]
    example = Example("a", (ChatMessage(role="user", content=parts),), (image,), "red")
    inputs = prompt_inputs(processor, example, {"clean": (image,)})
    rows = [Row("a", inputs, ids, [0.0] * 3, 1.0) for ids in ([5, 6, 7], [8, 9, 10])]
    return collate(rows, ("clean",), processor.tokenizer.pad_token_id)


def _partitioned(module: torch.nn.Module) -> bool:
    """Every parameter is a ZeRO-3 placeholder: its data lives in the partitions, not in the module."""
    return all(hasattr(p, "ds_id") and p.numel() == 0 for p in module.parameters())


def test_zero3_builds_the_policy_and_the_reference_partitioned_and_publishes_the_checkpoint_names(tiny):
    policy = _policy(tiny, "deepspeed.zero_stage=3", "objective.beta=0.01")
    assert _partitioned(policy.engine.module)
    assert isinstance(policy.reference, deepspeed.DeepSpeedEngine) and _partitioned(policy.reference.module)
    on_disk = load_file(tiny / "model.safetensors")
    with policy.full_weights() as weights:
        published = checkpoint_tensors(policy.engine.module, weights)
    # Not `model.model.layers.*`: the names a rollout server's checkpoint has, with the values it has.
    assert published.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        torch.testing.assert_close(published[name], tensor, msg=name)


def test_the_zero3_reference_scores_as_the_policy_before_any_step(tiny):
    policy = _policy(tiny, "deepspeed.zero_stage=3", "objective.beta=0.01")
    batch = one_batch(tiny)
    logp, _ = policy.score_old(batch, ("clean",))["clean"]
    with torch.no_grad():
        logp_ref, _ = response_logprobs(
            policy.reference, batch, "clean", policy.dtype, policy.temperature, policy.suppressed_ids
        )
    assert logp.shape == batch.response_ids.shape
    torch.testing.assert_close(logp_ref, logp)
