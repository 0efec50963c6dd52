"""The policy on a CUDA GPU, as a cluster runs it: bf16 under DeepSpeed over NCCL, CPPO's three passes.

Skipped where no CUDA device is present (``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.images import encode_image_data_url
from shared.perturbations import perturb
from shared.schemas import ChatMessage, ImagePart, ImageURL, PerturbedView, PromptRollout, Sample, TextPart
from shared.tiny_model import build_tiny_model
from shared.vlm import load_model, load_processor, suppressed_token_ids
from shared.weight_broadcast import checkpoint_tensors
from trainer.config import load_config
from trainer.data import Example
from trainer.distributed import init_distributed
from trainer.experience import collate, make_rows, prompt_inputs
from trainer.objective import ALGORITHMS, logprobs_and_entropy
from trainer.policy import Policy, teacher_forced_logits

pytestmark = pytest.mark.gpu

PASSES = ALGORITHMS["cppo"].passes


def _example(name: str, colour: tuple[int, int, int]) -> Example:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste(colour, (12, 12, 52, 52))
    parts = [
        ImagePart(type="image_url", image_url=ImageURL(url=encode_image_data_url(image))),
        TextPart(type="text", text="What colour is the shape?"),
    ]
    return Example(name, (ChatMessage(role="user", content=parts),), (image,), "red")


def _rollout(processor, example: Example, responses: list[list[int]], seed: int) -> PromptRollout:
    """A rollout as the server returns it for CPPO: the samples, and the prompt's I⁺ and I⁻ views."""
    ids = prompt_inputs(processor, example, {"clean": example.images})["clean"].input_ids.tolist()
    samples = [
        Sample(
            prompt_id=example.id,
            sample_index=i,
            token_ids=tokens,
            text="",
            logprobs=[-1.0] * len(tokens),
            finish_reason="stop",
            policy_version=0,
        )
        for i, tokens in enumerate(responses)
    ]
    views = []
    for kind in ("positive", "negative"):
        image, spec = perturb(example.images[0], kind, seed)
        views.append(PerturbedView(kind=kind, image_url=encode_image_data_url(image), spec=spec))
    return PromptRollout(prompt_id=example.id, prompt_token_ids=ids, samples=samples, views=views)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def _rows(processor) -> list:
    """Two prompts with two responses each, one rewarded; their CPPO rows with advantages ±0.7."""
    words = processor.tokenizer("red green blue yellow purple orange circle square").input_ids
    examples = [_example("a", (200, 30, 30)), _example("b", (30, 30, 200))]
    responses = {"a": [words[0:3], words[3:4]], "b": [words[4:6], words[1:4]]}
    rollouts = [_rollout(processor, e, responses[e.id], seed=7) for e in examples]
    rewards = {(e.id, i): (float(i == 0), {}) for e in examples for i in range(2)}
    rows = make_rows(processor, examples, rollouts, rewards, PASSES, seed=0)
    for row, advantage in zip(rows, (0.7, -0.7, 0.7, -0.7), strict=True):
        row.advantage = advantage
    return rows


def test_a_cppo_micro_step_in_bf16_on_cuda(tiny):
    assert torch.cuda.is_available()
    processor = load_processor(tiny)
    rows = _rows(processor)
    batch = collate(rows, PASSES, processor.tokenizer.pad_token_id)

    init_distributed()
    config = load_config(
        None,
        [f"model.path={tiny}", "objective.algorithm=cppo", "train.micro_batch_size=4", "train.lr=1e-3"],
    )
    suppressed = suppressed_token_ids(processor.tokenizer)
    policy = Policy(config, 1, suppressed)
    assert policy.dtype == torch.bfloat16 and policy.engine.device.type == "cuda"
    assert policy.deepspeed_config["bf16"]["enabled"]

    # The bf16 GPU passes agree with an fp32 CPU reference to bf16's precision.
    reference = load_model(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        for name in PASSES:
            gpu_logp, gpu_entropy = policy.score_old(batch, (name,))[name]
            logits = teacher_forced_logits(
                reference, batch.inputs[name], batch.owner, batch.response_ids, torch.float32
            )
            cpu_logp, cpu_entropy = logprobs_and_entropy(
                logits, batch.response_ids, config.rollout.temperature, suppressed
            )
            valid = batch.response_mask
            torch.testing.assert_close(gpu_logp.cpu()[valid], cpu_logp[valid], atol=0.05, rtol=0.02)
            torch.testing.assert_close(gpu_entropy.cpu()[valid], cpu_entropy[valid], atol=0.05, rtol=0.02)

    before = {n: p.detach().float().cpu().clone() for n, p in policy.engine.module.named_parameters()}
    metrics = policy.micro_step(batch, None, 1.0, None)
    for name in ("loss", "pg_loss", "cpl_loss", "perception_token_fraction", "entropy_shift_mean"):
        assert torch.isfinite(torch.tensor(metrics[name])).all(), (name, metrics)
    # One fraction per response.
    assert len(metrics["perception_token_fraction"]) == len(rows)
    assert all(0.0 <= f <= 1.0 for f in metrics["perception_token_fraction"])
    assert torch.isfinite(torch.tensor(policy.grad_norm())) and policy.grad_norm() > 0
    changed = [
        n
        for n, p in policy.engine.module.named_parameters()
        if not torch.equal(p.detach().float().cpu(), before[n])
    ]
    assert changed, "the optimizer step changed no weight"
    with policy.full_weights() as state:
        assert state is not None and all(t.device.type == "cpu" for t in state.values())


@pytest.mark.parametrize(
    "options",
    [
        ["deepspeed.zero_stage=3"],
        ["model.lora={}"],
        ["model.lora={}", "deepspeed.zero_stage=3"],
    ],
    ids=["zero3", "lora", "lora-zero3"],
)
def test_lora_and_zero3_train_with_a_reference_and_publish_the_checkpoint_names_on_cuda(tiny, options):
    """β > 0: the reference is a sharded engine (ZeRO-3) or the adapter switched off (LoRA); its KL starts
    at zero, the step trains, and the published weights have the checkpoint's names and shapes."""
    processor = load_processor(tiny)
    batch = collate(_rows(processor), PASSES, processor.tokenizer.pad_token_id)
    init_distributed()
    overrides = [f"model.path={tiny}", "objective.beta=0.01", "train.micro_batch_size=4", "train.lr=1e-3"]
    policy = Policy(load_config(None, [*overrides, *options]), 1, suppressed_token_ids(processor.tokenizer))
    assert policy.engine.device.type == "cuda"
    metrics = policy.micro_step(batch, None, 1.0, None)
    assert metrics["kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and policy.grad_norm() > 0
    on_disk = load_model(tiny, dtype=torch.float32).state_dict()
    with policy.full_weights() as state:
        published = checkpoint_tensors(policy.model, state)
    expected = checkpoint_tensors(load_model(tiny, dtype=torch.float32), on_disk)
    assert {n: tuple(t.shape) for n, t in published.items()} == {
        n: tuple(t.shape) for n, t in expected.items()
    }
